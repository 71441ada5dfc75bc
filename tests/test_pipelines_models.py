"""Models round-trip through MLflow: log a from_pretrained folder, register it, get it back."""

import mlflow
import pytest
import torch

from pipelines.models import download_model, log_hf_model
from unlearn.cli import resolve_model
from unlearn.models import ModelLoadError, load_model, load_tokenizer, save_model


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("models-test")  # not an experiment id cached from another database
    yield tmp_path
    mlflow.set_tracking_uri(None)


def test_logged_model_downloads_to_the_same_weights(tracking):
    torch.manual_seed(0)
    model, tokenizer = load_model("tiny"), load_tokenizer("tiny")
    folder = save_model(model, tokenizer, tracking / "model")
    with mlflow.start_run():
        info = log_hf_model(folder)
    mlflow.register_model(info.model_uri, "forget-test")
    mlflow.MlflowClient().set_registered_model_alias("forget-test", "champion", "1")
    for uri in ("models:/forget-test/1", "models:/forget-test@champion"):
        local = resolve_model(uri)
        again = load_model(local)
        for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
            assert torch.equal(a, b), name
    with pytest.raises(ModelLoadError, match="cannot download models:/no-such-model/1"):
        download_model("models:/no-such-model/1")
    with pytest.raises(ModelLoadError, match="no config.json"):
        log_hf_model(tracking)
