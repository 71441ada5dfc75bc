"""Which Ray a command joins: the address that ``ray start`` left on this machine only while a
cluster answers there, else a local instance of its own."""

import logging
import socket
import time

import pytest

ray = pytest.importorskip("ray")

from pipelines import ray_env  # noqa: E402


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
    address_file.write_text(listening)
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    ray_env.ensure_ray()
    assert init_calls[0]["address"] == "ray://head:10001"
