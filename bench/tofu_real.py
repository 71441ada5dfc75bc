"""The real-data benchmark: SmolLM2-135M on a subset of the real TOFU, every method through the Ray
pipeline at equal compute, one table, one plot, one MLflow parent run.

    python bench/tofu_real.py                      # forget01, 8 retain authors, CPU
    python bench/tofu_real.py --device cuda        # the same on a GPU (one Ray worker per GPU)
    python bench/tofu_real.py --methods pdu npo    # a few methods; finished ones are kept

Steps, each skipped when its output is already there (a re-run resumes; ``--fresh`` starts over):

1. ``bench/tofu_subset.py``'s subset of ``--data`` in ``OUT/data``: the forget split, its holdout
   and perturbed rows, the first ``--retain-authors`` retain authors, EGUP's proxy authors and the
   general-knowledge splits (``--utility-rows`` rows of each utility split).
2. ``unlearn finetune`` on ``configs/tofu_smollm2_pdu.yaml``'s settings: the target (forget +
   retain) and the retain model (retain only) in ``OUT/target``, ``OUT/retain``.
3. Both evaluated (``OUT/evals/retain.json`` is every run's reference, ``target.json`` the gate's
   "before").
4. Each method unlearns the forget split from the target through ``pipelines.run.run_pipeline``
   (Ray Train, FSDP2 workers) with the config's epochs, batches, lr and dual, and its own default
   parameters (``unlearn methods``); each is an MLflow child of one parent run. Nothing is
   registered: this is a benchmark, judged by the TOFU (retain-model) gate.
5. The table (``OUT/table.md``, printed), ``OUT/results.json`` and ``OUT/fq_vs_mu.png`` (forget
   quality against model utility), logged to the parent run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from tofu_subset import write_subset  # noqa: E402

from unlearn.config import Config, load_config  # noqa: E402

# label -> method overrides; the top-k variant keeps PDU's flattening on the 5 largest logits only.
# pdu_eta1000: the config's PDU with a dual step scaled to this model's constraint (its retain loss
# after finetuning is ~0.06, so a violation of ~0.1 moved lam by 0.5 a step at eta_dual 5 and lam
# stayed at ~lam_0 for the whole run; at 1000 it moves by ~100)
METHODS = {
    "pdu": ["method.name=pdu"],
    "pdu_top5": ["method.name=pdu", "method.params.top_k=5"],
    "pdu_eta1000": ["method.name=pdu", "dual.eta_dual=1000"],
    "npo": ["method.name=npo"],
    "simnpo": ["method.name=simnpo"],
    "grad_diff": ["method.name=grad_diff"],
    "unilogit": ["method.name=unilogit"],
    "palu": ["method.name=palu"],
    "egup": ["method.name=egup"],
}
COLUMNS = ("forget_quality", "model_utility", "forget_prob", "holdout_prob", "forget_rouge", "holdout_rouge",
           "forget_truth_ratio", "privleak", "extraction_strength", "mia_min_k_auc")


def stage_overrides(args, out: Path) -> list[str]:
    """The config of every stage: the subset in ``out/data``, no early stopping, nothing registered."""
    overrides = [f"output_dir={out}", f"data.source={out / 'data'}", f"data.forget_split={args.forget_split}",
                 "data.retain_split=retain", "data.full_split=null", "data.proxy_split=proxy",
                 "stop.enabled=false", "registry.model_name=null", f"device={args.device}"]
    if args.device == "cuda":
        overrides += ["ray.use_gpu=true", f"ray.num_workers={args.workers or 1}"]
    elif args.workers:
        overrides.append(f"ray.num_workers={args.workers}")
    return overrides + list(args.overrides)


def prepare(cfg: Config, out: Path) -> dict[str, str]:
    """Steps 2 and 3 in a child process (reused when present): the finetuning's memory must be
    gone before the Ray workers start. Done in this process, glibc kept what they freed (the driver
    held 5.1 GB after them and one method), and NPO's two workers then ran 24 GB out of memory."""
    evals = {role: str(out / "evals" / f"{role}.json") for role in ("retain", "target")}
    if (out / "finetune.json").is_file() and all(Path(path).is_file() for path in evals.values()):
        return evals
    child = multiprocessing.get_context("spawn").Process(target=finetune_and_evaluate, args=(cfg, out))
    child.start()
    child.join()
    if child.exitcode != 0:
        sys.exit(f"error: finetuning or evaluating the target and retain models failed "
                 f"(exit {child.exitcode})")
    return evals


