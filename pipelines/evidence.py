"""The evidence behind a registered version, checked rather than trusted.

At registration the gate logs every document it judged to the version's source run and records
their SHA-256 in the version's tags (``evidence.<name>``):

- ``eval``: ``eval/after.json``, the evaluation the gate rules were judged on;
- ``before``: ``eval/before.json``, the model before unlearning (the rules' ``base.*``);
- ``history``: ``eval/history.json``, the re-check of every earlier deletion request;
- ``requests``: ``lineage/requests.json``, every forget set this version has forgotten;
- ``files``: ``evidence/files.json``, the SHA-256 of each file of the model folder.

``evidence.source`` is the model URI that was registered. ``evidence.digest`` hashes all of these
with the gate rules and the source run, so editing any one tag is caught; with
``UNLEARN_EVIDENCE_KEY`` set, ``evidence.signature`` is its HMAC-SHA256.

:func:`verify_version` re-reads each document from the source run, checks its hash and re-judges
the gate from it; :func:`verify_files` checks a downloaded model folder against the manifest.
Without a key, someone allowed to write both a run's artifacts and a version's tags could forge a
consistent set; the key, held by the pipeline and the deployer rather than by MLflow's users,
closes that.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from unlearn.gate import GateResult, judge

KEY_ENV = "UNLEARN_EVIDENCE_KEY"
DOCUMENTS = {"eval": "eval/after.json", "before": "eval/before.json", "history": "eval/history.json",
             "requests": "lineage/requests.json", "files": "evidence/files.json"}
REQUIRED = ("eval", "requests", "files")
DIGEST, SIGNATURE, RULES, SOURCE = "evidence.digest", "evidence.signature", "gate_rules", "evidence.source"


class PromotionRefused(RuntimeError):
    """A version that may not become (or serve as) the champion, with the reason."""


def tag(name: str) -> str:
    return f"evidence.{name}"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_manifest(folder: str | Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder``, by its relative POSIX path."""
    root = Path(folder)
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def evidence_digest(tags: dict, run_id: str) -> str:
    payload = {"run_id": run_id, RULES: tags.get(RULES), SOURCE: tags.get(SOURCE),
               **{n: tags.get(tag(n)) for n in DOCUMENTS}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def signature(digest: str) -> str | None:
    key = os.environ.get(KEY_ENV)
    return hmac.new(key.encode(), digest.encode(), "sha256").hexdigest() if key else None


def record_evidence(client, run_id: str, rules: list[str], source: str, model_folder: str | Path,
                    documents: dict[str, dict | list | None]) -> dict[str, str]:
    """Log the documents (by name, see ``DOCUMENTS``) and the file manifest of ``model_folder`` (the
    files of ``source``, the registered model URI) to ``run_id``; returns the version tags that pin
    them."""
    tags = {RULES: json.dumps(rules), SOURCE: source}
    with tempfile.TemporaryDirectory() as tmp:
        for name, document in {**documents, "files": file_manifest(model_folder)}.items():
            if document is None:
                continue
            path = Path(tmp) / DOCUMENTS[name]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(document, indent=2, sort_keys=True))
            client.log_artifact(run_id, str(path), artifact_path=path.parent.name)
            tags[tag(name)] = sha256_file(path)
    tags[DIGEST] = evidence_digest(tags, run_id)
    if (signed := signature(tags[DIGEST])) is not None:
        tags[SIGNATURE] = signed
    return tags


@dataclass
class Evidence:
    """A version's documents, read back from its source run and checked against its tags."""

    name: str
    version: str
    run_id: str
    rules: list[str]
    documents: dict = field(default_factory=dict)
    gate: GateResult | None = None

    @property
    def after(self) -> dict:
        return self.documents["eval"]["aggregates"]

    @property
    def requests(self) -> list[dict]:
        return self.documents["requests"]

    def refuse(self, why: str) -> PromotionRefused:
        return PromotionRefused(f"{self.name} version {self.version}: {why}")


def verify_version(client, name: str, version: str) -> Evidence:
    """The version's evidence, verified; :class:`PromotionRefused` names what is missing, altered
    or failing."""
    model_version = client.get_model_version(name, version)
    tags = model_version.tags
    evidence = Evidence(name, str(version), model_version.run_id, [])
    if tags.get("gate") != "passed":
        raise evidence.refuse(f"has no passing gate (tag gate={tags.get('gate', 'missing')!r})")
    missing = [tag(n) for n in REQUIRED if tag(n) not in tags] + [t for t in (RULES, SOURCE, DIGEST)
                                                                   if t not in tags]
    if missing or not evidence.run_id:
        raise evidence.refuse("its tag says passed, but it has no recorded evidence (missing "
                              f"{', '.join(missing) or 'source run'}): it was not registered by the gate")
    if evidence_digest(tags, evidence.run_id) != tags[DIGEST]:
        raise evidence.refuse("its evidence tags were edited after registration (evidence.digest does not "
                              "match the recorded hashes, rules and source run)")
    if tags[SOURCE] != model_version.source:
        raise evidence.refuse(f"its model {model_version.source} is not the model that was evaluated "
                              f"({tags[SOURCE]})")
    expected = signature(tags[DIGEST])
    if expected is not None and not hmac.compare_digest(expected, tags.get(SIGNATURE, "")):
        raise evidence.refuse(f"its evidence is not signed with this deployment's {KEY_ENV}"
                              + ("" if SIGNATURE in tags else " (no signature recorded)"))
    evidence.rules = json.loads(tags[RULES])
    with tempfile.TemporaryDirectory() as tmp:
        for name_, path in DOCUMENTS.items():
            if tag(name_) in tags:
                evidence.documents[name_] = _checked_document(client, evidence, path, tags[tag(name_)], tmp)
    documents = evidence.documents
    evidence.gate = judge(evidence.rules, evidence.after, (documents.get("before") or {}).get("aggregates"),
                          documents["eval"].get("unavailable"), documents.get("history"))
    if not evidence.gate.passed:
        failed = "; ".join(f"{v.rule} ({v.reason or 'value ' + format(v.value, '.4g')})"
                           for v in evidence.gate.failures())
        raise evidence.refuse(f"its recorded evaluation fails the gate: {failed}")
    return evidence


def _checked_document(client, evidence: Evidence, path: str, recorded: str, tmp: str):
    try:
        local = client.download_artifacts(evidence.run_id, path, tmp)
    except Exception as exc:  # noqa: BLE001 - not found, permission, unreachable store
        raise evidence.refuse(f"evidence {path} is missing from run {evidence.run_id} "
                              f"({type(exc).__name__}: {str(exc)[:200]})") from None
    actual = sha256_file(local)
    if actual != recorded:
        raise evidence.refuse(f"evidence {path} of run {evidence.run_id} was altered after the gate "
                              f"(SHA-256 {actual[:12]}..., recorded {recorded[:12]}...)")
    return json.loads(Path(local).read_text())


def verify_files(folder: str | Path, evidence: Evidence) -> None:
    """Refuse a downloaded model folder whose files are not the ones that were evaluated."""
    recorded, actual = evidence.documents["files"], file_manifest(folder)
    changed = sorted(p for p in recorded if p in actual and actual[p] != recorded[p])
    gone = sorted(set(recorded) - set(actual))
    extra = sorted(set(actual) - set(recorded))
    parts = [f"{what}: {', '.join(paths)}" for what, paths in
             (("changed", changed), ("missing", gone), ("not evaluated", extra)) if paths]
    if parts:
        raise evidence.refuse(f"its model files are not the files that were evaluated ({'; '.join(parts)})")
