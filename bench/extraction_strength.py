"""Extraction strength under both definitions (and forget Prob) of a model on a TOFU forget split.

    .venv/bin/python bench/extraction_strength.py --model smollm2-135m --data ../shared/data/tofu

Teacher-forced likelihoods of the forget split's answers only (no generation): seconds on CPU.
"""

from __future__ import annotations

import argparse
import statistics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="../shared/data/tofu", help="a TOFU folder")
    parser.add_argument("--split", default="forget01")
    args = parser.parse_args()

    from unlearn.data import load_qa
    from unlearn.eval import metrics
    from unlearn.eval.scoring import Likelihood, LocalScorer
    from unlearn.models import load_model, load_tokenizer

    records = load_qa(args.data, args.split)
    tokenizer = load_tokenizer(args.model)
    scorer = LocalScorer(load_model(args.model), tokenizer, batch_size=8, progress=False)
    results = scorer.run([Likelihood(r.answer, r.question) for r in records])
    for variant in metrics.ES_VARIANTS:
        value = statistics.mean(metrics.extraction_strength(r["correct"], variant) for r in results)
        print(f"extraction strength ({variant}): {value:.4f}")
    print(f"forget Prob: {statistics.mean(metrics.prob(r['logprobs']) for r in results):.4f}")
    print(f"answer tokens (median): {statistics.median(len(r['correct']) for r in results)}; "
          f"last token wrong in {sum(not r['correct'][-1] for r in results)} of {len(results)}")


if __name__ == "__main__":
    main()
