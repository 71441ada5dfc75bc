"""Every path a user gives is made absolute on the driver; URIs, hub ids and named specs pass."""

import os
from pathlib import Path

import pytest

from unlearn.config import load_config, resolve_paths
from unlearn.paths import absolute_model, absolute_path, absolute_source, absolute_tracking_uri


@pytest.mark.parametrize("spec", ["tiny", "Tiny", "smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct",
                                  "Qwen/Qwen2.5-0.5B", "models:/forget-authors@champion", "runs:/abc/model",
                                  "s3://bucket/model", "gs://bucket/model"])
def test_named_models_hub_ids_and_uris_pass_through(spec, tmp_path):
    assert absolute_model(spec, tmp_path) == spec


@pytest.mark.parametrize("spec, expected", [
    ("outputs/demo/target", "outputs/demo/target"),  # two levels: never a hub id
    ("./target", "target"),
    ("../models/target", "../models/target"),
    ("model.gguf", "model.gguf"),
    ("owner/weights.gguf", "owner/weights.gguf"),  # a file, not a hub id
])
def test_local_model_paths_are_made_absolute(spec, expected, tmp_path):
    base = tmp_path / "work"
    assert absolute_model(spec, base) == os.path.normpath(base / expected)


def test_an_existing_folder_wins_over_a_hub_id_of_the_same_shape(tmp_path):
    (tmp_path / "outputs" / "target").mkdir(parents=True)
    assert absolute_model("outputs/target", tmp_path) == str(tmp_path / "outputs" / "target")
    assert absolute_model("owner/name", tmp_path) == "owner/name"  # nothing local by that name


def test_data_sources_tracking_uris_and_idempotence(tmp_path):
    assert absolute_source("synthetic", tmp_path) == "synthetic"
    assert absolute_source("locuslab/TOFU", tmp_path) == "locuslab/TOFU"
    assert absolute_source("data/tofu", tmp_path) == "data/tofu"  # nothing local: a hub name
    (tmp_path / "data" / "tofu").mkdir(parents=True)
    assert absolute_source("data/tofu", tmp_path) == str(tmp_path / "data" / "tofu")
    assert absolute_source("forget.jsonl", tmp_path) == str(tmp_path / "forget.jsonl")
    assert absolute_tracking_uri("sqlite:///mlflow.db", tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    assert absolute_tracking_uri(f"sqlite:///{tmp_path}/m.db", "/elsewhere") == f"sqlite:///{tmp_path}/m.db"
    assert absolute_tracking_uri("http://127.0.0.1:5000", tmp_path) == "http://127.0.0.1:5000"
    once = absolute_path("a/../b/c", tmp_path)
    assert once == str(tmp_path / "b" / "c") and absolute_path(once, "/elsewhere") == once
    assert absolute_path("~/x") == str(Path.home() / "x")


def test_load_config_resolves_every_path_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "tofu").mkdir(parents=True)
    cfg = load_config(None, ["output_dir=outputs/demo", "model.name_or_path=outputs/demo/target",
                             "data.source=data/tofu", "eval.reference=outputs/eval/retain.json",
                             "ray.storage_path=ckpt", "mlflow.tracking_uri=sqlite:///m.db"])
    assert cfg.output_dir == str(tmp_path / "outputs" / "demo")
    assert cfg.model.name_or_path == str(tmp_path / "outputs" / "demo" / "target")
    assert cfg.data.source == str(tmp_path / "data" / "tofu")
    assert cfg.eval.reference == str(tmp_path / "outputs" / "eval" / "retain.json")
    assert cfg.ray.storage_path == str(tmp_path / "ckpt")
    assert cfg.mlflow.tracking_uri == f"sqlite:///{tmp_path}/m.db"
    assert resolve_paths(cfg, "/elsewhere") == cfg  # already absolute: unchanged

    remote = load_config(None, ["ray.storage_path=s3://bucket/ckpt", "mlflow.tracking_uri=http://mlflow:5000",
                                "data.source=locuslab/TOFU"])
    assert remote.ray.storage_path == "s3://bucket/ckpt"
    assert remote.mlflow.tracking_uri == "http://mlflow:5000"
    assert remote.data.source == "locuslab/TOFU" and remote.model.name_or_path == "tiny"
    assert remote.ray.storage_path is not None and load_config().ray.storage_path is None
