"""The MLflow registry gate: judge a candidate, register only what passed, promote with care.

- :func:`judge_and_register`: evaluates the gate on the candidate's aggregates (and on the re-check
  of every earlier deletion request in its base's lineage), records ``gate.json`` and the tag
  ``gate=passed|failed`` on its run, and only when it passed makes it a new version of the
  registered model with alias ``challenger``, lineage tags, the cumulative list of deletion
  requests, a model card and the hashes of its evidence (``pipelines.evidence``).
- :func:`promote`: moves alias ``champion`` to a version only if its evidence verifies (re-read,
  hashed and re-judged, never the tags alone) and it does not regress any gate metric against the
  current champion; otherwise :class:`PromotionRefused` says why. Promotions of one model are
  serialised by a lock, so concurrent pipelines cannot interleave their check and their move.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pipelines.evidence import PromotionRefused, record_evidence, verify_version
from unlearn.gate import STILL_FORGOTTEN_METRICS, GateResult, judge, parse_rules, regressions

CHALLENGER, CHAMPION = "challenger", "champion"
__all__ = ["CHALLENGER", "CHAMPION", "PromotionRefused", "Registration", "judge_and_register", "promote"]


@dataclass
class Registration:
    gate: GateResult
    version: str | None  # None: not registered (gate failed, or no registry.model_name)


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def model_form(cfg) -> str:
    """What a registered folder holds: the full model's weights, LoRA adapters merged into them,
    or the adapters alone (loaded on their base model)."""
    lora = cfg.model.lora
    if lora is None:
        return "full weights"
    adapters = f"r={lora.r}, alpha={lora.alpha}, {'/'.join(lora.target_modules)}"
    if lora.merge:
        return f"full weights, LoRA merged in ({adapters})"
    return f"LoRA adapters only ({adapters}), on the base model"


def lineage(cfg, base_model: str, forget: tuple[int, str], run_id: str, **extra) -> dict:
    """What a registered version came from: the tags and the model card's first paragraph.
    ``forget``: the forget set's record count and fingerprint."""
    return {"base_model": base_model, "model_form": model_form(cfg), "method": cfg.method.name,
            "forget_split": cfg.data.forget_split,
            "data": str(cfg.data.source), "forget_records": forget[0], "forget_fingerprint": forget[1],
            "config_hash": config_hash(cfg.model_dump(mode="json")), "mlflow_run_id": run_id, **extra}


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def request_entry(lineage: dict, after: dict, version: str | None) -> dict:
    """One deletion request as the lineage keeps it: what was forgotten, when, by which run, and
    how forgotten it was when gated (the bar later versions are held to)."""
    return {"forget_split": lineage["forget_split"], "data": lineage["data"],
            "forget_records": lineage["forget_records"], "forget_fingerprint": lineage["forget_fingerprint"],
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "mlflow_run_id": lineage["mlflow_run_id"], "model_version": version, "method": lineage["method"],
            "gated": {k: after.get(k) for k in STILL_FORGOTTEN_METRICS}}


def model_card(name: str, lineage: dict, gate: GateResult, after: dict, before: dict | None,
               requests: list[dict] | None = None, history: list[dict] | None = None) -> str:
    lines = [f"# {name}: unlearned model", "",
             f"Base model `{lineage['base_model']}`, method `{lineage['method']}`, forget split "
             f"`{lineage['forget_split']}` of `{lineage['data']}` ({lineage['forget_records']} records, "
             f"SHA-256 `{lineage['forget_fingerprint']}`). Weights: "
             f"{lineage.get('model_form', 'full weights')}.", "",
             "## What was forgotten", "",
             f"The records of `{lineage['forget_split']}`: the model was trained to no longer reproduce "
             "them, under a constraint that its loss on the retain set stay bounded."]
    if requests:
        now = {item["request"]: item["now"] for item in history or []}
        lines += ["", "## Deletion requests", "",
                  f"Every forget set this version has forgotten ({len(requests)}), oldest first. Forget Prob "
                  "and forget quality: when the request was gated, and this version's re-check.", "",
                  "| # | date | forget split | records | fingerprint | MLflow run | version | forget Prob "
                  "(gated / now) | forget quality (gated / now) |", "|---|---|---|---|---|---|---|---|---|"]
        for number, request in enumerate(requests, 1):
            gated = request["gated"]
            later = now.get(number, gated)  # the newest request was gated on this very model
            lines.append(
                f"| {number} | {request['date']} | `{request['forget_split']}` of `{request['data']}` | "
                f"{request['forget_records']} | `{request['forget_fingerprint'][:16]}` | "
                f"`{request['mlflow_run_id']}` | {request['model_version'] or 'this one'} | "
                f"{_fmt(gated.get('forget_prob'))} / {_fmt(later.get('forget_prob'))} | "
                f"{_fmt(gated.get('forget_quality'))} / {_fmt(later.get('forget_quality'))} |")
    lines += ["", "## Evidence", "", "| metric | before | after |", "|---|---|---|"]
    for key, value in after.items():
        lines.append(f"| {key} | {_fmt((before or {}).get(key))} | {_fmt(value)} |")
    lines += ["", f"## Gate: {'passed' if gate.passed else 'FAILED'}", "", "| rule | value | verdict |",
              "|---|---|---|"]
    for v in gate.verdicts:
        verdict = "pass" if v.passed else "fail: " + (v.reason or v.threshold)
        lines.append(f"| `{v.rule}` | {_fmt(v.value)} | {verdict} |")
    return "\n".join(lines) + "\n"


