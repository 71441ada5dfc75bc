"""What evaluation asks of a model, and a batched single-process scorer that answers it.

An evaluation is planned as a flat list of requests (:class:`Likelihood`, :class:`Generation`),
executed in one go by a scorer, then aggregated. The single-process :class:`LocalScorer` and the
Ray Data scorer in ``pipelines/eval.py`` take the same requests and return the same results, so
the model is loaded once per process and the aggregation code is shared.

- Likelihood: one right-padded forward per batch of (prompt, continuation) pairs; logits are
  computed only at the continuation's positions, a chunk of rows at a time, so many candidate
  answers of many questions share one pass without a ``[B, T, V]`` tensor. Result: the token
  log-probs and whether the teacher-forced argmax was right, per continuation token.
- Generation: greedy, left-padded batches with the KV cache, stopping at EOS or a stop string.
Requests are sorted by length before batching (little padding) and results returned in order.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from unlearn.data.tokenize import IGNORE, collate, encode_qa, prompt_ids

DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_LENGTH = 512
HEAD_CHUNK = 1024


@dataclass(frozen=True)
class Likelihood:
    """Score ``text`` as the answer to question ``prompt`` (``chat``: the training prompt format,
    EOS included), or as a raw continuation of ``prompt`` (every token of ``text`` when
    ``prompt`` is None)."""

    text: str
    prompt: str | None = None
    chat: bool = True


@dataclass(frozen=True)
class Generation:
    """Greedy continuation of ``prompt`` (a question in the chat/QA format when ``chat``)."""

    prompt: str
    chat: bool = True
    max_new_tokens: int = 200
    stop: tuple[str, ...] = ()


Request = Likelihood | Generation


def request_to_json(request: Request) -> str:
    return json.dumps({"kind": type(request).__name__, **asdict(request)})


def request_from_json(text: str) -> Request:
    fields = json.loads(text)
    kind = fields.pop("kind")
    if kind == "Likelihood":
        return Likelihood(**fields)
    if kind == "Generation":
        return Generation(**{**fields, "stop": tuple(fields["stop"])})
    raise ValueError(f"unknown request kind {kind!r}")


def request_size(request: Request) -> int:
    """A cheap length estimate (characters) used to sort requests before batching."""
    if isinstance(request, Likelihood):
        return len(request.prompt or "") + len(request.text)
    return len(request.prompt)


# --------------------------------------------------------------------------- encoding


def encode_likelihood(tokenizer, request: Likelihood, max_length: int) -> dict[str, list[int]]:
    if request.chat:
        if request.prompt is None:
            raise ValueError("a chat likelihood request needs a prompt (the question)")
        return encode_qa(tokenizer, request.prompt, request.text, max_length=max_length)
    if request.prompt is None:
        ids = tokenizer(request.text)["input_ids"][:max_length]
        labels = [IGNORE] + ids[1:]  # the first token has nothing to be predicted from
    else:
        prompt = tokenizer(request.prompt)["input_ids"]
        text = tokenizer(request.text, add_special_tokens=False)["input_ids"]
        ids = (prompt + text)[-max_length:]
        labels = ([IGNORE] * len(prompt) + text)[-max_length:]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def encode_prompt(tokenizer, request: Generation) -> list[int]:
    if request.chat:
        return prompt_ids(tokenizer, request.prompt)
    return tokenizer(request.prompt)["input_ids"]


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    end = len(text)
    for s in stop:
        found = text.find(s)
        if found != -1:
            end = min(end, found)
    return text[:end]


# --------------------------------------------------------------------------- model passes


def _uses_plain_head(model: nn.Module) -> bool:
    """True when logits are exactly ``lm_head(last_hidden_state)`` (no softcap or scale)."""
    config = getattr(model, "config", None)
    return (hasattr(model, "get_decoder") and model.get_output_embeddings() is not None
            and getattr(config, "final_logit_softcapping", None) is None
            and getattr(config, "logit_scale", None) is None)


@torch.no_grad()
def token_scores(model: nn.Module, batch: dict[str, torch.Tensor], *,
                 chunk: int = HEAD_CHUNK) -> list[tuple[list[float], list[bool]]]:
    """Per sample: log-prob of each supervised label token and whether the argmax predicted it."""
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if _uses_plain_head(model):
        hidden = model.get_decoder()(**inputs).last_hidden_state[:, :-1]
        rows, head = hidden[mask], model.get_output_embeddings()
    else:
        rows, head = model(**inputs).logits[:, :-1][mask], None
    targets = labels[mask]
    logprobs, correct = [], []
    for start in range(0, rows.shape[0], chunk):
        part = rows[start:start + chunk]
        logits = (head(part) if head is not None else part).float()
        target = targets[start:start + chunk]
        logprobs.append(torch.log_softmax(logits, dim=-1).gather(1, target[:, None]).squeeze(1))
        correct.append(logits.argmax(dim=-1) == target)
    flat_lp = torch.cat(logprobs).tolist() if logprobs else []
    flat_ok = torch.cat(correct).tolist() if correct else []
    out, offset = [], 0
    for count in mask.sum(dim=1).tolist():
        out.append((flat_lp[offset:offset + count], flat_ok[offset:offset + count]))
        offset += count
    return out


@torch.no_grad()
def greedy_generate(model: nn.Module, tokenizer, prompts: Sequence[list[int]], *,
                    max_new_tokens: int, stop: Sequence[str] = (), synced_gpus: bool = False) -> list[str]:
    """Greedy continuations of a batch of prompt ids (left-padded, KV cache), cut at EOS/stop.
    ``synced_gpus``: every rank of a sharded model keeps stepping until all ranks are done."""
    from transformers import GenerationConfig

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pad = eos if pad is None else pad
    batch = collate([{"input_ids": p, "attention_mask": [1] * len(p)} for p in prompts], pad,
                    padding_side="left")
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              eos_token_id=eos, pad_token_id=pad,
                              stop_strings=list(stop) or None)
    in_step = {"synced_gpus": True} if synced_gpus else {}
    output = model.generate(**batch, generation_config=config, tokenizer=tokenizer if stop else None,
                            **in_step)
    texts = []
    for row in output[:, batch["input_ids"].shape[1]:].tolist():
        if eos in row:
            row = row[:row.index(eos)]
        texts.append(cut_at_stop(tokenizer.decode(row, skip_special_tokens=True), stop).strip())
    return texts


# --------------------------------------------------------------------------- scorer


class LocalScorer:
    """Answers requests in this process, in length-sorted batches."""

    synced_gpus = False

    def __init__(self, model: nn.Module, tokenizer, *, batch_size: int = DEFAULT_BATCH_SIZE,
                 generation_batch_size: int | None = None, max_length: int = DEFAULT_MAX_LENGTH,
                 progress: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = batch_size
        self.generation_batch_size = generation_batch_size or batch_size
        self.max_length, self.progress = max_length, progress

    def run(self, requests: Sequence[Request]) -> list[dict]:
        """Likelihood -> ``{"logprobs": [...], "correct": [...]}``; Generation -> ``{"text"}``."""
        self.model.eval()
        results: list[dict | None] = [None] * len(requests)
        likelihood = [i for i, r in enumerate(requests) if isinstance(r, Likelihood)]
        generation = [i for i, r in enumerate(requests) if isinstance(r, Generation)]
        self._likelihoods(requests, likelihood, results)
        self._generations(requests, generation, results)
        return results  # type: ignore[return-value]

    def _batches(self, indices: list[int], lengths: dict[int, int], size: int) -> list[list[int]]:
        ordered = sorted(indices, key=lambda i: -lengths[i])
        return [ordered[s:s + size] for s in range(0, len(ordered), size)]

    def _share(self, batches: list) -> list[tuple[Any, bool]]:
        """The batches this process runs, each with whether its answers are kept."""
        return [(batch, True) for batch in batches]

    def _likelihoods(self, requests, indices, results) -> None:
        if not indices:
            return
        features = {i: encode_likelihood(self.tokenizer, requests[i], self.max_length) for i in indices}
        lengths = {i: len(f["input_ids"]) for i, f in features.items()}
        pad = self.tokenizer.pad_token_id
        device = next(self.model.parameters()).device
        batches = self._batches(indices, lengths, self.batch_size)
        for group, keep in tqdm(self._share(batches), desc="likelihood", disable=not self.progress,
                                leave=False):
            batch = collate([features[i] for i in group], pad)
            scores = token_scores(self.model, {k: v.to(device) for k, v in batch.items()})
            for i, (logprobs, correct) in zip(group, scores):
                if keep:
                    results[i] = {"logprobs": logprobs, "correct": correct}

    def _generations(self, requests, indices, results) -> None:
        if not indices:
            return
        prompts = {i: encode_prompt(self.tokenizer, requests[i]) for i in indices}
        lengths = {i: len(p) for i, p in prompts.items()}
        # One generate() call per (max_new_tokens, stop) setting, each in length-sorted batches.
        settings: dict[tuple, list[int]] = {}
        for i in indices:
            settings.setdefault((requests[i].max_new_tokens, requests[i].stop), []).append(i)
        batches = [(key, group) for key, members in settings.items()
                   for group in self._batches(members, lengths, self.generation_batch_size)]
        for ((max_new_tokens, stop), group), keep in tqdm(self._share(batches), desc="generate",
                                                          disable=not self.progress, leave=False):
            texts = greedy_generate(self.model, self.tokenizer, [prompts[i] for i in group],
                                    max_new_tokens=max_new_tokens, stop=stop, synced_gpus=self.synced_gpus)
            for i, text in zip(group, texts):
                if keep:
                    results[i] = {"text": text}


class ShardedScorer(LocalScorer):
    """Answers requests with a model sharded over ranks (FSDP2), no rank holding the full model.

    Collective: every rank calls ``run`` with the same requests. Each rank runs every
    ``world``-th batch and every rank returns all the answers (``gather``: a list per rank, as
    ``torch.distributed.all_gather_object``). Each forward is a collective, so all ranks run the
    same number of batches (a rank one short repeats the first and drops its answers) and
    generate in step. The root's parameters (embeddings, final norm, head) are gathered for the
    whole call: the scoring and ``generate`` paths call submodules past the root's hooks.
    """

    synced_gpus = True

    def __init__(self, model: nn.Module, tokenizer, *, rank: int, world: int,
                 gather: Callable[[list], list[list]], **kwargs: Any) -> None:
        super().__init__(model, tokenizer, **kwargs)
        self.rank, self.world, self.gather = rank, world, gather

    def _share(self, batches: list) -> list[tuple[Any, bool]]:
        mine = batches[self.rank::self.world]
        short = -(-len(batches) // self.world) - len(mine)
        return [(batch, True) for batch in mine] + [(batches[0], False)] * short

    def run(self, requests: Sequence[Request]) -> list[dict]:
        training = self.model.training
        self.model.unshard()
        try:
            local = super().run(requests)
        finally:
            self.model.reshard()
            self.model.train(training)
        merged: list[dict | None] = [None] * len(requests)
        for answered in self.gather([(i, r) for i, r in enumerate(local) if r is not None]):
            for i, result in answered:
                merged[i] = result
        return merged  # type: ignore[return-value]
