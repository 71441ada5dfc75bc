"""bench/step.py's FLOP count and its 1B shape (its timings are benchmarks, not tests)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM


@pytest.fixture(scope="module")
def step(bench_script):
    return bench_script("step")


def batch(rows: int, length: int) -> dict:
    ids = torch.randint(0, 300, (rows, length))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


@pytest.mark.parametrize("tied", [True, False])
def test_step_flops_equal_the_counted_matmuls_of_a_training_step_and_a_reference_forward(step, tied):
    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, tie_word_embeddings=tied)
    config._attn_implementation = "eager"  # attention as matmuls, which the counter sees
    model = LlamaForCausalLM(config)
    trained, reference = [batch(3, 17), batch(2, 9)], [batch(2, 11)]
    with FlopCounterMode(display=False) as counter:
        for b in trained:
            model(**b).loss.backward()
        with torch.no_grad():
            for b in reference:
                model(**b)
    assert step.step_flops(model, trained, reference) == counter.get_total_flops()


def test_step_flops_count_only_the_unpadded_tokens(step):
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=100))
    padded = batch(2, 10)
    padded["attention_mask"][1, 6:] = 0
    first = {key: value[:1] for key, value in padded.items()}
    second_unpadded = {key: value[1:, :6] for key, value in padded.items()}
    assert step.step_flops(model, [padded]) == (step.step_flops(model, [first])
                                                + step.step_flops(model, [second_unpadded]))


@pytest.mark.parametrize("shape, parameters", [("llama3.2-1b", 1_235_814_400), ("smollm2-135m", 134_515_008)])
def test_a_shape_has_its_models_parameters_and_a_tied_head(step, tmp_path, shape, parameters):
    small = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=300)
    small.save_pretrained(tmp_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(step.shaped_config(str(tmp_path), shape))
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_a_shape_without_random_init_is_refused_before_any_worker_runs(step, capsys):
    with pytest.raises(SystemExit) as exit_info:
        step.main(["--models", "tiny", "--shape", "llama3.2-1b"])
    assert exit_info.value.code == 2
    assert "--shape needs --random-init" in capsys.readouterr().err


def test_worker_options_become_the_flags_the_worker_parses(step):
    flags = step.worker_flags({"steps": 3, "batch_size": 4, "length": None, "random_init": True,
                               "fsdp": False, "shape": "llama3.2-1b", "peak_tflops": 989.4})
    assert flags == ["--steps", "3", "--batch-size", "4", "--random-init", "--shape", "llama3.2-1b",
                     "--peak-tflops", "989.4"]
