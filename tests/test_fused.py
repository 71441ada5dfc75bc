"""Fused chunked losses == plain losses on logits = hidden @ W.T (values and gradients)."""

import pytest
import torch

from unlearn import fused, losses

B, T, H, V = 3, 9, 8, 37


def inputs(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype) * 0.7
    ref_hidden = hidden + 0.3 * torch.randn(B, T, H, generator=g, dtype=dtype)
    ref_weight = weight + 0.1 * torch.randn(V, H, generator=g, dtype=dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :3] = -100  # prompt
    labels[1, -2:] = -100  # padding
    onset = torch.zeros(B, T, dtype=torch.long)
    onset[:, 4] = 1
    onset[2, 6] = 1
    return hidden, weight, ref_hidden, ref_weight, labels, onset


def plain_and_fused(name, hidden, weight, ref_hidden, ref_weight, labels, onset, reduction, chunk):
    logits, ref_logits = hidden @ weight.T, ref_hidden @ ref_weight.T
    table = {
        "nll": (lambda: losses.nll(logits, labels, reduction),
                lambda: fused.fused_nll(hidden, weight, labels, reduction, chunk)),
        "margin": (lambda: losses.logit_margin_flattening(logits, labels, reduction=reduction),
                   lambda: fused.fused_logit_margin_flattening(hidden, weight, labels,
                                                               reduction=reduction, chunk_size=chunk)),
        "margin_top3": (
            lambda: losses.logit_margin_flattening(logits, labels, top_k=3, reduction=reduction),
            lambda: fused.fused_logit_margin_flattening(hidden, weight, labels, top_k=3,
                                                        reduction=reduction, chunk_size=chunk)),
        "margin_top4_ref": (
            lambda: losses.logit_margin_flattening(logits, labels, 4, ref_logits, reduction),
            lambda: fused.fused_logit_margin_flattening(hidden, weight, labels, 4, ref_hidden,
                                                        ref_weight, reduction, chunk)),
        "unilogit": (lambda: losses.unilogit(logits, labels, reduction),
                     lambda: fused.fused_unilogit(hidden, weight, labels, reduction, chunk)),
        "max_entropy": (lambda: losses.max_entropy(logits, labels, reduction),
                        lambda: fused.fused_max_entropy(hidden, weight, labels, reduction, chunk)),
        "undial": (lambda: losses.undial(logits, labels, ref_logits, 2.0, reduction),
                   lambda: fused.fused_undial(hidden, weight, labels, ref_hidden, ref_weight, 2.0,
                                              reduction, chunk)),
        "kl": (lambda: losses.kl_to_ref(logits, labels, ref_logits, onset * 0 + 1, reduction),
               lambda: fused.fused_kl_to_ref(hidden, weight, labels, ref_hidden, ref_weight,
                                             onset * 0 + 1, reduction, chunk)),
        "kl_masked": (lambda: losses.kl_to_ref(logits, labels, ref_logits, 1 - onset, reduction),
                      lambda: fused.fused_kl_to_ref(hidden, weight, labels, ref_hidden, ref_weight,
                                                    1 - onset, reduction, chunk)),
        "palu": (lambda: losses.palu_local(logits, labels, onset, ref_logits, 5, reduction),
                 lambda: fused.fused_palu_local(hidden, weight, labels, onset, ref_hidden,
                                                ref_weight, 5, reduction, chunk)),
        "npo": (lambda: losses.npo(logits, labels, ref_logits, 0.5, reduction),
                lambda: fused.fused_npo(hidden, weight, labels, ref_hidden, ref_weight, 0.5,
                                        reduction, chunk)),
        "simnpo": (lambda: losses.simnpo(logits, labels, 2.0, 0.1, reduction),
                   lambda: fused.fused_simnpo(hidden, weight, labels, 2.0, 0.1, reduction, chunk)),
    }
    plain, fast = table[name]
    return plain(), fast()


