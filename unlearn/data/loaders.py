"""Read TOFU- and MUSE-format data from local files, folders, or the Hugging Face hub.

A source is a file (``.json`` array or JSON Lines, ``.jsonl``, ``.parquet``), a folder holding
``{split}.json|.jsonl|.parquet`` (a split may contain a slash: ``raw/forget``), or a hub name
``owner/name`` (only when online). Every problem raises :class:`DataError` naming the file, the
row and the field.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from unlearn.data.records import DataError, QARecord, SplitNotFound, VerbatimRecord
from unlearn.paths import looks_like_hub_id

log = logging.getLogger(__name__)

SUFFIXES = (".json", ".jsonl", ".parquet")
ALIASES = {"prompt": "question", "response": "answer"}


# --------------------------------------------------------------------------- files


def is_uri(source: str) -> bool:
    return "://" in str(source)


def _filesystem(source: str):
    """(pyarrow filesystem, path in it, prefix that makes a path a name for messages)."""
    import pyarrow.fs as pafs

    if is_uri(source):
        try:
            fs, path = pafs.FileSystem.from_uri(source)
        except Exception as exc:  # noqa: BLE001 - unknown scheme, missing credentials...
            raise DataError(f"data source {source}: no filesystem for this URI ({exc})") from None
        return fs, path, source.split("://", 1)[0] + "://"
    return pafs.LocalFileSystem(), str(Path(source).expanduser().absolute()), ""


def split_files(source: str | Path, split: str | None = None):
    """The files that hold ``split`` of ``source`` and the filesystem to read them with.

    ``source`` is a local path or a URI (``s3://``, ``gs://``, ``file://``: whatever pyarrow's
    filesystems reach). It is a data file, or a folder holding ``{split}.json|.jsonl|.parquet``
    or a folder ``{split}/`` of such shards (read in name order). Returns ``(filesystem, paths,
    prefix)``; ``prefix + path`` names a file in messages.
    """
    import pyarrow.fs as pafs

    fs, root, prefix = _filesystem(str(source))
    kind = fs.get_file_info(root).type
    if kind == pafs.FileType.NotFound:
        raise DataError(f"data source {source!s} not found")
    if kind == pafs.FileType.File:
        return fs, [root], prefix
    if split is None:
        raise DataError(f"{source} is a folder: name the split to read from it")
    for suffix in SUFFIXES:
        if fs.get_file_info(f"{root}/{split}{suffix}").type == pafs.FileType.File:
            return fs, [f"{root}/{split}{suffix}"], prefix
    folder = f"{root}/{split}"
    if fs.get_file_info(folder).type == pafs.FileType.Directory:
        shards = sorted(info.path for info in fs.get_file_info(pafs.FileSelector(folder, recursive=True))
                        if info.type == pafs.FileType.File and info.path.endswith(SUFFIXES))
        if not shards:
            raise DataError(f"{prefix}{folder}: no .json, .jsonl or .parquet shard in the folder")
        return fs, shards, prefix
    raise SplitNotFound(f"{source}: no file for split {split!r} (looked for {split}.json, "
                        f"{split}.jsonl, {split}.parquet and a folder {split}/ of shards)")


def iter_file_rows(stream, name: str, *, chunk_rows: int = 1024) -> Iterator[list[Any]]:
    """The rows of one data file, in chunks of about ``chunk_rows`` (a random-access pyarrow
    file or any binary file object); ``name`` ends with the format's suffix. A Parquet file or a
    JSON Lines file is read a chunk at a time; a ``.json`` array is parsed whole."""
    if name.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(stream).iter_batches(batch_size=chunk_rows):
                yield batch.to_pylist()
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds
            raise DataError(f"{name}: unreadable Parquet file ({exc})") from None
        return
    if name.endswith(".json"):
        rows = _json_array(stream, name)
        if rows is not None:
            for start in range(0, len(rows), chunk_rows):
                yield rows[start:start + chunk_rows]
            return
        stream.seek(0)  # JSON Lines under a .json name
    lines = _text_lines(stream, name)
    chunk: list[Any] = []
    for number, line in lines:
        if not line.strip():
            continue
        try:
            chunk.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{name} line {number}: not valid JSON ({exc.msg})") from None
        if len(chunk) >= chunk_rows:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _json_array(stream, name: str) -> list | None:
    """The rows of a JSON array file; None when the file is not one JSON value (JSON Lines)."""
    try:
        text = stream.read().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{name}: unreadable file ({exc})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if isinstance(value, dict):
        raise DataError(f"{name}: expected a JSON array of rows, got an object")
    return value if isinstance(value, list) else None


def _text_lines(stream, name: str) -> Iterator[tuple[int, str]]:
    reader = io.TextIOWrapper(stream, encoding="utf-8")
    try:
        yield from enumerate(reader, start=1)
    except UnicodeDecodeError as exc:
        raise DataError(f"{name}: unreadable file ({exc})") from None


def iter_split_rows(source: str | Path, split: str | None = None, *,
                    config: str | None = None) -> Iterator[tuple[str, int, Any]]:
    """``(file, row number in that file, row)`` for every row of ``split``: local files and
    folders, URIs, or a hub name ``owner/name`` (only when online)."""
    text = str(source)
    local = Path(text).expanduser()
    if not is_uri(text) and not local.exists() and looks_like_hub_id(text):
        rows, origin = _read_hub(text, split, config)
        yield from ((origin, i, row) for i, row in enumerate(rows))
        return
    if not is_uri(text) and not local.exists():
        raise DataError(f"data source {source!s} not found (no such file or folder, and not a hub "
                        "name of the form owner/name)")
    fs, paths, prefix = split_files(source, split)
    for path in paths:
        name = prefix + path
        try:
            handle = fs.open_input_file(path)
        except OSError as exc:
            raise DataError(f"{name}: unreadable file ({exc})") from None
        with handle:
            index = 0
            for chunk in iter_file_rows(handle, name):
                for row in chunk:
                    yield name, index, row
                    index += 1


def read_rows(source: str | Path, split: str | None = None, *,
              config: str | None = None) -> tuple[list[Any], str]:
    """Rows of ``split`` in ``source`` and a name for messages (the file, folder or hub dataset)."""
    rows, names = [], []
    for name, _, row in iter_split_rows(source, split, config=config):
        rows.append(row)
        if not names or names[-1] != name:
            names.append(name)
    return rows, names[0] if len(names) == 1 else f"{source}/{split}"


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
    records = [parse_qa_row(row, f"{name} row {i}", tuple(require), index=n)
               for n, (name, i, row) in enumerate(iter_split_rows(source, split, config=config))]
    if not records:
        raise DataError(f"{source}{'' if split is None else f' split {split}'}: the split is empty")
    return records


def parse_qa_row(row: Any, where: str, require: tuple[str, ...] = (), *,
                 index: int | None = None) -> QARecord:
    """One validated QA record; a bad row raises :class:`DataError` naming ``where`` and the field."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with question/answer, got {type(row).__name__}")
    row = {ALIASES.get(k, k): v for k, v in row.items()}
    for field in ("question", "answer", *require):
        if row.get(field) is None:
            raise DataError(f"{where}: field {field!r} is missing")
    question, answer = _string(row, "question", where), _string(row, "answer", where)
    for field, value in (("question", question), ("answer", answer)):
        if not value.strip():
            raise DataError(f"{where}: field {field!r} is empty")
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
    texts = [parse_text_row(row, f"{name} row {i}") for name, i, row in iter_split_rows(source, split)]
    if not texts:
        raise DataError(f"{source} split {split}: the split is empty")
    return texts


