"""Write a small TOFU folder for CPU runs on the real data: one forget split, its holdout and
perturbed splits, the first N retain authors (20 QA pairs each, TOFU's order) as ``retain``
with their perturbed rows as ``retain_perturbed``, and the general-knowledge splits.

    python bench/tofu_subset.py --data ../shared/data/tofu --forget-split forget01 \
        --retain-authors 8 --out outputs/tofu-forget01-r8

``full`` is left out, so ``unlearn finetune`` trains the target on forget + retain. ``proxy`` (EGUP's
proxy set, ``data.proxy_split=proxy``) holds as many never-seen authors as the forget split, taken
from the next larger holdout split past the evaluation's own holdout (TOFU's holdout05 starts with
holdout01's authors), so no method trains against the evaluation's membership-attack non-members;
forget10 has no larger holdout and gets no proxy. Trade-offs:
model utility's retain part is measured on retain authors the models trained on (as TOFU's
``retain_perturbed`` is), but on fewer of them; ``--utility-rows N`` keeps the first N rows of each
utility split (retain, real authors, world facts) to make an evaluation cheaper on CPU, at the price
of a noisier model utility: with 40, SmolLM2-135M's evaluation on forget01 (920 likelihood and 200
generation requests, at most 100 new tokens) took 224 s on 2 cores with nothing else running.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

QA_PER_AUTHOR = 20
COPIED = ("real_authors", "real_authors_perturbed", "world_facts", "world_facts_perturbed")


def read(folder: Path, split: str) -> list[dict]:
    path = folder / f"{split}.json"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found (is --data a TOFU folder?)")
    return json.loads(path.read_text())


def proxy_rows(data: Path, pct: str, skip: int, rows: int) -> list[dict]:
    """Never-seen rows past the evaluation's holdout: the next larger holdout split's, after its
    first ``skip`` rows (the smaller holdout's authors), checked to share no question with them."""
    larger = {"01": "05", "05": "10"}.get(pct)
    if larger is None:
        return []
    smaller, bigger = read(data, f"holdout{pct}"), read(data, f"holdout{larger}")
    if [r["question"] for r in bigger[:skip]] != [r["question"] for r in smaller]:
        raise SystemExit(f"error: holdout{larger} does not start with holdout{pct}'s authors")
    return bigger[skip:skip + rows]


def write_subset(data: Path, forget_split: str, retain_authors: int, out: Path,
                 utility_rows: int | None = None) -> dict[str, int]:
    match = re.fullmatch(r"forget(\d+)", forget_split)
    if not match:
        raise SystemExit(f"error: --forget-split must be forgetXX, got {forget_split!r}")
    pct = match.group(1)
    retain = read(data, f"retain{100 - int(pct):02d}")[:retain_authors * QA_PER_AUTHOR]
    perturbed = read(data, "retain_perturbed")[:retain_authors * QA_PER_AUTHOR]
    if [r["question"] for r in perturbed] != [r["question"] for r in retain[:len(perturbed)]]:
        raise SystemExit("error: retain_perturbed does not start with the retain split's authors")
    splits = {forget_split: read(data, forget_split),
              f"{forget_split}_perturbed": read(data, f"{forget_split}_perturbed"),
              f"holdout{pct}": read(data, f"holdout{pct}"),
              "retain": retain, "retain_perturbed": perturbed}
    splits.update({name: read(data, name) for name in COPIED})
    proxy = proxy_rows(data, pct, len(splits[f"holdout{pct}"]), len(splits[forget_split]))
    if proxy:
        splits["proxy"] = proxy
    for name in ("retain_perturbed", "real_authors_perturbed", "world_facts_perturbed"):
        splits[name] = splits[name][:utility_rows]
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        (out / f"{name}.json").write_text(json.dumps(rows, indent=0))
    return {name: len(rows) for name, rows in splits.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/tofu")
    parser.add_argument("--forget-split", default="forget01")
    parser.add_argument("--retain-authors", type=int, default=8)
    parser.add_argument("--utility-rows", type=int, default=None, help="rows kept of each utility split")
    parser.add_argument("--out", default="outputs/tofu-forget01-r8")
    args = parser.parse_args()
    sizes = write_subset(Path(args.data), args.forget_split, args.retain_authors, Path(args.out),
                         args.utility_rows)
    for name, n in sizes.items():
        print(f"{name:28s} {n:5d}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
