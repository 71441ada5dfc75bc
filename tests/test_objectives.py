"""Objectives on a tiny random Llama: the composition of each loss, and steps that move the
model the right way."""

import weakref

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from unlearn import losses
from unlearn.dual import DualController
from unlearn.loop import Unlearner, build_optimizer, pair_batches, supervised_samples, supervised_tokens
from unlearn.models import frozen_copy
from unlearn.objectives import EGUP, StepInputs, available, forward_logits, get_objective

V = 40


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def make_batch(seed, batch=3, length=10, prompt=4):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (batch, length), generator=g)
    attention = torch.ones_like(ids)
    attention[0, -2:] = 0  # right padding on the first row
    ids[0, -2:] = 0
    labels = ids.clone()
    labels[:, :prompt] = -100
    labels[attention == 0] = -100
    onset = torch.zeros_like(ids)
    onset[:, prompt + 1] = 1
    neutral = (labels != -100).long() - onset
    neutral[:, prompt + 2] = 0
    return {"input_ids": ids, "attention_mask": attention, "labels": labels,
            "onset_mask": onset, "neutral_mask": neutral,
            "sample_id": torch.arange(batch) + 100 * seed}


def prepared(name, model, forget, retain, **params):
    objective = get_objective(name, **params)
    if isinstance(objective, EGUP):
        objective.prepare(model, retain=[retain], forget=[forget], proxy=[make_batch(9)])
    return objective


def test_every_method_in_the_spec_is_registered():
    expected = {"pdu", "unilogit", "palu", "egup", "grad_ascent", "grad_diff", "npo", "simnpo",
                "me_gd", "undial"}
    assert expected <= set(available())
    assert all(available()[name] for name in expected)


@pytest.mark.parametrize("name", sorted(available()))
def test_each_method_gives_a_finite_loss_and_gradients(name):
    model = tiny_model()
    forget, retain = make_batch(1), make_batch(2)
    objective = prepared(name, model, forget, retain)
    ref = frozen_copy(model) if objective.needs_ref else None
    dual = DualController(eps=1.0) if objective.uses_dual else None
    out = objective.compute(StepInputs(model, forget, retain, ref, dual))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)


