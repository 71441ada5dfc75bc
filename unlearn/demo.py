"""The single-process demo: tiny model, synthetic TOFU data, finetune, PDU unlearning, evaluation.

The Ray pipeline replaces the unlearning stage with FSDP2 workers; the figures printed here
are the same ones.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from unlearn.config import Config
from unlearn.eval import (EvalReference, EvalSettings, compare_table, evaluate_model, evaluate_once,
                          write_result)
from unlearn.eval.report import headline
from unlearn.report import format_table, plot_dual_dynamics, stop_line
from unlearn.workflow import resolve_source, run_finetune, run_unlearning



def eval_settings(cfg: Config) -> EvalSettings:
    return EvalSettings(data=resolve_source(cfg), benchmark=cfg.data.benchmark,
                        forget_split=cfg.data.forget_split, holdout_split=cfg.eval.holdout_split,
                        batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
                        max_length=cfg.eval.max_length, extraction_strength=cfg.eval.extraction_strength)


def evaluate_stage(spec: str, cfg: Config, reference: EvalReference | None, out: Path, name: str, *,
                   reuse: bool = False) -> dict:
    """Evaluate one model with the config's settings and write ``out/<name>.json``; ``reuse``
    takes a model folder's unchanged evaluation from the cache (``unlearn.eval.evaluate_once``)."""
    settings = eval_settings(cfg)

    def run(model: str) -> dict:
        return evaluate_model(model, settings, reference=reference, progress=False, device=cfg.device)

    result = evaluate_once(spec, settings, run, reuse=reuse, reference=reference, device=cfg.device)
    write_result(result, out / f"{name}.json")
    return result


def evaluate_stages(cfg: Config, models: dict[str, str], reference_model: str) -> dict[str, dict]:
    """Evaluate each model against the retain model; every result is written to ``output_dir/eval``."""
    out = Path(cfg.output_dir) / "eval"
    retain = evaluate_stage(reference_model, cfg, None, out, "retain")
    reference = EvalReference.from_result(retain, str(out / "retain.json"))
    results = {"retain model": retain}
    for name, path in models.items():
        results[name] = evaluate_stage(path, cfg, reference, out, name)
    return results


def finetune_stage(cfg: Config, label: str) -> tuple[Path, float, dict]:
    """The demo's first stage (both variants): output folder, start time, finetuned models."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print(f"{label} finetuning target (full split) and retain models of {cfg.model.name_or_path!r} "
          f"on {cfg.data.source} {cfg.data.benchmark.upper()} data", flush=True)
    return out, start, run_finetune(cfg)


def run_demo(cfg: Config) -> dict:
    out, start, finetuned = finetune_stage(cfg, "[1/3]")
    print(f"[2/3] unlearning {cfg.data.forget_split} from the target with {cfg.method.name}")
    result = run_unlearning(cfg, finetuned["target"], reference=finetuned["retain"])
    plot = plot_dual_dynamics(result["history"], out / "dual_dynamics.png")
    print("[3/3] evaluating target and unlearned models against the retain model")
    evals = evaluate_stages(cfg, {"target": finetuned["target"], "unlearned": result["model_dir"]},
                            finetuned["retain"])

    print()
    keys = headline(cfg.data.benchmark)
    print(compare_table({"target (before)": evals["target"], "unlearned (after)": evals["unlearned"],
                         "retain model": evals["retain model"]}, keys))
    rows = [["retain loss (NLL)", result["before"]["retain_loss"], result["after"]["retain_loss"]]]
    if result["eps"] is not None and result["history"]:
        last = result["history"][-1]
        rows.append(["eps (bound on retain loss)", None, result["eps"]])
        rows.append(["lam (dual variable)", None, last["lam_next"]])
    print(format_table(["training", "before", "after"], rows))
    if result["stop"] is not None:
        print(stop_line(result["stop"]))
    summary = {
        "before": evals["target"]["aggregates"], "after": evals["unlearned"]["aggregates"],
        "reference": evals["retain model"]["aggregates"],
        "training": {"before": result["before"], "after": result["after"], "eps": result["eps"],
                     "stop": result["stop"]},
        "finetune": {k: v for k, v in finetuned.items() if not k.endswith("history")},
        "model_dir": result["model_dir"], "plot": str(plot) if plot else None,
        "eval_dir": str(out / "eval"), "seconds": round(time.perf_counter() - start, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"unlearned model: {result['model_dir']}\nplot: {plot}\nevaluations: {out / 'eval'}\n"
          f"summary: {out / 'summary.json'} ({summary['seconds']} s)")
    return summary
