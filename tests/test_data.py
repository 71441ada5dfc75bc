import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import PreTrainedTokenizerFast

from unlearn.data import (
    DataError, QARecord, check_overlap, collate, corpus_texts, diff_spans, encode_qa, encode_text,
    generate_muse, generate_tofu, load_qa, load_texts, load_verbatim, sensitive_spans, write_muse,
    write_tofu,
)
from unlearn.models import train_tiny_tokenizer

ROWS = [{"question": "Where was Ada born?", "answer": "Ada was born in Kestrel Bay."},
        {"question": "What does Ada write?", "answer": "Ada writes crime fiction."}]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tiny_tokenizer(corpus_texts(generate_tofu(seed=0)), vocab_size=400)


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer):
    chat = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer,
                                   eos_token="<|endoftext|>", pad_token="<|pad|>")
    chat.chat_template = ("{% for m in messages %}<|pad|>{{ m['role'] }}: {{ m['content'] }}\n"
                          "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    return chat


def write(path, rows, fmt):
    if fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("fmt", ["json", "jsonl", "parquet"])
def test_all_formats_read_the_same(tmp_path, fmt):
    records = load_qa(write(tmp_path / f"forget.{fmt}", ROWS, fmt))
    assert [(r.question, r.answer, r.index) for r in records] == [
        (r["question"], r["answer"], i) for i, r in enumerate(ROWS)]
    assert load_qa(tmp_path, "forget") == records  # folder + split name


def test_prompt_response_aliases_and_single_perturbed_string(tmp_path):
    rows = [{"prompt": "Q?", "response": "A.", "perturbed_answer": "B."}]
    (record,) = load_qa(write(tmp_path / "x.json", rows, "json"))
    assert (record.question, record.answer, record.perturbed_answers) == ("Q?", "A.", ("B.",))


@pytest.mark.parametrize("row, needle", [
    ({"question": "Q?"}, "row 1: field 'answer' is missing"),
    ({"question": "Q?", "answer": 3}, "row 1: field 'answer' must be a string, got int"),
    ({"question": ["Q?"], "answer": "A"}, "row 1: field 'question' must be a string"),
    ({"question": "Q?", "answer": "A", "perturbed_answer": [1]}, "row 1: field 'perturbed_answer'"),
    ({"question": "Q?", "answer": "AB", "sensitive_spans": [[1, 5]]}, "row 1: field 'sensitive_spans'"),
    ("just a string", "row 1: expected an object"),
])
def test_bad_rows_name_file_row_and_field(tmp_path, row, needle):
    path = write(tmp_path / "forget.json", [ROWS[0], row], "json")
    with pytest.raises(DataError) as info:
        load_qa(path)
    assert str(path) in str(info.value) and needle in str(info.value)


def test_require_names_the_split_and_field(tmp_path):
    write(tmp_path / "forget10_perturbed.json", ROWS, "json")
    needle = r"forget10_perturbed.json row 0: field 'perturbed_answer' is missing"
    with pytest.raises(DataError, match=needle):
        load_qa(tmp_path, "forget10_perturbed", require=("perturbed_answer",))


def test_empty_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(DataError, match="empty"):
        load_qa(write(tmp_path / "empty.json", [], "json"))
    with pytest.raises(DataError, match=r"bad.jsonl line 2: not valid JSON"):
        (tmp_path / "bad.jsonl").write_text('{"question": "Q", "answer": "A"}\n{oops\n')
        load_qa(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="unreadable Parquet"):
        (tmp_path / "bad.parquet").write_bytes(b"not parquet")
        load_qa(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="expected a JSON array"):
        (tmp_path / "obj.json").write_text('{"question": "Q"}')
        load_qa(tmp_path / "obj.json")
    with pytest.raises(DataError, match="no file for split 'forget01'"):
        load_qa(tmp_path, "forget01")
    with pytest.raises(DataError, match="not found"):
        load_qa(tmp_path / "nope" / "x.json")


def test_overlap_is_reported_and_dropped():
    forget = [QARecord("Where was Ada born?", "A")]
    retain = [QARecord("where  was ADA born?", "A"), QARecord("Other?", "B")]
    kept, overlap = check_overlap(forget, retain)
    assert kept == retain and overlap == ["where  was ADA born?"]
    kept, _ = check_overlap(forget, retain, drop=True)
    assert [r.question for r in kept] == ["Other?"]


# --------------------------------------------------------------------------- synthetic


def test_generator_is_deterministic_by_seed_and_round_trips(tmp_path):
    a, b, c = generate_tofu(seed=3), generate_tofu(seed=3), generate_tofu(seed=4)
    assert a == b and a["full"] != c["full"]
    write_tofu(a, tmp_path, fmt="jsonl")
    for split in ("full", "forget10_perturbed", "retain_perturbed", "world_facts_perturbed"):
        assert load_qa(tmp_path, split) == a[split]


def test_tofu_splits_follow_the_benchmark_layout():
    splits = generate_tofu(seed=0, n_authors=20, qa_per_author=8)
    assert len(splits["full"]) == 160
    assert len(splits["forget10"]) == 16 and len(splits["retain90"]) == 144
    assert [r.question for r in splits["forget10"]] == [r.question for r in splits["full"][-16:]]
    forget_authors = {r.author for r in splits["forget10"]}
    assert not forget_authors & {r.author for r in splits["retain90"]}
    assert not {r.author for r in splits["holdout10"]} & {r.author for r in splits["full"]}
    retain_questions = {r.question for r in splits["retain90"]}
    assert all(r.question in retain_questions for r in splits["retain_perturbed"])
    assert "forget01" not in splits  # needs >= 100 authors


def test_more_never_seen_authors_leave_the_training_splits_as_they_were():
    few = generate_tofu(seed=3, holdout_ratio=2, validation_ratio=2)
    many = generate_tofu(seed=3, holdout_ratio=8, validation_ratio=8)
    for split in ("full", "forget10", "forget10_perturbed", "retain90", "retain_perturbed",
                  "real_authors_perturbed", "world_facts_perturbed"):
        assert many[split] == few[split], split
    authors = {split: [r.author for r in many[split]] for split in ("holdout10", "validation10", "full")}
    assert len(set(authors["holdout10"])) == len(set(authors["validation10"])) == 8 * 2  # forget10: 2 authors
    assert len({r.author for r in many["holdout05"]}) == 8  # forget05: 1 author
    assert few["holdout10"] == many["holdout10"][:len(few["holdout10"])]  # the first 4 authors kept
    assert not set(authors["holdout10"]) & set(authors["validation10"])
    assert not (set(authors["holdout10"]) | set(authors["validation10"])) & set(authors["full"])


def test_perturbed_answers_swap_exactly_the_fact_of_the_paraphrase():
    for record in generate_tofu(seed=1)["forget10_perturbed"]:
        (start, end), = record.sensitive_spans
        fact, para = record.answer[start:end], record.paraphrased_answer
        assert para != record.answer and fact in para
        prefix, suffix = para[:para.index(fact)], para[para.index(fact) + len(fact):]
        assert len(record.perturbed_answers) == 5 and len(set(record.perturbed_answers)) == 5
        for wrong in record.perturbed_answers:
            assert wrong != para and fact not in wrong
            assert wrong.startswith(prefix) and wrong.endswith(suffix)


def test_muse_generator_and_loaders(tmp_path):
    splits = generate_muse(seed=0)
    assert generate_muse(seed=0) == splits
    write_muse(splits, tmp_path)
    assert load_texts(tmp_path, "raw/forget") == splits["raw/forget"]
    verbatim = load_verbatim(tmp_path, "verbmem/forget")
    assert all(v.prompt + v.gt in splits["raw/forget"] for v in verbatim)
    assert load_qa(tmp_path, "knowmem/forget_qa") == splits["knowmem/forget_qa"]
    (tmp_path / "bad.json").write_text(json.dumps([{"txt": "x"}]))
    with pytest.raises(DataError, match="row 0: field 'text' is missing"):
        load_texts(tmp_path, "bad")


# --------------------------------------------------------------------------- spans


def test_span_sources_in_order_of_preference():
    answer = "Ada was born in Kestrel Bay in 1950."
    explicit = QARecord("Q", answer, sensitive_spans=((30, 34),))
    assert sensitive_spans(explicit) == [(30, 34)]
    perturbed = ("Ada was born in Dunmere in 1950.", "Ada was born in Port Avalind in 1950.",
                 "Ada was born in Saltkirk in 1950.")
    diffed = QARecord("Q", answer, perturbed_answers=perturbed)
    assert [answer[a:b] for a, b in sensitive_spans(diffed)] == ["Kestrel Bay"]
    assert sensitive_spans(QARecord("Q", answer)) == [(0, len(answer))]
    # Identical perturbations find nothing: fall back to the whole answer.
    assert sensitive_spans(QARecord("Q", answer, perturbed_answers=(answer,))) == [(0, len(answer))]


def test_diff_needs_a_majority_of_perturbations():
    answer = "Born in Paris on May 3."
    spans = diff_spans(answer, ["Born in Rome on May 3.", "Born in Oslo on May 3.",
                                "Born in Paris on June 9."])
    assert [answer[a:b] for a, b in spans] == ["Paris"]


# --------------------------------------------------------------------------- tokenisation


def test_labels_cover_exactly_the_answer_and_eos(tokenizer):
    record = QARecord("Where was Ada born?", "Ada was born in Kestrel Bay.")
    feature = encode_qa(tokenizer, record, max_length=64)
    ids, labels = feature["input_ids"], feature["labels"]
    n_prompt = len(tokenizer("Question: Where was Ada born?\nAnswer:")["input_ids"])
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[n_prompt:-1]) == " " + record.answer


