"""The Ray Data evaluation path gives the same results as the single-process scorer."""

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

from pipelines.eval import RayScorer  # noqa: E402
from unlearn.data import generate_tofu  # noqa: E402
from unlearn.eval import EvalSettings, LocalScorer  # noqa: E402
from unlearn.eval.scoring import Generation, Likelihood  # noqa: E402
from unlearn.models import load_model, load_tokenizer, save_model  # noqa: E402


@pytest.fixture(scope="module")
def ray_local():
    if ray.is_initialized():  # another test module's local Ray (its CPU count may differ)
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_ray_scorer_matches_local_scorer(ray_local, tmp_path):
    torch.manual_seed(1)
    model, tokenizer = load_model("tiny"), load_tokenizer("tiny")
    folder = save_model(model, tokenizer, tmp_path / "model")
    records = generate_tofu(seed=2)["forget10_perturbed"][:6]
    requests = [Likelihood(r.answer, r.question) for r in records]
    requests += [Likelihood(p, r.question) for r in records for p in r.perturbed_answers[:2]]
    requests += [Generation(r.question, max_new_tokens=8) for r in records]
    settings = EvalSettings(data=str(tmp_path), batch_size=4)
    remote = RayScorer(str(folder), settings, workers=2).run(requests)
    local = LocalScorer(model, tokenizer, batch_size=4).run(requests)
    for a, b in zip(remote, local):
        if "text" in b:
            assert a["text"] == b["text"]
        else:
            np.testing.assert_allclose(a["logprobs"], b["logprobs"], atol=1e-5)
            assert a["correct"] == b["correct"]


def test_ray_scorer_refuses_more_workers_than_cpus(ray_local, tmp_path):
    with pytest.raises(ValueError, match="exceed the cluster's 2 CPUs"):
        RayScorer("tiny", EvalSettings(data=str(tmp_path)), workers=3, cpus_per_worker=1)
