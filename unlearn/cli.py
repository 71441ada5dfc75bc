"""The ``unlearn`` command line.

    unlearn demo [--output DIR]             finetune a tiny target, unlearn with PDU on Ray, evaluate
    unlearn run CONFIG [k=v ...]            the Ray pipeline (FSDP2 workers, evaluation, MLflow)
    unlearn methods                         list the registered objectives
    unlearn finetune CONFIG [k=v ...]       target + retain reference models (TOFU protocol)
    unlearn forget CONFIG [k=v ...]         single-process unlearning of the configured forget set
    unlearn eval --model M [--reference R]  TOFU/MUSE metrics of a model (table + JSON)
    unlearn tune CONFIG [k=v ...]           Ray Tune search; the best trial is gated and registered
    unlearn promote NAME [VERSION]          alias champion -> a gated version that does not regress
    unlearn serve NAME                      HTTP endpoint for the champion (gated versions only)
    unlearn gate EVAL.json [--before B]     judge an evaluation by the gate's rules
    unlearn synth {tofu,muse} --out DIR     write the seeded synthetic data set
    unlearn convert-gguf FILE [--out DIR]   one-time GGUF -> safetensors folder
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from unlearn.config import ConfigError, load_config
from unlearn.gate import format_gate
from unlearn.paths import URI_SCHEMES, absolute_model, absolute_source, absolute_tracking_uri


def _cmd_methods(args) -> int:
    from unlearn.objectives import available

    width = max(len(name) for name in available())
    for name, description in available().items():
        print(f"{name:<{width}}  {description}")
    return 0


def _cmd_finetune(args) -> int:
    from unlearn.workflow import run_finetune

    cfg = load_config(args.config, args.overrides)
    report = run_finetune(cfg)
    print(json.dumps({k: v for k, v in report.items() if not k.endswith("history")}, indent=2))
    return 0


def _cmd_forget(args) -> int:
    from unlearn.report import print_unlearn_table
    from unlearn.workflow import run_unlearning

    cfg = load_config(args.config, args.overrides)
    result = run_unlearning(cfg, args.model, reference=absolute_model(args.reference))
    print_unlearn_table(result)
    return 0


def _cmd_demo(args) -> int:
    overrides = [f"output_dir={args.output}", "run_name=demo"] + list(args.overrides)
    cfg = load_config(args.config, overrides)
    if args.local:
        from unlearn.demo import run_demo

        run_demo(cfg)
        return 0
    from pipelines.run import run_demo_pipeline

    run_demo_pipeline(cfg)
    return 0


def _cmd_run(args) -> int:
    from pipelines.run import run_pipeline

    overrides = list(args.overrides) + ([f"output_dir={args.output}"] if args.output else [])
    cfg = load_config(args.config, overrides)
    from pipelines.lineage import is_registered_uri

    # A registered version is resolved by the pipeline, which verifies it and carries its lineage on.
    model = args.model if is_registered_uri(args.model) else resolve_model(args.model) if args.model else None
    run_pipeline(cfg, model, reference=args.reference)
    return 0


def resolve_model(spec: str) -> str:
    """A model spec for ``load_model``; MLflow ``models:/`` and ``runs:/`` URIs are downloaded, a
    local path is made absolute (Ray actors do not share the working directory)."""
    if spec.startswith(URI_SCHEMES):
        from pipelines.models import download_model

        return download_model(spec)
    return absolute_model(spec)


def _eval_data(benchmark: str, data: str | None) -> str:
    from unlearn.eval import DEFAULT_DATA
    from unlearn.models import cache_dir

    if data is None:
        return DEFAULT_DATA[benchmark]
    if data == "synthetic":
        from unlearn.data.synthetic import synthetic_source

        return str(synthetic_source(benchmark, cache_dir() / "data"))
    return absolute_source(data)


def _cmd_eval(args) -> int:
    from unlearn.eval import EvalSettings, evaluate, format_aggregates, load_reference, write_result

    try:
        settings = EvalSettings(data=_eval_data(args.benchmark, args.data), benchmark=args.benchmark,
                                forget_split=args.forget_split, holdout_split=args.holdout_split,
                                batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                extraction_strength=args.extraction_strength)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    model = resolve_model(args.model)
    stem = f"{Path(args.model.rstrip('/')).name}_{args.benchmark}"
    if args.benchmark == "tofu":
        stem += f"_{args.forget_split}"
    output = Path(args.output or Path("outputs") / "eval" / f"{stem}.json")
    reference_output = output.with_name(output.stem + ".reference.json")
    if args.ray:
        from pipelines.eval import ray_scorer

        def make_scorer(spec):
            return ray_scorer(spec, settings, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                              dtype=args.dtype)
    else:
        from unlearn.eval import local_scorer

        def make_scorer(spec):
            return local_scorer(spec, settings, dtype=args.dtype, device=args.device)

    def run(spec, reference=None):
        scorer, tokenizer = make_scorer(spec)
        return evaluate(scorer, tokenizer, settings, reference=reference, model_name=spec)

    reference = None
    if args.reference is not None:
        reference = load_reference(resolve_model(args.reference) if not args.reference.endswith(".json")
                                   else args.reference, settings, evaluate_fn=lambda spec, _: run(spec),
                                   output=reference_output)
        if not args.reference.endswith(".json"):
            print(f"reference evaluation: {reference_output} (pass it as --reference next time)")
    result = run(model, reference)
    write_result(result, output)
    print(format_aggregates(result))
    print(f"{result['requests']} requests in {result['seconds']} s; results: {output}")
    return 0


def _mlflow_client(uri: str | None):
    import os

    from mlflow import MlflowClient

    from pipelines.run import check_mlflow

    uri = absolute_tracking_uri(uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db")
    check_mlflow(uri)
    return MlflowClient(uri)


def _cmd_tune(args) -> int:
    from pipelines.tune import run_tune

    overrides = list(args.overrides) + ([f"output_dir={args.output}"] if args.output else [])
    cfg = load_config(args.config, overrides)
    try:
        summary = run_tune(cfg, resolve_model(args.model) if args.model else None, reference=args.reference)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return 130 if summary.get("interrupted") else 0


def _registry_refusal(exc: Exception, name: str) -> str | None:
    """The one-line refusal for a registry call the tracking server denied, else None."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException) and exc.error_code in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
        import os

        user = os.environ.get("MLFLOW_TRACKING_USERNAME", "this user")
        what = "permission denied" if exc.error_code == "PERMISSION_DENIED" else "not authenticated"
        return f"{what}: {user} may not change model {name!r} on the tracking server ({exc.message})"
    return None


