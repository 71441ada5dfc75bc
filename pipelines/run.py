"""The product's main job: validate -> evaluate before -> FSDP2 unlearning on Ray Train ->
export -> evaluate after -> MLflow -> ``summary.json``.

    from pipelines.run import run_pipeline
    summary = run_pipeline(load_config("configs/tofu_tiny.yaml"), model="outputs/target",
                           reference="outputs/retain")

Everything a user can get wrong (data, model, resources, MLflow) is checked on the driver before
any worker starts. Re-running with the same ``run_name`` continues the same MLflow run and
resumes training from the latest checkpoint under ``ray.storage_path``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

from pipelines.errors import PipelineError
from unlearn.config import Config, ConfigError
from unlearn.data import DataError
from unlearn.gate import format_gate
from unlearn.models import ModelLoadError

log = logging.getLogger(__name__)

RUN_NAME_TAG = "unlearn.run_name"


# --------------------------------------------------------------------------- checks


def tracking_uri(cfg: Config) -> str:
    """The MLflow URI; a relative sqlite path is made absolute so Ray workers find the same file."""
    from unlearn.paths import absolute_tracking_uri

    return absolute_tracking_uri(cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                                 or "sqlite:///mlflow.db")


def check_mlflow(uri: str) -> None:
    import mlflow

    mlflow.set_tracking_uri(uri)
    try:
        if uri.startswith(("http://", "https://")):
            import requests  # a quick probe: the MLflow client itself retries for minutes

            requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
        mlflow.search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - connection refused, bad URI, auth...
        raise PipelineError(f"MLflow is not reachable at {uri}: {exc}. Start it, or set "
                            "mlflow.tracking_uri / MLFLOW_TRACKING_URI") from None


def check_model(spec: str) -> None:
    from transformers import AutoConfig

    from unlearn.models import resolve_model_path

    path = resolve_model_path(spec)
    try:
        AutoConfig.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"model {spec!r} ({path}) cannot be loaded: {exc}") from None


def check_resources(cfg: Config) -> None:
    import ray

    r = cfg.ray
    total = ray.cluster_resources()
    need = {"CPU": r.num_workers * r.cpus_per_worker + (r.data_cpus if cfg.data.streaming else 0),
            "GPU": r.num_workers if r.use_gpu else 0}
    need.update({k: v * r.num_workers for k, v in r.resources_per_worker.items()})
    short = {k: (v, total.get(k, 0)) for k, v in need.items() if v and v > total.get(k, 0)}
    if short:
        detail = ", ".join(f"{k}: {want:g} needed, {have:g} in the cluster"
                           for k, (want, have) in short.items())
        raise PipelineError(f"ray.num_workers={r.num_workers} do not fit the cluster ({detail}); lower "
                            "ray.num_workers or ray.cpus_per_worker"
                            + (" (data.streaming keeps ray.data_cpus free for reading and tokenising)"
                               if cfg.data.streaming else ""))


# --------------------------------------------------------------------------- MLflow


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = json.dumps(value) if not isinstance(value, str) else value
    return flat


# Settings that change how a run executes, not what it computes: a re-run may differ in them and
# still continue the same run.
EXECUTION_ONLY = ("ray.verbose", "ray.max_failures", "ray.wait_for_workers_s", "ray.fail_at_step",
                  "ray.fault")
IDENTITY_LABELS = {"unlearn.config_hash": "config (hash)", "unlearn.model": "model",
                   "unlearn.output_dir": "output folder", "unlearn.storage": "checkpoint storage"}


def run_identity(cfg: Config, model: str, storage: str) -> dict[str, str]:
    """What makes a re-run the same run: the resolved config's hash, the model, output and storage.
    Recorded as tags on the MLflow run; an unfinished run is resumed only when all of them match."""
    from pipelines.registry import config_hash

    config = cfg.model_dump(mode="json")
    for key in EXECUTION_ONLY:
        section, field = key.split(".")
        config[section].pop(field, None)
    return {"unlearn.config_hash": config_hash(config), "unlearn.model": model,
            "unlearn.output_dir": cfg.output_dir, "unlearn.storage": storage}


def unfinished_run(client, experiment_id: str, name: str,
                   identity: dict[str, str]) -> tuple[str | None, str | None]:
    """``(run id, None)`` of the newest unfinished run tagged ``name`` whose tags match
    ``identity``, to resume; else ``(None, why the newest unfinished one is not resumed)``;
    ``(None, None)`` when there is none."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}' and "
                                                             "attributes.status != 'FINISHED'",
                              max_results=50, order_by=["attributes.start_time DESC"])
    for run in runs:
        if all(run.data.tags.get(k) == v for k, v in identity.items()):
            return run.info.run_id, None
    if not runs:
        return None, None
    old = runs[0]
    changed = [f"{IDENTITY_LABELS.get(k, k)} {old.data.tags.get(k, 'not recorded')} -> {v}"
               for k, v in identity.items() if old.data.tags.get(k) != v]
    return None, (f"not resuming the unfinished MLflow run {old.info.run_id} of the same name "
                  f"({'; '.join(changed)}): starting a new run")


