"""Models from MLflow: ``models:/NAME/VERSION``, ``models:/NAME@alias`` and ``runs:/ID/path``
URIs are downloaded to a local folder that ``unlearn.models.load_model`` takes."""

from __future__ import annotations

from pathlib import Path

from unlearn.models import ModelLoadError


def download_model(uri: str, dst: str | Path | None = None) -> str:
    """Download the artifacts behind ``uri`` and return the Hugging Face folder inside them."""
    import mlflow

    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst))
    except Exception as exc:  # noqa: BLE001 - unknown name/version, unreachable server, ...
        raise ModelLoadError(f"cannot download {uri} from MLflow ({mlflow.get_tracking_uri()}): "
                             f"{exc}") from None
    folders = sorted(p.parent for p in local.rglob("config.json"))
    if not folders:
        raise ModelLoadError(f"{uri}: no Hugging Face model folder (config.json) in its artifacts at {local}")
    return str(folders[0])
