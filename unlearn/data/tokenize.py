"""Records -> token ids, labels and PALU masks.

The prompt is the tokenizer's chat template when it has one, ``Question: ...\\nAnswer:``
otherwise. Prompt and answer are tokenised separately and concatenated, so the label boundary is
exact; labels are -100 on the prompt and on padding. The answer ends with the EOS token, which
is supervised (the model must learn to stop).
"""

from __future__ import annotations

import torch

from unlearn.data.records import DataError, QARecord
from unlearn.data.spans import sensitive_spans

IGNORE = -100


def format_prompt(tokenizer, question: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                             tokenize=False, add_generation_prompt=True)
    return f"Question: {question}\nAnswer:"


def answer_text(tokenizer, answer: str) -> str:
    """The answer as it follows the prompt (a space after ``Answer:`` for the plain prompt)."""
    return answer if getattr(tokenizer, "chat_template", None) else " " + answer


def prompt_ids(tokenizer, question: str) -> list[int]:
    """Token ids of the formatted prompt, exactly as training sees them before the answer."""
    prompt = format_prompt(tokenizer, question)
    # A chat template already writes its special tokens; a plain prompt gets the tokenizer's.
    add_special = not getattr(tokenizer, "chat_template", None)
    return tokenizer(prompt, add_special_tokens=add_special)["input_ids"]


def encode_qa(tokenizer, record_or_question: QARecord | str, answer: str | None = None, *,
              max_length: int = 256, prefix_tokens: int | None = None) -> dict[str, list[int]]:
    """``input_ids``, ``attention_mask``, ``labels`` (+ ``onset_mask``, ``neutral_mask``).

    The masks are aligned with ``labels`` (position t describes the label token at t). A token
    is sensitive when its characters overlap a sensitive span; the onset is the first
    ``prefix_tokens`` tokens of each contiguous run of sensitive tokens.
    """
    if isinstance(record_or_question, QARecord):
        record = record_or_question
    else:
        if answer is None:
            raise DataError("encode_qa: an answer is needed with a plain question")
        record = QARecord(question=record_or_question, answer=answer)
    return encode_qa_batch(tokenizer, [record], max_length=max_length, prefix_tokens=prefix_tokens)[0]


def encode_qa_batch(tokenizer, records: list[QARecord], *, max_length: int = 256,
                    prefix_tokens: int | None = None) -> list[dict[str, list[int]]]:
    """:func:`encode_qa` of many records, with one tokenizer call for the prompts and one for the
    answers (a fast tokenizer encodes a list in parallel, ~5x the records/s of one at a time)."""
    want_offsets = prefix_tokens is not None
    if want_offsets and not getattr(tokenizer, "is_fast", False):
        raise DataError("PALU onset masks need a fast tokenizer (character offsets)")
    if not records:
        return []
    # A chat template already writes its special tokens; a plain prompt gets the tokenizer's.
    add_special = not getattr(tokenizer, "chat_template", None)
    prompts = tokenizer([format_prompt(tokenizer, r.question) for r in records],
                        add_special_tokens=add_special)["input_ids"]
    texts = [answer_text(tokenizer, r.answer) for r in records]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=want_offsets)
    features = []
    for i, record in enumerate(records):
        offsets = encoded["offset_mapping"][i] if want_offsets else None
        features.append(_assemble(record, list(prompts[i]), list(encoded["input_ids"][i]), offsets,
                                  len(texts[i]) - len(record.answer), max_length=max_length,
                                  eos=tokenizer.eos_token_id, prefix_tokens=prefix_tokens))
    return features


def _assemble(record: QARecord, prompt: list[int], answer_ids: list[int], offsets, shift: int, *,
              max_length: int, eos: int, prefix_tokens: int | None) -> dict[str, list[int]]:
    budget = max_length - len(prompt) - 1
    if budget < 1:
        raise DataError(f"max_length={max_length} leaves no room for the answer after a "
                        f"{len(prompt)}-token prompt")
    answer_ids = answer_ids[:budget]
    input_ids = prompt + answer_ids + [eos]
    labels = [IGNORE] * len(prompt) + answer_ids + [eos]
    feature = {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}
    if prefix_tokens is not None:
        # ``shift``: the leading space of the plain prompt's answer text
        char_offsets = [(a - shift, b - shift) for a, b in offsets[:len(answer_ids)]]
        onset, neutral = _answer_masks(char_offsets, sensitive_spans(record), int(prefix_tokens))
        pad = [0] * len(prompt)
        feature["onset_mask"] = pad + onset + [0]
        feature["neutral_mask"] = pad + neutral + [1]
    return feature


def _answer_masks(offsets: list[tuple[int, int]], spans: list[tuple[int, int]],
                  prefix_tokens: int) -> tuple[list[int], list[int]]:
    sensitive = [any(a < end and b > start for start, end in spans) for a, b in offsets]
    onset, run = [], 0
    for flag in sensitive:
        run = run + 1 if flag else 0
        onset.append(int(flag and run <= prefix_tokens))
    neutral = [int(not flag) for flag in sensitive]
    return onset, neutral


def encode_text(tokenizer, text: str, max_length: int = 256) -> dict[str, list[int]]:
    """A raw training text (MUSE corpora): every token supervised, EOS appended."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: max_length - 1]
    ids = ids + [tokenizer.eos_token_id]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}


def encode_text_windows(tokenizer, text: str, max_length: int = 256) -> list[dict[str, list[int]]]:
    """A raw training text cut into consecutive windows of at most ``max_length`` tokens (EOS
    after the last token), every token supervised: a long document is trained on whole, not
    truncated to its first window."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return [{"input_ids": window, "attention_mask": [1] * len(window), "labels": list(window)}
            for window in (ids[start:start + max_length] for start in range(0, len(ids), max_length))]


PAD_VALUES = {"input_ids": None, "attention_mask": 0, "labels": IGNORE,
              "onset_mask": 0, "neutral_mask": 0}


def collate(features: list[dict], pad_token_id: int, *,
            padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad encoded features to the longest and stack them into LongTensors."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not features:
        raise ValueError("collate: no features")
    width = max(len(f["input_ids"]) for f in features)
    batch = {}
    for key in features[0]:
        if key not in PAD_VALUES:
            continue
        fill = pad_token_id if key == "input_ids" else PAD_VALUES[key]
        rows = []
        for feature in features:
            values, pad = list(feature[key]), [fill] * (width - len(feature[key]))
            rows.append(values + pad if padding_side == "right" else pad + values)
        batch[key] = torch.tensor(rows, dtype=torch.long)
    return batch
