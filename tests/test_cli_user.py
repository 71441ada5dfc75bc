"""The CLI as a user runs it: the installed ``unlearn`` command, from a fresh working directory,
with the default (relative) output and relative model, reference and config paths.

Ray workers do not share the driver's working directory, so this is where a relative path that
reaches a worker unresolved fails (the README's first command did, on a fresh clone).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")

BIN = Path(sys.executable).parent
# One Ray Train worker: the test is about paths reaching the workers; FSDP is test_pipeline's, and the
# demo's defaults run in CI's `make demo`.
QUICK = ["finetune.epochs=2", "train.epochs=1", "eval.max_new_tokens=8", "ray.num_workers=1"]


def _unlearn(args, cwd, timeout=900):
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    done = subprocess.run([str(BIN / "unlearn"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stdout


@pytest.mark.slow
def test_demo_then_run_from_a_fresh_directory_with_relative_paths(tmp_path):
    printed = _unlearn(["demo", *QUICK], cwd=tmp_path)  # default output: outputs/demo
    demo = tmp_path / "outputs" / "demo"
    summary = json.loads((demo / "summary.json").read_text())
    assert summary["model_dir"] == str(demo / "unlearned")
    assert (demo / "unlearned" / "config.json").is_file()
    assert summary["mlflow_tracking_uri"] == f"sqlite:///{tmp_path}/mlflow.db" and summary["mlflow_run_id"]
    assert "forget_quality" in printed and "gate:" in printed and "mlflow ui --backend-store-uri" in printed
    for stage in ("before", "after"):
        assert {"forget_quality", "model_utility", "forget_prob", "privleak"} <= set(summary[stage])
    assert summary["before"]["forget_quality"] is not None  # the retain model is the reference

    # a config with relative paths inside, given by a relative path, from the same directory
    (tmp_path / "run.yaml").write_text("run_name: relative-run\noutput_dir: outputs/run\n"
                                       "data:\n  source: outputs/demo/data/tofu-seed0\n"
                                       "eval:\n  before: false\n  max_new_tokens: 8\n"
                                       "train:\n  epochs: 1\nregistry:\n  model_name: null\n"
                                       "ray:\n  num_workers: 1\n")
    printed = _unlearn(["run", "run.yaml", "--model", "outputs/demo/target",
                        "--reference", "outputs/demo/retain"], cwd=tmp_path)
    run = tmp_path / "outputs" / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model_dir"] == str(run / "unlearned") and (run / "unlearned" / "config.json").is_file()
    assert summary["data"] == str(demo / "data" / "tofu-seed0")
    assert summary["after"]["forget_quality"] is not None  # the relative reference was found
    assert (run / "eval" / "reference.json").is_file()
    assert "MLflow run" in printed and "(new)" in printed
