"""The registry against a real MLflow tracking server with basic auth: an admin, a pipeline user and
a read-only user. The server process is started and stopped by this module."""

import contextlib
import multiprocessing
import os
import queue as queues
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from pipelines.evidence import verify_version
from pipelines.registry import CHAMPION, PromotionRefused, judge_and_register, promote

USERS = {"admin": "admin-password-1", "pipeline": "pipeline-password-1", "reader": "reader-password-1"}
RULES = ["forget_quality >= 0.05", "privleak within [-25, 25]"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def as_user(name: str):
    """MLflow's standard credential variables, set for ``name`` while the block runs."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ.update(MLFLOW_TRACKING_USERNAME=name, MLFLOW_TRACKING_PASSWORD=USERS[name])
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    ini = root / "basic_auth.ini"
    ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{root / 'auth.db'}\n"
                   f"admin_username = admin\nadmin_password = {USERS['admin']}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                   "auth_cache_ttl_seconds = 60\n")  # each password check costs ~0.4 s of CPU otherwise
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env.update(MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_FLASK_SERVER_SECRET_KEY="test-csrf-key",
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with open(root / "server.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
             "--port", str(port), "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts"), "--workers", "2"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, (root / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the MLflow server did not start in 120 s"
                time.sleep(0.5)
        from mlflow.server import get_app_client

        with as_user("admin"):
            admin = get_app_client("basic-auth", tracking_uri=url)
            for name in ("pipeline", "reader"):
                admin.create_user(name, USERS[name])
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def register(url: str, model_name: str, forget_quality: float, folder: str) -> str | None:
    """What a pipeline does at its end, against the server: log the model, gate it, register it."""
    import mlflow
    from mlflow import MlflowClient

    from pipelines.models import log_hf_model

    mlflow.set_tracking_uri(url)
    mlflow.set_experiment(f"pipelines-{model_name}")  # the Default experiment is not writable
    after = {"forget_quality": forget_quality, "privleak": 0.0}
    with mlflow.start_run() as run:
        model_uri = log_hf_model(folder).model_uri
    lineage = {"base_model": "tiny", "method": "pdu", "forget_split": "forget10", "data": "synthetic",
               "forget_records": 16, "forget_fingerprint": "cd" * 32, "config_hash": "0",
               "mlflow_run_id": run.info.run_id}
    registration = judge_and_register(
        MlflowClient(url), run.info.run_id, model_uri, rules=RULES, after=after, before=None, reasons={},
        model_name=model_name, lineage=lineage, model_folder=folder,
        evaluation={"benchmark": "tofu", "aggregates": after, "unavailable": {}})
    return registration.version


def _pipeline_process(url: str, folder: str, forget_quality: float, queue) -> None:
    """One of four concurrent pipelines: register, then ask for promotion."""
    with as_user("pipeline"):
        version = register(url, "concurrent", forget_quality, folder)
        from mlflow import MlflowClient

        try:
            outcome = promote(MlflowClient(url), "concurrent", version)
        except PromotionRefused as exc:
            outcome = f"refused: {exc}"
    queue.put((forget_quality, version, outcome))


def _outcomes(queue, workers, timeout_s: float = 300.0) -> list:
    """Every worker's outcome; fails at once (not after the timeout) when a worker died."""
    outcomes, deadline = [], time.monotonic() + timeout_s
    while len(outcomes) < len(workers):
        try:
            outcomes.append(queue.get(timeout=1.0))
        except queues.Empty:
            died = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
            assert not died, f"a pipeline process died with exit code {died}; its traceback is above"
            assert time.monotonic() < deadline, f"only {len(outcomes)} of {len(workers)} pipelines answered"
    return outcomes


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    import torch

    from unlearn.models import load_model, load_tokenizer, save_model

    torch.manual_seed(0)
    return str(save_model(load_model("tiny"), load_tokenizer("tiny"), tmp_path_factory.mktemp("m") / "tiny"))


def test_the_pipeline_user_registers_and_a_read_only_user_is_refused_cleanly(server, model_folder, capsys):
    from unlearn.cli import main

    with as_user("pipeline"):
        assert register(server, "guarded", 0.4, model_folder) == "1"
    with as_user("reader"):  # reading is allowed: the evidence verifies through the server
        from mlflow import MlflowClient

        assert verify_version(MlflowClient(server), "guarded", "1").gate.passed
        code = main(["promote", "guarded", "1", "--tracking-uri", server])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "refused: permission denied: reader may not change model 'guarded'" in err
    with as_user("pipeline"):
        assert main(["promote", "guarded", "--tracking-uri", server]) == 0
        assert str(MlflowClient(server).get_model_version_by_alias("guarded", CHAMPION).version) == "1"
        with pytest.raises(Exception, match="PERMISSION_DENIED|Permission denied"):
            with as_user("reader"):
                MlflowClient(server).set_model_version_tag("guarded", "1", "gate", "failed")


@pytest.mark.slow
def test_four_pipelines_register_at_once_and_the_champion_is_the_one_promote_chose(server, model_folder):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    qualities = [0.2, 0.5, 0.3, 0.4]
    workers = [context.Process(target=_pipeline_process, args=(server, model_folder, q, queue))
               for q in qualities]
    for worker in workers:
        worker.start()
    outcomes = _outcomes(queue, workers)
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    from mlflow import MlflowClient

    with as_user("reader"):
        client = MlflowClient(server)
        versions = sorted(int(v.version) for v in client.search_model_versions("name='concurrent'"))
        assert versions == [1, 2, 3, 4]  # none lost, consecutive
        assert sorted(int(v) for _, v, _ in outcomes) == versions
        for version in versions:
            assert verify_version(client, "concurrent", str(version)).gate.passed
        best = max(outcomes)  # the highest forget quality: no later promotion may replace it
        champion = str(client.get_model_version_by_alias("concurrent", CHAMPION).version)
        assert champion == best[1] and best[2] == best[1], outcomes
        for _, version, outcome in outcomes:  # every other promotion either preceded the
            if version != champion:                 # best one or was refused as a regression
                assert outcome == version or "regresses against champion" in outcome
        assert [m.name for m in client.search_registered_models()
                if m.name.endswith(".promotion-lock")] == []  # every lock released
