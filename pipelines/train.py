"""Ray Train: the unlearning loop on N FSDP2 workers (``TorchTrainer``), with checkpoints.

Each worker builds the model on the meta device, shards every decoder block and then the root
with ``fully_shard`` (bf16 mixed precision on GPU) and reads only its own shard of the weights
(``pipelines.fsdp.load_sharded``); the frozen reference model, when the method needs one, is
loaded the same way. No worker holds the full model. The step is the framework-free
:class:`unlearn.loop.Unlearner`. The dual variable
sees the retain loss averaged over ranks, so every rank holds the same lam; EGUP's retain centroid
is summed over ranks once.

Data: in the deterministic mode every worker pulls the tokenised sets and takes its slice of the
single-process global batches (``pipelines.data``); with ``data.streaming`` it iterates its own
shard of the forget and retain streams (``pipelines.stream.ShardStream``), and the whole-set uses
take bounded samples.

Checkpoints (``torch.distributed.checkpoint``: sharded model and optimizer, plus the dual and
EGUP state, the scheduler, the step and every rank's RNG) are reported to Ray Train; a restarted
worker group (``FailureConfig``) or a re-run with the same run name resumes from the latest. The
last report carries the exported Hugging Face folder (``pipelines.fsdp.export_sharded``: written
tensor by tensor from rank 0, never the full model at once) and, for LoRA, the PEFT adapter
folder. Tune's per-epoch evaluation scores the sharded model in place. No worker holds the full
model at any point.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

EXPORT_MARKER = "unlearn_export.json"
TRAIN_STATE = "train_state_rank{rank}.pt"


# --------------------------------------------------------------------------- distributed helpers


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def all_reduce_mean(value: float) -> float:
    dist = _dist()
    if dist is None:
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor) / dist.get_world_size()


def all_gather_list(items: list) -> list[list]:
    """Every rank's ``items``, in rank order (picklable objects)."""
    dist = _dist()
    if dist is None:
        return [items]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    return gathered


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    dist = _dist()
    if dist is not None:
        dist.all_reduce(tensor)
    return tensor


def peak_memory_mib(device: torch.device) -> float:
    """This process's peak memory: GPU memory allocated on GPU, else peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def all_reduce_max(value: float) -> float:
    dist = _dist()
    if dist is None:
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor)


def mean_metrics(metrics: dict[str, float], keys: tuple[str, ...]) -> dict[str, float]:
    """Average ``keys`` of the step metrics over ranks (tokens are summed)."""
    dist = _dist()
    present = [k for k in keys if k in metrics]
    if dist is None or not present:
        return metrics
    tensor = torch.tensor([metrics[k] for k in present], dtype=torch.float64)
    dist.all_reduce(tensor)
    world = dist.get_world_size()
    out = dict(metrics)
    for key, value in zip(present, tensor.tolist()):
        out[key] = value if key in ("tokens", "tokens_per_s") else value / world
    return out


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(folder: Path, model, optimizer, extra: dict) -> None:
    """Sharded model + optimizer (DCP, collective) and this rank's small state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder))
    rank = _dist().get_rank() if _dist() else 0
    torch.save(extra, folder / TRAIN_STATE.format(rank=rank))


def load_checkpoint(folder: Path, model, optimizer) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rank = _dist().get_rank() if _dist() else 0
    return torch.load(folder / TRAIN_STATE.format(rank=rank), weights_only=False)


def export_full_model(model, tokenizer, spec: str, out_dir: Path) -> Path | None:
    """Write the model as a ``from_pretrained`` folder (collective; ``pipelines.fsdp.export_sharded``:
    no rank gathers the full model); the folder on rank 0, None elsewhere."""
    from pipelines.fsdp import export_sharded

    return export_sharded(model, tokenizer, spec, out_dir)


def evaluate_epoch(model, tokenizer, epoch_eval: dict) -> float:
    """One metric of the current model (collective): every rank scores its share of the run's
    evaluation with its own shard of the weights (``unlearn.eval.scoring.ShardedScorer``), and
    every rank returns the value (NaN if unavailable)."""
    from unlearn.eval import EvalSettings, evaluate
    from unlearn.eval.scoring import ShardedScorer

    dist = _dist()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist is not None else (0, 1)
    settings = EvalSettings(**epoch_eval["settings"])
    scorer = ShardedScorer(model, tokenizer, rank=rank, world=world, gather=all_gather_list,
                           batch_size=settings.batch_size, max_length=settings.max_length)
    result = evaluate(scorer, tokenizer, settings, reference=epoch_eval["reference"])
    found = result["aggregates"].get(epoch_eval["metric"])
    return float("nan") if found is None else float(found)


