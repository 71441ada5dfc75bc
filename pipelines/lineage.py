"""Deletion requests over time: start from a registered version, carry its requests forward, and
re-check on the new model every forget set the base had forgotten.

    unlearn run CONFIG --model models:/NAME@champion

downloads the champion after verifying its evidence and files (``pipelines.evidence``), and reads
its lineage (``lineage/requests.json``: one entry per request, with the forget set's fingerprint,
split, source, date, MLflow run, version, and its forget Prob and forget quality when it was gated).
After unlearning, :func:`recheck_requests` evaluates the new model on each of those forget sets;
the gate (``unlearn.gate.judge``) holds each to the values it was gated with.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from pipelines.evidence import PromotionRefused, verify_files, verify_version
from unlearn.gate import STILL_FORGOTTEN_METRICS as CHECKED
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))/?$")


class BaseError(RuntimeError):
    """A registered base that cannot be used (unknown, or its evidence does not verify)."""


@dataclass
class BaseVersion:
    uri: str
    name: str
    version: str
    folder: str
    requests: list[dict]


def is_registered_uri(spec: str | None) -> bool:
    return bool(spec and _URI.match(spec))


def registered_base(client, uri: str, dst: str | Path) -> BaseVersion:
    """``models:/NAME@alias`` or ``models:/NAME/VERSION``, downloaded to ``dst``. A version that went
    through the gate must verify, files included, and brings its deletion requests; any other
    registered model (a plain base model) starts a lineage with none."""
    from mlflow.exceptions import MlflowException

    from pipelines.models import download_model

    match = _URI.match(uri)
    if not match:
        raise BaseError(f"{uri!r} is not models:/NAME/VERSION or models:/NAME@ALIAS")
    name = match["name"]
    try:
        version = match["version"] or str(client.get_model_version_by_alias(name, match["alias"]).version)
        tags = client.get_model_version(name, version).tags
    except MlflowException as exc:
        raise BaseError(f"{uri}: no such registered version ({exc.message})") from None
    if "gate" not in tags and not any(key.startswith("evidence.") for key in tags):
        return BaseVersion(uri, name, version, download_model(f"models:/{name}/{version}", dst), [])
    try:  # the documents first: a refused version is not downloaded
        evidence = verify_version(client, name, version)
        folder = download_model(f"models:/{name}/{version}", dst)
        verify_files(folder, evidence)
    except PromotionRefused as exc:
        raise BaseError(f"cannot start from {uri}: {exc}") from None
    return BaseVersion(uri, name, version, folder, evidence.requests)


def forget_fingerprint(benchmark: str, source: str, split: str) -> str:
    from unlearn.data import load_qa, load_texts
    from unlearn.data.loaders import fingerprint, record_digest

    records = load_qa(source, split) if benchmark == "tofu" else load_texts(source, split)
    return fingerprint(record_digest(r) for r in records)


def recheck_requests(model_dir: str, cfg, reference: str | None, requests: list[dict],
                     out_dir: Path) -> list[dict]:
    """Evaluate ``model_dir`` on each earlier request's forget set; the items the gate judges.

    ``reference``: the retain model (evaluated on each split) or an evaluation JSON (used for the
    split it was made on). A forget set whose records changed since it was gated, or that cannot be
    read, is not evaluated: its metrics are unavailable, and the gate fails closed."""
    from unlearn.data import DataError
    from unlearn.demo import eval_settings
    from unlearn.eval import evaluate_model, write_result

    tolerance = asdict(cfg.gate.tolerance())
    items = []
    for number, request in enumerate(requests, 1):
        split, data = request["forget_split"], request["data"]
        item = {"request": number, "label": f"request {number} ({split}, {request['date'][:10]})",
                "forget_split": split, "data": data, "forget_fingerprint": request["forget_fingerprint"],
                "gated": request["gated"], "now": {}, "unavailable": {}, "tolerance": tolerance}
        items.append(item)
        try:
            now = forget_fingerprint(cfg.data.benchmark, data, split)
        except DataError as exc:
            item["unavailable"] = dict.fromkeys(CHECKED, f"its forget set cannot be read: {exc}")
            continue
        if now != request["forget_fingerprint"]:
            item["unavailable"] = dict.fromkeys(CHECKED, f"its forget set {split} of {data} changed since it "
                                                f"was gated (fingerprint {now[:12]}..., gated "
                                                f"{request['forget_fingerprint'][:12]}...)")
            continue
        settings = replace(eval_settings(cfg), data=data, forget_split=split)
        ref, why = _reference_on(reference, settings, out_dir / f"request{number}.reference.json",
                                 reuse=cfg.eval.reuse_reference)
        result = evaluate_model(model_dir, settings, reference=ref, progress=False)
        write_result(result, out_dir / f"request{number}.json")
        item["now"] = {k: result["aggregates"].get(k) for k in CHECKED}
        item["unavailable"] = {k: why or v for k, v in result["unavailable"].items() if k in CHECKED}
    return items


def _reference_on(reference: str | None, settings, output: Path, *, reuse: bool):
    """The reference for ``settings``' forget split, or None and why."""
    from unlearn.eval import EvalReference, load_reference

    if reference is None:
        return None, "no reference (retain model) was given"
    if reference.endswith(".json"):
        ref = EvalReference.from_file(reference)
        if ref.forget_split not in (None, settings.forget_split):
            return None, (f"the reference {reference} was evaluated on {ref.forget_split}, not "
                          f"{settings.forget_split}: pass the retain model to re-check earlier requests")
        return ref, None
    return load_reference(reference, settings, output=output, reuse=reuse), None
