"""Models round-trip through MLflow: log a from_pretrained folder, register it, get it back."""

from pathlib import Path

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


def test_a_lora_adapter_folder_logs_and_downloads_as_a_model(tracking):
    from unlearn.models import LoraSettings, lora_state, write_adapter

    model = load_model("tiny", lora=LoraSettings(r=2))
    folder = write_adapter(model, lora_state(model), load_tokenizer("tiny"), "tiny", tracking / "adapter")
    with mlflow.start_run():
        info = log_hf_model(folder)
    local = download_model(info.model_uri, tracking / "back")
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in Path(local).iterdir())
    base = load_model("tiny").state_dict()
    for name, value in load_model(local).state_dict().items():  # B = 0: merging changes nothing
        assert torch.equal(value, base[name]), name