def start_or_resume_run(cfg: Config, uri: str, identity: dict[str, str],
                        parent_run_id: str | None = None) -> tuple[str, bool]:
    """The MLflow run of ``cfg.run_name``: the unfinished one of the same identity (see
    :func:`run_identity`) if there is one, else a new one."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    name = cfg.mlflow.experiment
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    existing, why_not = unfinished_run(client, experiment_id, cfg.run_name, identity)
    if existing:
        return existing, True
    if why_not:
        print(why_not, flush=True)
    tags = {RUN_NAME_TAG: cfg.run_name, **identity}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id  # a child run (a Tune trial) of the search's run
    run = client.create_run(experiment_id, run_name=cfg.run_name, tags=tags)
    params = flatten(cfg.model_dump(mode="json"))
    from mlflow.entities import Param

    items = list(params.items())
    for start in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=[Param(k, v[:6000]) for k, v in items[start:start + 100]])
    return run.info.run_id, False


def log_evaluation(client, run_id: str, stage: str, result: dict, out_dir: Path) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(f"{stage}.{k}", float(v), now, 0) for k, v in result["aggregates"].items()
               if v is not None]
    if metrics:
        client.log_batch(run_id, metrics=metrics)
    client.log_artifact(run_id, str(out_dir / f"{stage}.json"), artifact_path="eval")


def step_history(client, run_id: str) -> list[dict]:
    """Per-step metrics back from MLflow (the plot of the dual dynamics is drawn from them)."""
    keys = ("lam", "retain_loss", "eps", "forget_loss")
    by_step: dict[int, dict] = {}
    for key in keys:
        for metric in client.get_metric_history(run_id, key):
            by_step.setdefault(metric.step, {"step": float(metric.step)})[key] = metric.value
    history = [by_step[s] for s in sorted(by_step)]
    for row in history:
        if "lam" in row:
            row.setdefault("lam_next", row["lam"])
    return history


class TrainingProgress:
    """A progress bar on the driver, fed by the step metrics rank 0 logs to MLflow."""

    def __init__(self, client, run_id: str, *, desc: str, eps_warning: bool, every: float = 2.0) -> None:
        import threading

        self.client, self.run_id, self.desc, self.every = client, run_id, desc, every
        self.eps_warning = eps_warning
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> TrainingProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _watch(self) -> None:
        from tqdm.auto import tqdm

        bar, warned = None, False
        while not self._stop.wait(self.every):
            try:
                run = self.client.get_run(self.run_id)
            except Exception:  # noqa: BLE001 - a busy sqlite file; try again next tick
                continue
            metrics, params = run.data.metrics, run.data.params
            if bar is None and "train.total_steps" in params:
                bar = tqdm(total=int(params["train.total_steps"]), desc=self.desc)
            if self.eps_warning and not warned and "retain_loss_initial" in metrics and "eps" in metrics:
                warned = True
                if metrics["retain_loss_initial"] > metrics["eps"]:
                    log.warning("eps=%.4g is below the model's retain loss %.4g before unlearning: the "
                                "constraint starts violated", metrics["eps"], metrics["retain_loss_initial"])
            if bar is not None and "step" in metrics:
                bar.n = int(metrics["step"])
                bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("forget_loss", "retain_loss", "eps", "lam")
                                 if k in metrics}, refresh=True)
        if bar is not None:
            try:
                bar.n = int(self.client.get_run(self.run_id).data.metrics.get("step", bar.n))
            except Exception:  # noqa: BLE001
                pass
            bar.close()


#: Ray Train gives a worker group this long to start, then retries (a controller failure).
START_TIMEOUT_VAR = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


def start_retries(wait_s: float | None) -> int:
    """``FailureConfig.controller_failure_limit`` that bounds the wait for workers to ``wait_s``.

    When a worker group cannot be placed (a node lost and not yet replaced), Ray Train times the
    start out after ``$RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (60 s) and tries again, forever
    by default. The limit counts every such retry of the run, so ``wait_s`` bounds the total
    (in whole timeouts, at least one attempt).
    """
    if wait_s is None:
        return -1
    timeout = float(os.environ.get(START_TIMEOUT_VAR, 60))
    return max(0, math.ceil(wait_s / timeout) - 1)


def latest_checkpoint(storage: str, name: str):
    """The newest checkpoint Ray Train wrote under ``storage/name`` (local storage), or None."""
    from ray.train import Checkpoint

    folder = Path(storage) / name
    if "://" in storage or not folder.is_dir():
        return None
    found = sorted(p for p in folder.glob("checkpoint_*") if p.is_dir())
    return Checkpoint.from_directory(str(found[-1])) if found else None


# --------------------------------------------------------------------------- the job


def driver_paths(cfg: Config, model: str | None, reference: str | None) -> tuple[Config, str, str | None]:
    """The config, model and reference with every local path absolute (against the driver's
    working directory), before anything is handed to Ray: workers, actors and trials run elsewhere."""
    from unlearn.config import resolve_paths
    from unlearn.paths import absolute_model

    cfg = resolve_paths(cfg)
    reference = absolute_model(reference)
    if cfg.gate.rules is None:
        cfg = cfg.with_gate_rules(reference)
        without = reference is None and cfg.eval.reference is None
        log.info("gate: the %s profile%s", "holdout" if without and cfg.data.benchmark == "tofu"
                 else "retain_model", " (no retain model given)" if without else "")
    return cfg, absolute_model(model) or cfg.model.name_or_path, reference


def reference_for(cfg: Config, reference: str | None, out: Path):
    from unlearn.demo import eval_settings
    from unlearn.eval import load_reference

    source = reference or cfg.eval.reference
    if source is None:
        log.warning("no eval.reference (retain model or its eval JSON): forget quality and privleak "
                    "will be reported unavailable")
        return None
    return load_reference(source, eval_settings(cfg), output=out / "reference.json",
                          reuse=cfg.eval.reuse_reference)


def run_pipeline(cfg: Config, model: str | None = None, *, reference: str | None = None,
                 parent_run_id: str | None = None, before: dict | None = None,
                 epoch_metric: str | None = None) -> dict:
    """Unlearn ``cfg.data.forget_split`` from ``model`` on Ray Train; returns the summary.

    ``parent_run_id`` makes the MLflow run a child (Tune trials); ``before`` passes aggregates of
    the model before unlearning evaluated elsewhere (the gate's base), instead of evaluating here.
    ``epoch_metric`` (Tune trials with early stopping) evaluates the model after every epoch but
    the last and reports that metric, with ``epochs_done``, to the trial's Tune session.
    """
    import mlflow
    from mlflow import MlflowClient
    from ray.train import (CheckpointConfig, ControllerError, DataConfig, FailureConfig, RunConfig,
                           ScalingConfig)
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.data import tokenized_dataset
    from pipelines.stream import stream_data_config
    from pipelines.ray_env import ensure_ray
    from unlearn.demo import evaluate_stage
    from unlearn.eval import compare_table
    from unlearn.eval.report import headline
    from unlearn.report import plot_dual_dynamics, stop_line
    from unlearn.workflow import build_objective, resolve_source

    from pipelines.lineage import BaseError, is_registered_uri, recheck_requests, registered_base
    from pipelines.ray_env import runtime_env

    start = time.perf_counter()
    base_uri, model = (model, None) if is_registered_uri(model) else (None, model)
    cfg, spec, reference = driver_paths(cfg, model, reference)
    out = Path(cfg.output_dir)
    eval_dir = out / "eval"
    # 1. everything that can be wrong, before any worker starts
    objective = build_objective(cfg)
    data = read_inputs(cfg, objective)
    uri = tracking_uri(cfg)
    check_mlflow(uri)
    base = None
    if base_uri is not None:  # a registered version: verified, and its deletion requests carried on
        try:
            base = registered_base(MlflowClient(uri), base_uri, out / "base")
        except BaseError as exc:
            raise PipelineError(str(exc)) from None
        spec = base.folder
        print(f"starting from {base.name} version {base.version} ({base_uri}): "
              f"{len(base.requests)} earlier deletion request(s) in its lineage", flush=True)
    check_model(spec)
    ensure_ray(log_to_driver=cfg.ray.verbose)
    check_resources(cfg)
    scan_inputs(cfg, spec, objective, data)
    storage = cfg.ray.storage_path or str(out / "ray")
    run_id, resumed = start_or_resume_run(cfg, uri, run_identity(cfg, spec, storage), parent_run_id)
    client = MlflowClient(uri)
    # One Ray run directory per MLflow run: a re-run of an unfinished run resumes from its
    # checkpoints, a new run never picks up an older run's.
    ray_name = f"{cfg.run_name}-{run_id[:8]}"
    # Ray Train V2 restores a run from the checkpoints under storage/name by itself.
    resume_from = latest_checkpoint(storage, ray_name) if resumed else None
    print(f"MLflow run {run_id} ({'resumed' if resumed else 'new'}) at {uri}", flush=True)

    # 2. evaluate before
    ref = reference_for(cfg, reference, eval_dir)
    results: dict[str, dict] = {}
    if before is not None:
        results["before"] = {"aggregates": before}
    elif cfg.eval.before:
        print(f"evaluating {spec} before unlearning", flush=True)
        results["before"] = evaluate_stage(spec, cfg, ref, eval_dir, "before", reuse=cfg.eval.reuse_before)
        log_evaluation(client, run_id, "before", results["before"], eval_dir)

    # 3. unlearn on Ray Train
    r = cfg.ray
    loop_config = {"config": cfg.model_dump(mode="json"), "model": spec, "run_id": run_id,
                   "tracking_uri": uri, "storage_path": str(storage), "ray_name": ray_name}
    if cfg.data.streaming:
        datasets = dict(data.plan.datasets)
        loop_config["stream_rows"] = data.plan.rows
    else:
        datasets = {"forget": tokenized_dataset(data.forget, spec, max_length=cfg.data.max_length,
                                                prefix_tokens=objective.prefix_tokens())}
        if objective.wants_retain():  # the dual's methods want it too (calibration, constraint)
            datasets["retain"] = tokenized_dataset(data.retain, spec, max_length=cfg.data.max_length)
        if data.proxy is not None and objective.name == "egup":
            datasets["proxy"] = tokenized_dataset(data.proxy, spec, max_length=cfg.data.max_length)
    if data.stop is not None:
        datasets["stop"] = tokenized_dataset(data.stop, spec, max_length=cfg.data.max_length)
        loop_config["stop_auc"] = driver_stop_target(cfg, data, spec, reference)
    loop_config["datasets"] = sorted(datasets)
    callbacks = []
    if epoch_metric is not None:
        from dataclasses import asdict

        from unlearn.demo import eval_settings

        loop_config["epoch_eval"] = {"metric": epoch_metric, "settings": asdict(eval_settings(cfg)),
                                     "reference": ref}
        callbacks.append(_epoch_results_to_tune())
    trainer = TorchTrainer(
        _worker_entry,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if r.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=r.num_workers, use_gpu=r.use_gpu,
            resources_per_worker={"CPU": r.cpus_per_worker, **r.resources_per_worker}),
        run_config=RunConfig(name=ray_name, storage_path=str(storage),
                             failure_config=FailureConfig(
                                 max_failures=r.max_failures,
                                 controller_failure_limit=start_retries(r.wait_for_workers_s)),
                             checkpoint_config=CheckpointConfig(num_to_keep=r.keep_checkpoints),
                             callbacks=callbacks, worker_runtime_env=runtime_env()),
        datasets=datasets,
        dataset_config=(stream_data_config([n for n in STREAMED if n in datasets]) if cfg.data.streaming
                        else DataConfig(datasets_to_split=[])),
    )
    print(f"unlearning {cfg.data.forget_split} with {objective.name} on {r.num_workers} FSDP2 worker(s); "
          f"checkpoints in {storage}/{ray_name}"
          + (f"; resuming from {resume_from.path}" if resume_from else ""), flush=True)
    with TrainingProgress(client, run_id, desc=f"unlearn ({objective.name}, {r.num_workers} workers)",
                          eps_warning=objective.uses_dual):
        try:
            result = trainer.fit()
        except ControllerError as exc:
            if type(exc.controller_failure).__name__ != "WorkerGroupStartupTimeoutError":
                raise
            raise PipelineError(
                f"Ray Train could not (re)start {r.num_workers} worker(s) within ray.wait_for_workers_s="
                f"{r.wait_for_workers_s:g} s: the cluster lacks the capacity (a lost node not replaced?). "
                f"The checkpoints stay in {storage}/{ray_name}; once the capacity is back, the same command "
                f"resumes MLflow run {run_id} from the latest.") from None
    if result.checkpoint is None:
        raise RuntimeError("training ended without an exported model")
    model_dir = out / "unlearned"  # the run's model: full weights, or a LoRA run's adapters alone
    adapter_dir = out / "adapter"  # a LoRA run's adapters beside its merged model
    with result.checkpoint.as_directory() as folder:
        exported = Path(folder)
        for path in (model_dir, adapter_dir):
            if path.exists():
                shutil.rmtree(path)
        full = exported / "model"
        shutil.copytree(full if full.is_dir() else exported / "adapter", model_dir)
        if full.is_dir() and (exported / "adapter").is_dir():
            shutil.copytree(exported / "adapter", adapter_dir)

    # 4. evaluate after, artifacts, summary
    if cfg.eval.after:
        print(f"evaluating {model_dir} after unlearning", flush=True)
        results["after"] = evaluate_stage(str(model_dir), cfg, ref, eval_dir, "after")
        log_evaluation(client, run_id, "after", results["after"], eval_dir)
    rechecked = None
    if "after" in results and base is not None and base.requests and cfg.gate.recheck_earlier:
        print(f"re-checking the {len(base.requests)} earlier deletion request(s) on {model_dir}", flush=True)
        rechecked = recheck_requests(str(model_dir), cfg, reference or cfg.eval.reference, base.requests,
                                     eval_dir)
    history = step_history(client, run_id)
    stop = stop_summary(client, run_id, result.metrics, loop_config.get("stop_auc"))
    plot = plot_dual_dynamics(history, out / "dual_dynamics.png") if history else None
    with mlflow.start_run(run_id=run_id):
        from pipelines.models import log_hf_model

        model_uri = log_hf_model(model_dir).model_uri
    config_file = out / "config.yaml"
    import yaml

    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    client.log_artifact(run_id, str(config_file))
    if plot:
        client.log_artifact(run_id, str(plot))
    if adapter_dir.is_dir():
        client.log_artifacts(run_id, str(adapter_dir), "adapter")
    gate, version = None, None
    if "after" in results:
        from pipelines.registry import judge_and_register, lineage

        registration = judge_and_register(
            client, run_id, model_uri, rules=cfg.gate.rules, after=results["after"]["aggregates"],
            before=results.get("before", {}).get("aggregates"), reasons=results["after"]["unavailable"],
            model_name=cfg.registry.model_name, evaluation=results["after"], model_folder=model_dir,
            requests=base.requests if base else None, history=rechecked,
            lineage=lineage(cfg, f"models:/{base.name}/{base.version}" if base else spec,
                            data.forget_identity(), run_id, data=resolve_source(cfg)))
        gate, version = registration.gate.to_dict(), registration.version
    summary = {
        "gate": gate, "registered_version": version,
        "registered_model": cfg.registry.model_name if version else None,
        "before": results.get("before", {}).get("aggregates"),
        "after": results.get("after", {}).get("aggregates"),
        "mlflow_run_id": run_id, "mlflow_tracking_uri": uri, "model_dir": str(model_dir),
        "adapter_dir": str(adapter_dir) if adapter_dir.is_dir() else None, "model_uri": model_uri,
        "base_version": f"models:/{base.name}/{base.version}" if base else None, "rechecked": rechecked,
        "data": resolve_source(cfg), "method": objective.name, "workers": r.num_workers,
        "steps": len(history), "stop": stop, "plot": str(plot) if plot else None,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    client.log_artifact(run_id, str(out / "summary.json"))
    client.set_terminated(run_id, "FINISHED")

    columns = {k: v for k, v in results.items() if v is not None}
    keys = headline(cfg.data.benchmark)
    if columns:
        print()
        print(compare_table(columns, keys))
    if gate is not None:
        print("\n" + format_gate(gate))
        print(f"registered: {cfg.registry.model_name} version {version} (alias challenger)" if version
              else "not registered")
    if stop is not None:
        print(stop_line(stop))
    print(f"\nmodel: {model_dir}\nsummary: {out / 'summary.json'}\nMLflow UI: mlflow ui "
          f"--backend-store-uri {uri}  (run {run_id})", flush=True)
    mlflow.set_tracking_uri(None)
    return summary


def driver_stop_target(cfg: Config, data, spec: str, reference: str | None) -> float:
    """Early stopping's target AUC, measured once on the driver (``unlearn.workflow.stop_target``);
    a streamed run measures it on the forget set's sample."""
    from pipelines.data import features_of
    from unlearn.models import load_tokenizer
    from unlearn.workflow import build_stopper, encode_records

    tokenizer = load_tokenizer(spec)
    stop = encode_records(tokenizer, data.stop, max_length=cfg.data.max_length)
    if cfg.data.streaming:
        forget = features_of(data.plan.datasets["forget_sample"])
    else:
        forget = encode_records(tokenizer, data.forget, max_length=cfg.data.max_length)
    stopper = build_stopper(cfg, tokenizer.pad_token_id, forget, stop,
                            reference=reference or cfg.eval.reference)
    return stopper.auc


STREAMED = ("forget", "retain")  # split equally among the workers; the other sets go whole to each


class StreamInputs:
    """A streamed run's inputs on the driver: the source and the (small) stop split; the
    training sets stay files until :func:`pipelines.stream.plan_streams` scans them."""

    def __init__(self, cfg: Config) -> None:
        from unlearn.workflow import resolve_source, stop_records

        self.source = resolve_source(cfg)
        self.stop = stop_records(cfg, self.source)
        self.plan = None

    def forget_identity(self) -> tuple[int, str]:
        return self.plan.forget_identity()


def read_inputs(cfg: Config, objective):
    """The run's data on the driver: every record, validated (``unlearn.workflow.load_unlearn_data``),
    or with ``data.streaming`` only the source and the stop split, until :func:`scan_inputs`."""
    from unlearn.workflow import load_unlearn_data

    if not cfg.data.streaming:
        return load_unlearn_data(cfg)
    if objective.name == "egup" and objective.params.get("use_intra"):
        raise PipelineError("method egup with use_intra keeps every forget sample's initial embedding, "
                            "which a streamed run does not hold: set method.params.use_intra=false or "
                            "data.streaming=false")
    return StreamInputs(cfg)


def scan_inputs(cfg: Config, spec: str, objective, data) -> None:
    """A streamed run's validating scan of its files, on the cluster (Ray must be up)."""
    from pipelines.stream import plan_streams

    if cfg.data.streaming:
        data.plan = plan_streams(cfg, spec, objective, data.source, data.stop)


def stop_summary(client, run_id: str, final: dict, target: float | None) -> dict | None:
    """Early stopping's record from the worker's last report and the ``stop_auc`` metric that
    rank 0 logged at each check (its MLflow step: steps done)."""
    from unlearn.workflow import stop_record

    if target is None:
        return None
    stopped = final.get("stopped_after_epochs", -1)
    per_epoch = final.get("steps_per_epoch", 1.0)
    aucs = {m.step / per_epoch: m.value for m in client.get_metric_history(run_id, "stop_auc")}
    return stop_record(target, None if stopped < 0 else stopped, aucs)


def run_demo_pipeline(cfg: Config) -> dict:
    """The demo: finetune target and retain models (one process), then the whole pipeline."""
    from unlearn.demo import finetune_stage

    out, start, finetuned = finetune_stage(cfg, "[1/2]")
    print(f"[2/2] Ray pipeline: unlearning {cfg.data.forget_split} from the target", flush=True)
    summary = run_pipeline(cfg, finetuned["target"], reference=finetuned["retain"])
    summary["finetune"] = {k: v for k, v in finetuned.items() if not k.endswith("history")}
    summary["seconds"] = round(time.perf_counter() - start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"demo finished in {summary['seconds']} s", flush=True)
    return summary


def _epoch_results_to_tune():
    """A Train callback that forwards the workers' per-epoch evaluations (reports that carry
    ``epochs_done``) to the Tune trial, for ASHA; checkpoint reports stay with Ray Train."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochResultsToTune(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and "epochs_done" in metrics[0]:
                super().after_report(run_context, metrics, None)

    return EpochResultsToTune()


def _worker_entry(loop_config: dict) -> None:
    from pipelines.train import train_loop_per_worker

    train_loop_per_worker(loop_config)


__all__ = ["PipelineError", "run_pipeline", "tracking_uri", "ConfigError", "DataError"]
