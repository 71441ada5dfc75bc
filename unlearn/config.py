"""One typed configuration for every command, validated at the edge.

Load it from YAML with command-line overrides (``key.sub=value``, the value parsed as YAML):

    cfg = load_config("configs/tofu_tiny.yaml", ["method.name=npo", "train.lr=3e-5"])

A bad value raises :class:`ConfigError` whose message names the field, e.g.
``train.lr: Input should be greater than 0``.

The defaults are the demo's setup (tiny model, synthetic TOFU data, PDU), tuned so that the
demo forgets within its constraint in a few minutes on two CPU cores; real setups are YAML files
in ``configs/`` (the paper's settings for SmolLM2 are in ``configs/tofu_smollm2_pdu.yaml``).
The tiny target memorises its retain set too (retain NLL ~0.02), so the demo's relative
threshold is loose in ratio (``rho = 1``: eps = 2 x L_r(theta_0)) but tiny in absolute terms.

Why ``lr = 2e-4``, ``eta_dual = 100`` and ``top_k = 20`` (measured with ``bench/demo_seeds.py``):

- With ``lr = 5e-4`` and ``eta_dual = 1000`` the constraint's slack at theta_0 walked lam from
  100 to 0 within 5 steps, the unconstrained forget steps drove the retain loss from 0.02 to
  1-2, and lam then climbed by up to ~1000 a step to 6-7e3. It can come down by at most
  ``eta_dual * eps`` (~40) a step, so it stayed there for the rest of the run, where the retain
  term alone drove the model: seed 0 over-forgot (privleak -43), seed 1 relearnt (privleak 79).
- ``lr = 2e-4`` and ``eta_dual = 100``: lam stays near lam_0, peaks at 250-650 and the
  retain loss at 0.2-0.6.
- Flattening all V logits has no resting point: it goes on until the forget facts are less
  likely than never-seen ones (privleak -60 to -95 for seeds 0 and 2 after 14 epochs). With
  the top-5 logits, seed 0 stays within privleak [-25, 29] from epoch 13 to 20.
- Nor does top-5 have one at "never seen": seed 2 passes privleak 4 at epoch 9 and rests at
  -60 to -69 from epoch 11; seed 1 is still at 25 after 20. Hence early stopping (``stop``,
  ``unlearn.stopping``) and ``train.epochs = 30`` as a cap: the three seeds stop after 13, 24
  and 10 epochs.
- On a machine with AMX (2026-12-06) the same seeds gave other target models, and top-5 passed
  the gate on seed 1 only: seed 0's truth ratios stayed below every retain-model value but
  one (forget quality 0.003) where its privleak crossed 0, seed 2 lost 8% of its utility in 5.5
  epochs. Top-20 passes seeds 0 and 2 (forget quality 0.09 and 0.21, privleak 2.0 and 3.5,
  utility 1.01x and 0.95x) and misses seed 1 by privleak 26.4; top-50 and top-100 passed 1 of 3.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """An invalid configuration; the message names each bad field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(_Strict):
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    merge: bool = Field(True, description="the run's model (evaluated, registered) is the base with the "
                        "adapters merged in; false: the adapter folder alone (it is always written)")


Precision = Literal["fp32", "bf16", "auto"]
PRECISION_HELP = ("compute precision of the training forward and backward: fp32, bf16 under "
                  "torch.autocast with the weights, gradients and optimizer states kept in model.dtype, "
                  "or auto: bf16 for a model of hidden size >= 512 on a GPU or a CPU with native bf16 "
                  "(avx512_bf16, AMX), fp32 otherwise")


class ModelConfig(_Strict):
    name_or_path: str = Field("tiny", description="'tiny', 'smollm2-135m', a .gguf, a folder or a hub id")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    lora: LoraConfig | None = None
    gradient_checkpointing: bool = False


