"""Fixtures shared by the slow tests: one finetuned tiny target and retain model per session."""

import pytest

from unlearn.config import build_config
from unlearn.workflow import resolve_source, run_finetune


@pytest.fixture(scope="session")
def finetuned(tmp_path_factory):
    """``(cfg, report, data_source)``: the demo's defaults, finetuned once (~20-60 s)."""
    out = tmp_path_factory.mktemp("finetuned")
    cfg = build_config({}, [f"output_dir={out}"])
    return cfg, run_finetune(cfg, progress=False), resolve_source(cfg)
