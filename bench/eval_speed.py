"""Evaluation throughput: questions per second for likelihood and for generation, one process
vs the Ray Data path.

    .venv/bin/python bench/eval_speed.py                              # tiny and SmolLM2-135M
    .venv/bin/python bench/eval_speed.py --models tiny --questions 64

Questions are synthetic TOFU forget-set questions. Per question, the likelihood workload is the
truth-ratio set (answer, paraphrase and 5 perturbed answers: 7 candidates, answer-only NLL) and
the generation workload one greedy answer (left-padded batches, KV cache, stop at EOS, at most
``--max-new-tokens``). ``one process`` loads the model once before the clock starts; the Ray
path is timed end to end (actors start and load the model inside the timing, as a user sees it),
plus a second run (each run starts its own actor pool, so both include the model load).
"""

from __future__ import annotations

import argparse
import time


def build_requests(questions: int, max_new_tokens: int):
    from unlearn.data import generate_tofu
    from unlearn.eval.scoring import Generation, Likelihood

    authors = max(20, -(-questions // 8) * 10)  # forget10 = the last 10% of the authors
    records = generate_tofu(seed=0, n_authors=authors)["forget10_perturbed"][:questions]
    likelihood = [Likelihood(text, r.question) for r in records
                  for text in (r.answer, r.paraphrased_answer, *r.perturbed_answers)]
    generation = [Generation(r.question, max_new_tokens=max_new_tokens) for r in records]
    return len(records), likelihood, generation


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2-135m"])
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args()

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    from unlearn.eval import EvalSettings, LocalScorer
    from unlearn.models import load_model, load_tokenizer
    from unlearn.report import format_table

    count, likelihood, generation = build_requests(args.questions, args.max_new_tokens)
    settings = EvalSettings(data=".", batch_size=args.batch_size)
    rows = []
    for name in args.models:
        tokenizer = load_tokenizer(name)
        model = load_model(name)
        scorer = LocalScorer(model, tokenizer, batch_size=args.batch_size)
        for workload, requests in (("likelihood", likelihood), ("generation", generation)):
            seconds = timed(scorer.run, requests)
            rows.append([name, workload, f"one process ({torch.get_num_threads()} threads)", count,
                         round(seconds, 2), round(count / seconds, 2)])
            print(rows[-1], flush=True)
        del model, scorer
        if args.no_ray:
            continue
        from pipelines.eval import RayScorer

        ray_scorer = RayScorer(name, settings, workers=args.workers)
        for workload, requests in (("likelihood", likelihood), ("generation", generation)):
            for run in ("run 1", "run 2"):
                seconds = timed(ray_scorer.run, requests)
                rows.append([name, workload, f"Ray Data, {args.workers} actors ({run})", count,
                             round(seconds, 2), round(count / seconds, 2)])
                print(rows[-1], flush=True)
    print()
    print(format_table(["model", "workload", "path", "questions", "seconds", "questions/s"], rows))


if __name__ == "__main__":
    main()