class DataConfig(_Strict):
    benchmark: Literal["tofu", "muse"] = "tofu"
    source: str = Field("synthetic", description="'synthetic', a local folder/file or a hub name")
    forget_split: str = "forget10"
    retain_split: str = "retain90"
    full_split: str | None = "full"
    proxy_split: str | None = "holdout10"
    max_length: int = Field(128, ge=8)
    drop_overlap: bool = True
    synthetic_seed: int = 0
    synthetic_authors: int = Field(20, ge=2)
    streaming: bool = Field(False, description="Ray pipeline: read, validate and tokenise on the "
                            "cluster, each worker streaming its own shard (see README, Streaming)")
    sample_rows: int = Field(2048, ge=1, description="streaming: rows of a set taken for the dual's "
                             "calibration, EGUP's centroids and early stopping's forget scores")
    shuffle_rows: int = Field(1024, ge=0, description="streaming: each worker's shuffle buffer, in "
                              "rows (seeded per epoch); 0 = stream order")


class MethodConfig(_Strict):
    """The objective by registry name, and its parameters (unset = the method's default)."""

    name: str = "pdu"
    params: dict[str, Any] = {}

    @model_validator(mode="after")
    def _known_method_and_params(self) -> MethodConfig:
        from unlearn.objectives import get_objective

        try:
            get_objective(self.name, **self.params)
        except ValueError as exc:
            raise ValueError(str(exc)) from exc
        return self


class DualConfig(_Strict):
    lam_0: float = Field(100.0, ge=0)
    eta_dual: float = Field(100.0, ge=0)
    lam_max: float = Field(1e4, gt=0)
    eps: float | None = Field(None, ge=0, description="absolute retain-loss threshold")
    rho: float | None = Field(1.0, ge=-1, description="relative: eps = (1 + rho) * L_r(theta_0)")
    warmup_steps: int = Field(0, ge=0, description="optimizer steps before the first dual update")
    warmup_epochs: float | None = Field(None, ge=0, description="the warm-up in epochs instead (may be "
                                        "fractional; rounded to whole steps): one setting for every "
                                        "split size")

    @model_validator(mode="after")
    def _one_threshold(self) -> DualConfig:
        if self.warmup_epochs is not None and self.warmup_steps:
            raise ValueError("set warmup_steps or warmup_epochs, not both")
        if self.eps is not None and self.rho is not None:
            # An explicit eps wins over the default rho, so YAML can just say `eps: 0.3`.
            object.__setattr__(self, "rho", None)
        if self.eps is None and self.rho is None:
            raise ValueError("set eps (absolute) or rho (relative)")
        if not self.lam_0 <= self.lam_max:
            raise ValueError(f"lam_0 ({self.lam_0}) must not exceed lam_max ({self.lam_max})")
        return self


class TrainConfig(_Strict):
    lr: float = Field(2e-4, gt=0)
    epochs: int = Field(30, ge=1, description="at most; early stopping (the stop section) usually "
                        "ends sooner")
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    bucket_by_length: bool = Field(True, description="length-bucketed batches (less padding)")
    fused_losses: bool = Field(True, description="chunked losses from hidden states (no full logits)")
    loss_chunk_size: int = Field(1024, ge=1, description="supervised positions per logits chunk")
    backward_per_term: bool = Field(True, description="backward through the forget term before the "
                                    "retain forward (one batch's activations at a time; same gradients)")
    precision: Precision = Field("auto", description=PRECISION_HELP)
    master_weights: Precision = Field(
        "auto", description="the dtype the trained weights, their gradients and AdamW states are kept "
        "in while unlearning: fp32; bf16 (updates rounded stochastically; half the memory of each); "
        "auto: bf16 on a CPU where train.precision resolves to bf16 (a GPU keeps fp32 and its fused "
        "AdamW). Applies when model.dtype is float32")
    optimizer_states: Literal["fp32", "bf16"] = Field(
        "fp32", description="AdamW's two moment estimates stored in bf16 (stochastically rounded; "
        "half their memory) or fp32")
    compile: bool = Field(False, description="torch.compile each decoder block (regional); falls back "
                          "to eager with a one-line warning where compilation is not possible")
    seed: int = 0


