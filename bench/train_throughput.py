"""Ray pipeline training throughput: tokens/s and peak memory per worker, 1 vs 2 FSDP2 workers.

    .venv/bin/python bench/train_throughput.py                         # tiny and SmolLM2-135M
    .venv/bin/python bench/train_throughput.py --models tiny --epochs 4

Each configuration is one `run_pipeline` (PDU, synthetic TOFU forget10 vs retain90, global batch
``--batch-size``, fused losses, evaluation off) on a local Ray; figures come from the step metrics
rank 0 logs to MLflow: tokens/s summed over workers (median over the steps after the first),
seconds per step, and the largest worker's peak memory (resident memory on CPU, allocated memory
on GPU). On this 2-core machine each worker gets one core, so 2 workers split the same CPUs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile


def run(model: str, workers: int, args, root: str) -> dict:
    from mlflow import MlflowClient

    from pipelines.run import run_pipeline
    from unlearn.config import build_config

    name = f"bench-{model}-{workers}w"
    cfg = build_config({}, [
        f"output_dir={root}/{name}", f"run_name={name}", f"model.name_or_path={model}",
        f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}", "eval.before=false",
        "eval.after=false", f"ray.num_workers={workers}", f"mlflow.tracking_uri=sqlite:///{root}/mlflow.db",
        "ray.checkpoint_every=1000",
    ])
    summary = run_pipeline(cfg, model)
    client = MlflowClient(summary["mlflow_tracking_uri"])

    def series(key):
        return [m.value for m in sorted(client.get_metric_history(summary["mlflow_run_id"], key),
                                        key=lambda m: m.step)]

    tokens, times, memory = series("tokens_per_s"), series("step_time"), series("peak_mem_mib")
    return {"model": model, "workers": workers, "steps": len(tokens),
            "tokens/s": round(statistics.median(tokens[1:] or tokens), 1),
            "s/step": round(statistics.median(times[1:] or times), 2),
            "peak MiB/worker": round(max(memory), 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2-135m"])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    from unlearn.report import format_table

    rows = []
    with tempfile.TemporaryDirectory() as root:
        for model in args.models:
            for workers in args.workers:
                rows.append(run(model, workers, args, root))
                print(rows[-1], flush=True)
    header = list(rows[0])
    print()
    print(format_table(header, [[row[k] for k in header] for row in rows]))


if __name__ == "__main__":
    main()