def _cmd_promote(args) -> int:
    from pipelines.registry import PromotionRefused, promote

    try:
        version = promote(_mlflow_client(args.tracking_uri), args.name, args.version)
    except PromotionRefused as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        if (why := _registry_refusal(exc, args.name)) is None:
            raise
        print(f"refused: {why}", file=sys.stderr)
        return 1
    print(f"{args.name} version {version} is now the champion")
    return 0


def _cmd_serve(args) -> int:
    from pipelines.registry import PromotionRefused
    from pipelines.serve import serve_model

    try:
        client = _mlflow_client(args.tracking_uri)
        serve_model(client, args.name, args.version, host=args.host, port=args.port)
    except PromotionRefused as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    return 0


def _read_eval(path: str, role: str) -> dict:
    from unlearn.data import DataError

    try:
        result = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{role} {path}: cannot read it as JSON ({exc})") from None
    if not isinstance(result, dict) or not isinstance(result.get("aggregates"), dict):
        raise DataError(f"{role} {path}: not an evaluation JSON (no 'aggregates')")
    return result


def _cmd_gate(args) -> int:
    from unlearn.gate import GateError, PROFILES, judge

    after = _read_eval(args.evaluation, "evaluation")
    before = _read_eval(args.before, "--before")["aggregates"] if args.before else None
    profile = args.profile or ("holdout" if after.get("reference") is None else "retain_model")
    rules = args.rule or list(PROFILES[profile])
    try:
        gate = judge(rules, after["aggregates"], before, after.get("unavailable"))
    except GateError as exc:
        raise ConfigError(str(exc)) from None
    source = "--rule" if args.rule else f"the {profile} profile"
    print(f"{args.evaluation} against {source}" + (f", base {args.before}" if args.before else ""))
    print(format_gate(gate.to_dict()))
    return 0 if gate.passed else 1


