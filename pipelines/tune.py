"""Ray Tune over the constraint thresholds, top-k and the optimiser settings.

Train V2 pattern: each trial is a driver function that runs the whole pipeline (build and fit a
``TorchTrainer``, export, evaluate) as an MLflow child run of the search's parent run. The model
before unlearning and the reference are evaluated once, by the parent. Optuna searches either
two objectives (maximise forget quality and model utility) or one metric. Afterwards the parent
gets a Pareto plot and a table of every trial with its gate verdict. The best trial that passes
the gate (by ``tune.metric``, else forget quality) is registered; where none passes, the best above
the gate's utility floor is judged, and turned down, on the record.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from unlearn.config import Config, build_config
from unlearn.gate import parse_rules

log = logging.getLogger(__name__)

OBJECTIVES = ("forget_quality", "model_utility")


def search_space(cfg: Config) -> dict:
    from ray import tune

    space = {}
    for key, spec in cfg.tune.search_space.items():
        kind, values = next(iter(spec.items()))
        if kind == "choice":
            space[key] = tune.choice(values)
        elif kind == "randint":
            space[key] = tune.randint(int(values[0]), int(values[1]) + 1)
        else:
            space[key] = getattr(tune, kind)(float(values[0]), float(values[1]))
    return space


def check_space(cfg: Config) -> None:
    """Build the config at the corners of the space, so a bad combination fails before any trial."""
    base = cfg.model_dump(mode="json")
    corners = [{}, {}]
    for key, spec in cfg.tune.search_space.items():
        kind, values = next(iter(spec.items()))
        corners[0][key], corners[1][key] = values[0], values[-1]
    for corner in corners:
        build_config(base, [f"{k}={json.dumps(v)}" for k, v in corner.items()])


def check_ranking(cfg: Config, reference: str | None) -> None:
    """Without a retain model, forget quality and privleak are unavailable: trials cannot be ranked
    by them (every trial would tie), so the search needs another tune.metric."""
    from pipelines.run import PipelineError

    metric = cfg.tune.metric or OBJECTIVES[0]
    if reference is None and cfg.eval.reference is None and metric in ("forget_quality", "privleak"):
        raise PipelineError(f"tune ranks trials by {metric}, which needs a retain model (--reference or "
                            "eval.reference); without one, set tune.metric to what the holdout gate "
                            "reads, e.g. tune.metric=mia_min_k_pvalue tune.mode=max")


def utility_floor(cfg: Config, before: dict | None) -> float | None:
    """The gate's lower bound on model utility (None when the gate has no such rule)."""
    for rule in parse_rules(cfg.gate_rules()):
        if rule.metric == "model_utility" and rule.op in (">=", ">"):
            if rule.value is not None:
                return rule.value
            base = (before or {}).get(rule.base_metric)
            return None if base is None else rule.factor * base
    return None


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """Which points no other point beats on both coordinates (both maximised)."""
    return [not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points) for p in points]


