"""Single-process stages: data -> finetune (target, retain) -> unlearn -> saved model.

The Ray pipeline runs the same stages distributed; this module is the reference path, the
one the tests and the local demo use.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from unlearn.config import Config
from unlearn.data.batching import batch_indices
from unlearn.data import (
    DataError,
    SplitNotFound,
    check_overlap,
    collate,
    encode_qa_batch,
    encode_text_windows,
    load_qa,
    load_texts,
    shared_questions,
)
from unlearn.data.synthetic import synthetic_source
from unlearn.eval.tofu import holdout_split_for
from unlearn.dual import DualController
from unlearn.loop import (
    Unlearner,
    build_optimizer,
    build_scheduler,
    compute_precision,
    master_weights_dtype,
    resolve_precision,
    mean_nll,
    mean_prob,
    pair_batches,
)
from unlearn.models import (
    AdaptersOff,
    LoraSettings,
    frozen_copy,
    load_model,
    load_tokenizer,
    lora_state,
    model_hidden_size,
    resolve_device,
    resolve_model_path,
    save_model,
    write_adapter,
)
from unlearn.objectives import EGUP, Objective, get_objective
from unlearn.stopping import ForgetHoldoutStop

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- data


@dataclass
class UnlearnData:
    """The records of one run: what to forget, what to keep, and (for EGUP) a proxy set."""

    forget: list
    retain: list
    full: list | None
    proxy: list | None
    source: str
    overlap: list[str] = field(default_factory=list)
    stop: list | None = None  # never-seen records for early stopping (unlearn.stopping)

    def forget_identity(self) -> tuple[int, str]:
        """The forget set's record count and fingerprint (the registry's lineage)."""
        from unlearn.data.loaders import fingerprint, record_digest

        return len(self.forget), fingerprint(record_digest(r) for r in self.forget)


def resolve_source(cfg: Config) -> str:
    """The data source; 'synthetic' is generated (seeded) once into ``output_dir/data``."""
    data = cfg.data
    if data.source != "synthetic":
        return data.source
    return str(synthetic_source(data.benchmark, Path(cfg.output_dir) / "data", seed=data.synthetic_seed,
                                authors=data.synthetic_authors))


def load_unlearn_data(cfg: Config) -> UnlearnData:
    """Read and validate the forget/retain(/proxy) records before any training starts."""
    source, data = resolve_source(cfg), cfg.data
    if data.streaming:
        log.warning("data.streaming applies to the Ray pipeline (unlearn run / tune); this process "
                    "reads the sets into memory")
    if data.benchmark == "muse":
        forget = load_texts(source, data.forget_split)
        retain = load_texts(source, data.retain_split)
        proxy = load_texts(source, data.proxy_split) if data.proxy_split else None
        return UnlearnData(forget, retain, None, proxy, source, stop=stop_records(cfg, source))
    forget = load_qa(source, data.forget_split)
    retain = load_qa(source, data.retain_split)
    retain, overlap = check_overlap(forget, retain, drop=data.drop_overlap)
    full = load_qa(source, data.full_split) if data.full_split else None
    proxy = load_qa(source, data.proxy_split) if data.proxy_split else None
    stop = stop_records(cfg, source)
    if stop is not None:
        check_never_seen(stop, {"forget": forget, "retain": retain, "full": full or []})
    return UnlearnData(forget, retain, full, proxy, source, overlap, stop)


def stop_split(cfg: Config) -> tuple[str | None, bool]:
    """The early-stopping split and whether the user named it (False: the default)."""
    stop = cfg.stop
    if not stop.enabled:
        return None, False
    if stop.split is not None:
        return stop.split, True
    match = re.fullmatch(r"forget(\d+)", cfg.data.forget_split)
    return (f"validation{match.group(1)}" if match and cfg.data.benchmark == "tofu" else None), False


def stop_records(cfg: Config, source: str) -> list | None:
    """The never-seen records of ``stop.split``; None when stopping is off or its default split
    is not in the source (training then runs every epoch, and a warning says so)."""
    split, named = stop_split(cfg)
    if split is None:
        if cfg.stop.enabled:
            log.warning("early stopping is off: name a split of never-seen records in stop.split")
        return None
    load = load_texts if cfg.data.benchmark == "muse" else load_qa
    try:
        records = load(source, split)
    except SplitNotFound as exc:
        if named:
            raise DataError(f"stop.split: {exc}") from None
        log.warning("early stopping is off: %s (set stop.split to never-seen records, or "
                    "stop.enabled=false to silence this)", exc)
        return None
    return records if cfg.data.benchmark == "muse" else without_eval_holdout(cfg, source, split, records)


def without_eval_holdout(cfg: Config, source: str, split: str, records: list) -> list:
    """The stop split minus the evaluation's holdout (real TOFU nests holdout01 in holdout10):
    the gate judges a stopping point on records the stopping rule never looked at."""
    holdout = cfg.eval.holdout_split or holdout_split_for(cfg.data.forget_split)
    try:
        held = load_qa(source, holdout) if holdout else []
    except SplitNotFound:
        return records
    shared = set(shared_questions(held, records))
    if len(shared) == len(records):
        raise DataError(f"stop.split: every record of {split!r} is in the evaluation's holdout "
                        f"{holdout!r}; the gate would judge a stopping point chosen on its own data "
                        "(use other never-seen records)")
    if shared:
        log.info("stop.split: %d record(s) of %s also in the evaluation's holdout %s left out",
                 len(shared), split, holdout)
    return [r for r in records if r.question not in shared]


def build_stopper(cfg: Config, pad_token_id: int, forget_features: list, stop_features: list | None, *,
                  target: float | None = None, reference: str | None = None, rank: int = 0,
                  world: int = 1, gather=None) -> ForgetHoldoutStop | None:
    """The early-stopping rule of this run, or None when it is off (no stop split).

    Its target is ``target`` when given (Ray workers get the driver's), else :func:`stop_target`.
    """
    if stop_features is None:
        return None
    size = cfg.stop.batch_size
    forget = make_batches(forget_features, size, pad_token_id)
    stop = make_batches(stop_features, size, pad_token_id)
    if target is None:
        target = stop_target(cfg, forget, stop, reference)
    return ForgetHoldoutStop(forget, stop, auc=target, min_epochs=cfg.stop.min_epochs,
                             checks_per_epoch=cfg.stop.checks_per_epoch,
                             keep_closer=cfg.stop.keep_closer, rank=rank, world=world, gather=gather)


def stop_target(cfg: Config, forget: list, stop: list, reference: str | None) -> float:
    """``stop.auc``, else the AUC that the reference (retain) model gives forget vs the stop split
    (what never having seen the forget set looks like on these records), else chance (0.5)."""
    if cfg.stop.auc is not None:
        return cfg.stop.auc
    if reference is None or Path(reference).suffix == ".json":
        log.warning("early stopping at AUC 0.5: %s", "no reference model given" if reference is None
                    else f"the reference {reference} is an eval JSON, not a model")
        return 0.5
    target = ForgetHoldoutStop(forget, stop).measure(load_model(reference, device=resolve_device(cfg.device)))
    log.info("early stopping once the forget set's Min-k AUC against %s is at most %.3f (the "
             "reference model's)", stop_split(cfg)[0], target)
    return target


def stop_record(target: float, stopped_at: float | None, auc_by_epoch: dict[float, float]) -> dict:
    """What early stopping did, for the run's record and summary (one process and Ray alike).

    Epochs done are fractional between epoch ends (``stop.checks_per_epoch``): keys "1", "1.25".
    """
    def epochs(value: float) -> int | float:
        value = round(float(value), 3)
        return int(value) if value.is_integer() else value

    return {"target_auc": target, "stopped_after_epochs": None if stopped_at is None else epochs(stopped_at),
            "auc_by_epoch": {str(epochs(done)): auc for done, auc in sorted(auc_by_epoch.items())}}


def check_never_seen(stop: list, seen: dict[str, list]) -> None:
    """Early stopping compares the forget set with records the model never saw: refuse a
    ``stop.split`` that shares questions with the training data."""
    for name, records in seen.items():
        shared = shared_questions(records, stop)
        if shared:
            raise DataError(f"stop.split shares {len(shared)} question(s) with the {name} split "
                            f"(e.g. {shared[0]!r}): it must hold records the model never saw")


def encode_records(tokenizer, records: list, *, max_length: int,
                   prefix_tokens: int | None = None) -> list[dict]:
    """Tokenise QA records (or raw texts, cut into ``max_length`` windows) and tag each feature
    with its ``sample_id`` (its position)."""
    if all(not isinstance(r, str) for r in records):
        features = encode_qa_batch(tokenizer, list(records), max_length=max_length,
                                   prefix_tokens=prefix_tokens)
    else:
        features = [feature for text in records
                    for feature in encode_text_windows(tokenizer, text, max_length=max_length)]
    for index, feature in enumerate(features):
        feature["sample_id"] = index
    return features


def make_batches(features: list[dict], batch_size: int, pad_token_id: int, *,
                 shuffle: bool = False, seed: int = 0,
                 bucket: bool = False) -> list[dict[str, torch.Tensor]]:
    """Pad features into batches (right padding); shuffled by ``seed`` when asked, and
    length-bucketed (little padding, see ``unlearn.data.batching``) when ``bucket``."""
    lengths = [len(f["input_ids"]) for f in features]
    batches = []
    for indices in batch_indices(lengths, batch_size, shuffle=shuffle, seed=seed, bucket=bucket):
        chunk = [features[i] for i in indices]
        ids = torch.tensor([f["sample_id"] for f in chunk], dtype=torch.long)
        batch = collate([{k: v for k, v in f.items() if k != "sample_id"} for f in chunk],
                        pad_token_id)
        batch["sample_id"] = ids
        batches.append(batch)
    return batches


# --------------------------------------------------------------------------- finetune


def finetune(model, batches_for_epoch: Callable[[int], list], *, epochs: int, lr: float,
             weight_decay: float = 0.0, precision: str = "fp32", fused: bool = False,
             desc: str = "finetune", progress: bool = True) -> list[float]:
    """NLL training (``precision``: see ``unlearn.loop.compute_precision``; ``fused``: the chunked
    NLL from hidden states, never the full logits); returns the mean loss of each epoch."""
    from unlearn.objectives import on_model_device, ops
    from unlearn.objectives.base import forward_output

    optimizer = build_optimizer(model, lr, weight_decay)
    precision = resolve_precision(model, precision)
    history = []
    bar = tqdm(range(epochs), desc=desc, disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        total, count = 0.0, 0
        for batch in batches_for_epoch(epoch):
            batch = on_model_device(model, batch)
            with compute_precision(model, precision):
                loss = ops.nll(forward_output(model, batch, fused=fused), batch["labels"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            total, count = total + float(loss.detach()), count + 1
        history.append(total / max(count, 1))
        bar.set_postfix(loss=f"{history[-1]:.3f}")
    return history


SYNTHETIC_GENERAL_SPLITS = ("real_authors_perturbed", "world_facts_perturbed")


def general_knowledge(cfg: Config, source: str) -> list:
    """Records both finetuned models also learn: general knowledge that model utility measures.

    The tiny base model is random, so on synthetic data it learns the real-authors and
    world-facts questions here, as a pretrained model would already know them.
    """
    splits = cfg.finetune.general_splits
    if splits is None:
        synthetic = cfg.data.source == "synthetic" and cfg.data.benchmark == "tofu"
        splits = list(SYNTHETIC_GENERAL_SPLITS) if synthetic else []
    return [record for split in splits for record in load_qa(source, split)]


def run_finetune(cfg: Config, *, progress: bool = True) -> dict:
    """TOFU protocol: a target model (trained on ``full``) and a retain model (``retain`` only).

    Writes ``output_dir/target`` and ``output_dir/retain`` (``from_pretrained`` folders) and
    returns their paths with the forget-set Prob before and after finetuning.
    """
    data = load_unlearn_data(cfg)
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    ft, max_length = cfg.finetune, cfg.data.max_length
    forget_batches = make_batches(encode_records(tokenizer, data.forget, max_length=max_length),
                                  ft.batch_size, tokenizer.pad_token_id)
    general = general_knowledge(cfg, data.source)
    training_sets = {"target": (data.full or data.forget + data.retain) + general,
                     "retain": data.retain + general}
    report: dict = {"forget_prob": {}}
    # Finetuning keeps random batches: on a small templated set, length buckets group questions
    # of one template together and the target memorised less (forget Prob 0.73 vs 0.99 after
    # 30 epochs on the synthetic set).
    for role, records in training_sets.items():
        torch.manual_seed(ft.seed)
        model = load_model(cfg.model.name_or_path, dtype=cfg.model.dtype, device=resolve_device(cfg.device))
        if role == "target":
            report["forget_prob"]["base"] = mean_prob(model, forget_batches)
        features = encode_records(tokenizer, records, max_length=max_length)
        history = finetune(
            model,
            lambda epoch, features=features: make_batches(
                features, ft.batch_size, tokenizer.pad_token_id, shuffle=True, seed=ft.seed + epoch),
            epochs=ft.epochs, lr=ft.lr, weight_decay=ft.weight_decay, precision=ft.precision,
            fused=ft.fused_losses,
            desc=f"finetune {role}", progress=progress,
        )
        report["forget_prob"][role] = mean_prob(model, forget_batches)
        path = save_model(model, tokenizer, Path(cfg.output_dir) / role)
        report[role] = str(path)
        report[f"{role}_loss_history"] = history
        log.info("%s model: final loss %.4f, forget Prob %.4f, saved to %s",
                 role, history[-1], report["forget_prob"][role], path)
    (Path(cfg.output_dir) / "finetune.json").write_text(json.dumps(report, indent=2))
    return report


# --------------------------------------------------------------------------- unlearn


def build_objective(cfg: Config) -> Objective:
    return get_objective(cfg.method.name, **cfg.method.params)


def build_dual(cfg: Config, objective: Objective, steps_per_epoch: int,
               reduce=None) -> DualController | None:
    if not objective.uses_dual:
        return None
    d = cfg.dual
    warmup = d.warmup_steps if d.warmup_epochs is None else round(d.warmup_epochs * steps_per_epoch)
    return DualController(lam_0=d.lam_0, eta_dual=d.eta_dual, lam_max=d.lam_max, eps=d.eps,
                          rho=d.rho, warmup_steps=warmup, reduce=reduce)


def writes_full_model(cfg: Config) -> bool:
    """Whether the run's model is full weights (no LoRA, or LoRA merged in) rather than the
    adapter folder alone."""
    return cfg.model.lora is None or cfg.model.lora.merge


def lora_settings(cfg: Config) -> LoraSettings | None:
    lora = cfg.model.lora
    if lora is None:
        return None
    return LoraSettings(r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                        target_modules=tuple(lora.target_modules), init_seed=cfg.train.seed)


def trained_dtype(cfg: Config, spec: str, device: torch.device) -> str:
    """The dtype unlearning loads and trains ``spec`` in (``train.master_weights``)."""
    t = cfg.train
    dtype = master_weights_dtype(t.master_weights, t.precision, cfg.model.dtype, model_hidden_size(spec),
                                 device)
    if dtype != cfg.model.dtype:
        log.info("train.master_weights %s: the model trains in %s", t.master_weights, dtype)
    return dtype


def run_unlearning(cfg: Config, model_path: str | None = None, *, reference: str | None = None,
                   progress: bool = True, on_step: Callable[[dict], None] | None = None) -> dict:
    """Unlearn ``cfg.data.forget_split`` from ``model_path`` (default: the configured model).

    ``reference`` (default ``eval.reference``): the retain model, whose view of the stop split
    sets where early stopping stops (``unlearn.stopping``). Returns the step history, the
    forget-set Prob and retain loss before and after, the early-stopping record and the folder of
    the saved model (``output_dir/unlearned``).
    """
    spec = model_path or cfg.model.name_or_path
    torch.manual_seed(cfg.train.seed)
    objective = build_objective(cfg)
    data = load_unlearn_data(cfg)
    tokenizer = load_tokenizer(spec)
    prefix = objective.prefix_tokens()
    t = cfg.train
    max_length, pad = cfg.data.max_length, tokenizer.pad_token_id
    forget_features = encode_records(tokenizer, data.forget, max_length=max_length, prefix_tokens=prefix)
    retain_features = encode_records(tokenizer, data.retain, max_length=max_length)
    eval_forget = make_batches(forget_features, t.batch_size, pad)
    eval_retain = make_batches(retain_features, t.batch_size, pad)

    device = resolve_device(cfg.device)
    model = load_model(spec, dtype=trained_dtype(cfg, spec, device), lora=lora_settings(cfg),
                       gradient_checkpointing=cfg.model.gradient_checkpointing, device=device)
    ref_model = None
    if objective.needs_ref:  # LoRA: the base is the model with its adapters off, no second copy
        ref_model = AdaptersOff(model) if cfg.model.lora is not None else frozen_copy(model)
    steps_per_epoch = -(-len(eval_forget) // t.grad_accum)
    dual = build_dual(cfg, objective, steps_per_epoch)
    stop_features = None if data.stop is None else encode_records(tokenizer, data.stop, max_length=max_length)
    stopper = build_stopper(cfg, pad, forget_features, stop_features,
                            reference=reference or cfg.eval.reference)
    before = {"forget_prob": mean_prob(model, eval_forget), "retain_loss": mean_nll(model, eval_retain)}
    if dual is not None:
        dual.calibrate(before["retain_loss"])
        if before["retain_loss"] > dual.eps:
            log.warning("eps=%.4f is below the model's current retain loss %.4f: the constraint "
                        "starts violated", dual.eps, before["retain_loss"])
    if isinstance(objective, EGUP):
        proxy = None
        if data.proxy is not None:
            proxy = make_batches(encode_records(tokenizer, data.proxy, max_length=max_length),
                                 t.batch_size, pad)
        objective.prepare(model, retain=eval_retain, forget=eval_forget, proxy=proxy)

    total_steps = steps_per_epoch * t.epochs
    optimizer = build_optimizer(model, t.lr, t.weight_decay, states=t.optimizer_states)
    unlearner = Unlearner(model, objective, optimizer, ref_model=ref_model, dual=dual,
                          scheduler=build_scheduler(optimizer, total_steps, schedule=t.schedule,
                                                    warmup_ratio=t.warmup_ratio),
                          max_grad_norm=t.max_grad_norm, fused=t.fused_losses,
                          chunk_size=t.loss_chunk_size, backward_per_term=t.backward_per_term,
                          precision=t.precision, compile=t.compile)
    history = []
    bar = tqdm(total=total_steps, desc=f"unlearn ({objective.name})", disable=not progress, leave=False)
    stopped_at = None
    for epoch in range(t.epochs):
        forget = make_batches(forget_features, t.batch_size, pad, shuffle=True, seed=t.seed + epoch,
                              bucket=t.bucket_by_length)
        retain = make_batches(retain_features, t.batch_size, pad, shuffle=True,
                              seed=t.seed + 10_000 + epoch,
                              bucket=t.bucket_by_length) if objective.wants_retain() else None
        pairs = list(pair_batches(forget, retain))
        for start in range(0, len(pairs), t.grad_accum):
            if stopper is not None and stopper.should_stop_before(model, unlearner.global_step,
                                                                  steps_per_epoch):
                stopped_at = stopper.stopped_at
                break
            metrics = unlearner.step(pairs[start:start + t.grad_accum])
            metrics["epoch"] = float(epoch)
            history.append(metrics)
            if on_step is not None:
                on_step(metrics)
            bar.update(1)
            bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("forget_loss", "retain_loss", "lam")
                             if k in metrics})
        if stopped_at is not None:
            break
    bar.close()
    if stopper is not None and stopped_at is None:
        log.warning("early stopping: the forget set's AUC did not reach %.3f in %d epochs (last %s)",
                    stopper.auc, t.epochs, f"{stopper.history[-1][1]:.3f}" if stopper.history else "n/a")
    after = {"forget_prob": mean_prob(model, eval_forget), "retain_loss": mean_nll(model, eval_retain)}
    adapter_dir = None
    for stale in ("unlearned", "adapter"):  # an earlier run's files must not mix with this one's
        shutil.rmtree(Path(cfg.output_dir) / stale, ignore_errors=True)
    if cfg.model.lora is not None:  # the adapters always; the merged model unless merge is off
        folder = "adapter" if writes_full_model(cfg) else "unlearned"
        adapter_dir = write_adapter(model, lora_state(model), tokenizer, resolve_model_path(spec),
                                    Path(cfg.output_dir) / folder)
    if writes_full_model(cfg):
        out_dir = save_model(model, tokenizer, Path(cfg.output_dir) / "unlearned")
    else:
        out_dir = adapter_dir
    result = {
        "method": objective.name, "params": objective.params, "before": before, "after": after,
        "eps": float(dual.eps) if dual is not None else None, "history": history,
        "model_dir": str(out_dir), "adapter_dir": str(adapter_dir) if adapter_dir else None,
        "overlap_dropped": len(data.overlap),
        "stop": None if stopper is None else stop_record(stopper.auc, stopped_at, dict(stopper.history)),
    }
    (Path(cfg.output_dir) / "unlearn.json").write_text(json.dumps(result, indent=2, default=str))
    return result