NAMES = ["nll", "margin", "margin_top3", "margin_top4_ref", "unilogit", "max_entropy", "undial",
         "kl", "kl_masked", "palu", "npo", "simnpo"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("reduction", ["mean", "per_sample"])
@pytest.mark.parametrize("chunk", [5, 4096])
def test_values_and_gradients_match_the_plain_loss(name, reduction, chunk):
    results = []
    for use_fused in (False, True):
        hidden, weight, ref_hidden, ref_weight, labels, onset = inputs()
        hidden.requires_grad_(True)
        weight.requires_grad_(True)
        value = plain_and_fused(name, hidden, weight, ref_hidden, ref_weight, labels, onset,
                                reduction, chunk)[int(use_fused)]
        # A non-uniform upstream gradient also checks the per-row backward.
        upstream = torch.linspace(0.5, 1.5, value.numel()).reshape(value.shape)
        (value * upstream).sum().backward()
        results.append((value.detach(), hidden.grad.clone(), weight.grad.clone()))
    (v0, h0, w0), (v1, h1, w1) = results
    torch.testing.assert_close(v1, v0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h1, h0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w1, w0, rtol=1e-5, atol=1e-6)


def test_no_gradient_reaches_unsupervised_positions():
    hidden, weight, _, _, labels, _ = inputs()
    hidden.requires_grad_(True)
    fused.fused_logit_margin_flattening(hidden, weight, labels, chunk_size=4).backward()
    predicts_nothing = torch.cat([labels[:, 1:] == -100, torch.ones(B, 1, dtype=torch.bool)], 1)
    assert float(hidden.grad[predicts_nothing].abs().sum()) == 0.0
    assert float(hidden.grad[~predicts_nothing].abs().sum()) > 0.0


def test_logits_are_only_ever_made_chunk_by_chunk(monkeypatch):
    """The memory property: no logits tensor larger than chunk_size x V exists."""
    seen = []
    real = fused._logits

    def spy(rows, weight):
        seen.append(tuple(rows.shape))
        return real(rows, weight)

    monkeypatch.setattr(fused, "_logits", spy)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 128, 16, generator=g, requires_grad=True)
    weight = torch.randn(5000, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 5000, (4, 128), generator=g)
    labels[:, :40] = -100
    fused.fused_nll(hidden, weight, labels, chunk_size=64).backward()
    n = int((labels[:, 1:] != -100).sum())
    assert max(rows for rows, _ in seen) <= 64
    assert sum(rows for rows, _ in seen) == 2 * n  # forward once, recompute once


def test_bfloat16_runs_and_is_close_to_float32():
    hidden, weight, _, _, labels, _ = inputs()
    full = fused.fused_nll(hidden, weight, labels)
    half = fused.fused_nll(hidden.bfloat16().requires_grad_(), weight.bfloat16(), labels)
    assert half.dtype == torch.float32
    assert float(half.detach()) == pytest.approx(float(full), rel=5e-2)


def test_errors():
    hidden, weight, ref_hidden, ref_weight, labels, onset = inputs()
    with pytest.raises(ValueError, match="shape mismatch"):
        fused.fused_nll(hidden[:, :-1], weight, labels)
    with pytest.raises(ValueError, match="weight must be"):
        fused.fused_nll(hidden, weight[:, :-1], labels)
    with pytest.raises(ValueError, match="no supervised token"):
        fused.fused_nll(hidden, weight, torch.full_like(labels, -100))
    with pytest.raises(ValueError, match="ref_hidden and ref_weight are required"):
        fused.fused_npo(hidden, weight, labels, None, None)
    with pytest.raises(ValueError, match="top_k"):
        fused.fused_logit_margin_flattening(hidden, weight, labels, top_k=V + 1)
    with pytest.raises(ValueError, match="chunk_size"):
        fused.fused_nll(hidden, weight, labels, chunk_size=0)
    with pytest.raises(ValueError, match="reduction"):
        fused.fused_nll(hidden, weight, labels, reduction="sum")
    zero = fused.fused_palu_local(hidden, weight, labels, onset * 0, ref_hidden, ref_weight, 3)
    assert float(zero) == 0.0


def test_finetuning_with_the_fused_nll_follows_the_plain_one():
    from unlearn.models import load_model
    from unlearn.workflow import finetune

    torch.manual_seed(0)
    ids = torch.randint(3, 200, (4, 12))
    labels = ids.clone()
    labels[:, :4] = -100  # the prompt: no loss there
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    histories = {}
    for chunked in (False, True):
        torch.manual_seed(0)
        histories[chunked] = finetune(load_model("tiny"), lambda epoch: [batch], epochs=5, lr=3e-3,
                                      fused=chunked, progress=False)
    assert histories[True][-1] < histories[True][0]
    assert histories[True] == pytest.approx(histories[False], rel=1e-5)
