"""Read TOFU- and MUSE-format data from local files, folders, or the Hugging Face hub.

A source is a file (``.json`` array or JSON Lines, ``.jsonl``, ``.parquet``), a folder holding
``{split}.json|.jsonl|.parquet`` (a split may contain a slash: ``raw/forget``), or a hub name
``owner/name`` (only when online). Every problem raises :class:`DataError` naming the file, the
row and the field.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from unlearn.data.records import DataError, QARecord, SplitNotFound, VerbatimRecord
from unlearn.paths import looks_like_hub_id

log = logging.getLogger(__name__)

SUFFIXES = (".json", ".jsonl", ".parquet")
ALIASES = {"prompt": "question", "response": "answer"}


# --------------------------------------------------------------------------- raw rows


def read_rows(source: str | Path, split: str | None = None, *,
              config: str | None = None) -> tuple[list[Any], str]:
    """Rows of ``split`` in ``source`` and a name for messages (the file or hub dataset)."""
    path = Path(source).expanduser()
    if path.is_dir():
        if split is None:
            raise DataError(f"{path} is a folder: name the split to read from it")
        return _read_file(_split_file(path, split))
    if path.is_file():
        return _read_file(path)
    if looks_like_hub_id(str(source)):
        return _read_hub(str(source), split, config)
    raise DataError(f"data source {source!s} not found (no such file or folder, and not a hub "
                    "name of the form owner/name)")


def _split_file(folder: Path, split: str) -> Path:
    for suffix in SUFFIXES:
        candidate = folder / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    raise SplitNotFound(f"{folder}: no file for split {split!r} (looked for {split}.json, "
                    f"{split}.jsonl, {split}.parquet)")


def _read_file(path: Path) -> tuple[list[Any], str]:
    name = str(path)
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist(), name
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds
            raise DataError(f"{name}: unreadable Parquet file ({exc})") from None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{name}: unreadable file ({exc})") from None
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError:
            rows = None  # maybe JSON Lines under a .json name
        if isinstance(rows, list):
            return rows, name
        if isinstance(rows, dict):
            raise DataError(f"{name}: expected a JSON array of rows, got an object")
    return _read_json_lines(text, name), name


def _read_json_lines(text: str, name: str) -> list[Any]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{name} line {number}: not valid JSON ({exc.msg})") from None
    return rows


def _read_hub(name: str, split: str | None, config: str | None) -> tuple[list[Any], str]:
    try:
        from datasets import load_dataset

        if config is None and split is not None and "/" in split:
            config, split = split.split("/", 1)  # MUSE on the hub: config "knowmem", split "forget_qa"
            dataset, origin = load_dataset(name, config, split=split), f"{name}:{config}/{split}"
        else:
            dataset, origin = load_dataset(name, config or split, split="train"), f"{name}:{config or split}"
    except Exception as exc:  # noqa: BLE001 - offline, unknown dataset, unknown config...
        raise DataError(f"hub dataset {name} (split {split}) could not be loaded: {exc}. "
                        "Offline? Pass a local folder or file instead.") from None
    return dataset.to_list(), origin


# --------------------------------------------------------------------------- QA records


def load_qa(source: str | Path, split: str | None = None, *, config: str | None = None,
            require: Iterable[str] = ()) -> list[QARecord]:
    """TOFU-format QA records; ``require`` names optional fields every row must have."""
    rows, origin = read_rows(source, split, config=config)
    records = [_qa_record(row, origin, i, tuple(require)) for i, row in enumerate(rows)]
    if not records:
        raise DataError(f"{origin}: the split is empty")
    return records


def _qa_record(row: Any, origin: str, index: int, require: tuple[str, ...]) -> QARecord:
    where = f"{origin} row {index}"
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with question/answer, got {type(row).__name__}")
    row = {ALIASES.get(k, k): v for k, v in row.items()}
    for field in ("question", "answer", *require):
        if row.get(field) is None:
            raise DataError(f"{where}: field {field!r} is missing")
    question, answer = _string(row, "question", where), _string(row, "answer", where)
    perturbed = row.get("perturbed_answer")
    if isinstance(perturbed, str):
        perturbed = [perturbed]
    if perturbed is not None and (not isinstance(perturbed, list)
                                  or not all(isinstance(p, str) for p in perturbed)):
        raise DataError(f"{where}: field 'perturbed_answer' must be a string or a list of strings")
    return QARecord(
        question=question,
        answer=answer,
        paraphrased_question=_optional_string(row, "paraphrased_question", where),
        paraphrased_answer=_optional_string(row, "paraphrased_answer", where),
        perturbed_answers=tuple(perturbed or ()),
        sensitive_spans=_spans(row.get("sensitive_spans"), answer, where),
        author=_optional_string(row, "author", where),
        index=index,
    )


def _string(row: dict, field: str, where: str) -> str:
    value = row[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    return value


def _optional_string(row: dict, field: str, where: str) -> str | None:
    return None if row.get(field) is None else _string(row, field, where)


def _spans(raw: Any, answer: str, where: str) -> tuple[tuple[int, int], ...] | None:
    if raw is None:
        return None
    spans = []
    for span in raw:
        ok = (isinstance(span, (list, tuple)) and len(span) == 2
              and all(isinstance(v, int) for v in span) and 0 <= span[0] < span[1] <= len(answer))
        if not ok:
            raise DataError(f"{where}: field 'sensitive_spans' entry {span!r} is not a "
                            f"[start, end) inside the answer (length {len(answer)})")
        spans.append((span[0], span[1]))
    return tuple(spans)


# --------------------------------------------------------------------------- MUSE


def load_texts(source: str | Path, split: str) -> list[str]:
    """MUSE raw/privleak texts: rows are strings or objects with a ``text`` field."""
    rows, origin = read_rows(source, split)
    texts = []
    for i, row in enumerate(rows):
        if isinstance(row, dict):
            if "text" not in row:
                raise DataError(f"{origin} row {i}: field 'text' is missing")
            row = row["text"]
        if not isinstance(row, str):
            raise DataError(f"{origin} row {i}: field 'text' must be a string, got {type(row).__name__}")
        texts.append(row)
    if not texts:
        raise DataError(f"{origin}: the split is empty")
    return texts


def load_verbatim(source: str | Path, split: str = "verbmem/forget") -> list[VerbatimRecord]:
    """MUSE verbmem items (``prompt``, ``gt``)."""
    rows, origin = read_rows(source, split)
    records = []
    for i, row in enumerate(rows):
        where = f"{origin} row {i}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with prompt/gt")
        for field in ("prompt", "gt"):
            if row.get(field) is None:
                raise DataError(f"{where}: field {field!r} is missing")
        records.append(VerbatimRecord(_string(row, "prompt", where), _string(row, "gt", where)))
    if not records:
        raise DataError(f"{origin}: the split is empty")
    return records


# --------------------------------------------------------------------------- overlap


def _normalise(question: str) -> str:
    return " ".join(question.split()).casefold()


def shared_questions(first: list[QARecord], second: list[QARecord]) -> list[str]:
    """The questions of ``second`` also asked in ``first`` (whitespace and case ignored)."""
    asked = {_normalise(r.question) for r in first}
    return [r.question for r in second if _normalise(r.question) in asked]


def check_overlap(forget: list[QARecord], retain: list[QARecord], *,
                  drop: bool = False) -> tuple[list[QARecord], list[str]]:
    """Retain records whose question is also in the forget set: reported, dropped on request."""
    overlap = shared_questions(forget, retain)
    if overlap:
        log.warning("%d retain question(s) also appear in the forget set%s", len(overlap),
                    "; dropped from retain" if drop else "")
    if drop and overlap:
        dropped = {_normalise(q) for q in overlap}
        retain = [r for r in retain if _normalise(r.question) not in dropped]
    return retain, overlap
