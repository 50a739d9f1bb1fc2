"""The pipeline simulator calibrated with this project's measured CPU numbers, and checked on them.

Calibration inputs, from the committed benchmark results:

* compute costs: the cost probe of ``benchmarks/speculative_speed.py`` (one decoder layer, the LM
  head and a K/V fill at 1..8 rows), at the engine's torch threads for the engine, and at 1 thread
  for the pipeline (Ray gives each 0.1-CPU replica one thread);
* ``hop_ms``: from the 3-stage pipeline's time per token at one stream, exits off
  (``benchmarks/pipeline_speed.py``);
* ``token_cpu_ms`` (front-door and proxy work per streamed token, on the same 2 cores): from the
  same pipeline's throughput at 16 streams, exits off. Hops are taken to be CPU work there
  (``PIPELINE_HOP_CPU_SHARE``, an assumption).

Everything else is a prediction set against a measurement: the engine's decode step with and
without exits at batch 1 and 8, and the pipeline's time per token and throughput with exits, at 1
and 16 streams. Exit layers are the ones the engine measured for the same policy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sedac_ray.sim.pipeline import Cost, Costs, Pipeline, Workload, simulate

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
PIPELINE_STAGES = 3  # benchmarks/pipeline_speed.py serves 3 stages
PIPELINE_CORES = 2  # on the 2-core development machine
PIPELINE_STEPS_IN_FLIGHT = 1  # the front door's merged step messages in flight (deployments/local.yaml)
# Assumed: on the 2-core box a hop between replicas is CPU work (pickling, the RPC stack, asyncio),
# not wire time; an idle-machine hop measured about 3.5 ms (DESIGN §6), pure work.
PIPELINE_HOP_CPU_SHARE = 1.0
TOLERANCE = 0.25


@dataclass
class Figure:
    name: str
    measured: float
    predicted: float
    role: str  # "calibration" (fitted to it) or "prediction"

    @property
    def error(self) -> float:
        return self.predicted / self.measured - 1

    def as_dict(self) -> dict:
        return {**self.__dict__, "error": self.error}


def fit(samples: dict) -> Cost:
    """A cost through measured ``{rows: ms}``: the samples themselves (made non-decreasing, since a
    bigger batch never costs less and the small differences are noise), extended past the last by
    the least-squares slope."""
    points = sorted((int(rows), float(ms)) for rows, ms in samples.items())
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    slope = max(0.0, sum((x - mean_x) * (y - mean_y) for x, y in points) / spread) if spread else 0.0
    monotone, highest = [], 0.0
    for rows, ms in points:
        highest = max(highest, ms)
        monotone.append((rows, highest))
    return Cost(one_row_ms=monotone[0][1], extra_row_ms=slope, samples=tuple(monotone))


def probe_costs(
    probe: dict, threads: int, hop_ms: float = 0.0, hop_cpu_share: float = 0.0, token_cpu_ms: float = 0.0
) -> Costs:
    entry = probe[f"threads_{threads}"]
    return Costs(
        layer=fit(entry["layer_ms"]),
        head=fit(entry["head_ms"]),
        fill=fit(entry["fill_ms"]),
        hop_ms=hop_ms,
        hop_cpu_share=hop_cpu_share,
        token_cpu_ms=token_cpu_ms,
    )


def engine_model(num_layers: int, costs: Costs) -> Pipeline:
    """The single-process engine: one range over every layer, the head in the same step, no hops."""
    return Pipeline(num_layers, 1, costs, shared_slots=1, fused_head=True)


def cpu_pipeline(num_layers: int, costs: Costs) -> Pipeline:
    return Pipeline(
        num_layers,
        PIPELINE_STAGES,
        costs,
        shared_slots=PIPELINE_CORES,
        front_door_in_flight=PIPELINE_STEPS_IN_FLIGHT,
    )


def pipeline_workload(
    speculative: dict, concurrency: int, tokens: int, hop_ms: float, exit_layers: list[int] = ()
) -> Workload:
    """Requests as the pipeline benchmark sends them: all at once, but stage 0 prefills one
    sequence at a time, so they start decoding one prefill (the engine's, measured, plus the
    hops of its trip) apart."""
    prefill_ms = 1000 * next(
        r["prefill_s"] for r in speculative["rows"] if r["mode"] == "no exit" and r["batch"] == 1
    )
    stagger = concurrency * (prefill_ms + (PIPELINE_STAGES + 2) * hop_ms)
    return Workload(concurrency, tokens, exit_layers=list(exit_layers), stagger_ms=stagger)


def load(results: Path = RESULTS) -> tuple[dict, dict]:
    speculative = json.loads((results / "speculative_speed.json").read_text())
    pipeline = json.loads((results / "pipeline_speed.json").read_text())
    return speculative, pipeline


def calibrated_pipeline(speculative: dict, pipeline: dict) -> tuple[Pipeline, list[Figure]]:
    """The CPU pipeline with ``hop_ms`` and ``token_cpu_ms`` fitted; returns it and the two fits."""
    num_layers = speculative["num_layers"]
    rows = {(r["policy"], r["concurrency"]): r for r in pipeline["rows"]}
    tokens = pipeline["max_tokens"]
    single, many = rows[("no exit", 1)], rows[("no exit", 16)]

    def run(hop_ms: float, token_cpu_ms: float, concurrency: int):
        costs = probe_costs(speculative["cost_probe"], 1, hop_ms, PIPELINE_HOP_CPU_SHARE, token_cpu_ms)
        workload = pipeline_workload(speculative, concurrency, tokens, hop_ms)
        return simulate(cpu_pipeline(num_layers, costs), workload, "no_exit")

    hop_ms = token_cpu_ms = 0.0
    for _ in range(3):  # each fit barely moves the other's figure: alternate until both settle
        # At one stream (cores mostly idle) the time per token is about linear in the hop time.
        base, probe = run(0.0, token_cpu_ms, 1).tpot_ms, run(10.0, token_cpu_ms, 1).tpot_ms
        hop_ms = max(0.0, (single["pipeline_tpot_ms"] - base) * 10.0 / (probe - base))
        # Throughput at 16 streams falls as each token costs the 2 cores more: bisect.
        low, high = 0.0, 100.0
        for _ in range(25):
            middle = (low + high) / 2
            if run(hop_ms, middle, 16).tokens_per_s > many["pipeline_tokens_per_s"]:
                low = middle
            else:
                high = middle
        token_cpu_ms = (low + high) / 2
    costs = probe_costs(speculative["cost_probe"], 1, hop_ms, PIPELINE_HOP_CPU_SHARE, token_cpu_ms)
    model = cpu_pipeline(num_layers, costs)
    fits = [
        Figure(
            "pipeline, no exit, 1 stream: ms per token",
            single["pipeline_tpot_ms"],
            simulate(model, pipeline_workload(speculative, 1, tokens, hop_ms), "no_exit").tpot_ms,
            "calibration",
        ),
        Figure(
            "pipeline, no exit, 16 streams: tokens/s",
            many["pipeline_tokens_per_s"],
            simulate(model, pipeline_workload(speculative, 16, tokens, hop_ms), "no_exit").tokens_per_s,
            "calibration",
        ),
    ]
    return model, fits


def figures(results: Path = RESULTS) -> tuple[list[Figure], dict]:
    """Every calibration fit and every prediction next to its measurement, plus the fitted values."""
    speculative, pipeline = load(results)
    num_layers = speculative["num_layers"]
    engine = engine_model(num_layers, probe_costs(speculative["cost_probe"], speculative["torch_threads"]))
    out: list[Figure] = []
    exit_layers: dict[tuple[str, int], list[int]] = {}
    for row in speculative["rows"]:
        if row["system"] != "engine" or row["mode"] == "speculative":
            continue  # the engine's speculative mode verifies in chunks: not what the pipeline does
        layers = [x for per_sequence in row["exit_layers"] for x in per_sequence]
        exit_layers[(row["policy"], row["batch"])] = layers
        mode = "no_exit" if row["mode"] == "no exit" else "early_exit"
        workload = Workload(row["batch"], speculative["new_tokens"] - 1, exit_layers=layers)
        label = row["mode"] if row["policy"] == "-" else f"{row['mode']}, {row['policy']}"
        out.append(
            Figure(
                f"engine, {label}, batch {row['batch']}: ms per decode step",
                row["decode_step_ms"],
                simulate(engine, workload, mode).tpot_ms,
                "prediction",
            )
        )

    model, fits = calibrated_pipeline(speculative, pipeline)
    out += fits
    tokens = pipeline["max_tokens"]
    for row in pipeline["rows"]:
        exits = row["policy"] != "no exit"
        layers = exit_layers.get((row["policy"], max(b for _, b in exit_layers)), []) if exits else []
        if exits and not layers:
            continue  # no engine measurement of this policy's exit layers
        result = simulate(
            model,
            pipeline_workload(speculative, row["concurrency"], tokens, model.costs.hop_ms, layers),
            "early_exit" if exits else "no_exit",
        )
        streams = f"{row['concurrency']} stream{'s' if row['concurrency'] > 1 else ''}"
        if exits or row["concurrency"] > 1:
            out.append(
                Figure(
                    f"pipeline, {row['policy']}, {streams}: ms per token",
                    row["pipeline_tpot_ms"],
                    result.tpot_ms,
                    "prediction",
                )
            )
        if exits and row["concurrency"] > 1:
            out.append(
                Figure(
                    f"pipeline, {row['policy']}, {streams}: tokens/s",
                    row["pipeline_tokens_per_s"],
                    result.tokens_per_s,
                    "prediction",
                )
            )
    fitted = {
        "engine_costs": engine.costs,
        "pipeline_costs": model.costs,
        "hop_ms": model.costs.hop_ms,
        "token_cpu_ms": model.costs.token_cpu_ms,
    }
    return out, fitted
