"""Editing a registry file in place: one entry added, replaced or deleted, as a person would by hand.

The file keeps its layout: every other entry exactly as written (flat or under ``model_config``), the key
order of each entry, the indentation. A save is atomic (a temporary file in the same folder, renamed over the
original), keeps the previous version beside it (``model_registry.json.bak``), and happens only when the file
is still the version the edit started from (its ``version``, a hash of its bytes): two people editing at
once never lose each other's changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from backends.registry.entries import Problem, RegistryFileError, bundled_registry_path, flatten_entry, validate_entry


class RegistryEditError(Exception):
    """An edit that cannot be made: ``status`` 400 (the entry is invalid), 404, 409 (stale or not editable)."""

    def __init__(self, status: int, message: str, problems: tuple[Problem, ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.problems = problems


def version_of(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()[:32]


def indentation_of(text: str) -> int | str:
    """The indentation of the file's first indented line (what ``json.dumps`` takes); 2 for a one-line file."""
    match = re.search(r"\n([ \t]+)\S", text)
    if match is None:
        return 2
    whitespace = match[1]
    return len(whitespace) if set(whitespace) == {" "} else whitespace


def entry_name(entry: Any) -> str | None:
    """The ``model_name`` of a raw entry, flat or under ``model_config``."""
    if not isinstance(entry, Mapping):
        return None
    name = entry.get("model_name")
    if name is None and isinstance(entry.get("model_config"), Mapping):
        name = entry["model_config"].get("model_name")
    return name if isinstance(name, str) else None


def check_entry(entry: Any) -> tuple[Problem, ...]:
    """Every problem of one entry, by the same rules as ``clemproxy check``; warnings do not stop a save."""
    if not isinstance(entry, Mapping):
        return (Problem("error", f"an entry must be a JSON object, got {type(entry).__name__}"),)
    flat, problems = flatten_entry(entry)
    return tuple(p for p in [*problems, *validate_entry(flat)] if p.severity == "error")


class RegistryFile:
    """One registry file that edits are written to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()  # one edit at a time: each reads, changes and writes the whole file

    def refusal(self) -> str | None:
        """Why this file cannot be edited, or None."""
        try:
            bundled = self.path.resolve() == bundled_registry_path().resolve()
        except OSError:
            bundled = False
        if bundled:
            return (
                f"{self.path} is the registry bundled with clemproxy; start the server with --registry PATH "
                "(or a model_registry.json in its working directory) to edit a registry of your own"
            )
        if not os.access(self.path, os.W_OK) or not os.access(self.path.parent, os.W_OK):
            return f"{self.path} is not writable by this server (the file and its folder must be)"
        return None

    def read(self) -> tuple[list[Any], str, str]:
        """The entries as written, the file's version, and its text."""
        try:
            content = self.path.read_bytes()
        except OSError as exc:
            raise RegistryFileError(f"{self.path}: cannot read registry file: {exc.strerror or exc}") from exc
        text = content.decode("utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RegistryFileError(f"{self.path}: not valid JSON: {exc.msg} at line {exc.lineno}") from exc
        entries = data if isinstance(data, list) else [data]
        return entries, version_of(content), text

    def put(self, name: str, entry: Any, if_match: str | None) -> str:
        """Add the entry, or replace the entry of that name where it stands; the new version."""
        problems = check_entry(entry)
        if entry_name(entry) != name and not problems:
            problems = (Problem("error", f"must be {name!r}, the name in the address", "model_name"),)
        if problems:
            listed = "; ".join(str(p) for p in problems)
            raise RegistryEditError(400, f"The entry for '{name}' is invalid: {listed}", problems)
        with self._lock:
            entries, text = self._editable(if_match)
            index = next((i for i, e in enumerate(entries) if entry_name(e) == name), None)
            if index is None:
                entries.append(dict(entry))
            else:
                entries[index] = dict(entry)
            return self._save(entries, text)

    def delete(self, name: str, if_match: str | None) -> str:
        with self._lock:
            entries, text = self._editable(if_match)
            kept = [e for e in entries if entry_name(e) != name]
            if len(kept) == len(entries):
                raise RegistryEditError(404, f"{self.path} has no entry named '{name}'")
            return self._save(kept, text)

    def _editable(self, if_match: str | None) -> tuple[list[Any], str]:
        """The entries and text of the file, when it may be edited and is still the version ``if_match`` names."""
        refusal = self.refusal()
        if refusal is not None:
            raise RegistryEditError(409, refusal)
        entries, version, text = self.read()
        if if_match is not None and if_match.strip('"') != version:
            raise RegistryEditError(
                409,
                f"{self.path} changed since this edit began (version {if_match.strip(chr(34))}, now {version}); "
                "reload it and edit again",
            )
        return entries, text

    def _save(self, entries: list[Any], old_text: str) -> str:
        """Write a temporary file beside the original, then rename it over it; the old text goes to ``.bak``."""
        new_text = json.dumps(entries, indent=indentation_of(old_text), ensure_ascii=False)
        if old_text.endswith("\n"):
            new_text += "\n"
        backup = self.path.with_name(self.path.name + ".bak")
        backup.write_text(old_text, encoding="utf-8")
        descriptor, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                handle.write(new_text)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(temporary, self.path.stat().st_mode & 0o777)
            replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return version_of(new_text.encode("utf-8"))


def replace(source: str, target: Path) -> None:
    """The atomic step of a save (its own function, so that a test can crash a save just before it)."""
    os.replace(source, target)