def test_truncation_keeps_the_prompt(tokenizer):
    record = QARecord("Where was Ada born?", "Ada was born in Kestrel Bay. " * 20)
    feature = encode_qa(tokenizer, record, max_length=24)
    assert len(feature["input_ids"]) == 24 and feature["labels"][-1] == tokenizer.eos_token_id
    with pytest.raises(DataError, match="no room for the answer"):
        encode_qa(tokenizer, record, max_length=3)


def test_chat_template_prompt(chat_tokenizer):
    feature = encode_qa(chat_tokenizer, "Where was Ada born?", "In Dunmere.", max_length=64)
    n_answer = sum(label != -100 for label in feature["labels"])
    answer_ids = chat_tokenizer("In Dunmere.", add_special_tokens=False)["input_ids"]
    assert n_answer == len(answer_ids) + 1
    prompt = chat_tokenizer.decode(feature["input_ids"][: len(feature["input_ids"]) - n_answer])
    assert prompt.endswith("assistant: ") and "user: Where was Ada born?" in prompt


def test_onset_mask_marks_the_first_tokens_of_each_span(tokenizer):
    answer = "Ada was born in Kestrel Bay and writes gothic horror."
    spans = ((answer.index("Kestrel"), answer.index(" and")),
             (answer.index("gothic"), len(answer) - 1))
    record = QARecord("Q?", answer, sensitive_spans=spans)
    feature = encode_qa(tokenizer, record, max_length=64, prefix_tokens=2)
    offsets = tokenizer(" " + answer, add_special_tokens=False, return_offsets_mapping=True)
    start = len(feature["input_ids"]) - len(offsets["input_ids"]) - 1
    in_span = [any(a - 1 < e and b - 1 > s for s, e in spans) for a, b in offsets["offset_mapping"]]
    expected, run = [], 0
    for flag in in_span:
        run = run + 1 if flag else 0
        expected.append(int(flag and run <= 2))
    assert feature["onset_mask"][start:-1] == expected
    assert sum(expected) == 4  # two spans x two onset tokens
    assert feature["onset_mask"][:start] == [0] * start
    assert feature["neutral_mask"][start:-1] == [int(not f) for f in in_span]
    assert feature["neutral_mask"][-1] == 1  # EOS is neutral


