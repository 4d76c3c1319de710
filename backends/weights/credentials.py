"""Credentials from clembench's ``key.json``: Hugging Face tokens for gated models, upstream servers' keys.

Sources, in clembench's order: ``key.json`` in the working directory, then
``~/.clemcore/key.json`` (``{"huggingface": {"api_key": "..."}}``,
``{"openai_compatible": {"api_key": "...", "base_url": "..."}}``), then, for
Hugging Face, the ``HF_TOKEN`` environment variable. Keys are never logged;
messages name only where they were looked for.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from backends.errors import CredentialsError

logger = logging.getLogger(__name__)


def key_file_locations(cwd: Path | None = None, home: Path | None = None) -> list[Path]:
    return [(cwd or Path.cwd()) / "key.json", (home or Path.home()) / ".clemcore" / "key.json"]


def key_section(name: str, cwd: Path | None = None, home: Path | None = None) -> tuple[dict[str, Any], Path | None]:
    """The ``name`` section of the first key file that has one, and that file; ``({}, None)`` if none does."""
    for path in key_file_locations(cwd, home):
        if not path.is_file():
            continue
        try:
            keys = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            logger.warning("cannot read %s: %s", path, type(exc).__name__)
            continue
        section = keys.get(name) if isinstance(keys, dict) else None
        if isinstance(section, dict):
            return section, path
    return {}, None


def huggingface_token(cwd: Path | None = None, home: Path | None = None) -> str:
    """The Hugging Face token for a gated model, or ``CredentialsError`` saying where we looked."""
    locations = key_file_locations(cwd, home)
    section, path = key_section("huggingface", cwd, home)
    token = section.get("api_key")
    if isinstance(token, str) and token:
        logger.debug("using the Hugging Face token from %s", path)
        return token
    token = os.environ.get("HF_TOKEN", "")
    if token:
        logger.debug("using the Hugging Face token from HF_TOKEN")
        return token
    where = ", ".join(str(p) for p in locations)
    raise CredentialsError(
        "This model is gated (requires_api_key is true) but no Hugging Face token was found: "
        f'put {{"huggingface": {{"api_key": "hf_..."}}}} in one of {where}, or set HF_TOKEN'
    )
