"""Deferred fill against state propagation at the same exit policies, on the held-out prompts.

An exited token's deeper-layer K/V either come from state propagation (the default: projected
from its exit hidden state) or from deferred fill (FREE, Bae et al. 2023: its deeper layers run at
full computation in the next step, beside the next token, so later tokens attend to exact K/V).

* Policies: the settings ``benchmarks/quality_probes.py`` chose on the calibration prompts for
  ``--target`` (read from its results file), for the families the runtime runs (V7, V7+probe,
  probe). Probe gates use the model's shipped probes (fitted on the calibration traces).
* Free-running quality, each arm: the engine generates greedily with the policy; every decode token
  is compared with the full model's greedy token on the prefix the policy wrote (one HF forward).
  ``layers_saved`` counts the deferred layers as computed, not saved; ``exit_depth_saved`` is the
  share of layers before each token is read out.
* Wall clock, paired: exits off, propagation and deferred fill run back to back on the same prompts
  at a fixed length (EOS ignored), the order rotating each round; tokens/s = batch x tokens / time,
  medians over rounds, ratios per round then median.

Run (minutes on 2 shared cores; one thread avoids oversubscription):

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD nice -n 15 .venv/bin/python benchmarks/deferred_fill.py

Writes ``benchmarks/results/deferred_fill.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.quality_probes import RUNTIME_FAMILIES, paired_times, write_result
from sedac_ray.calibration.prompts import load_prompts
from sedac_ray.calibration.sweep import policy_from_setting
from sedac_ray.calibration.traces import encode_prompts
from sedac_ray.calibration.validate import free_running
from sedac_ray.engine import Engine
from sedac_ray.model.loading import load_model
from sedac_ray.policy import ExitPolicy
from sedac_ray.sampling import SamplingParams

ARMS = {"propagated": False, "deferred fill": True}


def chosen_settings(path: Path, target: float) -> list[tuple[str, dict]]:
    rows = json.loads(path.read_text())["rows"]
    return [
        (row["family"], row["setting"])
        for row in rows
        if row["target"] == target and row["family"] in RUNTIME_FAMILIES and row.get("setting")
    ]


def wall_clock(
    engine: Engine, prompts: list[list[int]], policy: ExitPolicy, batch: int, tokens: int, rounds: int
) -> dict:
    group = prompts[:batch]

    def run(which: ExitPolicy, deferred: bool) -> Callable[[], object]:
        return lambda: engine.generate_ids(
            group, tokens, SamplingParams(), [], which, ignore_eos=True, deferred_fill=deferred
        )

    times = paired_times(
        {
            "off": run(ExitPolicy.disabled(), False),
            "propagated": run(policy, False),
            "deferred": run(policy, True),
        },
        rounds,
    )

    def ratio(fast: str, slow: str) -> float:
        return statistics.median(a / b for a, b in zip(times[slow], times[fast], strict=True))

    return {
        "batch": batch,
        "tokens": tokens,
        "rounds": rounds,
        **{f"{arm}_tok_s": batch * tokens / statistics.median(t) for arm, t in times.items()},
        "deferred_vs_propagated": ratio("deferred", "propagated"),
        "deferred_vs_off": ratio("deferred", "off"),
        "propagated_vs_off": ratio("propagated", "off"),
        "seconds_all": times,  # per arm, per round: the pairs behind the ratios
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--settings", default="benchmarks/results/quality_probes.json")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3, help="paired wall-clock rounds (0 skips timing)")
    parser.add_argument("--timing-tokens", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[1])
    parser.add_argument("--out", default="benchmarks/results/deferred_fill.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    clock = time.perf_counter()
    loaded = load_model()
    engine = Engine(loaded, ExitPolicy.disabled())  # the model's shipped probes serve probe gates
    held_prompts = encode_prompts(engine, load_prompts("heldout"))
    quality, timing = [], []
    for family, setting in chosen_settings(Path(args.settings), args.target):
        policy = policy_from_setting(setting)
        for arm, deferred in ARMS.items():
            result = free_running(
                loaded,
                held_prompts,
                policy,
                args.max_new_tokens,
                probes=engine.probes,
                progress=False,
                deferred_fill=deferred,
            )
            figures = result.to_dict()
            row = {
                "family": family,
                "kv": arm,
                "policy": policy.describe(),
                "tokens": figures["tokens"],
                "agreement": figures["agreement"],
                "layers_saved": figures["layers_saved"],
                "exit_depth_saved": figures.get("exit_depth_saved", figures["layers_saved"]),
                "deferred_layers": figures.get("deferred_layers", 0),
            }
            quality.append(row)
            print(json.dumps(row), flush=True)
        for batch in args.batches if args.rounds else []:
            row = {
                "family": family,
                **wall_clock(engine, held_prompts, policy, batch, args.timing_tokens, args.rounds),
            }
            timing.append(row)
            print(json.dumps(row), flush=True)
    write_result(
        args.out, __doc__, loaded, clock, {"target": args.target, "quality": quality, "wall_clock": timing}
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
