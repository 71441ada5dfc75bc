"""`ray job submit` end to end: a local head with token authentication runs `unlearn run`.

The test starts its own head (``RAY_AUTH_MODE=token`` and a fresh token on both sides), submits
the README's command on a small config, waits for SUCCEEDED, finds the run and its step metrics
in MLflow, and stops the head it started.
"""

import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ray(args, env, timeout=300, check=True):
    return subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=check)


@pytest.fixture
def head(tmp_path):
    ray.shutdown()  # `ray stop` below stops every Ray process of this machine, ours included
    token = secrets.token_hex(16)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    dashboard = _free_port()
    _ray(["start", "--head", f"--port={_free_port()}", "--num-cpus=2", "--include-dashboard=true",
          "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--disable-usage-stats"], env)
    try:
        yield env, f"http://127.0.0.1:{dashboard}"
    finally:
        _ray(["stop", "--force"], env, check=False)


@pytest.mark.slow
def test_ray_job_submit_runs_the_pipeline_with_token_auth(head, tmp_path):
    env, address = head
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    job = "unlearn-test-job"
    command = [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", job,
               "--working-dir", str(REPO), "--runtime-env", str(REPO / "cluster" / "runtime_env.yaml"),
               "--", "unlearn", "run", "configs/tofu_tiny.yaml", "output_dir=outputs/job-test",
               "run_name=job-test", f"mlflow.tracking_uri={uri}", "train.epochs=1", "eval.before=false",
               "eval.max_new_tokens=8", "ray.num_workers=1"]
    # without the token the head refuses the submission
    no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    no_token["RAY_AUTH_TOKEN"] = "0" * 32
    refused = subprocess.run(command[:5] + ["--no-wait", "--", "true"], env=no_token, capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode != 0
    submitted = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    logs = submitted.stdout[-4000:] + submitted.stderr[-4000:]
    status = _ray(["job", "status", "--address", address, job], env, check=False)
    assert "succeeded" in (status.stdout + status.stderr).lower(), logs + status.stdout + status.stderr

    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="tags.`unlearn.run_name` = 'job-test'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = client.get_metric_history(runs[0].info.run_id, "forget_loss")
    assert len(steps) >= 1 and "after.forget_prob" in runs[0].data.metrics
    # the relative output_dir means the job's working directory (Ray's copy of the repository)
    out = Path(runs[0].data.tags["unlearn.output_dir"])
    assert out.is_absolute() and out.parts[-2:] == ("outputs", "job-test") and REPO not in out.parents
    assert (out / "unlearned" / "config.json").is_file()
