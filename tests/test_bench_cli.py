"""The real-data benchmark's command line (its runs need ../shared and take hours: not tested here)."""

import pytest


@pytest.fixture(scope="module")
def tofu_real(bench_script):
    return bench_script("tofu_real")


def test_overrides_after_the_methods_are_overrides_not_methods(tofu_real):
    args = tofu_real.parse_args(["--methods", "npo", "grad_diff", "train.lr=4e-5", "dual.rho=0.3"])
    assert args.methods == ["npo", "grad_diff"]
    assert args.overrides == ["train.lr=4e-5", "dual.rho=0.3"]
    args = tofu_real.parse_args(["train.lr=4e-5", "--methods", "pdu"])
    assert (args.methods, args.overrides) == (["pdu"], ["train.lr=4e-5"])
    assert tofu_real.parse_args([]).methods == list(tofu_real.METHODS)


@pytest.mark.parametrize("argv, named", [(["--methods", "npo", "nope"], "nope"),
                                         (["--methods", "train.lr=4e-5"], "none given")])
def test_an_unknown_or_missing_method_is_refused_by_name(tofu_real, argv, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tofu_real.parse_args(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert named in error and "choose from pdu, pdu_top5" in error
