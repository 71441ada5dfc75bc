"""The single-process demo: tiny model, synthetic TOFU data, finetune, then PDU unlearning.

The Ray pipeline replaces the unlearning stage with FSDP2 workers; the figures printed here
are the same ones.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from unlearn.config import Config
from unlearn.report import format_table, plot_dual_dynamics
from unlearn.workflow import run_finetune, run_unlearning


def run_demo(cfg: Config) -> dict:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print(f"[1/2] finetuning target (full split) and retain models of {cfg.model.name_or_path!r} "
          f"on {cfg.data.source} {cfg.data.benchmark.upper()} data")
    finetuned = run_finetune(cfg)
    print(f"[2/2] unlearning {cfg.data.forget_split} from the target with {cfg.method.name}")
    result = run_unlearning(cfg, finetuned["target"])
    plot = plot_dual_dynamics(result["history"], out / "dual_dynamics.png")

    probs = finetuned["forget_prob"]
    rows = [
        ["forget-set Prob", probs["base"], probs["target"], probs["retain"], result["after"]["forget_prob"]],
        ["retain loss (NLL)", None, result["before"]["retain_loss"], None, result["after"]["retain_loss"]],
    ]
    print()
    print(format_table(["metric", "base", "target", "retain model", "unlearned"], rows))
    if result["eps"] is not None:
        last = result["history"][-1]
        print(f"constraint: retain loss <= eps = {result['eps']:.4f}; final lam = {last['lam_next']:.4g}")
    summary = {
        "finetune": {k: v for k, v in finetuned.items() if not k.endswith("history")},
        "before": result["before"], "after": result["after"], "eps": result["eps"],
        "model_dir": result["model_dir"], "plot": str(plot) if plot else None,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"unlearned model: {result['model_dir']}; plot: {plot}; summary: {out / 'summary.json'} "
          f"({summary['seconds']} s)")
    return summary
