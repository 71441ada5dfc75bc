"""An unfinished MLflow run is resumed only by a re-run of the same config, model and output."""

import pytest

pytest.importorskip("mlflow")

from mlflow import MlflowClient  # noqa: E402

from pipelines.run import run_identity, start_or_resume_run  # noqa: E402
from unlearn.config import build_config  # noqa: E402


@pytest.fixture
def setup(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"

    def make(*extra):
        return build_config({}, [f"output_dir={tmp_path}/out", "run_name=same-name",
                                 f"mlflow.tracking_uri={uri}", *extra])

    return make, uri


def _start(cfg, uri, model="/models/target"):
    return start_or_resume_run(cfg, uri, run_identity(cfg, model, f"{cfg.output_dir}/ray"))


def test_identity_changes_with_what_the_run_computes_not_how_it_executes(setup):
    make, _ = setup
    base = run_identity(make(), "/m", "/s")
    execution = make("ray.verbose=true", "ray.max_failures=0", "ray.fail_at_step=3")
    assert run_identity(execution, "/m", "/s") == base
    lr = run_identity(make("train.lr=1e-4"), "/m", "/s")
    assert lr["unlearn.config_hash"] != base["unlearn.config_hash"]
    assert run_identity(make(), "/other", "/s")["unlearn.model"] == "/other"
    assert run_identity(make("output_dir=/elsewhere"), "/m", "/s")["unlearn.output_dir"] == "/elsewhere"


def test_a_rerun_resumes_only_the_same_run(setup, capsys):
    make, uri = setup
    first, resumed = _start(make(), uri)
    assert not resumed
    again, resumed = _start(make("ray.verbose=true"), uri)  # the same run, more output
    assert resumed and again == first and "not resuming" not in capsys.readouterr().out

    changed, resumed = _start(make("train.lr=1e-4"), uri)
    assert not resumed and changed != first
    line = capsys.readouterr().out
    assert f"not resuming the unfinished MLflow run {first}" in line and "config (hash)" in line

    other_model, resumed = _start(make(), uri, model="/models/other")
    assert not resumed and other_model not in (first, changed)
    assert "model /models/target -> /models/other" in capsys.readouterr().out

    other_output, resumed = _start(make(f"output_dir={make().output_dir}-2"), uri)
    assert not resumed and "output folder" in capsys.readouterr().out

    # the first run is still unfinished: the original command resumes it, not a newer run
    back, resumed = _start(make(), uri)
    assert resumed and back == first
    client = MlflowClient(uri)
    assert client.get_run(changed).data.params["train.lr"] == "0.0001"
    assert client.get_run(first).data.params["train.lr"] == str(make().train.lr)


def test_a_finished_run_is_never_resumed(setup):
    make, uri = setup
    first, _ = _start(make(), uri)
    MlflowClient(uri).set_terminated(first, "FINISHED")
    second, resumed = _start(make(), uri)
    assert not resumed and second != first