def test_pdu_is_the_lagrangian():
    model = tiny_model()
    forget, retain = make_batch(1), make_batch(2)
    dual = DualController(lam_0=7.0, eps=0.5)
    out = get_objective("pdu", gamma=2.0).compute(StepInputs(model, forget, retain, None, dual))
    lf = losses.logit_margin_flattening(forward_logits(model, forget), forget["labels"])
    lr = losses.nll(forward_logits(model, retain), retain["labels"])
    expected = 2.0 * lf + 7.0 * (lr - 0.5)
    assert float(out.loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert float(out.retain_loss.detach()) == pytest.approx(float(lr.detach()), rel=1e-6)


def test_grad_diff_and_retain_kl():
    model = tiny_model()
    forget, retain = make_batch(1), make_batch(2)
    out = get_objective("grad_diff").compute(StepInputs(model, forget, retain))
    expected = -losses.nll(forward_logits(model, forget), forget["labels"]) + losses.nll(
        forward_logits(model, retain), retain["labels"])
    assert float(out.loss) == pytest.approx(float(expected), rel=1e-5)
    kl = get_objective("grad_diff", retain_loss="kl")
    assert kl.needs_ref
    out = kl.compute(StepInputs(model, forget, retain, frozen_copy(model)))
    assert float(out.retain_loss) == pytest.approx(0.0, abs=1e-6)  # theta == ref


def test_palu_needs_onset_masks():
    model = tiny_model()
    forget = make_batch(1)
    del forget["onset_mask"]
    with pytest.raises(ValueError, match="onset_mask"):
        get_objective("palu").compute(StepInputs(model, forget, make_batch(2), frozen_copy(model)))


def test_unknown_parameter_is_rejected():
    with pytest.raises(ValueError, match="unknown parameter"):
        get_objective("npo", top_k=3)
    with pytest.raises(ValueError, match="unknown method"):
        get_objective("forget-everything")


def test_egup_weights_at_theta0():
    model = tiny_model()
    forget, retain = make_batch(1), make_batch(2)
    egup = prepared("egup", model, forget, retain, inner="grad_ascent")
    with torch.no_grad():
        _, hidden = forward_logits(model, forget, hidden=True)
    from unlearn.objectives.egup import answer_embedding
    emb = answer_embedding(hidden[-1], forget["labels"])
    weights = egup.weights(emb, forget["sample_id"])
    # No drift yet: w_intra = 1, so the weights are B * softmax(cos / tau), mean 1.
    assert float(weights.mean()) == pytest.approx(1.0, rel=1e-5)
    sims = torch.nn.functional.cosine_similarity(emb, egup.state.retain_centroid[None], dim=-1)
    assert int(weights.argmax()) == int(sims.argmax())  # closer to retained knowledge: more effort
    # A sample that drifted far gets less effort.
    moved = emb.clone()
    moved[0] = -moved[0]
    assert float(egup.weights(moved, forget["sample_id"])[0]) < float(weights[0])


def test_egup_proxy_penalty_is_zero_below_the_boundary():
    model = tiny_model()
    forget, retain = make_batch(1), make_batch(2)
    egup = prepared("egup", model, forget, retain, inner="grad_ascent", use_inter=False,
                    use_intra=False)
    egup.state.proxy_boundary = 1e6
    out = egup.compute(StepInputs(model, forget, retain))
    assert out.metrics["proxy_penalty"] == 0.0
    egup.state.proxy_boundary = 0.0
    out = egup.compute(StepInputs(model, forget, retain))
    nll = losses.nll(forward_logits(model, forget), forget["labels"], reduction="per_sample")
    assert out.metrics["proxy_penalty"] == pytest.approx(float(nll.mean()), rel=1e-5)


def run_steps(name, steps, lr=1e-2, **kw):
    model = tiny_model()
    forget, retain = make_batch(1), make_batch(2)
    objective = prepared(name, model, forget, retain, **kw.pop("params", {}))
    dual = kw.pop("dual", None)
    ref = frozen_copy(model) if objective.needs_ref else None
    unlearner = Unlearner(model, objective, torch.optim.SGD(model.parameters(), lr=lr),
                          ref_model=ref, dual=dual, max_grad_norm=None)
    history = [unlearner.step([(forget, retain)]) for _ in range(steps)]
    return model, forget, retain, history


def test_gradient_ascent_raises_the_forget_nll():
    model = tiny_model()
    forget = make_batch(1)
    before = float(losses.nll(forward_logits(model, forget), forget["labels"]))
    model, forget, _, _ = run_steps("grad_ascent", 3)
    after = float(losses.nll(forward_logits(model, forget), forget["labels"]))
    assert after > before


def test_pdu_step_flattens_and_dual_reacts():
    dual = DualController(lam_0=0.0, eta_dual=1.0, eps=0.0)  # always violated: lam must grow
    model, forget, _, history = run_steps("pdu", 3, lr=1e-2, dual=dual)
    margins = [h["forget_loss"] for h in history]
    assert margins[-1] < margins[0]
    assert history[0]["lam"] == 0.0 and history[-1]["lam_next"] > history[0]["lam_next"] > 0
    assert history[-1]["slack"] == pytest.approx(history[-1]["retain_loss"])


def test_gradient_accumulation_averages_micro_batches():
    torch.manual_seed(0)
    f1, f2, r = make_batch(1), make_batch(3), make_batch(2)
    grads = []
    for pairs in ([(f1, r), (f2, r)], None):
        model = tiny_model()
        objective = get_objective("grad_diff")
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        if pairs is not None:
            Unlearner(model, objective, opt, max_grad_norm=None).step(pairs)
            grads.append(model.model.embed_tokens.weight.grad.clone())
        else:
            total = sum(objective.compute(StepInputs(model, f, r)).loss for f in (f1, f2)) / 2
            total.backward()
            grads.append(model.model.embed_tokens.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_pairing_is_forget_anchored_and_retain_cycles():
    pairs = list(pair_batches(["f1", "f2", "f3"], ["r1", "r2"]))
    assert pairs == [("f1", "r1"), ("f2", "r2"), ("f3", "r1")]
    with pytest.raises(ValueError, match="forget set"):
        list(pair_batches([], ["r1"]))


def test_optimizer_groups_skip_decay_on_norms():
    model = tiny_model()
    opt = build_optimizer(model, 1e-3, 0.1)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    norm = model.model.norm.weight
    assert id(norm) not in decayed and id(model.model.embed_tokens.weight) in decayed


def test_optimizer_is_fused_only_where_every_parameter_is_on_cuda():
    from unlearn.loop import fused_adamw_supported

    model = tiny_model()
    assert build_optimizer(model, 1e-3, 0.0).defaults["fused"] is None  # CPU: the reference loop
    assert not fused_adamw_supported(list(model.parameters()))
    assert not fused_adamw_supported([])
    with torch.device("meta"):
        assert not fused_adamw_supported([torch.nn.Parameter(torch.zeros(2))])
    if torch.cuda.is_available():
        assert fused_adamw_supported([torch.nn.Parameter(torch.zeros(2, device="cuda"))])
        assert not fused_adamw_supported([torch.nn.Parameter(torch.zeros(2, device="cuda")),
                                          torch.nn.Parameter(torch.zeros(2))])


def fresh_step_inputs(name, forget, retain, *, fused):
    """The objective and its step inputs on a fresh tiny model (same seed every call)."""
    model = tiny_model()
    objective = prepared(name, model, forget, retain)
    ref = frozen_copy(model) if objective.needs_ref else None
    dual = DualController(lam_0=3.0, eps=1.0) if objective.uses_dual else None
    return objective, StepInputs(model, forget, retain, ref, dual, fused=fused, chunk_size=7)


@pytest.mark.parametrize("name", sorted(available()))
def test_fused_path_gives_the_plain_loss_and_gradients(name):
    forget, retain = make_batch(1), make_batch(2)
    results = []
    for fused in (False, True):
        objective, inputs = fresh_step_inputs(name, forget, retain, fused=fused)
        out = objective.compute(inputs)
        out.loss.backward()
        grads = torch.cat([p.grad.flatten() for p in inputs.model.parameters() if p.grad is not None])
        results.append((float(out.loss.detach()), grads))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5, abs=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(available()))
@pytest.mark.parametrize("fused", [False, True])
def test_backward_per_term_gives_the_whole_loss_gradients(name, fused):
    forget, retain = make_batch(1), make_batch(2)
    results = []
    for per_term in (False, True):
        objective, inputs = fresh_step_inputs(name, forget, retain, fused=fused)
        weights = objective.term_weights(inputs) if per_term else None
        if weights is None:
            out = objective.compute(inputs)
            (out.loss * 0.5).backward()
        else:
            out = objective.backward_by_term(inputs, weights, scale=0.5)
        grads = torch.cat([p.grad.flatten() for p in inputs.model.parameters() if p.grad is not None])
        results.append((float(out.loss.detach()), float(out.forget_loss), grads, weights))
    assert results[1][:2] == pytest.approx(results[0][:2], rel=1e-6)
    torch.testing.assert_close(results[1][2], results[0][2], rtol=1e-5, atol=1e-7)
    # the methods whose loss is a weighted sum of a forget and a retain term take the split path
    split = {"pdu", "unilogit", "grad_ascent", "grad_diff", "npo", "simnpo", "me_gd", "undial"}
    assert (results[1][3] is not None) == (name in split)
    if name == "pdu":
        assert results[1][3] == (1.0, 3.0)  # gamma and lam


def test_per_term_backward_frees_the_forget_activations_before_the_retain_pass():
    """Bytes autograd holds for backward, at their peak: the split path never holds the forget and
    the retain passes' at once, the whole-loss path does."""
    forget, retain = make_batch(1, batch=4, length=24), make_batch(2, batch=4, length=24)

    class Held:
        __slots__ = ("tensor", "__weakref__")

    peaks = {}
    for per_term in (False, True):
        model = tiny_model()
        objective = get_objective("grad_diff")
        inputs = StepInputs(model, forget, retain)
        live = {"bytes": 0, "peak": 0}

        def release(size, live=live):
            live["bytes"] -= size

        def pack(tensor, live=live, release=release):
            held, size = Held(), tensor.numel() * tensor.element_size()
            held.tensor = tensor
            live["bytes"] += size
            live["peak"] = max(live["peak"], live["bytes"])
            weakref.finalize(held, release, size)
            return held

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda held: held.tensor):
            if per_term:
                objective.backward_by_term(inputs, objective.term_weights(inputs))
            else:
                objective.compute(inputs).loss.backward()
        peaks[per_term] = live["peak"]
    assert peaks[True] < 0.6 * peaks[False]


