"""Reference evaluations kept by content, so the same retain model is evaluated once.

A run with a retain model as its reference evaluates that model before anything else (~3.5 min
for SmolLM2-135M on the real forget01 on this CPU). Its result depends only on the model's files,
the evaluation's data and settings, the device, and the code that scores and aggregates; the key
below hashes all of them, so any change among them means a fresh evaluation, never a stale hit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)

#: Source files whose change can change an evaluation's numbers (the data it reads is hashed
#: separately, as loaded).
_CODE = ("eval", "models.py", "data")


@lru_cache(maxsize=1)
def _code_digest() -> str:
    import torch
    import transformers

    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256(f"torch {torch.__version__} transformers {transformers.__version__}".encode())
    for name in _CODE:
        root = package / name
        for path in sorted(root.rglob("*.py")) if root.is_dir() else [root]:
            digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _file_digest(path: Path) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 22), b""):
            digest.update(chunk)
    return digest.digest()


def reference_key(folder: str | Path, settings, data, device: str) -> str:
    """The key of ``folder``'s evaluation under ``settings`` on ``data`` (the loaded evaluation
    data: its repr holds every record) and ``device``."""
    folder = Path(folder)
    digest = hashlib.sha256(_code_digest().encode())
    digest.update(json.dumps(asdict(settings), sort_keys=True).encode())
    digest.update(device.encode() + repr(data).encode())
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + _file_digest(path))
    return digest.hexdigest()


def cache_folder() -> Path:
    from unlearn.models import cache_dir

    return cache_dir() / "reference-evals"


def cached_result(key: str) -> dict | None:
    path = cache_folder() / f"{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):  # absent, or written by a run that died mid-write
        return None


def store_result(key: str, result: dict) -> Path:
    """Write atomically: runs in parallel may store the same key."""
    folder = cache_folder()
    folder.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(handle, "w") as stream:
        json.dump(result, stream)
    path = folder / f"{key}.json"
    os.replace(tmp, path)
    return path