class FinetuneConfig(_Strict):
    lr: float = Field(3e-3, gt=0)
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(16, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    precision: Precision = Field("auto", description=PRECISION_HELP)
    fused_losses: bool = Field(False, description="the chunked NLL from hidden states (no full logits; "
                               "same values to rounding; configs/*smollm2* turn it on); false: the "
                               "plain NLL on full logits, which the demo's seeds were measured with")
    seed: int = 0
    general_splits: list[str] | None = Field(
        None, description="general-knowledge splits both target and retain models also learn "
        "(standing in for pretraining when the base model knows nothing); default: "
        "real_authors_perturbed and world_facts_perturbed for synthetic TOFU data, none otherwise")


class EvalConfig(_Strict):
    reference: str | None = Field(None, description="retain model (folder/spec) or its eval JSON: "
                                  "forget quality and privleak need it")
    before: bool = Field(True, description="also evaluate the model before unlearning")
    reuse_reference: bool = Field(True, description="take a reference model's evaluation from the "
                                  "cache while its files, the data, these settings and the evaluation "
                                  "code are unchanged (unlearn.eval.cache)")
    reuse_before: bool = Field(True, description="take the evaluation of the model before unlearning "
                               "from the cache while its files, the data, the reference, these settings "
                               "and the evaluation code are unchanged (unlearn.eval.cache)")
    after: bool = Field(True, description="evaluate the unlearned model (off only for benchmarks)")
    batch_size: int = Field(16, ge=1)
    max_new_tokens: int = Field(200, ge=1, description="TOFU generation length")
    max_length: int = Field(512, ge=8)
    holdout_split: str | None = Field(None, description="default: holdoutXX for forgetXX")
    extraction_strength: Literal["reference", "strict"] = Field(
        "reference", description="reference: OpenUnlearning's definition (at least 1/|answer|); strict: "
        "a wrong last answer token scores 0")


class StopConfig(_Strict):
    """Early stopping when the forget set looks like never-seen data (``unlearn.stopping``)."""

    enabled: bool = True
    split: str | None = Field(None, description="never-seen records, neither trained on nor the "
                              "evaluation's holdout; default: validationXX for forgetXX (TOFU data; "
                              "without that split, training runs every epoch and says so)")
    auc: float | None = Field(None, gt=0, lt=1, description="stop once the Min-k AUC of forget vs "
                              "split is at most this; default: that AUC under the reference (retain) "
                              "model when one is given, else 0.5")
    min_epochs: int = Field(1, ge=0, description="epochs that run before the first check")
    checks_per_epoch: int = Field(4, ge=1, description="checks at evenly spaced steps of each epoch "
                                  "(each scores the forget set and the split: a forward pass over both)")
    keep_closer: bool = Field(True, description="end with the weights of whichever of the last two "
                              "checks is closer to stop.auc (a host copy of the trainable weights)")
    batch_size: int = Field(16, ge=1)


class RayConfig(_Strict):
    num_workers: int = Field(2, ge=1, description="Ray Train workers (FSDP2 ranks)")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    data_cpus: float = Field(1, gt=0, description="CPUs kept free of training workers for reading "
                             "and tokenising (data.streaming)")
    resources_per_worker: dict[str, float] = {}
    storage_path: str | None = Field(None, description="checkpoints (shared storage or s3://...); "
                                     "default: output_dir/ray")
    max_failures: int = Field(2, ge=0, description="worker-group restarts from the last checkpoint")
    wait_for_workers_s: float | None = Field(1800, ge=0, description="how long a (re)starting worker "
                                             "group may wait for the cluster's capacity, e.g. a lost "
                                             "node's replacement, before the run fails; null: forever")
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints; 0 = each epoch")
    keep_checkpoints: int = Field(2, ge=1)
    verbose: bool = Field(False, description="forward every worker's output to the driver")
    fail_at_step: int | None = Field(None, ge=1, description="fault injection (tests): once, after "
                                     "this step, the last rank fails as ray.fault says")
    fault: Literal["exit", "hold"] = Field("exit", description="fault injection (tests): 'exit' kills "
                                           "the last rank's process; 'hold' has it write the marker "
                                           "file and wait there, for a test to take a node down")


class MlflowConfig(_Strict):
    tracking_uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI, else "
                                     "sqlite:///mlflow.db in the working directory")
    experiment: str = "unlearn"