def _uneven_global_batch(seed):
    """4 rows whose halves carry very different numbers of answer tokens (14 vs 5)."""
    batch = make_batch(seed, batch=4, length=12, prompt=4)
    batch["labels"][2, 6:] = -100
    batch["labels"][3, 7:] = -100
    return batch


def _rows(batch, rows):
    return {key: value[rows] for key, value in batch.items()}


@pytest.mark.parametrize("name", ["grad_diff", "npo", "pdu"])
def test_two_ranks_weighted_by_their_share_give_the_one_process_step(name):
    """Each rank's loss is a mean over its own rows; FSDP averages the ranks' gradients. Weighted
    by the rank shares, that average is the gradient of the mean over the whole global batch."""
    forget, retain = _uneven_global_batch(1), _uneven_global_batch(2)
    halves = [(_rows(forget, slice(0, 2)), _rows(retain, slice(0, 2))),
              (_rows(forget, slice(2, 4)), _rows(retain, slice(2, 4)))]
    counter = supervised_samples if get_objective(name).forget_mean_over == "samples" else supervised_tokens
    local = [torch.tensor([[float(counter(f)), float(supervised_tokens(r))]], dtype=torch.float64)
             for f, r in halves]

    def step(pairs, reducer=None, world=1):
        model = tiny_model()
        objective = get_objective(name)
        dual = DualController(lam_0=2.0, eta_dual=0.0, eps=0.5) if objective.uses_dual else None
        unlearner = Unlearner(model, objective, torch.optim.SGD(model.parameters(), lr=0.0),
                              ref_model=frozen_copy(model) if objective.needs_ref else None, dual=dual,
                              max_grad_norm=None, all_reduce_sum=reducer, world_size=world)
        metrics = unlearner.step(pairs)
        return torch.cat([p.grad.flatten() for p in model.parameters()]), metrics

    whole_grad, whole = step([(forget, retain)])
    per_rank = [step([halves[rank]], lambda t, other=local[1 - rank]: t + other, world=2)
                for rank in (0, 1)]
    torch.testing.assert_close((per_rank[0][0] + per_rank[1][0]) / 2, whole_grad, rtol=1e-4, atol=1e-6)
    for key in ("forget_loss", "retain_loss", "loss"):
        assert (per_rank[0][1][key] + per_rank[1][1][key]) / 2 == pytest.approx(whole[key], rel=1e-5), key
    if name != "npo":  # a mean of the two ranks' token means is another step (samples split evenly)
        unweighted = [step([halves[rank]])[0] for rank in (0, 1)]
        assert not torch.allclose((unweighted[0] + unweighted[1]) / 2, whole_grad, rtol=1e-2, atol=1e-4)


def test_rank_shares_are_exactly_one_in_one_process():
    forget, retain = _uneven_global_batch(1), _uneven_global_batch(2)
    model = tiny_model()
    unlearner = Unlearner(model, get_objective("grad_diff"), torch.optim.SGD(model.parameters(), lr=0.0),
                          all_reduce_sum=lambda t: t, world_size=1)
    assert unlearner.rank_shares([(forget, retain), (forget, None)]) == [(1.0, 1.0), (1.0, 1.0)]


def test_a_step_that_backpropagates_the_loss_whole_keeps_per_rank_means_without_a_collective():
    forget, retain = _uneven_global_batch(1), _uneven_global_batch(2)
    model = tiny_model()

    def no_collective(tensor):
        raise AssertionError("no all-reduce is needed when the shares cannot be applied")

    unlearner = Unlearner(model, get_objective("grad_diff"), torch.optim.SGD(model.parameters(), lr=0.0),
                          backward_per_term=False, all_reduce_sum=no_collective, world_size=2)
    assert unlearner.rank_shares([(forget, retain)]) == [(1.0, 1.0)]