def plot_pareto(rows: list[dict], out_file: Path, *, label: str = "trial",
                title: str = "trials (red: Pareto front)") -> Path:
    """Forget quality against model utility, one point per row, named by its ``label`` key (trial
    ids by their last 5 characters)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["forget_quality"] is not None and r["model_utility"] is not None]
    points = [(r["forget_quality"], r["model_utility"]) for r in done]
    front = pareto_front(points)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for (fq, mu), on_front, row in zip(points, front, done):
        ax.scatter(fq, mu, c="tab:red" if on_front else "tab:gray", s=40)
        name = row[label][-5:] if label == "trial" else row[label]
        ax.annotate(name, (fq, mu), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel("forget quality (KS p-value vs retain model)")
    ax.set_ylabel("model utility")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out_file, dpi=120)
    plt.close(fig)
    return out_file


def _trial(params: dict, setup: dict) -> None:
    """One Tune trial: the pipeline with ``params`` applied, as a child run of the search."""
    from ray import tune

    from pipelines.run import run_pipeline

    name = tune.get_context().get_trial_name()
    overrides = [f"{k}={json.dumps(v)}" for k, v in params.items()]
    overrides += [f"output_dir={setup['output_dir']}/{name}", f"run_name={setup['run_name']}-{name}",
                  "eval.before=false", "registry.model_name=null"]
    cfg = build_config(setup["config"], overrides)
    metric = cfg.tune.metric
    summary = finished_child(cfg, setup["parent_run_id"])
    if summary is not None:
        print(f"trial {name} had finished when the search was interrupted: its child run "
              f"{summary['mlflow_run_id']} is reported, not run again", flush=True)
    else:
        try:
            summary = run_pipeline(cfg, setup["model"], reference=setup["reference"],
                                   parent_run_id=setup["parent_run_id"], before=setup["before"],
                                   epoch_metric=metric if cfg.tune.early_stopping else None)
        except BaseException:
            _mark_failed(cfg)  # the child run says FAILED; Tune records the error and goes on
            raise
    after = summary["after"] or {}
    report = {k: _number(after.get(k), 0.0) for k in OBJECTIVES}
    report["privleak"] = _number(after.get("privleak"))
    if metric:
        report[metric] = _number(after.get(metric))
    tune.report({**report, "epochs_done": float(cfg.train.epochs), "child_run_id": summary["mlflow_run_id"],
                 "model_uri": summary["model_uri"]})


def finished_child(cfg: Config, parent_run_id: str) -> dict | None:
    """The summary of this trial's child run if it finished already, else None.

    A search interrupted after a trial's run ended but before Tune saved the trial as ended
    restarts that trial when it resumes; trained again, it would start a second child run (a
    finished run is never resumed) and spend the trial's time twice.
    """
    import tempfile

    from mlflow import MlflowClient

    from pipelines.run import RUN_NAME_TAG, tracking_uri

    client = MlflowClient(tracking_uri(cfg))
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id], max_results=10,
                              filter_string=f"tags.`{RUN_NAME_TAG}` = '{cfg.run_name}' and "
                                            f"tags.`mlflow.parentRunId` = '{parent_run_id}' and "
                                            "attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"])
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            try:  # run_pipeline logs the summary last, before it marks the run FINISHED
                path = client.download_artifacts(run.info.run_id, "summary.json", tmp)
            except Exception:  # noqa: BLE001 - no summary: not a run that can be reported
                continue
            return json.loads(Path(path).read_text())
    return None


def _number(value, missing: float = float("nan")) -> float:
    return missing if value is None else float(value)


def finished_trials(grid) -> int:
    """How many trials ended (done, stopped early or failed), read from the state Tune saved when
    the search ended: after an interruption the returned grid marks every trial TERMINATED."""
    from ray.tune import ExperimentAnalysis

    saved = ExperimentAnalysis(grid.experiment_path, storage_filesystem=grid.filesystem)
    return sum(t.status in ("TERMINATED", "ERROR") for t in saved.trials)


def trial_row(result, cfg: Config) -> dict:
    """One line of the search's table: the trial's point, its final metrics and how it ended."""
    metrics = result.metrics or {}
    status = "failed" if result.error else "done" if metrics.get("model_uri") else "stopped early"
    row = {"trial": metrics.get("trial_id") or (Path(result.path).name if result.path else "?"),
           **{k: result.config.get(k) for k in cfg.tune.search_space}}
    for key in dict.fromkeys([*(k for k in [cfg.tune.metric] if k), *OBJECTIVES, "privleak"]):
        value = metrics.get(key)
        row[key] = None if value is None or value != value else value  # NaN: not available
    if status == "stopped early":  # its last value is a per-epoch one; the model was never exported
        row.update({k: None for k in OBJECTIVES if k != cfg.tune.metric})
    row.update({"epochs": int(metrics["epochs_done"]) if "epochs_done" in metrics else None,
                "child_run_id": metrics.get("child_run_id"), "model_uri": metrics.get("model_uri"),
                "status": status})
    if result.error:
        row["error"] = str(result.error).splitlines()[0][:300]
    return row


def best_trial(rows: list[dict], metric: str | None, mode: str = "max") -> dict | None:
    """The best of ``rows``: by ``metric`` (one-objective search), else highest forget quality."""
    key = metric or "forget_quality"
    scored = [r for r in rows if r.get(key) is not None]
    if not scored:
        return None
    sign = -1.0 if metric and mode == "min" else 1.0
    return max(scored, key=lambda r: sign * r[key])


def finished(row: dict) -> bool:
    """A trial that ran to the end and logged a model (one that can be judged and registered)."""
    return row["status"] == "done" and bool(row["model_uri"])


def choose_trial(rows: list[dict], metric: str | None, mode: str, floor: float | None) -> dict | None:
    """The trial to register: the best of those that pass the gate (``row["gate"] == "pass"``);
    where none does, the best above the utility floor, which the gate then turns down on the record.

    Ranking by the search's metric alone picked a trial the gate refused (real TOFU: the highest
    forget quality over-forgot to privleak -91) while a lower-ranked one might have passed.
    """
    done = [r for r in rows if finished(r)]
    passing = [r for r in done if r.get("gate") == "pass"]
    if passing:
        return best_trial(passing, metric, mode)
    return best_trial([r for r in done if floor is None or (r["model_utility"] or 0) >= floor], metric, mode)


def gate_each_trial(client, rows: list[dict], rules: list[str], before: dict | None, dst: Path) -> None:
    """Judge every finished trial on its logged evaluation: ``row["gate"]`` is ``pass`` or
    ``FAIL: <metrics>`` (what the table shows and :func:`choose_trial` reads)."""
    from unlearn.gate import judge

    for row in filter(finished, rows):
        evaluation = trial_evaluation(client, row, dst / row["trial"])
        row["gate"] = judge(rules, evaluation["aggregates"], before, evaluation.get("unavailable")).brief()


def plot_epoch_curves(grid, metric: str, epochs: int, out_file: Path) -> Path | None:
    """The metric after each epoch, one line per trial; a cross where ASHA stopped a trial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4.5))
    drawn = 0
    for result in grid:
        frame = result.metrics_dataframe
        if frame is None or metric not in frame or "epochs_done" not in frame:
            continue
        points = frame[["epochs_done", metric]].dropna()
        if points.empty:
            continue
        label = str(frame["trial_id"].iloc[-1]) if "trial_id" in frame else Path(result.path).name
        line, = ax.plot(points["epochs_done"], points[metric], marker="o", label=label)
        if points["epochs_done"].iloc[-1] < epochs and result.error is None:
            ax.scatter(points["epochs_done"].iloc[-1:], points[metric].iloc[-1:], marker="x", s=120,
                       color=line.get_color(), zorder=3)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epochs")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per epoch (x: stopped early by ASHA)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_file, dpi=120)
    plt.close(fig)
    return out_file