def finetune_and_evaluate(cfg: Config, out: Path) -> None:
    from unlearn.demo import evaluate_stage
    from unlearn.eval import EvalReference
    from unlearn.workflow import run_finetune

    evals = out / "evals"
    if not (out / "finetune.json").is_file():
        start = time.perf_counter()
        print(f"finetuning target and retain models of {cfg.model.name_or_path} on {out / 'data'}",
              flush=True)
        run_finetune(cfg)
        print(f"finetuned in {time.perf_counter() - start:.0f} s", flush=True)
    for role in ("retain", "target"):
        if not (evals / f"{role}.json").is_file():
            start = time.perf_counter()
            reference = None if role == "retain" else EvalReference.from_result(
                json.loads((evals / "retain.json").read_text()), str(evals / "retain.json"))
            evaluate_stage(str(out / role), cfg, reference, evals, role)
            print(f"evaluated {role} in {time.perf_counter() - start:.0f} s", flush=True)


def parent_run_id(cfg: Config, out: Path) -> str:
    """One MLflow parent run per benchmark folder: the same run again when the benchmark resumes."""
    from mlflow import MlflowClient

    from pipelines.run import check_mlflow, tracking_uri
    from pipelines.tune import parent_run

    uri = tracking_uri(cfg)
    check_mlflow(uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    experiment_id = (experiment.experiment_id if experiment
                     else client.create_experiment(cfg.mlflow.experiment))
    name = f"bench-tofu-real-{cfg.data.forget_split}"
    run_id = parent_run(client, experiment_id, name, {"unlearn.bench_output": str(out.resolve())})
    client.set_tag(run_id, "unlearn.kind", "benchmark")
    return run_id


def run_method(args, label: str, out: Path, evals: dict, before: dict, parent: str) -> dict:
    from pipelines.run import run_pipeline

    cfg = load_config(args.config, [*stage_overrides(args, out), *METHODS[label],
                                    f"output_dir={out / 'methods' / label}",
                                    f"run_name=bench-{args.forget_split}-{label}"])
    summary = run_pipeline(cfg, str(out / "target"), reference=evals["retain"], parent_run_id=parent,
                           before=before)
    steps, train_s = step_times(cfg, summary["mlflow_run_id"])
    return {"model": label, **metric_cells(summary["after"], before), "steps": steps,
            "train_s": train_s, "seconds": summary["seconds"],
            "gate": "pass" if summary["gate"]["passed"] else "FAIL",
            "mlflow_run_id": summary["mlflow_run_id"]}


def metric_cells(aggregates: dict, before: dict) -> dict:
    """A row's metrics, and the verdict of the gate a deployment without a retain model would
    apply (``unlearn.gate.HOLDOUT_RULES``, against the target as ``before``)."""
    from unlearn.gate import HOLDOUT_RULES, judge

    return {**{k: aggregates.get(k) for k in COLUMNS},
            "holdout_gate": judge(list(HOLDOUT_RULES), aggregates, before).brief()}


def step_times(cfg: Config, run_id: str) -> tuple[int, float]:
    """The run's optimizer steps and their time alone (the sum of the step times its workers
    logged), without Ray's start-up, the export and the evaluation that ``seconds`` also counts."""
    from mlflow import MlflowClient

    from pipelines.run import tracking_uri

    history = MlflowClient(tracking_uri(cfg)).get_metric_history(run_id, "step_time")
    return len(history), round(sum(metric.value for metric in history), 1)


def reference_row(label: str, path: str, before: dict) -> dict:
    """A model evaluated before any unlearning, with the holdout gate's verdict on it: the profile
    must pass the retain model, which never saw the forget set, and fail the finetuned target."""
    agg = json.loads(Path(path).read_text())["aggregates"]
    return {"model": label, **metric_cells(agg, before), "steps": None, "train_s": None,
            "seconds": None, "gate": None, "mlflow_run_id": None}


def table(rows: list[dict]) -> str:
    """A Markdown table (what the README prints)."""
    header = ["model", *COLUMNS, "steps", "train_s", "seconds", "gate", "holdout_gate"]

    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(row.get(k)) for k in header) + " |" for row in rows]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/tofu", help="the real TOFU splits")
    parser.add_argument("--forget-split", default="forget01")
    parser.add_argument("--retain-authors", type=int, default=8)
    parser.add_argument("--utility-rows", type=int, default=40, help="rows kept of each utility split")
    parser.add_argument("--config", default=str(ROOT / "configs" / "tofu_smollm2_pdu.yaml"))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), metavar="METHOD",
                        help=f"of {', '.join(METHODS)} (default: all)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--workers", type=int, default=None, help="Ray Train workers (default: the "
                        "config's on CPU, 1 on CUDA)")
    parser.add_argument("--out", default=None, help="default outputs/tofu-real-<forget split>")
    parser.add_argument("--fresh", action="store_true", help="delete OUT first instead of resuming")
    parser.add_argument("overrides", nargs="*", help="key.path=value config overrides for every stage")
    args = parser.parse_args(argv)
    split_overrides_from_methods(parser, args)
    return args


