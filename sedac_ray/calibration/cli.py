"""``sedac calibrate`` and ``sedac bench quality`` (argument parsing; the work happens elsewhere).

Heavy imports happen inside the commands, so that ``sedac --help`` stays fast.
"""

from __future__ import annotations

import sys

TRACE_CACHE_HELP = "record traces afresh and keep none (default: reuse them from $SEDAC_CACHE_DIR/traces)"


def add_calibration_parsers(commands, add_model_args) -> None:
    calibrate = commands.add_parser(
        "calibrate",
        help="pick a model's default exit policy for a target agreement with the full model",
        description="Sweep tau x K x min_layer on the calibration prompts, check the best candidates with "
        "the real runtime, pick the setting that saves the most layers at the target agreement, check it on "
        "the held-out prompts, and write <model>.json (used as the default policy by the engine and server).",
    )
    calibrate.add_argument("--target-agreement", type=float, default=0.95, help="default 0.95")
    calibrate.add_argument(
        "--prompts", default="calibration", help="'calibration' (packaged) or a .jsonl file of prompts"
    )
    calibrate.add_argument(
        "--validate-on", default="heldout", help="prompt set to check the result on ('none' to skip)"
    )
    calibrate.add_argument("--max-new-tokens", type=int, default=40, help="continuation length per prompt")
    calibrate.add_argument("--adapters", action="store_true", help="also fit exit adapters (a second file)")
    calibrate.add_argument(
        "--probes", action="store_true", help="also fit exit probes and sweep the probe and V7+probe families"
    )
    calibrate.add_argument(
        "--max-checks", type=int, default=4, help="runtime (free-running) checks per policy family; default 4"
    )
    calibrate.add_argument(
        "--margin",
        type=float,
        default=0.0,
        help="only settings whose offline agreement beats the target by this much are checked (default 0)",
    )
    calibrate.add_argument(
        "--min-layers-saved",
        type=float,
        default=0.05,
        help="a pick saving fewer layers than this fraction ships 'no exit' (default 0.05)",
    )
    calibrate.add_argument("--no-trace-cache", action="store_true", help=TRACE_CACHE_HELP)
    calibrate.add_argument(
        "--output",
        help="calibration file to write (default: $SEDAC_CALIBRATION_DIR or ~/.cache/sedac-ray/calibration)",
    )
    add_model_args(calibrate)
    calibrate.set_defaults(func=cmd_calibrate)

    bench = commands.add_parser("bench", help="benchmarks")
    kinds = bench.add_subparsers(dest="bench", required=True)
    quality = kinds.add_parser(
        "quality",
        help="quality vs layers saved for every policy family: JSON, Markdown and PNG plots",
        description="Compare V7, its window variant, V6 entropy checkpoints, CALM confidence and the oracle "
        "on the same prompts (settings chosen on the calibration prompts, judged on the held-out ones), with "
        "and without exit adapters; runtime agreement and wall-clock from the engine for the V7 points.",
    )
    quality.add_argument("--out-dir", default="benchmarks/results", help="where quality.* files go")
    quality.add_argument("--targets", type=float, nargs="+", default=[0.95, 0.99])
    quality.add_argument("--max-new-tokens", type=int, default=40)
    quality.add_argument("--no-adapters", action="store_true", help="skip the exit-adapter comparison")
    quality.add_argument("--wallclock-rounds", type=int, default=3, help="0 skips the wall-clock column")
    quality.add_argument("--no-trace-cache", action="store_true", help=TRACE_CACHE_HELP)
    add_model_args(quality)
    quality.set_defaults(func=cmd_bench_quality)


def cmd_calibrate(args) -> int:
    from sedac_ray.model.loading import load_model

    from .calibrate import calibrate, write

    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    validate_on = None if args.validate_on.lower() == "none" else args.validate_on
    run = calibrate(
        loaded,
        target=args.target_agreement,
        prompts=args.prompts,
        max_new_tokens=args.max_new_tokens,
        fit_adapters=args.adapters,
        validate_on=validate_on,
        cache=not args.no_trace_cache,
        fit_probes=args.probes,
        max_checks=args.max_checks,
        margin=args.margin,
        min_layers_saved=args.min_layers_saved,
    )
    path = write(run, args.output)
    calibration = run.calibration
    print(f"wrote {path}")
    if calibration.reason:
        print(f"policy: no exit ({calibration.reason})")
    else:
        print(
            f"policy {calibration.policy.describe()}: agreement {calibration.agreement:.4f} (target "
            f"{calibration.target_agreement:g}), {calibration.layers_saved:.2%} of layers saved on "
            f"{args.prompts} (engine, free-running); offline {run.choice.best.row.agreement:.4f}"
        )
    validation = calibration.details.get("validation") or {}
    held = validation.get("engine_free_running")
    if held:
        print(
            f"held-out ({validation['prompts']}, {held['tokens']} tokens, {held['policy']}): agreement "
            f"{held['agreement']:.4f}, {held['layers_saved']:.2%} of layers saved (free-running)"
        )
    if calibration.adapters and calibration.adapter_policy.enabled:
        print(
            f"with exit adapters: policy {calibration.adapter_policy.describe()}, agreement "
            f"{calibration.adapters['agreement']:.4f}, {calibration.adapters['layers_saved']:.2%} saved"
        )
    print(f"[{calibration.details['seconds']:.0f} s]", file=sys.stderr)
    return 0


def cmd_bench_quality(args) -> int:
    from sedac_ray.model.loading import load_model

    from .report import QualityBench

    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    bench = QualityBench(
        loaded,
        targets=args.targets,
        max_new_tokens=args.max_new_tokens,
        fit_adapters=not args.no_adapters,
        wallclock_rounds=args.wallclock_rounds,
        cache=not args.no_trace_cache,
    )
    paths = bench.run(args.out_dir)
    print(bench.markdown())
    for path in paths:
        print(f"wrote {path}", file=sys.stderr)
    return 0
