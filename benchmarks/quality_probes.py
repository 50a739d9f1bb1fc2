"""Exit-policy families side by side on the held-out prompts: V7, probe, V7+probe, V6, CALM, oracle.

Settings are chosen on the calibration prompts (offline, cross-fitted probe scores) for each target
agreement, then judged unchanged on the held-out prompts:

* offline, teacher-forced (traces: every family, and the oracle bound);
* free-running in the real engine (the families the runtime runs: V7, probe, V7+probe), each token
  compared with the full model's greedy token on the prefix the policy wrote (HF forward);
* wall clock, paired: exits off and the policy alternate on the same prompts, fixed length, at
  batch 1 and batch 8; speedup = time(exits off) / time(policy), median over rounds.

Run (minutes on 2 shared cores; one thread avoids oversubscription):

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD nice -n 15 .venv/bin/python benchmarks/quality_probes.py

Writes ``benchmarks/results/quality_probes.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from sedac_ray.calibration.policies import oracle_frontier
from sedac_ray.calibration.probe_fit import (
    PROBE,
    V7_PROBE,
    cross_fitted_probe_scores,
    fit_trace_probes,
    probe_table,
)
from sedac_ray.calibration.prompts import load_prompts
from sedac_ray.calibration.sweep import CALM, V6, V7, build_settings, policy_from_setting, sweep
from sedac_ray.calibration.traces import encode_prompts, record_traces
from sedac_ray.calibration.validate import free_running
from sedac_ray.engine import Engine
from sedac_ray.model.loading import load_model
from sedac_ray.policy import ExitPolicy
from sedac_ray.sampling import SamplingParams

RUNTIME_FAMILIES = (V7, PROBE, V7_PROBE)


def paired_times(arms: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds of each arm per round, the arms run back to back; the order rotates every round so
    a change in machine load falls on every arm alike."""
    names = list(arms)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            arms[name]()
            times[name].append(time.perf_counter() - start)
    return times


def wall_clock(
    engine: Engine, prompts: list[list[int]], policy: ExitPolicy, batch: int, tokens: int, rounds: int
):
    """Paired timing: per round, exits off then the policy (then swapped order next round)."""
    group = prompts[:batch]

    def run(which: ExitPolicy) -> Callable[[], object]:
        return lambda: engine.generate_ids(group, tokens, SamplingParams(), [], which, ignore_eos=True)

    times = paired_times({"off": run(ExitPolicy.disabled()), "policy": run(policy)}, rounds)
    ratios = [off / on for off, on in zip(times["off"], times["policy"], strict=True)]
    return {
        "batch": batch,
        "tokens": tokens,
        "rounds": rounds,
        "speedup_median": statistics.median(ratios),
        "speedups": ratios,
        "off_s_median": statistics.median(times["off"]),
        "policy_s_median": statistics.median(times["policy"]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.95, 0.99])
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3, help="paired wall-clock rounds (0 skips timing)")
    parser.add_argument("--timing-tokens", type=int, default=32)
    parser.add_argument("--out", default="benchmarks/results/quality_probes.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    clock = time.perf_counter()
    loaded = load_model()
    calibration = record_traces(loaded, load_prompts("calibration"), args.max_new_tokens, cache=True)
    heldout = record_traces(loaded, load_prompts("heldout"), args.max_new_tokens, cache=True)
    settings = build_settings(calibration, families={V7, V6, CALM})
    cal_tables = {"plain": sweep(calibration, settings, progress=False)}
    held_table = sweep(heldout, settings, progress=False)
    scores, _ = cross_fitted_probe_scores(calibration)
    cal_probe = probe_table(calibration, scores)
    probes = fit_trace_probes(calibration)
    held_probe = probe_table(heldout, probes.scores(heldout.hidden))
    engine = Engine(loaded, ExitPolicy.disabled(), probes=probes)
    held_prompts = encode_prompts(engine, load_prompts("heldout"))
    frontier = oracle_frontier(heldout.readout, heldout.reference)
    rows = []
    for target in args.targets:
        for family in (V7, PROBE, V7_PROBE, V6, CALM):
            cal_table, held = (
                (cal_probe, held_probe) if family in (PROBE, V7_PROBE) else (cal_tables["plain"], held_table)
            )
            pick = cal_table.best_at(family, target)
            row = {"target": target, "family": family}
            if pick is None:
                rows.append({**row, "setting": None, "note": "no setting reaches the target on calibration"})
                continue
            twin = held.family(family)[cal_table.family(family).index(pick)]
            row.update(
                setting=pick.setting,
                calibration_offline={"agreement": pick.agreement, "layers_saved": pick.layers_saved},
                heldout_offline={"agreement": twin.agreement, "layers_saved": twin.layers_saved},
            )
            if family in RUNTIME_FAMILIES:
                policy = policy_from_setting(pick.setting)
                result = free_running(
                    loaded, held_prompts, policy, args.max_new_tokens, probes=probes, progress=False
                )
                row["heldout_free_running"] = result.to_dict()
                if args.rounds and result.layers_saved > 0:
                    row["wall_clock"] = [
                        wall_clock(engine, held_prompts, policy, batch, args.timing_tokens, args.rounds)
                        for batch in (1, 8)
                    ]
            rows.append(row)
            print(json.dumps(row), flush=True)
        rows.append(
            {
                "target": target,
                "family": "oracle",
                "heldout_offline": {
                    "agreement": target,
                    "layers_saved": 1 - frontier.mean_layers_at(target) / heldout.num_layers,
                },
            }
        )
    fields = {"tokens": {"calibration": len(calibration), "heldout": len(heldout)}, "rows": rows}
    write_result(args.out, __doc__, loaded, clock, fields)
    return 0


def write_result(path: str, method: str, loaded, clock: float, fields: dict) -> None:
    """A result file: what was measured, on which model and machine, and how long it took."""
    result = {
        "method": method,
        "model": loaded.name,
        "dtype": str(loaded.model.dtype),
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
        **fields,
        "seconds": round(time.perf_counter() - clock, 1),
    }
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    raise SystemExit(main())