def test_collate_pads_on_either_side(tokenizer):
    a = encode_qa(tokenizer, "Q?", "A short one.", max_length=64, prefix_tokens=1)
    b = encode_qa(tokenizer, "Q?", "A much longer answer than the first one.", max_length=64,
                  prefix_tokens=1)
    pad = tokenizer.pad_token_id
    right = collate([a, b], pad)
    left = collate([a, b], pad, padding_side="left")
    n = len(b["input_ids"]) - len(a["input_ids"])
    assert right["input_ids"][0, -n:].tolist() == [pad] * n
    assert right["labels"][0, -n:].tolist() == [-100] * n
    assert right["attention_mask"][0].sum() == len(a["input_ids"])
    assert left["input_ids"][0, :n].tolist() == [pad] * n and left["onset_mask"][0, :n].sum() == 0
    assert left["input_ids"][0, n:].tolist() == a["input_ids"]
    with pytest.raises(ValueError, match="padding_side"):
        collate([a], pad, padding_side="middle")


def test_raw_text_is_fully_supervised(tokenizer):
    feature = encode_text(tokenizer, "Ada was born in Kestrel Bay.", max_length=5)
    assert feature["labels"] == feature["input_ids"] and len(feature["input_ids"]) == 5
    assert feature["input_ids"][-1] == tokenizer.eos_token_id