class GateConfig(_Strict):
    """Rules over the evaluation's aggregates (see ``unlearn.gate``); all must pass to register."""

    profile: Literal["auto", "retain_model", "holdout"] = Field(
        "auto", description="the default rules: retain_model (TOFU: forget quality, privleak; needs "
        "eval.reference), holdout (no retain model: the forget set against never-seen records); auto: "
        "retain_model when a reference is given, else holdout (TOFU-format data; MUSE: retain_model)")
    rules: list[str] | None = Field(None, description="explicit rules instead of the profile's")
    recheck_earlier: bool = Field(True, description="when the base is a registered version, re-evaluate "
                                  "every forget set in its lineage; each must stay forgotten")
    forget_prob_tolerance: float = Field(0.02, ge=0, le=1, description="an earlier forget set's forget "
                                         "Prob may rise by at most this much (absolute)")
    forget_quality_tolerance: float = Field(0.5, ge=0, le=1, description="an earlier forget set's forget "
                                            "quality must stay >= this fraction of its gated value")

    def tolerance(self):
        from unlearn.gate import Tolerance

        return Tolerance(forget_prob=self.forget_prob_tolerance, forget_quality=self.forget_quality_tolerance)

    def rules_for(self, benchmark: str, reference: str | None) -> list[str]:
        """The rules a run is judged by: ``rules``, else its profile's (``auto`` resolved)."""
        from unlearn.gate import PROFILES

        if self.rules is not None:
            return list(self.rules)
        profile = self.profile
        if profile == "auto":
            profile = "retain_model" if reference is not None or benchmark == "muse" else "holdout"
        return list(PROFILES[profile])

    @field_validator("rules")
    @classmethod
    def _parse(cls, rules: list[str] | None) -> list[str] | None:
        from unlearn.gate import parse_rules

        if rules is None:
            return None
        if not rules:
            raise ValueError("a gate needs at least one rule")
        parse_rules(rules)  # GateError (a ValueError) names the bad rule
        return rules


class RegistryConfig(_Strict):
    model_name: str | None = Field("unlearned-model", description="registered model; null: never register")


TUNABLE = ("dual.eps", "dual.rho", "dual.eta_dual", "dual.lam_0", "train.lr", "method.params.top_k",
           "method.params.prefix_tokens")
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")


class TuneConfig(_Strict):
    """Ray Tune search: ``search_space`` maps a tunable key to one distribution, e.g.
    ``dual.eps: {loguniform: [0.01, 1.0]}`` or ``method.params.top_k: {choice: [null, 5, 20]}``
    (null: PDU on every logit)."""

    num_samples: int = Field(4, ge=1)
    metric: str | None = Field(None, description="one metric to maximise; null: the two-objective "
                               "search (maximise forget_quality and model_utility)")
    mode: Literal["max", "min"] = Field("max", description="whether tune.metric is maximised or minimised")
    scheduler: Literal["fifo", "asha"] | None = Field(
        None, description="asha: stop trials early on the metric of an evaluation after each epoch; "
                          "null: asha with one metric, fifo with the two objectives")
    grace_period: int = Field(1, ge=1, description="ASHA: epochs every trial runs before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA: keep the best 1/reduction_factor at a rung")
    max_concurrent_trials: int | None = Field(None, ge=1, description="default: what the cluster fits")
    search_space: dict[str, dict[str, list]] = {}
    seed: int = 0

    @model_validator(mode="after")
    def _scheduler_needs_one_metric(self) -> TuneConfig:
        if self.scheduler == "asha" and self.metric is None:
            raise ValueError("scheduler: asha stops trials on one metric; set tune.metric, or use "
                             "scheduler: fifo for the two-objective search")
        return self

    @property
    def early_stopping(self) -> bool:
        """ASHA on a per-epoch evaluation of ``metric``."""
        return self.scheduler == "asha" or (self.scheduler is None and self.metric is not None)

    @field_validator("search_space")
    @classmethod
    def _space(cls, space: dict[str, dict[str, list]]) -> dict[str, dict[str, list]]:
        for key, spec in space.items():
            if key not in TUNABLE:
                raise ValueError(f"unknown parameter {key!r} (tunable: {', '.join(TUNABLE)})")
            if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
                raise ValueError(f"{key}: give exactly one of {', '.join(DISTRIBUTIONS)}, got {sorted(spec)}")
            kind, values = next(iter(spec.items()))
            if kind == "choice":
                if not values:
                    raise ValueError(f"{key}: empty choice")
                continue
            try:  # YAML reads 1e-6 (no dot) as a string
                values = spec[kind] = [(int if kind == "randint" else float)(float(v)) for v in values]
            except (TypeError, ValueError):
                raise ValueError(f"{key}: {kind} needs two numbers [low, high], got {values}") from None
            if len(values) != 2 or not values[0] < values[1]:
                raise ValueError(f"{key}: {kind} needs [low, high] with low < high, got {values} "
                                 "(empty range)")
            elif kind == "loguniform" and values[0] <= 0:
                raise ValueError(f"{key}: loguniform needs low > 0, got {values[0]}")
        return space

    @field_validator("metric")
    @classmethod
    def _metric(cls, metric: str | None) -> str | None:
        from unlearn.gate import KNOWN_METRICS

        if metric is not None and metric not in KNOWN_METRICS:
            raise ValueError(f"unknown metric {metric!r}")
        return metric


