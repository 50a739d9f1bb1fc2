"""Predictions for GPU pipelines, from stated assumptions (none of these numbers is a measurement).

Per-layer and head times are the bf16 weight bytes read per decode step over an effective H100
bandwidth of about 2.5 TB/s, plus kernel overheads, rounded up; extra rows cost little until the
batch is large (decode is memory-bound). The fill of an exited token projects Q/K/V only. A hop is
one Ray Serve message between GPU nodes. Exits: ``exit_share`` of the tokens exit, spread evenly
over ``exit_span`` of the depth; the rest run full depth. Acceptance is swept, since it depends
on the model and on the exit rule's calibration (on SmolLM2-135M it is low: see docs/performance.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from sedac_ray.sim.pipeline import MODES, Cost, Costs, Pipeline, Workload, simulate


@dataclass(frozen=True)
class Scenario:
    name: str
    num_layers: int
    stages: int
    layer: Cost
    head: Cost
    fill: Cost
    hop_ms: float = 1.0
    draft_limit: int = 4

    def pipeline(self, hop_ms: float | None = None) -> Pipeline:
        costs = Costs(self.layer, self.head, self.fill, self.hop_ms if hop_ms is None else hop_ms)
        return Pipeline(self.num_layers, self.stages, costs, draft_limit=self.draft_limit)

    def token_latency_ms(self) -> float:
        """One full-depth token at batch 1: every layer, the head, and stages + 2 hops."""
        return self.num_layers * self.layer(1) + self.head(1) + (self.stages + 2) * self.hop_ms


SCENARIOS = [
    # Llama-3-8B-like: 32 layers of ~0.44 GB bf16, a 1 GB head (128k vocabulary), 8 layers per GPU.
    Scenario("32 layers on 4 GPUs", 32, 4, Cost(0.25, 0.002), Cost(0.5, 0.002), Cost(0.05, 0.0005)),
    # Llama-3-70B-like: 80 layers of ~1.7 GB bf16, a 2.1 GB head, 10 layers per GPU.
    Scenario("80 layers on 8 GPUs", 80, 8, Cost(0.75, 0.005), Cost(0.9, 0.003), Cost(0.12, 0.001)),
]


def assumed_exit_layers(
    num_layers: int, exit_share: float = 0.7, exit_span: tuple[float, float] = (0.4, 0.7)
) -> list[int]:
    """A deterministic population of exit layers: ``exit_share`` of 100 tokens exit, spread evenly
    over ``exit_span`` of the depth; the rest run all layers."""
    exiting = round(100 * exit_share)
    low, high = (round(f * num_layers) for f in exit_span)
    layers = [low + round(i * (high - low) / max(1, exiting - 1)) for i in range(exiting)]
    return layers + [num_layers] * (100 - exiting)


def predict(
    scenario: Scenario,
    concurrency: int,
    acceptance: float,
    tokens: int = 64,
    hop_ms: float | None = None,
    seed: int = 0,
) -> dict[str, dict]:
    """Time per token and throughput of the three modes. Sequences start staggered over one
    token's latency, as independent requests would arrive."""
    pipeline = scenario.pipeline(hop_ms)
    workload = Workload(
        concurrency,
        tokens,
        exit_layers=assumed_exit_layers(scenario.num_layers),
        acceptance=acceptance,
        stagger_ms=scenario.token_latency_ms(),
        seed=seed,
    )
    return {mode: simulate(pipeline, workload, mode).as_dict() for mode in MODES}
