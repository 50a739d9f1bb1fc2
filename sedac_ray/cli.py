"""``sedac``: the command line. ``sedac generate`` runs the single-process engine."""

from __future__ import annotations

import argparse
import json
import sys

from sedac_ray.calibration.cli import add_calibration_parsers
from sedac_ray.deploy.cli import add_k8s_parser
from sedac_ray.model.loading import ACCEPTED_SPECS, DEFAULT_MODEL


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model spec: {ACCEPTED_SPECS}")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    parser.add_argument(
        "--dtype", default=None, help="float32, bfloat16 or float16 (default: fp32 on CPU, bf16 on CUDA)"
    )


def _add_policy_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "exit policy (default: the model's calibration file if there is one, else tau=0.99, K=3; "
        "flags override its fields)"
    )
    group.add_argument("--tau", type=float, help="stability threshold in (0, 1]")
    group.add_argument("--k", type=int, help="consecutive stable layers needed to exit (default 3)")
    group.add_argument("--min-layer", type=int, help="never exit before this layer (1..L)")
    group.add_argument(
        "--window", type=int, help="sliding-window rule: exit when K of the last N layers are stable"
    )
    group.add_argument("--no-exit", action="store_true", help="disable early exit (full-depth decoding)")
    group.add_argument(
        "--adapters",
        action="store_true",
        help="apply the exit adapters named in the model's calibration file (and its adapter policy)",
    )


def _policy(args, base):
    return base.with_overrides(
        tau=args.tau, k=args.k, min_layer=args.min_layer, window=args.window, disable=args.no_exit
    )


def _calibrated(args, loaded):
    """The base policy (calibrated when the model has a file), where it comes from, and the exit
    adapters to apply (``--adapters``)."""
    from sedac_ray.exit.store import calibrated_default
    from sedac_ray.policy import DEFAULT_POLICY

    calibration, source = calibrated_default(loaded.name, loaded.num_layers, loaded.model.dtype)
    if not args.adapters:
        return (calibration.policy if calibration else DEFAULT_POLICY), source, None
    if calibration is None or calibration.adapters_path is None:
        raise ValueError(
            f"--adapters needs a calibration file with exit adapters for {loaded.name} "
            "(run: sedac calibrate --adapters)"
        )
    return (
        calibration.adapter_policy,
        f"{source}, with adapters {calibration.adapters_path}",
        calibration.adapters_path,
    )


def cmd_generate(args) -> int:
    from sedac_ray.engine import Engine
    from sedac_ray.model.loading import load_model
    from sedac_ray.policy import DEFAULT_POLICY

    _policy(args, DEFAULT_POLICY)  # bad flags fail before the model loads
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    base, source, adapters = _calibrated(args, loaded)
    policy = _policy(args, base)
    print(f"[sedac] exit policy {policy.describe()} (base: {source})", file=sys.stderr)
    engine = Engine(
        loaded,
        policy,
        speculative=args.speculative,
        draft_limit=args.draft_limit,
        adapters=adapters,
        deferred_fill=args.deferred_fill,
    )
    result = engine.generate(
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
        chat=args.chat,
    )[0]
    if args.json:
        print(
            json.dumps(
                {
                    "model": loaded.name,
                    "num_layers": engine.num_layers,
                    "policy": policy.describe(),
                    "prompt_token_ids": result.prompt_token_ids,
                    "token_ids": result.token_ids,
                    "text": result.text,
                    "exit_layers": result.exit_layers,
                    "mean_layers": round(result.mean_layers, 3),
                    "finish_reason": result.finish_reason,
                    **({"speculative": result.speculative.as_dict()} if result.speculative else {}),
                    **(
                        {"deferred_layers": result.deferred_layers}
                        if result.deferred_layers is not None
                        else {}
                    ),
                }
            )
        )
    else:
        print(result.text)
        # Deferred layers run later, so they are not saved.
        deferred = result.deferred_layers
        computed = result.mean_layers + (deferred or 0) / max(len(result.token_ids), 1)
        saved = 1 - computed / engine.num_layers
        ran_later = f", {deferred} deferred layers run" if deferred is not None else ""
        print(
            f"[{len(result.token_ids)} tokens, policy {policy.describe()}, mean layers "
            f"{result.mean_layers:.1f}/{engine.num_layers} ({saved:.0%} saved{ran_later}), "
            f"finish: {result.finish_reason}]",
            file=sys.stderr,
        )
        if result.speculative:  # every token was verified at full depth; the layers are the drafts'
            stats = result.speculative
            print(
                f"[speculative: {stats.drafts} drafts, {stats.accepted} accepted, {stats.rolled_back} rolled "
                f"back, {stats.tokens_per_verification:.2f} tokens per verification]",
                file=sys.stderr,
            )
    return 0


def cmd_serve(args) -> int:
    """Load the configured model once (so replicas find its dequantized copy), then `serve run`."""
    import os
    from pathlib import Path

    import yaml

    from sedac_ray.model.loading import load_model

    config_path = Path(args.config)
    if not config_path.is_file():
        raise FileNotFoundError(f"serve config {config_path} does not exist")
    config = yaml.safe_load(config_path.read_text())
    for app in config.get("applications", []):
        model = app.get("args", {}).get("model", DEFAULT_MODEL)
        if model == DEFAULT_MODEL:
            load_model(model)
    serve_bin = Path(sys.executable).with_name("serve")
    print(
        f"[sedac] serve run {config_path} (HTTP and gRPC ports are in the config; Ctrl-C stops)",
        file=sys.stderr,
    )
    os.execv(str(serve_bin), [str(serve_bin), "run", str(config_path)])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sedac", description="Early-exit LLM inference and serving")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate text with the single-process engine")
    generate.add_argument("--prompt", required=True, help="prompt text (a user message with --chat)")
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--stop", action="append", help="stop string (repeatable)")
    generate.add_argument("--json", action="store_true", help="print one JSON object")
    generate.add_argument(
        "--speculative",
        action="store_true",
        help="lossless mode: exited tokens are drafts, verified at full depth (output = --no-exit's)",
    )
    generate.add_argument(
        "--draft-limit", type=int, default=4, help="with --speculative: drafts per verification (default 4)"
    )
    generate.add_argument(
        "--deferred-fill",
        action="store_true",
        help="exited tokens get exact K/V: their deeper layers run in the next step (FREE), not propagated",
    )
    _add_model_args(generate)
    _add_policy_args(generate)
    generate.set_defaults(func=cmd_generate)

    serve = commands.add_parser("serve", help="serve the pipeline on Ray Serve (`serve run` a config)")
    serve.add_argument("config", nargs="?", default="deployments/local.yaml", help="Serve config YAML")
    serve.set_defaults(func=cmd_serve)

    add_k8s_parser(commands)  # sedac k8s render | validate
    add_calibration_parsers(commands, _add_model_args)  # sedac calibrate, sedac bench quality
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"sedac: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