class Config(_Strict):
    run_name: str = "unlearn"
    output_dir: str = "outputs"
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="single-process finetuning, "
                                                   "unlearning and evaluation: auto = cuda when "
                                                   "there is one (the Ray pipeline: ray.use_gpu)")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    # The demo's method: PDU flattening the top-5 logits (see the module docstring). A config or
    # override that gives a `method` section replaces this default whole.
    method: MethodConfig = Field(default_factory=lambda: MethodConfig(name="pdu", params={"top_k": 20}))
    dual: DualConfig = Field(default_factory=DualConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    stop: StopConfig = Field(default_factory=StopConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)

    @model_validator(mode="after")
    def _holdout_gate_needs_qa_data(self) -> Config:
        if self.gate.profile == "holdout" and self.gate.rules is None and self.data.benchmark == "muse":
            raise ValueError("gate.profile: holdout compares TOFU-format QA metrics (forget vs "
                             "holdout Prob, ROUGE); for MUSE give gate.rules")
        return self

    def gate_rules(self, reference: str | None = None) -> list[str]:
        """The gate's rules for a run whose reference is ``reference`` (else ``eval.reference``)."""
        return self.gate.rules_for(self.data.benchmark, reference or self.eval.reference)

    def with_gate_rules(self, reference: str | None = None) -> Config:
        """This config with ``gate.rules`` pinned to :meth:`gate_rules` (what a run logs and is judged by)."""
        gate = self.gate.model_copy(update={"rules": self.gate_rules(reference)})
        return self.model_copy(update={"gate": gate})


def resolve_paths(cfg: Config, base: str | Path | None = None) -> Config:
    """A copy of ``cfg`` whose local paths are absolute against ``base`` (default: the working
    directory): output, model, data source, reference, checkpoint storage, a sqlite MLflow file.
    Hub ids, URIs and named models or sources are unchanged (see ``unlearn.paths``)."""
    from unlearn import paths

    storage, uri = cfg.ray.storage_path, cfg.mlflow.tracking_uri
    uri = uri and paths.absolute_tracking_uri(uri, base)
    return cfg.model_copy(update={
        "output_dir": paths.absolute_path(cfg.output_dir, base),
        "model": cfg.model.model_copy(update={"name_or_path": paths.absolute_model(cfg.model.name_or_path,
                                                                                   base)}),
        "data": cfg.data.model_copy(update={"source": paths.absolute_source(cfg.data.source, base)}),
        "eval": cfg.eval.model_copy(update={"reference": paths.absolute_model(cfg.eval.reference, base)}),
        "ray": cfg.ray.model_copy(update={"storage_path": storage and paths.absolute_path(storage, base)}),
        "mlflow": cfg.mlflow.model_copy(update={"tracking_uri": uri}),
    })


def _format_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "config"
        lines.append(f"{where}: {err['msg']}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    return raw


def build_config(raw: dict | None = None, overrides: list[str] | None = None) -> Config:
    """Validate a raw dict (+ overrides) into a :class:`Config`."""
    raw = apply_overrides(dict(raw or {}), list(overrides or []))
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config file (or the defaults when ``path`` is None) and validate it; its
    relative paths are made absolute against the working directory (:func:`resolve_paths`)."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config {path}: the top level must be a mapping")
    return resolve_paths(build_config(raw, overrides))
