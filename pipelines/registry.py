"""The MLflow registry gate: judge a candidate, register only what passed, promote with care.

- :func:`judge_and_register`: evaluates the gate on the candidate's aggregates, records
  ``gate.json`` and the tag ``gate=passed|failed`` on its run, and only when it passed makes it a
  new version of the registered model with alias ``challenger``, lineage tags and a model card.
- :func:`promote`: moves alias ``champion`` to a version only if its gate passed and it does not
  regress any gate metric against the current champion; otherwise :class:`PromotionRefused`
  says which rule failed.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from unlearn.gate import GateResult, evaluate_gate, parse_rules, regressions

CHALLENGER, CHAMPION = "challenger", "champion"


class PromotionRefused(RuntimeError):
    """A version that may not become (or serve as) the champion."""


@dataclass
class Registration:
    gate: GateResult
    version: str | None  # None: not registered (gate failed, or no registry.model_name)


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def lineage(cfg, base_model: str, forget: tuple[int, str], run_id: str, **extra) -> dict:
    """What a registered version came from: the tags and the model card's first paragraph.
    ``forget``: the forget set's record count and fingerprint."""
    return {"base_model": base_model, "method": cfg.method.name, "forget_split": cfg.data.forget_split,
            "data": str(cfg.data.source), "forget_records": forget[0], "forget_fingerprint": forget[1],
            "config_hash": config_hash(cfg.model_dump(mode="json")), "mlflow_run_id": run_id, **extra}


def model_card(name: str, lineage: dict, gate: GateResult, after: dict, before: dict | None) -> str:
    lines = [f"# {name}: unlearned model", "",
             f"Base model `{lineage['base_model']}`, method `{lineage['method']}`, forget split "
             f"`{lineage['forget_split']}` of `{lineage['data']}` ({lineage['forget_records']} records, "
             f"SHA-256 `{lineage['forget_fingerprint']}`).", "",
             "## What was forgotten", "",
             f"The records of `{lineage['forget_split']}`: the model was trained to no longer reproduce "
             "them, under a constraint that its loss on the retain set stay bounded.", "",
             "## Evidence", "", "| metric | before | after |", "|---|---|---|"]
    for key, value in after.items():
        old = (before or {}).get(key)
        lines.append(f"| {key} | {'n/a' if old is None else f'{old:.4g}'} | "
                     f"{'n/a' if value is None else f'{value:.4g}'} |")
    lines += ["", f"## Gate: {'passed' if gate.passed else 'FAILED'}", "", "| rule | value | verdict |",
              "|---|---|---|"]
    for v in gate.verdicts:
        value = "n/a" if v.value is None else f"{v.value:.4g}"
        verdict = "pass" if v.passed else "fail: " + (v.reason or v.threshold)
        lines.append(f"| `{v.rule}` | {value} | {verdict} |")
    return "\n".join(lines) + "\n"


def judge_and_register(client, run_id: str, model_uri: str, *, rules: list[str], after: dict,
                       before: dict | None, reasons: dict | None, model_name: str | None,
                       lineage: dict) -> Registration:
    """Gate the candidate of ``run_id``; register ``model_uri`` as ``challenger`` if it passed."""
    gate = evaluate_gate(parse_rules(rules), after, before, reasons)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gate.json"
        path.write_text(json.dumps(gate.to_dict(), indent=2))
        client.log_artifact(run_id, str(path))
        card = Path(tmp) / "model_card.md"
        card.write_text(model_card(model_name or "candidate", lineage, gate, after, before))
        client.log_artifact(run_id, str(card))
    client.set_tag(run_id, "gate", "passed" if gate.passed else "failed")
    if not gate.passed or not model_name:
        return Registration(gate, None)
    import mlflow

    try:
        client.get_registered_model(model_name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(model_name, description="Unlearned models that passed the gate.")
    version = client.create_model_version(model_name, model_uri, run_id=run_id,
                                          description=model_card(model_name, lineage, gate, after, before))
    tags = {"gate": "passed", "gate_rules": json.dumps(rules),
            "eval_summary": json.dumps({k: after.get(k) for k in _gate_metrics(rules)}),
            **{k: str(v) for k, v in lineage.items()}}
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version.version, key, value[:5000])
    client.set_registered_model_alias(model_name, CHALLENGER, version.version)
    return Registration(gate, str(version.version))


def _gate_metrics(rules: list[str]) -> list[str]:
    return [r.metric for r in parse_rules(rules)]


def after_metrics(client, run_id: str) -> dict:
    """The ``after.*`` evaluation metrics a pipeline run logged, by aggregate name."""
    metrics = client.get_run(run_id).data.metrics
    return {k.removeprefix("after."): v for k, v in metrics.items() if k.startswith("after.")}


def version_metrics(client, name: str, version: str) -> dict:
    """The ``after.*`` evaluation metrics of the run that produced ``version``."""
    return after_metrics(client, client.get_model_version(name, version).run_id)


def require_gated(client, name: str, version: str) -> None:
    tags = client.get_model_version(name, version).tags
    if tags.get("gate") != "passed":
        raise PromotionRefused(f"{name} version {version} has no passing gate (tag gate="
                               f"{tags.get('gate', 'missing')!r})")


def promote(client, name: str, version: str | None = None) -> str:
    """Move ``champion`` to ``version`` (default: the challenger) if allowed; returns it."""
    import mlflow

    if version is None:
        try:
            version = client.get_model_version_by_alias(name, CHALLENGER).version
        except mlflow.exceptions.MlflowException:
            raise PromotionRefused(f"{name} has no {CHALLENGER} version to promote") from None
    version = str(version)
    require_gated(client, name, version)
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        champion = None
    if champion is not None and str(champion.version) != version:
        rules = parse_rules(json.loads(client.get_model_version(name, version).tags["gate_rules"]))
        worse = regressions(rules, version_metrics(client, name, version),
                            version_metrics(client, name, champion.version))
        if worse:
            raise PromotionRefused(f"{name} version {version} regresses against champion version "
                                   f"{champion.version}: " + "; ".join(worse))
    client.set_registered_model_alias(name, CHAMPION, version)
    return version