# --------------------------------------------------------------------------- MLflow from rank 0


class StepLogger:
    """Logs step metrics to the driver's MLflow run from rank 0, skipping steps already logged
    (after a restart, the steps between the checkpoint and the crash are replayed)."""

    KEYS = ("loss", "forget_loss", "retain_loss", "lam", "eps", "slack", "lr", "grad_norm",
            "tokens_per_s", "step_time", "step", "peak_mem_mib")

    def __init__(self, tracking_uri: str | None, run_id: str | None, rank: int) -> None:
        self.client = None
        self.run_id = run_id
        self.last_logged = 0
        if rank != 0 or not run_id:
            return
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri)
        history = self.client.get_metric_history(run_id, "loss")
        self.last_logged = max((m.step for m in history), default=0)

    def start(self, total_steps: int, initial_retain_loss: float | None, eps: float | None) -> None:
        """Run facts the driver's progress bar and warnings read (logged once)."""
        if self.client is None:
            return
        from mlflow.entities import Metric, Param

        run = self.client.get_run(self.run_id)
        if "train.total_steps" not in run.data.params:
            self.client.log_batch(self.run_id, params=[Param("train.total_steps", str(total_steps))])
        if initial_retain_loss is not None and "retain_loss_initial" not in run.data.metrics:
            import time

            now = int(time.time() * 1000)
            metrics = [Metric("retain_loss_initial", initial_retain_loss, now, 0),
                       Metric("eps", float(eps), now, 0)]
            self.client.log_batch(self.run_id, metrics=metrics)

    def log(self, step: int, metrics: dict[str, float], *, force: bool = False) -> None:
        """Log the step metrics (``KEYS``) once per step; ``force`` logs every given key, as is."""
        if self.client is None or (step <= self.last_logged and not force):
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        keys = list(metrics) if force else [k for k in self.KEYS if k in metrics]
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(metrics[k]), now, step) for k in keys])
        self.last_logged = max(self.last_logged, step)


# --------------------------------------------------------------------------- the worker


