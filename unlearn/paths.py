"""Paths a user gives are made absolute once, on the driver, before anything reaches Ray.

Ray Train workers, Ray Data actors, Tune trials and Serve replicas do not run in the driver's
working directory, so a relative path (``outputs/demo/target``) means something else there.
Under ``ray job submit --working-dir .`` the driver runs in the job's working directory, and so
relative paths mean that directory. URIs (``s3://``, ``gs://``, ``models:/``, ``runs:/``), hub ids
(``owner/name`` that is not a local path) and the named models and sources (``tiny``,
``smollm2-135m``, ``synthetic``) pass through unchanged.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

URI_SCHEMES = ("models:/", "runs:/")
SQLITE = "sqlite:///"
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".gguf", ".safetensors", ".yaml", ".yml")
NAMED_SOURCES = frozenset({"synthetic"})


def is_uri(spec: str) -> bool:
    return "://" in spec or spec.startswith(URI_SCHEMES)


def looks_like_hub_id(spec: str) -> bool:
    """``owner/name``: a Hugging Face hub model or data set (when it is not a local path)."""
    return bool(HUB_ID.fullmatch(spec)) and not spec.startswith(".") and not spec.endswith(FILE_SUFFIXES)


def absolute_path(path: str | os.PathLike, base: str | os.PathLike | None = None) -> str:
    """A local path made absolute against ``base`` (default: the working directory); a URI as is."""
    text = os.fspath(path)
    if is_uri(text):
        return text
    full = Path(text).expanduser()
    if not full.is_absolute():
        full = Path(base or os.getcwd()) / full
    return os.path.normpath(full)


def absolute_spec(spec: str | None, base: str | os.PathLike | None = None, *,
                  named: set[str] | frozenset[str] = frozenset()) -> str | None:
    """A model or data spec: a local path (existing, or not a hub id) made absolute; named specs,
    URIs and hub ids unchanged."""
    if spec is None or spec.strip().lower() in named or is_uri(spec):
        return spec
    full = absolute_path(spec, base)
    if Path(full).exists() or not looks_like_hub_id(spec):
        return full
    return spec


def absolute_tracking_uri(uri: str, base: str | os.PathLike | None = None) -> str:
    """An MLflow URI; a relative ``sqlite:///file.db`` is made absolute (every process, one file)."""
    if uri.startswith(SQLITE) and not uri.startswith(SQLITE + "/"):
        return SQLITE + absolute_path(uri[len(SQLITE):], base)
    return uri


def absolute_model(spec: str | None, base: str | os.PathLike | None = None) -> str | None:
    from unlearn.models import SMOLLM2_ALIASES, TINY_ALIASES

    return absolute_spec(spec, base, named=TINY_ALIASES | SMOLLM2_ALIASES)


def absolute_source(spec: str | None, base: str | os.PathLike | None = None) -> str | None:
    return absolute_spec(spec, base, named=NAMED_SOURCES)
