"""Sensitive spans of an answer (PALU's localisation in time).

Preference order (methods.md section 3):
1. explicit ``sensitive_spans`` annotations on the record;
2. where the record has perturbed answers, the parts of the answer that the perturbations do not
   share. We diff at WORD granularity (words are ``\\w+`` or single punctuation marks): a
   character diff matches stray letters inside swapped words ("Paris" vs "Prague" share "P"
   and "a"), which would cut facts into fragments. A word is sensitive when it is unmatched in
   at least half of the perturbed answers; adjacent sensitive words form one span;
3. otherwise the whole answer is one span.
"""

from __future__ import annotations

import difflib
import re

from unlearn.data.records import QARecord

_WORD = re.compile(r"\w+|[^\w\s]")


def _words(text: str) -> list[re.Match]:
    return list(_WORD.finditer(text))


def diff_spans(answer: str, perturbed: tuple[str, ...] | list[str]) -> list[tuple[int, int]]:
    """Character spans of the answer's words that at least half the perturbations change."""
    words = _words(answer)
    if not words or not perturbed:
        return []
    tokens = [w.group() for w in words]
    unmatched = [0] * len(words)
    for other in perturbed:
        matcher = difflib.SequenceMatcher(None, tokens, [w.group() for w in _words(other)],
                                          autojunk=False)
        matched = [False] * len(words)
        for block in matcher.get_matching_blocks():
            for i in range(block.a, block.a + block.size):
                matched[i] = True
        unmatched = [u + (not m) for u, m in zip(unmatched, matched)]
    needed = len(perturbed) / 2
    spans: list[tuple[int, int]] = []
    for word, count in zip(words, unmatched):
        if count < needed:
            continue
        start, end = word.span()
        if spans and answer[spans[-1][1]:start].strip() == "":
            spans[-1] = (spans[-1][0], end)  # only whitespace between: one span
        else:
            spans.append((start, end))
    return spans


def sensitive_spans(record: QARecord) -> list[tuple[int, int]]:
    """The record's sensitive character spans, by the preference order above."""
    if record.sensitive_spans:
        return [tuple(span) for span in record.sensitive_spans]
    if record.perturbed_answers:
        spans = diff_spans(record.answer, record.perturbed_answers)
        if spans:
            return spans
    return [(0, len(record.answer))] if record.answer else []
