"""``python -m sedac_ray.sim``: the simulator against the measured CPU figures, then GPU predictions.

.venv/bin/python -m sedac_ray.sim [--tokens 64] [--results DIR] [--out FILE.json]

(``--out benchmarks/results/speculative_sim.json`` is the committed run.)
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from sedac_ray.sim.calibration import KNOWN_MISSES, RESULTS, TOLERANCE, figures
from sedac_ray.sim.scenarios import SCENARIOS, assumed_exit_layers, predict

ACCEPTANCE = (0.0, 0.5, 0.7, 0.9)
CONCURRENCY = (1, 16)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=64, help="decode tokens per sequence")
    parser.add_argument("--hop-ms", type=float, help="override the scenarios' assumed hop time")
    parser.add_argument("--out", help="write the figures and predictions as JSON")
    parser.add_argument(
        "--results",
        type=Path,
        default=RESULTS,
        help="folder with speculative_speed.json and pipeline_speed.json to calibrate on "
        "(default: the copies shipped with the package, from benchmarks/results)",
    )
    args = parser.parse_args(argv)

    checked, fitted = figures(args.results)
    print(
        f"simulator vs measured (2-core CPU; fitted hop {fitted['hop_ms']:.1f} ms, "
        f"CPU per streamed token {fitted['token_cpu_ms']:.1f} ms)"
    )
    print(f"{'figure':<62}{'measured':>10}{'simulated':>11}{'error':>8}  role")
    for figure in checked:
        print(
            f"{figure.name:<62}{figure.measured:>10.1f}{figure.predicted:>11.1f}"
            f"{figure.error:>+8.0%}  {figure.role}"
        )
    held = [abs(f.error) for f in checked if f.role == "prediction" and f.name not in KNOWN_MISSES]
    print(f"largest prediction error {max(held):.0%} (tolerance {TOLERANCE:.0%})")
    for name, (_, why) in KNOWN_MISSES.items():
        print(f"known miss: {name}: {why}")
    print()

    predictions = []
    for scenario in SCENARIOS:
        exits = assumed_exit_layers(scenario.num_layers)
        print(
            f"{scenario.name}: layer {scenario.layer.one_row_ms} ms, head {scenario.head.one_row_ms} ms, "
            f"fill {scenario.fill.one_row_ms} ms, hop {args.hop_ms or scenario.hop_ms} ms, "
            f"draft limit {scenario.draft_limit}; "
            f"mean exit layer {sum(exits) / len(exits):.1f} of {scenario.num_layers} (assumed)"
        )
        names = ("none", "early", "spec")
        print(f"{'':16}   {'ms per token':>21}   {'tokens/s':>24}")
        print(
            f"{'streams':>8}{'accept':>8}   "
            + "".join(f"{m:>7}" for m in names)
            + "   "
            + "".join(f"{m:>8}" for m in names)
        )
        for concurrency in CONCURRENCY:
            for acceptance in ACCEPTANCE:
                result = predict(scenario, concurrency, acceptance, args.tokens, hop_ms=args.hop_ms)
                tpot = [result[m]["tpot_ms"] for m in ("no_exit", "early_exit", "speculative")]
                rate = [result[m]["tokens_per_s"] for m in ("no_exit", "early_exit", "speculative")]
                print(
                    f"{concurrency:>8}{acceptance:>8.1f}   "
                    + "".join(f"{x:>7.2f}" for x in tpot)
                    + "   "
                    + "".join(f"{x:>8.0f}" for x in rate)
                )
                predictions.append(
                    {
                        "scenario": scenario.name,
                        "concurrency": concurrency,
                        "acceptance": acceptance,
                        **result,
                    }
                )
        print()
    if args.out:
        report = {
            "figures": [f.as_dict() for f in checked],
            "fitted": {k: asdict(v) if hasattr(v, "__dataclass_fields__") else v for k, v in fitted.items()},
            "scenarios": [asdict(s) for s in SCENARIOS],
            "tokens": args.tokens,
            "hop_ms_override": args.hop_ms,
            "predictions": predictions,
        }
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
