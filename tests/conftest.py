"""Fixtures shared by the tests: one finetuned tiny target and retain model per session, a
one-rank process group for FSDP2 in the test process, and bench scripts loaded as modules."""

import os

import pytest

from unlearn.config import build_config
from unlearn.workflow import resolve_source, run_finetune

# Ray Train's preemption watcher is one more actor process per pipeline run, and no test drains a
# node (~2 s a run here). Set before any Ray process starts, so every one inherits it.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


@pytest.fixture(scope="session")
def bench_script():
    """``bench_script(name)``: ``bench/<name>.py`` as a module, loaded from its path (``bench/`` is
    scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def finetuned(tmp_path_factory):
    """``(cfg, report, data_source)``: the demo's defaults, finetuned once (~20-60 s)."""
    out = tmp_path_factory.mktemp("finetuned")
    cfg = build_config({}, [f"output_dir={out}"])
    return cfg, run_finetune(cfg, progress=False), resolve_source(cfg)


@pytest.fixture
def single_rank_group(monkeypatch):
    """A one-rank gloo process group, so FSDP2 runs in this process; destroyed after the test."""
    import socket

    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.barrier()
    dist.destroy_process_group()
