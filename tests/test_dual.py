import pytest

from unlearn.dual import DualController


def test_warmup_holds_lam_then_ascends_on_violation():
    dual = DualController(lam_0=10.0, eta_dual=2.0, eps=0.5, warmup_steps=2)
    assert dual.update(1.5) == 10.0  # warm-up step 1
    assert dual.update(1.5) == 10.0  # warm-up step 2
    assert dual.update(1.5) == pytest.approx(10.0 + 2.0 * 1.0)  # violated: lam grows
    assert dual.update(0.0) == pytest.approx(12.0 - 2.0 * 0.5)  # satisfied: lam shrinks


def test_clipping_to_zero_and_lam_max():
    dual = DualController(lam_0=1.0, eta_dual=10.0, eps=1.0, lam_max=5.0)
    assert dual.update(0.0) == 0.0
    assert dual.update(0.0) == 0.0
    assert dual.update(100.0) == 5.0


def test_relative_eps_is_calibrated_from_initial_retain_loss():
    dual = DualController(rho=0.2)
    assert not dual.ready
    with pytest.raises(RuntimeError, match="calibrate"):
        dual.update(1.0)
    assert dual.calibrate(2.0) == pytest.approx(2.4)
    assert dual.slack(3.0) == pytest.approx(0.6)


def test_reduce_hook_is_applied_before_the_update():
    seen = []

    def mean_over_two_ranks(value):  # pretend the other rank saw 0.0
        seen.append(value)
        return (value + 0.0) / 2

    dual = DualController(lam_0=0.0, eta_dual=1.0, eps=0.25, reduce=mean_over_two_ranks)
    assert dual.update(1.0) == pytest.approx(0.25)  # (1.0 + 0.0)/2 - 0.25
    assert seen == [1.0]


def test_state_round_trip():
    dual = DualController(lam_0=3.0, eta_dual=1.0, rho=0.1, warmup_steps=1)
    dual.calibrate(1.0)
    for value in (2.0, 2.0, 0.5):
        dual.update(value)
    clone = DualController(lam_0=3.0, eta_dual=1.0, rho=0.1, warmup_steps=1)
    clone.load_state_dict(dual.state_dict())
    assert clone.state_dict() == dual.state_dict()
    assert clone.update(1.7) == dual.update(1.7)


@pytest.mark.parametrize("kwargs, field", [
    ({}, "exactly one"),
    ({"eps": 0.3, "rho": 0.1}, "exactly one"),
    ({"eps": -1.0}, "eps"),
    ({"eps": 0.3, "lam_0": 5.0, "lam_max": 1.0}, "lam_0"),
    ({"eps": 0.3, "eta_dual": -1.0}, "eta_dual"),
    ({"eps": 0.3, "warmup_steps": -1}, "warmup_steps"),
])
def test_bad_settings_raise(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DualController(**kwargs)
