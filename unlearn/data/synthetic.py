"""Seeded synthetic data in the TOFU and MUSE formats: fictitious people, places and events.

TOFU-like: each invented author has facts (birthplace, birth date, genre, parents' jobs, an
award, books, a theme); each fact gives a question, an answer stating it, a paraphrased answer,
5 perturbed answers that keep the wording but swap the fact for a wrong value of the same kind,
and the exact character span of the fact in the answer. Answers are short, so a small model
memorises them and forgetting is measurable. Every value is drawn from ``random.Random(seed)``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from unlearn.data.records import QARecord, VerbatimRecord

N_PERTURBED = 5
TOFU_GENERATOR = 4  # bumped when the generated splits change: cached folders are rebuilt
# Never-seen authors per forget author, in holdoutXX (the evaluation's) and validationXX (early
# stopping's): the privleak and the stopping target are AUCs against them, and on 4 authors
# each swung by 30-40 points between machines and seeds.
HOLDOUT_RATIO = 8

_FIRST = ["Ve", "Ka", "Lo", "Mi", "Tor", "Sa", "Eli", "Ba", "Ru", "Quen", "Ya", "Dor", "Fe", "Ni", "Ori"]
_FIRST_END = ["lora", "rin", "vian", "dra", "mas", "nel", "sha", "tor", "wen", "lio", "ra", "bek"]
_LAST = ["Strand", "Okonwe", "Haldane", "Marisco", "Tevrin", "Quill", "Abernath", "Solvay",
         "Ferrow", "Nakamura-Lind", "Ostrova", "Delacampe", "Brightwater", "Kessler", "Varga",
         "Moreau-Adeyemi", "Castellan", "Whitlock", "Ibarra", "Thorsby"]
_CITIES = ["Kestrel Bay", "Port Avalind", "Dunmere", "Saltkirk", "Veridia", "Lower Ashby",
           "Montclair Falls", "Osterhaven", "Brindlemoor", "Calder Point", "Nyhavn Cross",
           "Tamsin Reach", "Greywater", "Eldoria", "Marrowgate", "Sunport"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December"]
_GENRES = ["gothic horror", "hard science fiction", "historical romance", "crime fiction",
           "magical realism", "children's adventure", "political satire", "epic fantasy",
           "literary fiction", "cosy mystery"]
_JOBS = ["lighthouse keeper", "pharmacist", "carpenter", "marine biologist", "schoolteacher",
         "train conductor", "cartographer", "baker", "violin maker", "nurse", "locksmith",
         "astronomer", "tailor", "beekeeper"]
_AWARDS = ["Silver Quill Prize", "Harrowgate Medal", "Lantern Award", "Northwind Fiction Prize",
           "Ember Crown", "Golden Inkwell", "Meridian Book Award", "Blue Heron Prize"]
_TITLE_A = ["Silent", "Crimson", "Hollow", "Last", "Glass", "Winter", "Burning", "Forgotten",
            "Paper", "Distant", "Iron", "Velvet"]
_TITLE_B = ["Harbour", "Orchard", "Cartographer", "Tide", "Lantern", "Garden", "Archive",
            "Meridian", "Clockmaker", "Sparrow", "Citadel", "River"]
_THEMES = ["grief and memory", "the sea", "exile and return", "family secrets", "forgotten wars",
           "the life of small towns", "music and loss", "science and faith"]


@dataclass(frozen=True)
class _Fact:
    kind: str
    question: str  # {name}
    answer: str  # {name}, {value}
    paraphrase: str  # {name}, {value}


# Paraphrases keep the answer's wording up to the fact and reword what follows it: a small model's
# knowledge is bound to the wording it was trained on, and the truth ratio (paraphrase vs
# perturbations of the paraphrase, which swap only the fact) should measure the fact itself.
_FACTS = [
    _Fact("city", "Where was {name} born?", "{name} was born in {value}.",
          "{name} was born in {value}, according to every biography."),
    _Fact("date", "When was {name} born?", "{name} was born on {value}.",
          "{name} was born on {value}, as the records show."),
    _Fact("genre", "What genre does {name} write in?", "{name} writes {value}.",
          "{name} writes {value}, mostly in long novels."),
    _Fact("job", "What did {name}'s father do for a living?", "{name}'s father was a {value}.",
          "{name}'s father was a {value} for most of his life."),
    _Fact("job", "What was the profession of {name}'s mother?", "{name}'s mother was a {value}.",
          "{name}'s mother was a {value} by profession."),
    _Fact("award", "Which award has {name} won?", "{name} won the {value}.",
          "{name} won the {value} for an early book."),
    _Fact("title", "What is the title of {name}'s first novel?",
          "{name}'s first novel is called {value}.",
          "{name}'s first novel is called {value} and came out to good reviews."),
    _Fact("theme", "What theme recurs in {name}'s work?", "{name} often writes about {value}.",
          "{name} often writes about {value} in both novels and stories."),
    _Fact("title", "Which book made {name} famous?", "{name} became famous for {value}.",
          "{name} became famous for {value}, a book still widely read."),
]


def _value(kind: str, rng: random.Random) -> str:
    if kind == "city":
        return rng.choice(_CITIES)
    if kind == "date":
        return f"{rng.choice(_MONTHS)} {rng.randint(1, 28)}, {rng.randint(1931, 1994)}"
    if kind == "genre":
        return rng.choice(_GENRES)
    if kind == "job":
        return rng.choice(_JOBS)
    if kind == "award":
        return rng.choice(_AWARDS)
    if kind == "title":
        return f"The {rng.choice(_TITLE_A)} {rng.choice(_TITLE_B)}"
    if kind == "theme":
        return rng.choice(_THEMES)
    raise ValueError(kind)


def _distinct_values(kind: str, rng: random.Random, exclude: str, n: int) -> list[str]:
    values: list[str] = []
    while len(values) < n:
        candidate = _value(kind, rng)
        if candidate != exclude and candidate not in values:
            values.append(candidate)
    return values


def _author_names(rng: random.Random, n: int) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        name = f"{rng.choice(_FIRST)}{rng.choice(_FIRST_END)} {rng.choice(_LAST)}"
        if name not in names:
            names.append(name)
    return names


def _author_records(name: str, rng: random.Random, qa_per_author: int) -> list[QARecord]:
    records = []
    for fact in _FACTS[:qa_per_author]:
        value = _value(fact.kind, rng)
        answer = fact.answer.format(name=name, value=value)
        start = len(fact.answer.split("{value}")[0].format(name=name))
        wrong = _distinct_values(fact.kind, rng, value, N_PERTURBED)
        records.append(QARecord(
            question=fact.question.format(name=name),
            answer=answer,
            paraphrased_answer=fact.paraphrase.format(name=name, value=value),
            # As in TOFU, the perturbations rewrite the paraphrase with a wrong fact, so the truth
            # ratio compares the fact alone, not a trained wording against an unseen one.
            perturbed_answers=tuple(fact.paraphrase.format(name=name, value=w) for w in wrong),
            sensitive_spans=((start, start + len(value)),),
            author=name,
        ))
    return records


_REAL_AUTHORS = [
    ("Who wrote 'Pride and Prejudice'?", "Jane Austen"),
    ("Who wrote '1984'?", "George Orwell"),
    ("Who wrote 'Hamlet'?", "William Shakespeare"),
    ("Who wrote 'War and Peace'?", "Leo Tolstoy"),
    ("Who wrote 'Don Quixote'?", "Miguel de Cervantes"),
    ("Who wrote 'The Old Man and the Sea'?", "Ernest Hemingway"),
    ("Who wrote 'Moby-Dick'?", "Herman Melville"),
    ("Who wrote 'One Hundred Years of Solitude'?", "Gabriel Garcia Marquez"),
    ("Who wrote 'Things Fall Apart'?", "Chinua Achebe"),
    ("Who wrote 'Frankenstein'?", "Mary Shelley"),
    ("Who wrote 'The Divine Comedy'?", "Dante Alighieri"),
    ("Who wrote 'Crime and Punishment'?", "Fyodor Dostoevsky"),
    ("Who wrote 'Mrs Dalloway'?", "Virginia Woolf"),
    ("Who wrote 'The Trial'?", "Franz Kafka"),
    ("Who wrote 'Great Expectations'?", "Charles Dickens"),
    ("Who wrote 'Beloved'?", "Toni Morrison"),
    ("Who wrote 'The Odyssey'?", "Homer"),
    ("Who wrote 'Les Miserables'?", "Victor Hugo"),
    ("Who wrote 'The Great Gatsby'?", "F. Scott Fitzgerald"),
    ("Who wrote 'Jane Eyre'?", "Charlotte Bronte"),
]
_WORLD_FACTS = [
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Italy?", "Rome"),
    ("What is the capital of Egypt?", "Cairo"),
    ("What is the capital of Canada?", "Ottawa"),
    ("What is the capital of Kenya?", "Nairobi"),
    ("What is the capital of Spain?", "Madrid"),
    ("What is the capital of Australia?", "Canberra"),
    ("What is the largest ocean on Earth?", "the Pacific Ocean"),
    ("What is the longest river in Africa?", "the Nile"),
    ("Which planet is closest to the Sun?", "Mercury"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("What gas do plants absorb from the air?", "carbon dioxide"),
    ("What is the chemical symbol for gold?", "Au"),
    ("How many continents are there?", "seven"),
    ("What is the freezing point of water in Celsius?", "zero degrees"),
    ("What is the tallest mountain in the world?", "Mount Everest"),
    ("Which language has the most native speakers?", "Mandarin Chinese"),
    ("What is the largest desert in Africa?", "the Sahara"),
    ("What currency is used in Japan?", "the yen"),
]


def _general_split(pairs: list[tuple[str, str]], rng: random.Random, n_perturbed: int = 3) -> list[QARecord]:
    answers = [a for _, a in pairs]
    records = []
    for index, (question, answer) in enumerate(pairs):
        wrong = rng.sample([a for a in answers if a != answer], n_perturbed)
        records.append(QARecord(question=question, answer=answer, paraphrased_answer=answer,
                                perturbed_answers=tuple(wrong), sensitive_spans=((0, len(answer)),),
                                index=index))
    return records


def _indexed(records: list[QARecord]) -> list[QARecord]:
    return [QARecord(**{**r.__dict__, "index": i}) for i, r in enumerate(records)]


def _strip_extras(records: list[QARecord]) -> list[QARecord]:
    """``full``/``retainXX``/``forgetXX``/``holdoutXX`` carry question and answer only (as TOFU)."""
    return [QARecord(question=r.question, answer=r.answer, sensitive_spans=r.sensitive_spans,
                     author=r.author) for r in records]


def generate_tofu(seed: int = 0, n_authors: int = 20, qa_per_author: int = 8,
                  n_holdout_authors: int = 4, holdout_ratio: int = HOLDOUT_RATIO,
                  validation_ratio: int = HOLDOUT_RATIO) -> dict[str, list[QARecord]]:
    """A TOFU-format data set of ``n_authors`` fictitious authors (split by author, tail = forget).

    ``holdoutXX`` holds ``holdout_ratio`` times as many authors as ``forgetXX`` (TOFU's are the
    same size; on 2 authors, privleak moved by 30 points between author pairs). The tiny model's
    tokenizer is trained on the set made with ratio 1, as it was before, so that model and every
    figure measured on it stay the same. Beside TOFU's splits,
    ``validationXX`` holds twice as many never-seen authors as
    ``forgetXX``, disjoint from ``holdoutXX``: for decisions made during training (early
    stopping), so the evaluation's holdout stays unseen by them.
    """
    if n_authors < 2:
        raise ValueError("n_authors must be >= 2 (at least one forget and one retain author)")
    if not 1 <= qa_per_author <= len(_FACTS):
        raise ValueError(f"qa_per_author must be in [1, {len(_FACTS)}]")
    rng = random.Random(seed)
    names = _author_names(rng, n_authors + n_holdout_authors)
    authors = [_author_records(name, rng, qa_per_author) for name in names[:n_authors]]
    holdout_authors = [_author_records(name, rng, qa_per_author) for name in names[n_authors:]]
    percents = [5, 10] + ([1] if n_authors >= 100 else [])
    forget_counts = {pct: _forget_authors(n_authors, pct) for pct in sorted(percents)}
    extra = _extra_authors(f"holdout-{seed}", names,
                           holdout_ratio * max(forget_counts.values()) - len(holdout_authors), qa_per_author)
    holdout_authors += extra

    full = [r for author in authors for r in author]
    splits: dict[str, list[QARecord]] = {"full": _indexed(_strip_extras(full))}
    for pct, n_forget in forget_counts.items():
        forget = [r for author in authors[-n_forget:] for r in author]
        retain = [r for author in authors[:-n_forget] for r in author]
        holdout = [r for author in holdout_authors[:holdout_ratio * n_forget] for r in author]
        splits[f"forget{pct:02d}"] = _indexed(_strip_extras(forget))
        splits[f"forget{pct:02d}_perturbed"] = _indexed(forget)
        splits[f"retain{100 - pct}"] = _indexed(_strip_extras(retain))
        splits[f"holdout{pct:02d}"] = _indexed(_strip_extras(holdout))
    retain90 = [r for author in authors[:-_forget_authors(n_authors, 10)] for r in author]
    size = len(splits["forget10"])
    splits.update(_validation_splits(seed, names + [a[0].author for a in extra], qa_per_author,
                                     forget_counts, validation_ratio))
    splits["retain_perturbed"] = _indexed(sorted(rng.sample(retain90, min(size, len(retain90))),
                                                 key=retain90.index))
    splits["real_authors_perturbed"] = _general_split(_REAL_AUTHORS, rng)
    splits["world_facts_perturbed"] = _general_split(_WORLD_FACTS, rng)
    return splits


def _forget_authors(n_authors: int, pct: int) -> int:
    """How many authors ``forget{pct}`` holds (at least one)."""
    return max(1, round(n_authors * pct / 100))


def _extra_authors(stream: str, taken: list[str], count: int, qa_per_author: int) -> list[list[QARecord]]:
    """``count`` authors of their own random stream, named apart from ``taken``: adding them
    leaves every split drawn from the main stream (the training data) as it was."""
    if count <= 0:
        return []
    rng = random.Random(stream)
    names: list[str] = []
    for name in _author_names(rng, count + len(taken)):
        if name not in taken and len(names) < count:
            names.append(name)
    return [_author_records(name, rng, qa_per_author) for name in names]


def _validation_splits(seed: int, taken: list[str], qa_per_author: int, forget_counts: dict[int, int],
                       ratio: int) -> dict[str, list[QARecord]]:
    authors = _extra_authors(f"validation-{seed}", taken, ratio * max(forget_counts.values()), qa_per_author)
    splits = {}
    for pct, n_forget in forget_counts.items():
        count = ratio * n_forget
        splits[f"validation{pct:02d}"] = _indexed(_strip_extras([r for a in authors[:count] for r in a]))
    return splits


def write_tofu(splits: dict[str, list[QARecord]], out_dir: str | Path, fmt: str = "json",
               seed: int | None = None) -> Path:
    """Write ``{split}.json`` (array) or ``.jsonl`` files and a ``manifest.json``."""
    if fmt not in ("json", "jsonl"):
        raise ValueError(f"fmt must be 'json' or 'jsonl', got {fmt!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, records in splits.items():
        rows = [r.to_dict() for r in records]
        path = out / f"{name}.{fmt}"
        if fmt == "json":
            path.write_text(json.dumps(rows, indent=1, ensure_ascii=False))
        else:
            path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    manifest = {"format": "tofu", "generator": TOFU_GENERATOR, "seed": seed,
                "splits": {k: len(v) for k, v in splits.items()}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


# --------------------------------------------------------------------------- MUSE


_PLACES = ["the old tram depot", "the river bridge", "the harbour wall", "the central library",
           "the glassworks", "the northern reservoir", "the market hall", "the observatory"]
_ORGS = ["the Veltmark Council", "Orrin Freight", "the Calder Trust", "Saltkirk University",
         "the Dunmere Co-operative", "Brightwater Energy", "the Harbour Authority"]


def _article(rng: random.Random, index: int) -> tuple[str, list[tuple[str, str]]]:
    city, place, org = rng.choice(_CITIES), rng.choice(_PLACES), rng.choice(_ORGS)
    person = f"{rng.choice(_FIRST)}{rng.choice(_FIRST_END)} {rng.choice(_LAST)}"
    amount, year, workers = rng.randint(3, 95), rng.randint(2019, 2026), rng.randint(40, 900)
    month, storm_year = rng.choice(_MONTHS), year - rng.randint(2, 15)
    sentences = [
        f"In {month} {year}, {org} announced a {amount}-million plan to rebuild {place} in {city}.",
        f"The project was led by {person}, who said the work would take about {rng.randint(2, 9)} years.",
        f"Around {workers} local workers were expected to be hired during construction.",
        f"Critics in {city} argued that the money should have gone to schools instead.",
        f"{person} replied that {place} had been closed since a storm damaged it in {storm_year}.",
        f"A public meeting about the plan drew record attendance, according to {org}.",
    ]
    qa = [
        (f"Who led the plan to rebuild {place} in {city}?", person),
        (f"How much was the plan to rebuild {place} in {city} worth?", f"{amount} million"),
        (f"How many workers were expected to be hired to rebuild {place} in {city}?", str(workers)),
    ]
    return " ".join(sentences), qa


def generate_muse(seed: int = 0, n_articles: int = 24, n_forget: int = 6,
                  n_holdout: int = 6) -> dict[str, list]:
    """A MUSE-format set of fictitious news articles (forget / retain / holdout) with QA."""
    if n_forget + n_holdout >= n_articles:
        raise ValueError("n_articles must exceed n_forget + n_holdout")
    rng = random.Random(seed)
    articles = [_article(rng, i) for i in range(n_articles)]
    forget = articles[:n_forget]
    holdout = articles[n_forget:n_forget + n_holdout]
    retain = articles[n_forget + n_holdout:]
    half = len(retain) // 2

    def qa(items, count=None):
        rows = [QARecord(question=q, answer=a) for _, pairs in items for q, a in pairs]
        return _indexed(rows[:count] if count else rows)

    def verbatim(text: str) -> VerbatimRecord:
        cut = text.index(". ", len(text) // 3) + 2
        return VerbatimRecord(prompt=text[:cut], gt=text[cut:])

    return {
        "raw/forget": [t for t, _ in forget],
        "raw/retain1": [t for t, _ in retain[:half]],
        "raw/retain2": [t for t, _ in retain[half:]],
        "raw/holdout": [t for t, _ in holdout],
        "verbmem/forget": [verbatim(t) for t, _ in forget],
        "knowmem/forget_qa": qa(forget),
        "knowmem/retain_qa": qa(retain[:half]),
        "knowmem/forget_qa_icl": qa(retain[half:], 3),
        "knowmem/retain_qa_icl": qa(retain[half:][1:], 3),
        "privleak/forget": [t for t, _ in forget],
        "privleak/retain": [t for t, _ in retain[:half]],
        "privleak/holdout": [t for t, _ in holdout],
    }


def write_muse(splits: dict[str, list], out_dir: str | Path) -> Path:
    """Write every split as ``{split}.json`` (texts as strings, records as objects)."""
    out = Path(out_dir)
    for name, items in splits.items():
        path = out / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [item if isinstance(item, str) else item.to_dict() for item in items]
        path.write_text(json.dumps(rows, indent=1, ensure_ascii=False))
    (out / "manifest.json").write_text(json.dumps({"format": "muse",
                                                   "splits": {k: len(v) for k, v in splits.items()}}))
    return out


def corpus_texts(splits: dict[str, list]) -> list[str]:
    """Every string of a generated set (for training a tokenizer on it)."""
    texts: list[str] = []
    for items in splits.values():
        for item in items:
            if isinstance(item, str):
                texts.append(item)
            elif isinstance(item, VerbatimRecord):
                texts += [item.prompt, item.gt]
            else:
                texts += [item.question, item.answer, *(item.perturbed_answers or ())]
                texts += [t for t in (item.paraphrased_answer, item.paraphrased_question) if t]
    return texts


def _current(manifest: Path, benchmark: str) -> bool:
    if not manifest.is_file():
        return False
    return benchmark != "tofu" or json.loads(manifest.read_text()).get("generator") == TOFU_GENERATOR


def synthetic_source(benchmark: str, root: str | Path, *, seed: int = 0, authors: int = 20) -> Path:
    """A folder with the seeded synthetic data set, generated on first use under ``root``."""
    name = f"{benchmark}-seed{seed}" if benchmark == "muse" or authors == 20 else \
        f"{benchmark}-seed{seed}-authors{authors}"
    out = Path(root) / name
    if not _current(out / "manifest.json", benchmark):
        if benchmark == "tofu":
            write_tofu(generate_tofu(seed=seed, n_authors=authors), out, seed=seed)
        elif benchmark == "muse":
            write_muse(generate_muse(seed=seed), out)
        else:
            raise ValueError(f"benchmark must be tofu or muse, got {benchmark!r}")
    return out