def _close_stopped_trials(client, rows: list[dict]) -> None:
    """The child runs of trials ASHA stopped: KILLED and tagged, whatever the stopped trial's
    process managed to write first (it may have marked its run FAILED as Tune tore it down)."""
    for row in rows:
        if row["status"] == "stopped early" and row["child_run_id"]:
            client.set_tag(row["child_run_id"], "tune.stopped_early", "true")
            client.set_terminated(row["child_run_id"], "KILLED")


def _mark_failed(cfg: Config) -> None:
    from mlflow import MlflowClient

    from pipelines.run import RUN_NAME_TAG, tracking_uri

    # Only a RUNNING run: one the search already closed (a trial ASHA stopped) stays as it is.
    client = MlflowClient(tracking_uri(cfg))
    for run in client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  filter_string=f"tags.`{RUN_NAME_TAG}` = '{cfg.run_name}' and "
                                                "attributes.status = 'RUNNING'"):
        client.set_terminated(run.info.run_id, "FAILED")


def parent_run(client, experiment_id: str, name: str, identity: dict[str, str]) -> str:
    """The search's MLflow run: the unfinished one of an interrupted search with the same
    identity (config, model, output), else a new one."""
    from pipelines.run import RUN_NAME_TAG, unfinished_run

    existing, why_not = unfinished_run(client, experiment_id, name, identity)
    if existing:
        return existing
    if why_not:
        print(why_not, flush=True)
    return client.create_run(experiment_id, run_name=name,
                             tags={RUN_NAME_TAG: name, "unlearn.kind": "tune", **identity}).info.run_id


def trial_evaluation(client, trial: dict, dst: Path) -> dict:
    """A finished trial's evaluation as its run logged it, downloaded into ``dst`` (emptied first)."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    return json.loads(Path(client.download_artifacts(trial["child_run_id"], "eval/after.json",
                                                     str(dst))).read_text())


def trial_outputs(client, trial: dict, dst: Path) -> tuple[dict, str]:
    """A finished trial's evaluation and model folder, as its run logged them (what gets registered)."""
    from pipelines.models import download_model

    evaluation = trial_evaluation(client, trial, dst)
    return evaluation, download_model(trial["model_uri"], dst / "model")