def train_loop_per_worker(loop_config: dict) -> None:
    """One Ray Train worker (FSDP2 rank)."""
    import ray.train

    from pipelines.data import epoch_pairs, pull_features, rank_slice
    from pipelines.fsdp import load_sharded
    from unlearn.config import build_config
    from unlearn.loop import Unlearner, build_optimizer, build_scheduler, mean_nll
    from unlearn.models import AdaptersOff, load_tokenizer
    from unlearn.objectives import EGUP
    from unlearn.report import stop_line
    from unlearn.workflow import (
        build_dual,
        build_objective,
        build_stopper,
        lora_settings,
        make_batches,
        stop_record,
        trained_dtype,
        writes_full_model,
    )

    cfg = build_config(loop_config["config"])
    spec = loop_config["model"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    use_gpu = cfg.ray.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_gpu else torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.train.seed)

    objective = build_objective(cfg)
    tokenizer = load_tokenizer(spec)
    pad = tokenizer.pad_token_id
    streaming = "stream_rows" in loop_config
    # Streamed: the whole-set uses (calibration, EGUP, early stopping) take bounded samples.
    forget = pull_features("forget_sample" if streaming else "forget")
    retain_name = "retain_sample" if streaming else "retain"
    retain = pull_features(retain_name) if retain_name in loop_config["datasets"] else None
    proxy = pull_features("proxy") if "proxy" in loop_config["datasets"] else None
    stop_rows = pull_features("stop") if "stop" in loop_config["datasets"] else None

    # Built on the meta device and sharded before any weight is read: each rank loads its shard.
    lora = lora_settings(cfg)
    dtype = trained_dtype(cfg, spec, device)
    model = load_sharded(spec, dtype=dtype, device=device, mixed_precision=use_gpu,
                         gradient_checkpointing=cfg.model.gradient_checkpointing, lora=lora)
    ref_model = None
    if objective.needs_ref:  # LoRA: the base is the model with its adapters off, no second copy
        ref_model = AdaptersOff(model) if lora is not None else load_sharded(
            spec, dtype=dtype, device=device, mixed_precision=use_gpu, frozen=True)

    t = cfg.train
    stopper = build_stopper(cfg, pad, forget, stop_rows, target=loop_config.get("stop_auc"), rank=rank,
                            world=world, gather=all_gather_list)

    def to_device(batch):
        return {k: v.to(device) for k, v in batch.items()}

    def my_rows(features):
        batches = make_batches(features, t.batch_size, pad)
        return [to_device(rank_slice(b, rank, world)) for b in batches if len(b["input_ids"]) >= world]

    def all_rows(features):  # the same batches on every rank: under FSDP2 each forward is collective
        return [to_device(b) for b in make_batches(features, t.batch_size, pad)]

    if streaming:
        from pipelines.stream import ShardStream, stream_pairs

        def stream_of(name):
            return ShardStream(ray.train.get_dataset_shard(name), rows=loop_config["stream_rows"][name],
                               world=world, batch_size=t.batch_size, pad_token_id=pad, seed=t.seed,
                               bucket=t.bucket_by_length, shuffle_rows=cfg.data.shuffle_rows, name=name)

        forget_stream = stream_of("forget")
        # The retain stream cycles across forget epochs (each rank consumes it in step with the others).
        retain_cycle = stream_of("retain").cycle() if "retain" in loop_config["stream_rows"] else None
        batches_per_epoch = forget_stream.expected

        def pairs_for(epoch):
            return ((to_device(f), None if r is None else to_device(r))
                    for f, r in stream_pairs(forget_stream, retain_cycle, epoch))
    else:
        def pairs_for(epoch):
            pairs = epoch_pairs(forget, retain if objective.wants_retain() else None, batch_size=t.batch_size,
                                pad_token_id=pad, seed=t.seed, epoch=epoch, bucket=t.bucket_by_length,
                                rank=rank, world=world)
            return [(to_device(f), None if r is None else to_device(r)) for f, r in pairs]

        batches_per_epoch = len(pairs_for(0))
    steps_per_epoch = -(-batches_per_epoch // t.grad_accum)
    total_steps = steps_per_epoch * t.epochs
    dual = build_dual(cfg, objective, steps_per_epoch, reduce=all_reduce_mean)
    optimizer = build_optimizer(model, t.lr, t.weight_decay, states=t.optimizer_states)
    scheduler = build_scheduler(optimizer, total_steps, schedule=t.schedule, warmup_ratio=t.warmup_ratio)
    unlearner = Unlearner(model, objective, optimizer, ref_model=ref_model, dual=dual, scheduler=scheduler,
                          max_grad_norm=t.max_grad_norm, fused=t.fused_losses, chunk_size=t.loss_chunk_size,
                          backward_per_term=t.backward_per_term, precision=t.precision,
                          compile=t.compile, all_reduce_sum=all_reduce_sum, world_size=world)

    checkpoint = ray.train.get_checkpoint()
    start_step, initial_retain = 0, None
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            marker = Path(folder) / EXPORT_MARKER
            if marker.is_file():  # this run already finished and exported its model
                ray.train.report({"done": 1.0, **json.loads(marker.read_text())}, checkpoint=None)
                return
            extra = load_checkpoint(Path(folder), model, optimizer)
        start_step = extra["step"]
        scheduler.load_state_dict(extra["scheduler"])
        if dual is not None and extra["dual"] is not None:
            dual.load_state_dict(extra["dual"])
        if isinstance(objective, EGUP) and extra.get("egup") is not None:
            objective.state.load_state_dict(extra["egup"])
        torch.set_rng_state(extra["rng"])
        unlearner.global_step = start_step
        if rank == 0:
            log.warning("resumed from the checkpoint at step %d", start_step)
    else:
        if dual is not None:
            initial_retain = mean_nll(model, my_rows(retain), all_reduce_sum=all_reduce_sum)
            dual.calibrate(initial_retain)
        if isinstance(objective, EGUP):
            # every forget sample's starting embedding on every rank: the shuffled batches give a
            # rank samples that another rank's slice held
            objective.prepare(model, retain=my_rows(retain), forget=all_rows(forget),
                              proxy=my_rows(proxy) if proxy else None, all_reduce_sum=all_reduce_sum)

    logger = StepLogger(loop_config.get("tracking_uri"), loop_config.get("run_id"), rank)
    logger.start(total_steps, initial_retain, float(dual.eps) if dual is not None and dual.ready else None)
    every = cfg.ray.checkpoint_every or steps_per_epoch
    step, stopped_at = start_step, None
    for epoch in range(start_step // steps_per_epoch, t.epochs):
        groups = grouped(pairs_for(epoch), t.grad_accum)
        for group in itertools.islice(groups, step - epoch * steps_per_epoch, None):
            # At fixed steps: a run resumed from a checkpoint measures the same weights again.
            done = stopper.due(step, steps_per_epoch) if stopper is not None else None
            if done is not None:
                stop = stopper.should_stop(model, done)
                logger.log(step, {"stop_auc": stopper.history[-1][1]}, force=True)  # step: steps done
                if stop:
                    stopped_at = stopper.stopped_at
                    break
            metrics = mean_metrics(unlearner.step(group), ("loss", "forget_loss", "retain_loss", "slack",
                                                           "grad_norm", "tokens", "tokens_per_s"))
            step = unlearner.global_step
            metrics["epoch"] = float(epoch)
            metrics["peak_mem_mib"] = all_reduce_max(peak_memory_mib(device))  # the largest worker
            logger.log(step, metrics)

            _maybe_inject_fault(cfg, step, rank, world, loop_config)
            if step % every == 0 or step == total_steps:
                extra = {"step": step, "scheduler": scheduler.state_dict(),
                         "dual": dual.state_dict() if dual is not None else None,
                         "egup": objective.state.state_dict() if isinstance(objective, EGUP) else None,
                         "rng": torch.get_rng_state()}
                with tempfile.TemporaryDirectory() as tmp:
                    save_checkpoint(Path(tmp), model, optimizer, extra)
                    checkpoint = ray.train.Checkpoint.from_directory(tmp)
                    ray.train.report(_reportable(metrics), checkpoint=checkpoint)
            # Between checkpoints nothing is reported to Ray (a report synchronises every worker
            # with the controller); the step metrics go to MLflow from rank 0.
        if stopped_at is not None:
            if rank == 0:
                log.warning("early stopping: %s", stop_line(stop_record(stopper.auc, stopped_at,
                                                                     dict(stopper.history))))
            break
        epoch_eval = loop_config.get("epoch_eval")
        if epoch_eval is not None and epoch + 1 < t.epochs:
            # For Tune's early stopping (forwarded to the trial by TuneReportCallback). The last
            # epoch's value comes from the trial's full evaluation of the exported model.
            value = evaluate_epoch(model, tokenizer, epoch_eval)
            logger.log(step, {f"epoch.{epoch_eval['metric']}": value}, force=True)
            ray.train.report({epoch_eval["metric"]: value, "epochs_done": float(epoch + 1),
                              "step": float(step), "child_run_id": loop_config.get("run_id")},
                             checkpoint=None)

    final = {"step": float(step), "done": 1.0,
             "stopped_after_epochs": float(-1 if stopped_at is None else stopped_at),
             "steps_per_epoch": float(steps_per_epoch)}
    with tempfile.TemporaryDirectory() as tmp:
        # model/: the full weights (LoRA merged in); adapter/: a LoRA run's adapters (always)
        if writes_full_model(cfg):
            export_full_model(model, tokenizer, spec, Path(tmp) / "model")
        if lora is not None:
            from pipelines.fsdp import export_adapter

            export_adapter(model, tokenizer, spec, Path(tmp) / "adapter")
        if rank == 0:
            (Path(tmp) / EXPORT_MARKER).write_text(json.dumps(final))
            ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(final, checkpoint=None)


def grouped(pairs, size: int):
    """Consecutive lists of ``size`` pairs (the last may be shorter): one optimizer step each."""
    iterator = iter(pairs)
    while group := list(itertools.islice(iterator, size)):
        yield group


def _reportable(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def _maybe_inject_fault(cfg, step: int, rank: int, world: int, loop_config: dict) -> None:
    """Once (the marker file survives the restart), after ``ray.fail_at_step``, the last rank exits
    (``ray.fault=exit``) or waits (``hold``: the other ranks wait in the next collective) until
    its node or the worker group is taken down; a hold nobody ends fails after 10 minutes."""
    if cfg.ray.fail_at_step is None or step != cfg.ray.fail_at_step or rank != world - 1:
        return
    marker = Path(loop_config["storage_path"]) / f"{loop_config['ray_name']}.fault_injected"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(step))
    if cfg.ray.fault == "hold":
        log.warning("fault injection: rank %d waits after step %d to be taken down", rank, step)
        time.sleep(600)
    else:
        log.warning("fault injection: rank %d exits after step %d", rank, step)
    os._exit(1)