def parse_text_row(row: Any, where: str) -> str:
    """One raw text: a string, or an object with a non-empty ``text`` field."""
    if isinstance(row, dict):
        if "text" not in row:
            raise DataError(f"{where}: field 'text' is missing")
        row = row["text"]
    if not isinstance(row, str):
        raise DataError(f"{where}: field 'text' must be a string, got {type(row).__name__}")
    if not row.strip():
        raise DataError(f"{where}: field 'text' is empty")
    return row


def load_verbatim(source: str | Path, split: str = "verbmem/forget") -> list[VerbatimRecord]:
    """MUSE verbmem items (``prompt``, ``gt``)."""
    records = []
    for name, i, row in iter_split_rows(source, split):
        where = f"{name} row {i}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with prompt/gt")
        for field in ("prompt", "gt"):
            if row.get(field) is None:
                raise DataError(f"{where}: field {field!r} is missing")
        records.append(VerbatimRecord(_string(row, "prompt", where), _string(row, "gt", where)))
    if not records:
        raise DataError(f"{source} split {split}: the split is empty")
    return records


# --------------------------------------------------------------------------- overlap


def _normalise(question: str) -> str:
    return " ".join(question.split()).casefold()


def question_key(question: str) -> int:
    """A 63-bit key of a question (whitespace and case ignored): overlap checks on streams keep
    a set of these instead of the records."""
    digest = hashlib.blake2b(_normalise(question).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def record_digest(record: QARecord | str) -> bytes:
    """SHA-256 of one record's canonical JSON (a forget set's fingerprint combines these)."""
    payload = record if isinstance(record, str) else record.to_dict()
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).digest()


def fingerprint(digests) -> str:
    """SHA-256 over the sorted record digests (an iterable of 32-byte digests, or an ``(n, 32)``
    uint8 array): which records, whatever their order or sharding."""
    import numpy as np

    if not isinstance(digests, np.ndarray):
        digests = np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(-1, 32)
    order = np.lexsort(digests.T[::-1]) if len(digests) else np.arange(0)
    return hashlib.sha256(digests[order].tobytes()).hexdigest()


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
