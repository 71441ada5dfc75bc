"""Model evaluations kept by content, so the same model is evaluated once.

A run evaluates its reference (the retain model) and the model before unlearning before it
trains (~3.5 min each for SmolLM2-135M on the real forget01 on this CPU), and a re-run, a resumed
run or the next run from the same model would do it again. A result depends only on the model's
files, the evaluation's data and settings, the reference's values, the device, and the code that
scores and aggregates; the key below hashes all of them, so any change among them means a fresh
evaluation, never a stale hit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, replace
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


def evaluation_key(folder: str | Path, settings, data, device: str, reference=None) -> str:
    """The key of ``folder``'s evaluation under ``settings`` on ``data`` (the loaded evaluation
    data: its repr holds every record) and ``device``, against ``reference`` (an
    ``EvalReference``: the values forget quality and privleak are computed from) if given.

    The data's content counts, not its folder: the same records elsewhere (each run's own copy of
    generated data, say) give the same key."""
    folder = Path(folder)
    digest = hashlib.sha256(_code_digest().encode())
    digest.update(json.dumps({**asdict(settings), "data": None}, sort_keys=True).encode())
    digest.update(device.encode() + repr(replace(data, source=None)).encode())
    if reference is not None:
        digest.update(json.dumps([reference.benchmark, reference.forget_split, reference.truth_ratios,
                                  reference.mia_auc]).encode())
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + _file_digest(path))
    return digest.hexdigest()


def cache_folder() -> Path:
    from unlearn.models import cache_dir

    return cache_dir() / "evals"


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