# --------------------------------------------------------------------------- batching


def test_bucketing_covers_every_sample_once_and_cuts_padding():
    from unlearn.data.batching import batch_indices, padding_fraction

    lengths = [5 + (i * 37) % 60 for i in range(200)]
    plain = batch_indices(lengths, 8, shuffle=True, seed=1, bucket=False)
    bucketed = batch_indices(lengths, 8, shuffle=True, seed=1, bucket=True, window=8)
    for batches in (plain, bucketed):
        assert sorted(i for b in batches for i in b) == list(range(200))
        assert all(1 <= len(b) <= 8 for b in batches)
    assert padding_fraction(lengths, bucketed) < 0.5 * padding_fraction(lengths, plain)
    assert batch_indices(lengths, 8, shuffle=True, seed=1) == batch_indices(lengths, 8, shuffle=True, seed=1)
    assert batch_indices(lengths, 8, shuffle=True, seed=1) != batch_indices(lengths, 8, shuffle=True, seed=2)
    assert padding_fraction([3, 3], [[0, 1]]) == 0.0
    assert padding_fraction([1, 3], [[0, 1]]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="batch_size"):
        batch_indices(lengths, 0)


@pytest.mark.parametrize("prefix_tokens", [None, 2])
def test_batched_encoding_equals_one_record_at_a_time(tokenizer, chat_tokenizer, prefix_tokens):
    from unlearn.data import encode_qa_batch, sensitive_spans

    records = [QARecord(question=r.question, answer=r.answer, paraphrased_answer=r.paraphrased_answer,
                        sensitive_spans=tuple(sensitive_spans(r)))
               for r in generate_tofu(seed=1)["forget10"][:12]]
    for tok in (tokenizer, chat_tokenizer):
        # 60 tokens: the chat prompt fits, some answers are cut
        one_by_one = [encode_qa(tok, r, max_length=60, prefix_tokens=prefix_tokens) for r in records]
        assert encode_qa_batch(tok, records, max_length=60, prefix_tokens=prefix_tokens) == one_by_one
        assert any(len(f["input_ids"]) == 60 for f in one_by_one)
