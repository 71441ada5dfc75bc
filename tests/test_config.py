import pytest

from unlearn.config import ConfigError, build_config, load_config


def test_defaults_are_valid_and_relative_eps():
    cfg = build_config()
    assert cfg.method.name == "pdu"
    assert cfg.dual.rho == 1.0 and cfg.dual.eps is None


def test_overrides_parse_yaml_values():
    cfg = build_config({}, ["train.lr=3e-5", "method.name=npo", "method.params.beta=0.2",
                            "dual.eps=0.3"])
    assert cfg.train.lr == pytest.approx(3e-5)
    assert cfg.method.name == "npo" and cfg.method.params == {"beta": 0.2}
    assert cfg.dual.eps == 0.3 and cfg.dual.rho is None  # explicit eps wins over default rho


@pytest.mark.parametrize("overrides, needle", [
    (["train.lr=-1"], "train.lr"),
    (["train.batchsize=4"], "train.batchsize"),
    (["model.dtype=int8"], "model.dtype"),
    (["method.name=nosuch"], "unknown method 'nosuch'"),
    (["method.params.gamma=-2"], "gamma must be >= 0"),
    (["method.name=npo", "method.params.top_k=3"], "unknown parameter(s) ['top_k']"),
    (["dual.rho=null"], "set eps"),
    (["lr=0.1"], "lr"),
])
def test_bad_values_name_the_field(overrides, needle):
    with pytest.raises(ConfigError) as info:
        build_config({}, overrides)
    assert needle in str(info.value)


def test_malformed_override_and_files(tmp_path):
    with pytest.raises(ConfigError, match="key.path=value"):
        build_config({}, ["train.lr"])
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text("train:\n  epochs: 2\nmethod:\n  name: simnpo\n")
    cfg = load_config(good, ["train.epochs=3"])
    assert cfg.train.epochs == 3 and cfg.method.name == "simnpo"


@pytest.mark.parametrize("name", ["tofu_tiny.yaml", "tofu_smollm2_pdu.yaml", "muse_smollm2_npo.yaml"])
def test_the_shipped_configs_validate(name):
    from pathlib import Path

    path = Path(__file__).parent.parent / "configs" / name
    assert sorted(p.name for p in path.parent.glob("*.yaml")) == sorted(
        ["tofu_tiny.yaml", "tofu_smollm2_pdu.yaml", "muse_smollm2_npo.yaml"]), "list every config here"
    cfg = load_config(path)
    if name == "tofu_smollm2_pdu.yaml":  # one warm-up and one threshold that fit any split size
        assert cfg.dual.warmup_epochs == 1 and cfg.dual.rho is not None and cfg.dual.eps is None
        assert cfg.finetune.fused_losses  # SmolLM2's vocabulary: no full logits while finetuning
        # bf16 wherever the hardware has it; finetuning pinned to what the README's benchmark used
        assert cfg.train.precision == "auto" and cfg.finetune.precision == "fp32"