def main() -> None:
    args = parse_args()
    if not Path(args.data).is_dir():
        sys.exit(f"error: --data {args.data} is not a folder (the real TOFU splits, ../shared/data/tofu)")
    out = Path(args.out or f"outputs/tofu-real-{args.forget_split}").resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    write_subset(Path(args.data), args.forget_split, args.retain_authors, out / "data", args.utility_rows)
    cfg = load_config(args.config, stage_overrides(args, out))
    evals = prepare(cfg, out)
    before = json.loads(Path(evals["target"]).read_text())["aggregates"]  # the gates' "before"
    parent = parent_run_id(cfg, out)
    results_file = out / "results.json"
    done = {r["model"]: r for r in json.loads(results_file.read_text())} if results_file.is_file() else {}
    for label in args.methods:
        if label in done:
            print(f"{label}: done before ({done[label]['seconds']} s), kept", flush=True)
            continue
        print(f"\n=== {label} ===", flush=True)
        done[label] = run_method(args, label, out, evals, before, parent)
        results_file.write_text(json.dumps(list(done.values()), indent=2))
    report(cfg, out, parent, evals, before, [done[label] for label in METHODS if label in done])


def split_overrides_from_methods(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--methods npo grad_diff train.lr=4e-5``: argparse hands the overrides to ``--methods``;
    give them back to ``overrides``, and refuse what is neither a method nor an override."""
    args.overrides = [item for item in args.methods if "=" in item] + args.overrides
    args.methods = [item for item in args.methods if "=" not in item]
    unknown = [item for item in args.methods if item not in METHODS]
    if unknown or not args.methods:
        parser.error(f"--methods: {', '.join(unknown) or 'none given'}: choose from {', '.join(METHODS)}")


def report(cfg: Config, out: Path, parent: str, evals: dict, before: dict, rows: list[dict]) -> None:
    from mlflow import MlflowClient

    from pipelines.run import tracking_uri
    from pipelines.tune import plot_pareto

    for row in rows:  # rows written by an older version of this script
        if row.get("train_s") is None and row.get("mlflow_run_id"):
            row["steps"], row["train_s"] = step_times(cfg, row["mlflow_run_id"])
        after_file = out / "methods" / row["model"] / "eval" / "after.json"
        if "holdout_gate" not in row and after_file.is_file():
            row.update(metric_cells(json.loads(after_file.read_text())["aggregates"], before))
    rows = [reference_row("retain model", evals["retain"], before),
            reference_row("target", evals["target"], before), *rows]
    text = table(rows)
    print("\n" + text)
    (out / "table.md").write_text(text + "\n")
    plot = plot_pareto(rows, out / "fq_vs_mu.png", label="model",
                       title=f"SmolLM2-135M, real TOFU {cfg.data.forget_split} (red: Pareto front)")
    client = MlflowClient(tracking_uri(cfg))
    for path in (out / "table.md", out / "results.json", plot):
        if path.is_file():
            client.log_artifact(parent, str(path))
    client.set_terminated(parent, "FINISHED")
    print(f"\ntable: {out / 'table.md'}\nplot: {plot}\nMLflow parent run: {parent}", flush=True)


if __name__ == "__main__":
    main()
