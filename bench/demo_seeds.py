"""The demo's outcome over seeds: does the unlearned model pass the gate, and with what margin?

    .venv/bin/python bench/demo_seeds.py                       # seeds 0-2, one process and Ray
    .venv/bin/python bench/demo_seeds.py --modes local --seeds 0 1 2 -- train.lr=2e-4 dual.eta_dual=100

Each seed sets the synthetic data, finetuning and unlearning seeds. The target and retain models
of a seed are finetuned once (kept in ``--out/seedN``) and every mode unlearns from them with the
demo's settings plus the given overrides, then evaluates against the retain model. The table
shows the gate's metrics and the margin the issue asks for: forget quality >= 0.1,
|privleak| <= 20, model utility >= 0.97 x the target's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

HEADER = ["seed", "mode", "forget quality", "utility / before", "privleak", "forget Prob", "max lam",
          "final lam", "epochs", "s", "margin"]
MARGIN = {"forget_quality": 0.1, "privleak": 20.0, "utility_ratio": 0.97}


def with_margin(after: dict, before: dict) -> bool:
    fq, pl = after.get("forget_quality"), after.get("privleak")
    return (fq is not None and fq >= MARGIN["forget_quality"] and pl is not None
            and abs(pl) <= MARGIN["privleak"]
            and after["model_utility"] >= MARGIN["utility_ratio"] * before["model_utility"])


def finetuned(folder: Path, overrides: list[str]) -> dict:
    """Target and retain models in ``folder`` (finetuned once, then reused)."""
    from unlearn.config import load_config
    from unlearn.workflow import run_finetune

    report = folder / "finetune.json"
    if report.is_file():
        return json.loads(report.read_text())
    return run_finetune(load_config(None, [f"output_dir={folder}", *overrides]), progress=False)


def seed_overrides(seed: int) -> list[str]:
    return [f"data.synthetic_seed={seed}", f"finetune.seed={seed}", f"train.seed={seed}"]


FINETUNE_KEYS = ("data.", "finetune.", "model.")  # overrides that change the finetuned models


def run_local(cfg, models: dict) -> tuple[dict, list[dict]]:
    from unlearn.demo import evaluate_stages
    from unlearn.workflow import run_unlearning

    result = run_unlearning(cfg, models["target"], reference=models["retain"], progress=False)
    evals = evaluate_stages(cfg, {"target": models["target"], "unlearned": result["model_dir"]},
                            models["retain"])
    return {"before": evals["target"]["aggregates"], "after": evals["unlearned"]["aggregates"],
            "stop": result["stop"]}, result["history"]


def run_ray(cfg, models: dict) -> tuple[dict, list[dict]]:
    from mlflow import MlflowClient

    from pipelines.run import run_pipeline, step_history

    summary = run_pipeline(cfg, models["target"], reference=models["retain"])
    history = step_history(MlflowClient(summary["mlflow_tracking_uri"]), summary["mlflow_run_id"])
    return summary, history


def epochs_run(stop: dict | None, epochs: int) -> str:
    """Epochs trained: where early stopping stopped, else all of them."""
    if stop is None or stop["stopped_after_epochs"] is None:
        return str(epochs)
    return f"{stop['stopped_after_epochs']} (stopped)"


def plot_stop_curves(curves: dict[str, dict], out_file: Path) -> Path | None:
    """Early stopping's checks per run: the forget-vs-unseen AUC by epoch against its target."""
    curves = {label: stop for label, stop in curves.items() if stop and stop["auc_by_epoch"]}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    colors: dict[str, str] = {}  # one colour per seed ("seed N"), one line style per mode
    for label, stop in curves.items():
        seed, mode = label.rsplit(" ", 1)
        color = colors.setdefault(seed, f"C{len(colors)}")
        epochs = sorted(stop["auc_by_epoch"], key=float)
        ax.plot([float(e) for e in epochs], [stop["auc_by_epoch"][e] for e in epochs],
                ":" if mode == "ray" else "-",
                marker="." if mode == "ray" else None, color=color, label=label)
        ax.axhline(stop["target_auc"], linestyle="--", linewidth=0.8, color=color)
    ax.set_xlabel("epochs done")
    ax.set_ylabel("Min-k AUC, forget vs unseen")
    ax.set_title("early stopping: stop at the dashed target (the retain model's AUC)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_file, dpi=110)
    plt.close(fig)
    return Path(out_file)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", choices=["local", "ray"], default=["local", "ray"])
    parser.add_argument("--out", default="outputs/demo-seeds")
    parser.add_argument("--tag", default="run", help="names this setting's output folders")
    parser.add_argument("overrides", nargs="*", help="key.path=value, after the demo's defaults")
    args = parser.parse_args()

    from unlearn.config import load_config
    from unlearn.report import format_table, plot_dual_dynamics

    out = Path(args.out).resolve()
    rows, passed, curves = [], 0, {}
    upstream = [o for o in args.overrides if o.startswith(FINETUNE_KEYS)]
    for seed in args.seeds:
        base = out / "-".join([f"seed{seed}", *(o.replace("/", "_") for o in upstream)])
        models = finetuned(base, [*seed_overrides(seed), *upstream])
        for mode in args.modes:
            folder = base / f"{args.tag}-{mode}"
            shutil.rmtree(folder, ignore_errors=True)
            cfg = load_config(None, [f"output_dir={folder}", f"run_name=demo-seeds-{args.tag}-{seed}-{mode}",
                                     f"mlflow.tracking_uri=sqlite:///{out}/mlflow.db",
                                     "registry.model_name=null", *seed_overrides(seed), *args.overrides])
            start = time.perf_counter()
            summary, history = (run_local if mode == "local" else run_ray)(cfg, models)
            plot_dual_dynamics(history, folder / "dual_dynamics.png")
            before, after = summary["before"], summary["after"]
            ok = with_margin(after, before)
            curves[f"seed {seed} {mode}"] = summary.get("stop")
            passed += ok
            lams = [h["lam"] for h in history if "lam" in h]
            rows.append([seed, mode, after["forget_quality"],
                         after["model_utility"] / before["model_utility"], after["privleak"],
                         after["forget_prob"], max(lams, default=None), lams[-1] if lams else None,
                         epochs_run(summary.get("stop"), cfg.train.epochs),
                         round(time.perf_counter() - start), "yes" if ok else "NO"])
            print(format_table(HEADER, rows[-1:]), flush=True)
    print()
    print(f"settings: {' '.join(args.overrides) or '(demo defaults)'}")
    print(format_table(HEADER, rows))
    plot = plot_stop_curves(curves, out / f"stop_curves-{args.tag}.png")
    if plot:
        print(f"early stopping's checks: {plot}")
    print(f"{passed}/{len(rows)} runs pass with margin (forget quality >= {MARGIN['forget_quality']}, "
          f"|privleak| <= {MARGIN['privleak']:g}, utility >= {MARGIN['utility_ratio']} x before)")


if __name__ == "__main__":
    main()
