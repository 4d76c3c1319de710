"""``ModelSpec``: one model's settings, as clembench's registry entries define them."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any


class ModelSpec(Mapping[str, Any]):
    """An immutable model specification with attribute and item access.

    Mirrors clembench's ``backends.ModelSpec``: built from a registry entry or a
    dict (``from_dict``), from a bare name (``from_name``), and unified with a
    registry entry (``unify``), failing when the two disagree on a key.
    """

    __slots__ = ("_data",)

    def __init__(self, **data: Any) -> None:
        object.__setattr__(self, "_data", dict(data))

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> ModelSpec:
        return cls(**dict(spec))

    @classmethod
    def from_name(cls, model_name: str) -> ModelSpec:
        if not model_name:
            raise ValueError("a ModelSpec needs a non-empty model_name")
        return cls(model_name=model_name)

    def unify(self, other: ModelSpec | Mapping[str, Any]) -> ModelSpec:
        """Merge two specs; every key they share must agree (nested dicts recursively)."""
        return ModelSpec(**_unify(dict(self._data), dict(other), path=""))

    def to_dict(self) -> dict[str, Any]:
        return dict(self._data)

    def to_string(self) -> str:
        return json.dumps(self._data, separators=(",", ":"))

    # Attribute access: spec.huggingface_id
    def __getattr__(self, name: str) -> Any:
        try:
            return self._data[name]
        except KeyError:
            raise AttributeError(f"ModelSpec has no {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("ModelSpec is immutable; use unify() or from_dict()")

    # Mapping protocol: spec["huggingface_id"], "eos_to_cull" in spec, spec.get(...)
    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ModelSpec):
            return bool(self._data == other._data)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.to_string())

    def __repr__(self) -> str:
        return f"ModelSpec({self._data!r})"

    def has_attr(self, name: str) -> bool:
        """clembench's spelling of ``name in spec``."""
        return name in self._data


def _unify(left: dict[str, Any], right: dict[str, Any], path: str) -> dict[str, Any]:
    merged = dict(left)
    for key, value in right.items():
        if key not in merged:
            merged[key] = value
            continue
        mine = merged[key]
        if isinstance(mine, Mapping) and isinstance(value, Mapping):
            merged[key] = _unify(dict(mine), dict(value), path=f"{path}{key}.")
        elif mine != value:
            raise ValueError(f"specs disagree on {path}{key}: {mine!r} vs {value!r}")
    return merged


def parse_context_size(value: int | str) -> int:
    """``8192``, ``"8k"`` or ``"1m"`` as a number of tokens (clembench's notation)."""
    if isinstance(value, int):
        return value
    text = value.strip().lower()
    factor = {"k": 1024, "m": 1024 * 1024}.get(text[-1:], 1)
    return int(text.rstrip("km")) * factor
