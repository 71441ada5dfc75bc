"""Models in MLflow: log a Hugging Face folder as an MLflow model, and get one back.

A model is logged as a pyfunc whose artifact ``hf_model`` is the ``from_pretrained`` folder
(safetensors + tokenizer), or a LoRA run's PEFT adapter folder, so the registry holds exactly the
files ``unlearn.models.load_model`` takes. ``models:/NAME/VERSION``, ``models:/NAME@alias``,
``models:/<model id>`` and ``runs:/ID/path`` URIs are downloaded back to that folder.
"""

from __future__ import annotations

from pathlib import Path

import mlflow

from unlearn.models import ADAPTER_CONFIG, ModelLoadError, is_model_folder

ARTIFACT = "hf_model"


class HFGenerator(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: ``predict`` answers a list of prompts greedily."""

    def load_context(self, context) -> None:
        from unlearn.models import load_model, load_tokenizer

        folder = context.artifacts[ARTIFACT]
        self.model, self.tokenizer = load_model(folder), load_tokenizer(folder)

    def predict(self, context, model_input: list[str], params: dict[str, int] | None = None) -> list[str]:
        from unlearn.data.tokenize import prompt_ids
        from unlearn.eval.scoring import greedy_generate

        prompts = list(model_input.iloc[:, 0]) if hasattr(model_input, "iloc") else list(model_input)
        max_new_tokens = int((params or {}).get("max_new_tokens", 64))
        ids = [prompt_ids(self.tokenizer, str(p)) for p in prompts]
        return greedy_generate(self.model, self.tokenizer, ids, max_new_tokens=max_new_tokens)


def log_hf_model(folder: str | Path, name: str = "model", **kwargs):
    """Log ``folder`` as an MLflow model in the active run; returns its ``ModelInfo``."""
    import logging
    import warnings

    if not is_model_folder(folder):
        raise ModelLoadError(f"{folder} is not a from_pretrained folder (no config.json) "
                             "nor a LoRA adapter folder")
    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    level = pyfunc_log.level
    # The wrapper class is ours and importable; MLflow's pickling and type-hint advice is noise here.
    pyfunc_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return mlflow.pyfunc.log_model(name=name, python_model=HFGenerator(),
                                           artifacts={ARTIFACT: str(folder)}, pip_requirements=[], **kwargs)
    finally:
        pyfunc_log.setLevel(level)


def download_model(uri: str, dst: str | Path | None = None) -> str:
    """Download the artifacts behind ``uri`` and return the Hugging Face folder inside them."""
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst))
    except Exception as exc:  # noqa: BLE001 - unknown name/version, unreachable server, ...
        raise ModelLoadError(f"cannot download {uri} from MLflow ({mlflow.get_tracking_uri()}): "
                             f"{exc}") from None
    folders = sorted({p.parent for name in ("config.json", ADAPTER_CONFIG) for p in local.rglob(name)
                      if is_model_folder(p.parent)})
    if not folders:
        raise ModelLoadError(f"{uri}: no Hugging Face model folder (config.json) nor LoRA adapter folder "
                             f"in its artifacts at {local}")
    return str(folders[0])
