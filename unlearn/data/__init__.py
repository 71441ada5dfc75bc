"""Data: TOFU/MUSE records, loaders with validation, a seeded synthetic generator, tokenisation."""

from unlearn.data.loaders import (check_overlap, iter_split_rows, load_qa, load_texts, load_verbatim,
                                  parse_qa_row, parse_text_row, question_key, read_rows,
                                  shared_questions, split_files)
from unlearn.data.records import DataError, QARecord, SplitNotFound, VerbatimRecord
from unlearn.data.spans import diff_spans, sensitive_spans
from unlearn.data.synthetic import (
    corpus_texts,
    generate_muse,
    generate_tofu,
    write_muse,
    write_tofu,
)

# Tokenisation needs torch (~2 s to import); it is imported when one of its names is first used,
# so that reading and validating records does not pay for it.
_TOKENIZE = ("answer_text", "collate", "encode_qa", "encode_qa_batch", "encode_text", "encode_text_windows",
             "format_prompt", "prompt_ids")


def __getattr__(name: str):
    if name in _TOKENIZE:
        from unlearn.data import tokenize

        return getattr(tokenize, name)
    raise AttributeError(f"module 'unlearn.data' has no attribute {name!r}")


__all__ = [
    "DataError", "QARecord", "SplitNotFound", "VerbatimRecord", "answer_text", "check_overlap",
    "collate", "shared_questions", "corpus_texts", "diff_spans", "encode_qa", "encode_qa_batch",
    "encode_text", "encode_text_windows", "format_prompt", "prompt_ids", "generate_muse", "generate_tofu",
    "load_qa", "load_texts",
    "load_verbatim", "read_rows", "iter_split_rows", "parse_qa_row", "parse_text_row",
    "question_key", "split_files", "sensitive_spans", "write_muse", "write_tofu",
]