def run_tune(cfg: Config, model: str | None = None, *, reference: str | None = None) -> dict:
    """The search; returns the table of trials, the best trial and its registration."""
    import mlflow
    from mlflow import MlflowClient
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from pipelines.ray_env import ensure_ray
    from pipelines.registry import judge_and_register, lineage
    from pipelines.run import (
        check_mlflow,
        check_model,
        check_resources,
        driver_paths,
        driver_stop_target,
        read_inputs,
        reference_for,
        run_identity,
        scan_inputs,
        tracking_uri,
    )
    from unlearn.demo import evaluate_stage
    from unlearn.workflow import build_objective

    start = time.perf_counter()
    if not cfg.tune.search_space:
        raise ValueError("tune.search_space is empty: name at least one parameter to search")
    check_space(cfg)
    cfg, spec, reference = driver_paths(cfg, model, reference)
    check_ranking(cfg, reference)
    out = Path(cfg.output_dir)
    objective = build_objective(cfg)
    data = read_inputs(cfg, objective)
    check_model(spec)
    uri = tracking_uri(cfg)
    check_mlflow(uri)
    ensure_ray()
    check_resources(cfg)
    scan_inputs(cfg, spec, objective, data)  # streamed: validated once here; each trial scans again

    experiment = mlflow.set_experiment(cfg.mlflow.experiment)
    client = MlflowClient(uri)
    parent_id = parent_run(client, experiment.experiment_id, f"{cfg.run_name}-tune",
                           run_identity(cfg, spec, str(out / "tune")))
    if "search_space" not in client.get_run(parent_id).data.params:
        client.log_param(parent_id, "search_space", json.dumps(cfg.tune.search_space))
    eval_dir = out / "eval"
    ref = reference_for(cfg, reference, eval_dir)
    written = eval_dir / "reference.json"  # the reference model's evaluation, reused by every trial
    reference_json = str(written) if written.is_file() else reference
    if data.stop is not None and cfg.stop.auc is None:
        # Trials get the reference's eval JSON, not the model: they share the target measured here.
        target = driver_stop_target(cfg, data, spec, reference)
        cfg = cfg.model_copy(update={"stop": cfg.stop.model_copy(update={"auc": target})})
    print(f"evaluating {spec} before unlearning (once, for every trial)", flush=True)
    before = evaluate_stage(spec, cfg, ref, eval_dir, "before", reuse=cfg.eval.reuse_before)["aggregates"]

    metric, mode = cfg.tune.metric, cfg.tune.mode
    scheduler = None
    if metric:
        searcher = OptunaSearch(metric=metric, mode=mode, seed=cfg.tune.seed)
        if cfg.tune.early_stopping:
            from ray.tune.schedulers import ASHAScheduler

            scheduler = ASHAScheduler(time_attr="epochs_done", metric=metric, mode=mode,
                                      max_t=cfg.train.epochs,
                                      grace_period=min(cfg.tune.grace_period, cfg.train.epochs),
                                      reduction_factor=cfg.tune.reduction_factor)
    else:
        searcher = OptunaSearch(metric=list(OBJECTIVES), mode=["max", "max"], seed=cfg.tune.seed)
    per_trial = (cfg.ray.num_workers * cfg.ray.cpus_per_worker
                 + (cfg.ray.data_cpus if cfg.data.streaming else 0))
    import ray

    fits = max(1, int(ray.cluster_resources().get("CPU", 1) // per_trial))
    concurrency = min(cfg.tune.max_concurrent_trials or fits, fits)
    setup = {"config": cfg.model_dump(mode="json"), "model": spec, "reference": reference_json,
             "parent_run_id": parent_id, "before": before, "output_dir": str(out / "trials"),
             "run_name": cfg.run_name}
    # The trial's driver needs no CPU (its TorchTrainer asks for the workers' CPUs); Tune wants a
    # non-empty request, so it asks for one byte of memory.
    trainable = tune.with_resources(tune.with_parameters(_trial, setup=setup), {"cpu": 0, "memory": 1})
    storage = str(out / "tune")
    name = f"{cfg.run_name}-tune"
    if tune.Tuner.can_restore(f"{storage}/{name}"):
        print(f"resuming the interrupted search in {storage}/{name}", flush=True)
        tuner = tune.Tuner.restore(f"{storage}/{name}", trainable=trainable, resume_errored=False)
    else:
        tuner = tune.Tuner(
            trainable, param_space=search_space(cfg),
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                        num_samples=cfg.tune.num_samples, max_concurrent_trials=concurrency),
            run_config=tune.RunConfig(name=name, storage_path=storage,
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
    print(f"searching {len(cfg.tune.search_space)} parameter(s), {cfg.tune.num_samples} trials, "
          f"{concurrency} at a time"
          + (f"; ASHA stops trials early on {metric} ({mode}) after each epoch" if scheduler else ""),
          flush=True)
    grid = tuner.fit()
    finished = finished_trials(grid)
    if finished < cfg.tune.num_samples:
        # Ctrl+C: Tune saved its state; the parent run stays open for the resumed search.
        print(f"search interrupted after {finished} of {cfg.tune.num_samples} trials; run the same "
              "command again to resume it", flush=True)
        mlflow.set_tracking_uri(None)
        return {"parent_run_id": parent_id, "interrupted": True}

    rows = [trial_row(result, cfg) for result in grid]
    _close_stopped_trials(client, rows)
    gate_each_trial(client, rows, cfg.gate.rules, before, out / "trial_evals")
    (out / "tune_trials.json").write_text(json.dumps(rows, indent=2))
    client.log_artifact(parent_id, str(out / "tune_trials.json"))
    plot = plot_pareto(rows, out / "pareto.png")
    client.log_artifact(parent_id, str(plot))
    from unlearn.report import format_table

    curves = scheduler and plot_epoch_curves(grid, metric, cfg.train.epochs, out / "epoch_curves.png")
    if curves:
        client.log_artifact(parent_id, str(curves))
    header = ["trial", *cfg.tune.search_space, *([metric] if metric not in (None, *OBJECTIVES) else []),
              "forget_quality", "model_utility", "privleak", "epochs", "status", "gate"]
    table = format_table(header, [[r.get(h) for h in header] for r in rows])
    (out / "tune_trials.txt").write_text(table + "\n")
    client.log_artifact(parent_id, str(out / "tune_trials.txt"))
    print()
    print(table)

    floor = utility_floor(cfg, before)
    best = choose_trial(rows, metric, mode, floor)
    registration = None
    if best is None:
        print(f"no trial passed the gate or reached the utility floor {floor:.4g}: nothing to register"
              if floor is not None else "no trial finished: nothing to register", flush=True)
    else:
        if best.get("gate") != "pass":
            print("no trial passed the gate; judging the best above the utility floor", flush=True)
        # The best trial's own configuration (the search point applied), for its config hash.
        trial_cfg = build_config(cfg.model_dump(mode="json"),
                                 [f"{k}={json.dumps(best[k])}" for k in cfg.tune.search_space])
        evaluation, model_folder = trial_outputs(client, best, out / "best")
        registration = judge_and_register(
            client, best["child_run_id"], best["model_uri"], rules=cfg.gate.rules,
            after=evaluation["aggregates"], before=before, reasons=evaluation.get("unavailable"),
            model_name=cfg.registry.model_name, evaluation=evaluation, model_folder=model_folder,
            lineage=lineage(trial_cfg, spec, data.forget_identity(),
                            best["child_run_id"], tune_parent_run_id=parent_id,
                            tune_trial=best["trial"]))
        verdict = "passed" if registration.gate.passed else "failed"
        print(f"best trial {best['trial']}: "
              + ", ".join(f"{k} {best[k]:.4g}" for k in dict.fromkeys([metric or OBJECTIVES[0], *OBJECTIVES])
                          if best.get(k) is not None) + f"; gate {verdict}"
              + (f"; registered {cfg.registry.model_name} version {registration.version} (challenger)"
                 if registration.version else ""), flush=True)
        client.set_tag(parent_id, "best_trial", best["trial"])
    client.set_terminated(parent_id, "FINISHED")
    summary = {"parent_run_id": parent_id, "trials": rows, "best": best, "utility_floor": floor,
               "gate": registration.gate.to_dict() if registration else None,
               "registered_version": registration.version if registration else None,
               "pareto_plot": str(plot), "seconds": round(time.perf_counter() - start, 1)}
    (out / "tune_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    mlflow.set_tracking_uri(None)
    return summary
