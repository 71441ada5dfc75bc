"""Record types of the two benchmark formats, and the error every loader raises."""

from __future__ import annotations

from dataclasses import dataclass


class DataError(ValueError):
    """Bad input data; the message names the file (or hub name), the row and the field."""


class SplitNotFound(DataError):
    """A local data folder has no file for the requested split."""


@dataclass(frozen=True)
class QARecord:
    """One TOFU-format question/answer pair (the extra fields serve evaluation and PALU)."""

    question: str
    answer: str
    paraphrased_question: str | None = None
    paraphrased_answer: str | None = None
    perturbed_answers: tuple[str, ...] = ()
    sensitive_spans: tuple[tuple[int, int], ...] | None = None  # char offsets into answer
    author: str | None = None
    index: int | None = None

    def to_dict(self) -> dict:
        """TOFU field names; unset optional fields are left out."""
        row: dict = {"question": self.question, "answer": self.answer}
        if self.paraphrased_question is not None:
            row["paraphrased_question"] = self.paraphrased_question
        if self.paraphrased_answer is not None:
            row["paraphrased_answer"] = self.paraphrased_answer
        if self.perturbed_answers:
            row["perturbed_answer"] = list(self.perturbed_answers)
        if self.sensitive_spans is not None:
            row["sensitive_spans"] = [list(span) for span in self.sensitive_spans]
        if self.author is not None:
            row["author"] = self.author
        return row


@dataclass(frozen=True)
class VerbatimRecord:
    """A MUSE verbmem item: a prompt and the ground-truth continuation."""

    prompt: str
    gt: str

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "gt": self.gt}
