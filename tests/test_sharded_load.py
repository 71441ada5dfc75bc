"""Sharded loading (``pipelines.fsdp.load_sharded``): 2 gloo ranks, each reading only its shard."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from unlearn.eval.scoring import Generation, Likelihood, LocalScorer
from unlearn.models import AdaptersOff, LoraSettings, build_tiny_model, load_model, load_tokenizer

TEXTS = ["Where was Velora Strand born?", "Kestrel Bay"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train_adapters(model) -> None:
    """Stand-in for training: every lora_B set to seeded random values (it starts at zero)."""
    from unlearn.models import assign_full

    generator = torch.Generator().manual_seed(7)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            assign_full(param, 0.1 * torch.randn(param.shape, generator=generator))


def _worker(rank: int, world: int, folder: str, port: int, out: str, frozen: bool,
            export: str | None, lora: LoraSettings | None, requests: list | None) -> None:
    from torch.distributed.tensor import DTensor

    from pipelines.fsdp import base_name, load_sharded

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model = load_sharded(folder, frozen=frozen, lora=lora)
        if lora is not None:
            _train_adapters(model)
        params = {base_name(name): p for name, p in model.named_parameters(remove_duplicate=False)}
        shards = {name: tuple(p.to_local().shape) for name, p in params.items() if isinstance(p, DTensor)}
        record = {
            "plain": sorted(name for name, p in params.items() if not isinstance(p, DTensor)),
            "shards": shards,
            "tied": params["lm_head.weight"] is params["model.embed_tokens.weight"],
            "buffers": {name: b.clone() for name, b in model.named_buffers()},
            "requires_grad": {p.requires_grad for p in params.values()},
            "training": model.training,
        }
        record["trainable"] = sorted(name for name, p in params.items() if p.requires_grad)
        batch = load_tokenizer(folder)(TEXTS, return_tensors="pt", padding=True)
        with torch.no_grad():
            record["logits"] = model(**batch).logits
            if lora is not None:
                record["base_logits"] = AdaptersOff(model)(**batch).logits
        if requests is not None:
            from pipelines.train import all_gather_list
            from unlearn.eval.scoring import ShardedScorer

            model.train()
            model.reshard()  # as after a training step's backward: the root's weights sharded too
            scorer = ShardedScorer(model, load_tokenizer(folder), rank=rank, world=world,
                                   gather=all_gather_list, batch_size=2)
            record["answers"] = scorer.run(requests)
            record["training_after"] = model.training
        if export is not None:
            from pipelines.fsdp import export_sharded

            record["exported"] = export_sharded(model, load_tokenizer(folder), folder, export,
                                                max_shard_bytes=100_000)
            if lora is not None:
                from pipelines.fsdp import export_adapter

                record["adapter"] = export_adapter(model, load_tokenizer(folder), folder, export + "-adapter")
        torch.save(record, f"{out}.{rank}")
        # Tearing gloo down while the peer still has traffic in flight aborts the process
        # ("terminate called without an active exception") about once in five runs.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _load_on_two_ranks(folder, tmp_path, frozen=False, export=None, lora=None, requests=None) -> list[dict]:
    out = str(tmp_path / "rank")
    mp.spawn(_worker, args=(2, str(folder), _free_port(), out, frozen, export, lora, requests), nprocs=2)
    return [torch.load(f"{out}.{rank}", weights_only=False) for rank in (0, 1)]


@pytest.fixture(scope="module")
def odd_model(tmp_path_factory):
    """A tiny Llama whose vocabulary (an odd row count) does not split evenly over 2 ranks."""
    folder = tmp_path_factory.mktemp("odd") / "model"
    build_tiny_model(folder, vocab_size=301, hidden_size=64, num_layers=2, num_heads=2,
                     texts=["Velora Strand was born in Kestrel Bay."] * 20)
    return folder


def test_two_ranks_hold_half_the_weights_each_and_give_the_single_process_logits(odd_model, tmp_path):
    ranks = _load_on_two_ranks(odd_model, tmp_path)
    single = load_model(str(odd_model)).eval()
    batch = load_tokenizer(str(odd_model))(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = single(**batch).logits
    full = dict(single.named_parameters())
    vocab = full["model.embed_tokens.weight"].shape[0]
    assert vocab % 2 == 1
    for record in ranks:
        assert record["plain"] == []  # every parameter is a shard
        assert record["tied"]  # the LM head is the embedding, one parameter
        assert record["logits"].shape == expected.shape
        assert torch.allclose(record["logits"], expected, atol=1e-5, rtol=0)
        for name, buffer in single.named_buffers():  # the rotary frequencies, computed not loaded
            assert torch.equal(record["buffers"][name], buffer), name
        assert record["requires_grad"] == {True} and record["training"]
    for name, param in full.items():
        rows = [record["shards"][name][0] for record in ranks]
        assert sum(rows) == param.shape[0] and max(rows) == -(-param.shape[0] // 2), name
        assert all(record["shards"][name][1:] == tuple(param.shape[1:]) for record in ranks)


def test_a_frozen_reference_loads_without_gradients_in_eval_mode(odd_model, tmp_path):
    for record in _load_on_two_ranks(odd_model, tmp_path, frozen=True):
        assert record["requires_grad"] == {False} and not record["training"]


def test_the_export_writes_a_sharded_folder_that_from_pretrained_reads_back(odd_model, tmp_path):
    import json

    from safetensors import safe_open

    out = tmp_path / "exported"
    ranks = _load_on_two_ranks(odd_model, tmp_path, export=str(out))
    assert ranks[0]["exported"] == out and ranks[1]["exported"] is None  # rank 0 writes
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 2 and set(index["weight_map"].values()) == set(files)
    for file in files:  # each file holds only full tensors, within the size limit (or one tensor)
        with safe_open(str(out / file), framework="pt") as handle:
            sizes = [handle.get_tensor(k).numel() * 4 for k in handle.keys()]
        assert sum(sizes) <= 100_000 or len(sizes) == 1, file
    assert index["metadata"]["total_size"] == _stored_bytes(out)
    assert "lm_head.weight" not in index["weight_map"]  # tied: stored once
    original, exported = load_model(str(odd_model)), load_model(str(out))
    assert exported.lm_head.weight is exported.model.embed_tokens.weight
    for name, value in original.state_dict().items():
        assert torch.equal(exported.state_dict()[name], value), name
    assert load_tokenizer(str(out))(TEXTS)["input_ids"] == load_tokenizer(str(odd_model))(TEXTS)["input_ids"]


def _stored_bytes(folder):
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            total += sum(handle.get_tensor(k).nbytes for k in handle.keys())
    return total


def test_lora_on_two_ranks_gives_the_single_process_model_and_exports_it_merged_and_as_adapters(odd_model,
                                                                                               tmp_path):
    import json

    lora = LoraSettings(r=4, alpha=8, init_seed=3)
    out = tmp_path / "merged"
    ranks = _load_on_two_ranks(odd_model, tmp_path, export=str(out), lora=lora)
    single = load_model(str(odd_model), lora=lora)
    _train_adapters(single)
    batch = load_tokenizer(str(odd_model))(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected, base = single(**batch).logits, AdaptersOff(single)(**batch).logits
    plain = load_model(str(odd_model))
    with torch.no_grad():
        assert torch.allclose(base, plain(**batch).logits, atol=1e-6)  # adapters off: the base model
        assert not torch.allclose(expected, base, atol=1e-3)  # the adapters change the output
    for record in ranks:
        assert record["trainable"] and all("lora_" in name for name in record["trainable"])
        assert torch.allclose(record["logits"], expected, atol=1e-5, rtol=0)  # same A init, same B
        assert torch.allclose(record["base_logits"], base, atol=1e-5, rtol=0)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == _stored_bytes(out)  # the merged weights, no adapters
    # the adapters alone: a PEFT folder on the base model, as PEFT itself and load_model read it
    from peft import PeftModel

    adapter = tmp_path / "merged-adapter"
    assert ranks[0]["adapter"] == adapter and ranks[1]["adapter"] is None
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str(odd_model)
    with torch.no_grad():
        on_base = PeftModel.from_pretrained(load_model(str(odd_model)), str(adapter))(**batch).logits
        assert torch.allclose(on_base, expected, atol=1e-5, rtol=0)
        assert torch.allclose(load_model(str(adapter))(**batch).logits, expected, atol=1e-5, rtol=0)
    merged, exported = single.merge_and_unload().state_dict(), load_model(str(out)).state_dict()
    assert set(exported) == set(merged)
    for name, value in merged.items():
        assert torch.allclose(exported[name], value, atol=1e-6), name


SCORED = [
    Likelihood("Kestrel Bay", prompt="Where was Velora Strand born?"),
    Likelihood("Velora Strand was born in Kestrel Bay, a town by the sea.", prompt=None, chat=False),
    Likelihood("a writer", prompt="Who is Velora Strand?"),
    Generation("Where was Velora Strand born?", max_new_tokens=12),
    Likelihood("Bay", prompt="Kestrel", chat=False),
    Generation("Who is Velora Strand?", max_new_tokens=12),
    Likelihood("In the spring of a year long past.", prompt="When was she born?"),
    Generation("Velora", chat=False, max_new_tokens=5),
]


@pytest.mark.parametrize("lora", [None, LoraSettings(r=4, alpha=8, init_seed=3)], ids=["full", "lora"])
def test_the_sharded_scorer_gives_every_rank_the_single_process_answers(odd_model, tmp_path, lora):
    """5 likelihoods (3 batches of 2: one rank runs a repeated batch) and generations of two lengths,
    on 2 ranks each holding half the weights, against one process holding the whole model."""
    ranks = _load_on_two_ranks(odd_model, tmp_path, lora=lora, requests=SCORED)
    single = load_model(str(odd_model), lora=lora)
    if lora is not None:
        _train_adapters(single)
    expected = LocalScorer(single, load_tokenizer(str(odd_model)), batch_size=2).run(SCORED)
    assert any(answer.get("text") for answer in expected)  # the generations are not all empty
    for record in ranks:
        assert record["training_after"]  # the training model is back in training mode
        for got, want in zip(record["answers"], expected, strict=True):
            if "text" in want:
                assert got == want
            else:
                assert got["correct"] == want["correct"]
                assert torch.allclose(torch.tensor(got["logprobs"]), torch.tensor(want["logprobs"]),
                                      atol=1e-5, rtol=0)


def test_a_folder_whose_weights_lack_a_parameter_fails_naming_the_model(tmp_path, single_rank_group):
    from safetensors.torch import load_file, save_file

    from pipelines.fsdp import load_sharded
    from unlearn.models import ModelLoadError

    folder = build_tiny_model(tmp_path / "broken", vocab_size=301, hidden_size=64, num_layers=1,
                              num_heads=2, texts=["a b c"] * 10)
    weights = load_file(folder / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="could not load the shards of .*broken.*model.norm.weight"):
        load_sharded(str(folder))


@pytest.mark.parametrize("weights", ["float32", "bfloat16"])  # bf16 states; bf16 weights too
def test_bf16_optimizer_states_are_sharded_and_resume_from_a_checkpoint(tmp_path, single_rank_group, weights):
    from torch.distributed.tensor import DTensor

    from pipelines.fsdp import shard_model
    from pipelines.train import load_checkpoint, save_checkpoint
    from unlearn.loop import build_optimizer

    torch.manual_seed(0)
    ids = torch.randint(3, 200, (2, 12))

    def train_step(model, optimizer):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()

    def sharded():
        model = shard_model(load_model("tiny", dtype=weights))
        return model, build_optimizer(model, 1e-3, 0.01, states="bf16")

    model, optimizer = sharded()
    before = {name: p.full_tensor().clone() for name, p in model.named_parameters()}
    train_step(model, optimizer)
    param = next(model.parameters())
    state = optimizer.state[param]
    assert isinstance(state["exp_avg_sq"], DTensor) and state["exp_avg_sq"].dtype == torch.bfloat16
    assert param.dtype == getattr(torch, weights) and param.grad.dtype == param.dtype
    assert all(not torch.equal(p.full_tensor(), before[name]) for name, p in model.named_parameters())
    save_checkpoint(tmp_path, model, optimizer, {"step": 1})
    train_step(model, optimizer)
    expected = {name: p.full_tensor().clone() for name, p in model.named_parameters()}
    resumed, resumed_optimizer = sharded()
    assert load_checkpoint(tmp_path, resumed, resumed_optimizer) == {"step": 1}
    train_step(resumed, resumed_optimizer)
    for name, param in resumed.named_parameters():  # the same moments: the same next step
        assert torch.allclose(param.full_tensor(), expected[name], atol=1e-6), name