def judge_and_register(client, run_id: str, model_uri: str, *, rules: list[str], after: dict,
                       before: dict | None, reasons: dict | None, model_name: str | None,
                       lineage: dict, evaluation: dict, model_folder: str | Path,
                       requests: list[dict] | None = None, history: list[dict] | None = None) -> Registration:
    """Gate the candidate of ``run_id``; register ``model_uri`` as ``challenger`` if it passed.

    ``evaluation``: the full evaluation result the gate judges (logged as evidence); ``requests``:
    the deletion requests of the base version's lineage; ``history``: their re-check on this model.
    """
    gate = judge(rules, after, before, reasons, history)
    requests = list(requests or [])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gate.json"
        path.write_text(json.dumps(gate.to_dict(), indent=2))
        client.log_artifact(run_id, str(path))
        card = Path(tmp) / "model_card.md"
        card.write_text(model_card(model_name or "candidate", lineage, gate, after, before,
                                   requests + [request_entry(lineage, after, None)], history))
        client.log_artifact(run_id, str(card))
    client.set_tag(run_id, "gate", "passed" if gate.passed else "failed")
    if not gate.passed or not model_name:
        return Registration(gate, None)
    _ensure_registered_model(client, model_name)
    # a tracking server wants the logged model's id beside its models:/ URI
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    version = client.create_model_version(model_name, model_uri, run_id=run_id, model_id=model_id).version
    version = str(version)
    requests.append(request_entry(lineage, after, version))
    client.update_model_version(model_name, version, description=model_card(
        model_name, lineage, gate, after, before, requests, history))
    evidence = record_evidence(client, run_id, rules, model_uri, model_folder, {
        "eval": evaluation, "before": None if before is None else {"aggregates": before},
        "history": history or None, "requests": requests})
    tags = {"gate_rules": json.dumps(rules), "forget_requests": str(len(requests)),
            "eval_summary": json.dumps({k: after.get(k) for k in _gate_metrics(rules)}),
            **{k: str(v) for k, v in lineage.items()}, **evidence}
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value[:5000])
    client.set_model_version_tag(model_name, version, "gate", "passed")  # last: only whole evidence passes
    client.set_registered_model_alias(model_name, CHALLENGER, version)
    return Registration(gate, version)


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description="Unlearned models that passed the gate.")
        except MlflowException as exc:  # another pipeline created it in between
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise


def _gate_metrics(rules: list[str]) -> list[str]:
    return [r.metric for r in parse_rules(rules)]


class PromotionLock:
    """Serialise promotions of one model across processes and machines: the lock is a registered
    model named ``NAME.promotion-lock``, whose creation is atomic in the tracking store. A lock older
    than ``stale_s`` (a promoter that died) is broken."""

    def __init__(self, client, name: str, *, timeout_s: float = 120.0, stale_s: float = 600.0) -> None:
        self.client, self.model, self.name = client, name, f"{name}.promotion-lock"
        self.timeout_s, self.stale_s = timeout_s, stale_s

    def __enter__(self) -> PromotionLock:
        from mlflow.exceptions import MlflowException

        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                self.client.create_registered_model(self.name, description="held while promoting")
                return self
            except MlflowException as exc:
                # The sqlalchemy store answers a name clash by looking the holder up; if the holder
                # released the lock in between, that lookup says RESOURCE_DOES_NOT_EXIST.
                if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                    raise
            self._break_if_stale()
            if time.monotonic() > deadline:
                raise PromotionRefused(f"another promotion of {self.model} "
                                       f"holds the lock {self.name!r}; try again, or delete it if no "
                                       "promotion is running")
            time.sleep(0.2)

    def _break_if_stale(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            held = self.client.get_registered_model(self.name)
            if time.time() - held.creation_timestamp / 1000 > self.stale_s:
                self.client.delete_registered_model(self.name)
        except MlflowException:
            pass  # released in between

    def __exit__(self, *exc) -> None:
        self.client.delete_registered_model(self.name)


def promote(client, name: str, version: str | None = None) -> str:
    """Move ``champion`` to ``version`` (default: the challenger) if allowed; returns it."""
    from mlflow.exceptions import MlflowException

    with PromotionLock(client, name):
        if version is None:
            try:
                version = client.get_model_version_by_alias(name, CHALLENGER).version
            except MlflowException:
                raise PromotionRefused(f"{name} has no {CHALLENGER} version to promote") from None
        version = str(version)
        candidate = verify_version(client, name, version)
        try:
            champion = str(client.get_model_version_by_alias(name, CHAMPION).version)
        except MlflowException:
            champion = None
        if champion is not None and champion != version:
            current = _champion_metrics(client, name, champion)
            worse = regressions(parse_rules(candidate.rules), candidate.after, current) if current else []
            if worse:
                raise PromotionRefused(f"{name} version {version} regresses against champion version "
                                       f"{champion}: " + "; ".join(worse))
        client.set_registered_model_alias(name, CHAMPION, version)
    return version


def _champion_metrics(client, name: str, version: str) -> dict | None:
    """The champion's verified aggregates; None (not compared) when its own evidence fails."""
    import logging

    try:
        return verify_version(client, name, version).after
    except PromotionRefused as exc:
        logging.getLogger(__name__).warning("not comparing against the champion: %s", exc)
        return None
