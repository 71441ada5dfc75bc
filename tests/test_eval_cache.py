"""A reference model's evaluation, reused while nothing it depends on has changed."""

import json
import shutil
from dataclasses import replace

import pytest
import torch

from unlearn.eval import EvalSettings, evaluate_model, evaluate_once, load_reference
from unlearn.models import load_model


@pytest.fixture
def counted(finetuned, tmp_path, monkeypatch):
    """``(load, calls, retain folder, settings)``: ``load`` evaluates through a counting wrapper
    with the cache in ``tmp_path``."""
    _, report, source = finetuned
    monkeypatch.setenv("UNLEARN_CACHE", str(tmp_path / "cache"))
    calls = []

    def evaluate(spec, settings):
        calls.append(spec)
        return evaluate_model(spec, settings, progress=False)

    def load(model, settings, output, reuse=True):
        return load_reference(model, settings, evaluate_fn=evaluate, output=tmp_path / output, reuse=reuse)

    return load, calls, report["retain"], EvalSettings(data=source, max_new_tokens=8)


def test_the_same_folder_data_and_settings_are_evaluated_once(counted, tmp_path):
    load, calls, retain, settings = counted
    first, again = load(retain, settings, "first.json"), load(retain, settings, "again.json")
    assert calls == [retain]
    assert again.truth_ratios == first.truth_ratios and again.mia_auc == first.mia_auc
    assert again.origin == str(tmp_path / "again.json")  # the run's own copy, as without the cache
    written = [json.loads((tmp_path / name).read_text()) for name in ("first.json", "again.json")]
    assert written[1].pop("reused_evaluation") and written[0] == written[1]
    copy = tmp_path / "copy"  # the same files in another folder: the same evaluation, named anew
    shutil.copytree(retain, copy)
    load(str(copy), settings, "copy.json")
    assert calls == [retain]
    written = json.loads((tmp_path / "copy.json").read_text())
    assert written["model"] == str(copy) and written["reused_evaluation"]
    assert written["per_sample"] == json.loads((tmp_path / "first.json").read_text())["per_sample"]
    moved = tmp_path / "moved-data"  # the same records in another folder (a run's own copy)
    shutil.copytree(settings.data, moved)
    load(retain, replace(settings, data=str(moved)), "moved.json")
    assert calls == [retain]
    assert json.loads((tmp_path / "moved.json").read_text())["data"] == str(moved)
    load(retain, settings, "off.json", reuse=False)
    assert len(calls) == 2


def test_changed_settings_weights_or_data_are_evaluated_again(counted, tmp_path):
    load, calls, retain, settings = counted
    load(retain, settings, "a.json")
    load(retain, replace(settings, max_new_tokens=9), "b.json")
    assert len(calls) == 2

    edited = tmp_path / "edited"  # the same model with one weight nudged
    shutil.copytree(retain, edited)
    model = load_model(retain)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3
    model.save_pretrained(edited)
    load(str(edited), settings, "c.json")
    assert calls[-1] == str(edited) and len(calls) == 3

    data = tmp_path / "data"  # the same data with one forget answer changed (the evaluation reads
    shutil.copytree(settings.data, data)  # the forget records from the split with perturbations)
    forget = data / f"{settings.forget_split}_perturbed.json"
    rows = json.loads(forget.read_text())
    rows[0]["answer"] += " Indeed."
    forget.write_text(json.dumps(rows))
    load(retain, replace(settings, data=str(data)), "d.json")
    assert len(calls) == 4


def test_the_model_before_unlearning_is_evaluated_once_per_reference(counted, finetuned, tmp_path):
    """A re-run from the same model against the same reference values takes the stored result;
    other reference values change forget quality and privleak, so they are evaluated again."""
    load, _, retain, settings = counted
    target = finetuned[1]["target"]
    reference = load(retain, settings, "reference.json")
    calls = []

    def before(ref, reuse=True):
        def run(model):
            calls.append(model)
            return evaluate_model(model, settings, reference=ref, progress=False)

        return evaluate_once(target, settings, run, reuse=reuse, reference=ref)

    first, again = before(reference), before(reference)
    assert calls == [target] and again.pop("reused_evaluation") and again == first
    assert first["aggregates"]["forget_quality"] is not None
    moved = replace(reference, origin=str(tmp_path / "elsewhere.json"))  # the same values, another file
    assert before(moved)["reference"] == moved.origin and len(calls) == 1
    other = replace(reference, truth_ratios=[r * 0.5 for r in reference.truth_ratios])
    before(other)
    assert len(calls) == 2
    before(reference, reuse=False)
    assert len(calls) == 3