def _cmd_synth(args) -> int:
    from unlearn.data import generate_muse, generate_tofu, write_muse, write_tofu

    if args.benchmark == "tofu":
        write_tofu(generate_tofu(seed=args.seed, n_authors=args.authors), args.out)
    else:
        write_muse(generate_muse(seed=args.seed), args.out)
    print(f"wrote synthetic {args.benchmark.upper()} data (seed {args.seed}) to {args.out}")
    return 0


def _cmd_convert(args) -> int:
    from unlearn.models import convert_gguf

    print(convert_gguf(Path(args.gguf), Path(args.out) if args.out else None))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unlearn", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("methods", help="list the unlearning methods").set_defaults(func=_cmd_methods)

    demo = sub.add_parser("demo", help="end-to-end demo on the embedded defaults")
    demo.add_argument("--output", default="outputs/demo", help="where everything is written")
    demo.add_argument("--config", default=None, help="YAML to start from instead of the defaults")
    demo.add_argument("--local", action="store_true",
                      help="single-process unlearning instead of the Ray pipeline")
    demo.add_argument("overrides", nargs="*", help="key.path=value overrides")
    demo.set_defaults(func=_cmd_demo)

    run = sub.add_parser("run", help="the Ray pipeline: FSDP2 unlearning, evaluation, MLflow")
    run.add_argument("config", help="YAML config (configs/*.yaml)")
    run.add_argument("overrides", nargs="*", help="key.path=value overrides")
    run.add_argument("--model", default=None, help="model to unlearn from (default: model.name_or_path); "
                     "a folder, spec or MLflow models:/ URI")
    run.add_argument("--reference", default=None, help="retain model or its eval JSON (default: "
                     "eval.reference)")
    run.add_argument("--output", default=None, help="output_dir override")
    run.set_defaults(func=_cmd_run)

    for name, func, text in (("finetune", _cmd_finetune, "train target and retain models"),
                             ("forget", _cmd_forget, "single-process unlearning")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("config", help="YAML config (configs/*.yaml)")
        cmd.add_argument("overrides", nargs="*", help="key.path=value overrides")
        cmd.set_defaults(func=func)
        if name == "forget":
            cmd.add_argument("--model", default=None,
                             help="model to unlearn from (default: model.name_or_path)")
            cmd.add_argument("--reference", default=None, help="retain model: early stopping's "
                             "target (default: eval.reference; see the stop section)")

    ev = sub.add_parser("eval", help="TOFU or MUSE metrics of a model, against a reference")
    ev.add_argument("--model", required=True, help="model spec (folder, tiny, smollm2-135m, .gguf, "
                    "hub id) or an MLflow models:/ URI")
    ev.add_argument("--benchmark", choices=["tofu", "muse"], default="tofu")
    ev.add_argument("--forget-split", default="forget10", help="TOFU forget split (default forget10)")
    ev.add_argument("--holdout-split", default=None, help="MIA non-members (default holdoutXX)")
    ev.add_argument("--data", default=None, help="folder, file or hub name; 'synthetic' for the seeded "
                    "synthetic set (default: locuslab/TOFU or muse-bench/MUSE-News, online only)")
    ev.add_argument("--reference", default=None, help="the retain model (evaluated, and its JSON "
                    "written) or the eval JSON of an earlier run of it")
    ev.add_argument("--output", default=None, help="result JSON (default outputs/eval/<model>_...json)")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--max-new-tokens", type=int, default=200, help="TOFU generation length")
    ev.add_argument("--extraction-strength", choices=["reference", "strict"], default="reference",
                    help="reference: OpenUnlearning's definition (default); strict: a wrong last "
                    "answer token scores 0")
    ev.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ev.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="one process: auto = cuda when there is one (--ray: --gpus-per-worker)")
    ev.add_argument("--ray", action="store_true", help="score on a Ray cluster (Ray Data actor pool)")
    ev.add_argument("--workers", type=int, default=2, help="Ray actors, each loads the model once")
    ev.add_argument("--gpus-per-worker", type=float, default=0.0)
    ev.set_defaults(func=_cmd_eval)

    tune_cmd = sub.add_parser("tune", help="Ray Tune search (Optuna) over eps/rho, top_k, lr, ...; "
                              "registers the best trial if it passes the gate")
    tune_cmd.add_argument("config", help="YAML config with a tune.search_space")
    tune_cmd.add_argument("overrides", nargs="*", help="key.path=value overrides")
    tune_cmd.add_argument("--model", default=None, help="model to unlearn from (default: model.name_or_path)")
    tune_cmd.add_argument("--reference", default=None, help="retain model or its eval JSON")
    tune_cmd.add_argument("--output", default=None, help="output_dir override")
    tune_cmd.set_defaults(func=_cmd_tune)

    prom = sub.add_parser("promote", help="move alias champion to a gated, non-regressing version")
    prom.add_argument("name", help="registered model name")
    prom.add_argument("version", nargs="?", default=None, help="default: the challenger")
    prom.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    prom.set_defaults(func=_cmd_promote)

    srv = sub.add_parser("serve", help="HTTP generation endpoint (Ray Serve) for models:/NAME@champion")
    srv.add_argument("name", help="registered model name")
    srv.add_argument("--version", default=None, help="a version instead of the champion (it must be gated)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    srv.set_defaults(func=_cmd_serve)

    gate_cmd = sub.add_parser("gate", help="judge an evaluation JSON by the gate's rules (exit 1: failed)")
    gate_cmd.add_argument("evaluation", help="the candidate's eval JSON (unlearn eval)")
    gate_cmd.add_argument("--before", default=None, help="eval JSON of the model before unlearning "
                          "(base.* in the rules)")
    gate_cmd.add_argument("--profile", choices=["retain_model", "holdout"], default=None,
                          help="default: retain_model if the evaluation had a reference, else holdout")
    gate_cmd.add_argument("--rule", action="append", default=None,
                          help="a rule instead of the profile's (repeatable)")
    gate_cmd.set_defaults(func=_cmd_gate)

    synth = sub.add_parser("synth", help="write the seeded synthetic data set")
    synth.add_argument("benchmark", choices=["tofu", "muse"])
    synth.add_argument("--out", required=True)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--authors", type=int, default=20)
    synth.set_defaults(func=_cmd_synth)

    convert = sub.add_parser("convert-gguf", help="convert a GGUF file to a safetensors folder")
    convert.add_argument("gguf")
    convert.add_argument("--out", default=None)
    convert.set_defaults(func=_cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("matplotlib", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not args.verbose:
        _quiet_weight_loading()
    try:
        return args.func(args)
    except Exception as exc:
        if not _is_user_error(exc):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _quiet_weight_loading() -> None:
    """Turn off transformers' per-file weight-loading bars, which drown our own, without importing
    transformers (~1 s) in commands that never load a model."""
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    else:  # read when transformers is first imported, here and in the processes started from here
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _is_user_error(exc: Exception) -> bool:
    """Whether ``exc`` ends a command with one line and exit 2 (bad input, not a bug)."""
    from pipelines.errors import PipelineError
    from unlearn.data import DataError

    if isinstance(exc, (ConfigError, DataError, PipelineError)):
        return True
    models = sys.modules.get("unlearn.models")  # only a command that imported it loads a model
    return models is not None and isinstance(exc, models.ModelLoadError)


if __name__ == "__main__":
    sys.exit(main())
