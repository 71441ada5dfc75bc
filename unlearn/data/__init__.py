"""Data: TOFU/MUSE records, loaders with validation, a seeded synthetic generator, tokenisation."""

from unlearn.data.loaders import (check_overlap, load_qa, load_texts, load_verbatim, read_rows,
                                  shared_questions)
from unlearn.data.records import DataError, QARecord, SplitNotFound, VerbatimRecord
from unlearn.data.spans import diff_spans, sensitive_spans
from unlearn.data.synthetic import (
    corpus_texts,
    generate_muse,
    generate_tofu,
    write_muse,
    write_tofu,
)
from unlearn.data.tokenize import answer_text, collate, encode_qa, encode_text, format_prompt, prompt_ids

__all__ = [
    "DataError", "QARecord", "SplitNotFound", "VerbatimRecord", "answer_text", "check_overlap",
    "collate", "shared_questions", "corpus_texts", "diff_spans", "encode_qa", "encode_text",
    "format_prompt", "prompt_ids", "generate_muse", "generate_tofu", "load_qa", "load_texts",
    "load_verbatim", "read_rows", "sensitive_spans", "write_muse", "write_tofu",
]
