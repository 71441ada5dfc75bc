"""Which Ray a command joins: ``RAY_ADDRESS`` (refused at once when dead), else the address that
``ray start`` left on this machine only while a cluster answers there, else a local instance."""

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from pipelines import ray_env  # noqa: E402
from pipelines.errors import PipelineError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def address_file(tmp_path, monkeypatch):
    """Ray's address file under a temp dir of this test's own (Ray reads ``RAY_TMPDIR``)."""
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "ray").mkdir()
    return tmp_path / "ray" / "ray_current_cluster"


@pytest.fixture
def listening():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield f"127.0.0.1:{server.getsockname()[1]}"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def init_calls(monkeypatch):
    """``ray.init``'s arguments, without starting anything."""
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    return calls


def test_no_address_file_means_no_running_cluster(address_file):
    assert ray_env.recorded_cluster_address() is None
    assert ray_env.running_local_cluster() is None


def test_a_cluster_that_answers_is_joined(address_file, listening):
    address_file.write_text(listening + "\n")
    assert ray_env.recorded_cluster_address() == listening
    assert ray_env.running_local_cluster() == listening


def test_a_dead_recorded_cluster_is_passed_over_at_once_with_a_warning(address_file, caplog):
    dead = f"127.0.0.1:{closed_port()}"
    address_file.write_text(dead)
    started = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger=ray_env.log.name):
        assert ray_env.running_local_cluster() is None
    assert time.perf_counter() - started < 2
    assert dead in caplog.text and "does not answer" in caplog.text


def test_ensure_ray_starts_its_own_instance_beside_a_dead_address(address_file, init_calls):
    address_file.write_text(f"127.0.0.1:{closed_port()}")
    ray_env.ensure_ray(num_cpus=2)
    [call] = init_calls
    assert call["address"] == "local" and call["num_cpus"] == 2


def test_ensure_ray_joins_a_running_cluster_without_sizing_it(address_file, listening, init_calls):
    address_file.write_text(listening)
    ray_env.ensure_ray(num_cpus=2)
    [call] = init_calls
    assert call["address"] == listening and "num_cpus" not in call


def test_ray_address_wins_over_the_address_file(address_file, listening, init_calls, monkeypatch):
    address_file.write_text(listening)  # a live cluster that would be joined without RAY_ADDRESS
    monkeypatch.setenv("RAY_ADDRESS", f"ray://{listening}")
    ray_env.ensure_ray()
    assert init_calls[0]["address"] == f"ray://{listening}"


def test_a_dead_ray_address_is_refused_at_once_naming_it(monkeypatch, init_calls):
    dead = f"127.0.0.1:{closed_port()}"
    for address in (dead, f"ray://{dead}"):
        monkeypatch.setenv("RAY_ADDRESS", address)
        started = time.perf_counter()
        with pytest.raises(PipelineError, match=f"RAY_ADDRESS={address}: no Ray cluster answers there"):
            ray_env.ensure_ray()
        assert time.perf_counter() - started < 2
    assert init_calls == []


@pytest.mark.parametrize("address", ["auto", "local", "http://127.0.0.1:1"])
def test_addresses_without_a_port_to_try_go_to_ray_as_they_are(monkeypatch, init_calls, address):
    monkeypatch.setenv("RAY_ADDRESS", address)
    ray_env.ensure_ray()
    assert init_calls[0]["address"] == address


def test_unlearn_run_on_a_dead_ray_address_fails_in_seconds_with_one_line(tmp_path):
    """As a user meets it: a cluster that is down, the CLI from another directory."""
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{closed_port()}", "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    started = time.perf_counter()
    config = REPO / "configs" / "tofu_tiny.yaml"
    done = subprocess.run([sys.executable, "-m", "unlearn.cli", "run", str(config),
                           f"output_dir={tmp_path / 'out'}", "--model", "tiny"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    assert "error: RAY_ADDRESS=127.0.0.1:" in done.stderr and "Traceback" not in done.stderr
    assert time.perf_counter() - started < 60
