"""The pipeline simulator: exact cases by hand, the speculative mode's mechanics, and its
calibration recovering known parameters from synthetic measurements (no committed data read)."""

import json

import pytest

from sedac_ray.sim.calibration import (
    INPUTS,
    PIPELINE_HOP_CPU_SHARE,
    RESULTS,
    benchmark_requests,
    calibrated_pipeline,
    cpu_pipeline,
    fit,
    probe_costs,
)
from sedac_ray.sim.pipeline import Cost, Costs, Pipeline, Workload, simulate
from sedac_ray.sim.scenarios import SCENARIOS, assumed_exit_layers, predict

COSTS = Costs(layer=Cost(2.0, 0.2), head=Cost(10.0, 1.0), fill=Cost(0.5, 0.05), hop_ms=5.0)


def test_cost_fit_keeps_the_samples_made_monotone_and_extends_by_the_slope():
    linear = fit({"1": 2.0, "2": 2.2, "4": 2.6, "8": 3.4})  # 2 ms + 0.2 ms per extra row, exactly
    assert linear.one_row_ms == 2.0 and linear.extra_row_ms == pytest.approx(0.2)
    noisy = fit({1: 3.0, 2: 2.8, 4: 3.5})  # a bigger batch never costs less: 2 rows is held at 3.0
    assert noisy.samples == ((1, 3.0), (2, 3.0), (4, 3.5))
    assert fit({1: 5.0, 2: 4.0}).extra_row_ms == 0.0  # a falling fit is noise, not a negative cost


def _synthetic_measurements(hop_ms: float, token_cpu_ms: float, max_tokens: int = 25) -> tuple[dict, dict]:
    """Benchmark JSON as the benchmarks write it, with figures made by the simulator itself from
    known ``hop_ms`` and ``token_cpu_ms``: the calibration must find those two back. Requests need
    some length: at 8 tokens the 16-stream throughput hardly depends on ``token_cpu_ms``."""
    per_rows = {"1": 1.0, "2": 1.1, "4": 1.3, "8": 1.7}
    speculative = {
        "num_layers": 12,
        "cost_probe": {
            "threads_1": {"layer_ms": per_rows, "head_ms": {k: 3 * v for k, v in per_rows.items()},
                          "fill_ms": {k: 0.3 * v for k, v in per_rows.items()}},
        },
        "rows": [{"system": "engine", "mode": "no exit", "batch": 1, "prefill_s": 0.02}],
    }
    costs = probe_costs(speculative["cost_probe"], 1, hop_ms, PIPELINE_HOP_CPU_SHARE, token_cpu_ms)
    model = cpu_pipeline(speculative["num_layers"], costs)
    measured = {}
    for concurrency in (1, 16):
        requests = benchmark_requests(speculative, [max_tokens - 1] * concurrency, hop_ms)
        result = simulate(model, requests.workload, "no_exit")
        measured[concurrency] = requests.measured_as_benchmarks_do(result)
    pipeline = {
        "max_tokens": max_tokens,
        "rows": [
            {"policy": "no exit", "concurrency": c, "pipeline_tpot_ms": tpot, "pipeline_tokens_per_s": rate}
            for c, (tpot, rate) in measured.items()
        ],
    }
    return speculative, pipeline


@pytest.mark.parametrize("hop_ms, token_cpu_ms", [(6.0, 3.0), (2.0, 8.0)])
def test_calibration_recovers_known_hop_and_token_costs(hop_ms, token_cpu_ms):
    speculative, pipeline = _synthetic_measurements(hop_ms, token_cpu_ms)
    model, fits = calibrated_pipeline(speculative, pipeline)
    assert model.costs.hop_ms == pytest.approx(hop_ms, rel=0.02)
    assert model.costs.token_cpu_ms == pytest.approx(token_cpu_ms, rel=0.02)
    for figure in fits:  # the fitted pipeline reproduces the two figures it was fitted to
        assert figure.role == "calibration" and abs(figure.error) < 0.01, figure


def test_one_stream_without_exits_is_compute_plus_hops():
    result = simulate(Pipeline(30, 3, COSTS), Workload(1, 20), "no_exit")
    assert result.tpot_ms == pytest.approx(30 * 2.0 + 10.0 + 5 * 5.0)  # FD, 3 stages, head, FD: 5 hops


def test_engine_model_steps_the_whole_batch_together():
    engine = Pipeline(30, 1, Costs(COSTS.layer, COSTS.head, COSTS.fill, 0.0), shared_slots=1, fused_head=True)
    result = simulate(engine, Workload(8, 20), "no_exit")
    assert result.mean_stage_batch_rows == [8.0]
    assert result.tpot_ms == pytest.approx(30 * (2.0 + 7 * 0.2) + 10.0 + 7 * 1.0)
    early = simulate(engine, Workload(1, 20, exit_layers=[10]), "early_exit")
    assert early.tpot_ms == pytest.approx(10 * 2.0 + 20 * 0.5 + 10.0)  # 10 layers, 20 fills, head


def test_speculative_overlaps_verification_with_the_next_token():
    pipeline = Pipeline(30, 3, COSTS)
    exits = Workload(1, 40, exit_layers=[8], acceptance=1.0)  # every draft leaves stage 0, all right
    none = simulate(pipeline, exits, "no_exit")
    early = simulate(pipeline, exits, "early_exit")
    spec = simulate(pipeline, exits, "speculative")
    assert spec.tpot_ms < 0.75 * none.tpot_ms
    # Close to early exit: the draft leaves stage 0 once its row has run the stage's last 2 layers.
    assert early.tpot_ms < spec.tpot_ms < 1.15 * early.tpot_ms
    assert spec.accepted == spec.drafts_verified == 40
    # Nothing exits: speculative is exactly no exit.
    never = Workload(1, 40, exit_layers=[30], acceptance=0.5)
    assert simulate(pipeline, never, "speculative").tpot_ms == pytest.approx(none.tpot_ms)


def test_drafts_from_the_draft_head_at_the_last_stage_take_the_head_off_the_path():
    """One stream, every token drafted at full depth and right: a token costs the same hops and
    layers, with the draft head instead of the full head on its path (the verification follows
    it, with the next reply). All wrong: each token also waits for its void step."""
    pipeline = Pipeline(30, 3, COSTS, draft_head=Cost(1.0))
    none = simulate(pipeline, Workload(1, 40), "no_exit")
    right = simulate(pipeline, Workload(1, 40, acceptance=1.0, full_depth_drafts=1.0), "speculative")
    assert right.accepted == right.drafts_verified == 40
    # Head 10 ms, draft head 1 ms; the last draft's verification answers a poll: one 5 ms hop.
    assert right.tpot_ms == pytest.approx(none.tpot_ms - 10.0 + 1.0 + 5.0 / 40)
    wrong = simulate(pipeline, Workload(1, 40, acceptance=0.0, full_depth_drafts=1.0), "speculative")
    assert wrong.accepted == 0 and wrong.rows_wasted > 0 and wrong.tpot_ms > 1.5 * none.tpot_ms
    # Nothing passes the gate: the draft head is not even tried, so exactly no exit.
    gated = simulate(pipeline, Workload(1, 40, acceptance=1.0, full_depth_drafts=0.0), "speculative")
    assert gated.tpot_ms == pytest.approx(none.tpot_ms) and gated.drafts_verified == 0
    # Half pass: tried at one row (0.5 * 10 ms >= 1 ms), so about half the tokens spare the head.
    half = simulate(pipeline, Workload(1, 40, acceptance=1.0, full_depth_drafts=0.5, seed=3), "speculative")
    assert 0 < half.drafts_verified < 40 and right.tpot_ms < half.tpot_ms < none.tpot_ms + 1.0
    # No draft head: exactly no exit.
    plain = simulate(Pipeline(30, 3, COSTS), Workload(1, 40, full_depth_drafts=1.0), "speculative")
    assert plain.tpot_ms == pytest.approx(none.tpot_ms) and plain.drafts_verified == 0


def test_rejected_drafts_roll_back_and_waste_work():
    pipeline = Pipeline(30, 3, COSTS)
    good = simulate(pipeline, Workload(4, 200, exit_layers=[8, 30], acceptance=1.0, seed=1), "speculative")
    some = simulate(pipeline, Workload(4, 200, exit_layers=[8, 30], acceptance=0.6, seed=1), "speculative")
    bad = simulate(pipeline, Workload(4, 200, exit_layers=[8, 30], acceptance=0.0, seed=1), "speculative")
    assert some.accepted / some.drafts_verified == pytest.approx(0.6, abs=0.08)
    assert bad.accepted == 0 and bad.rows_wasted > some.rows_wasted > good.rows_wasted
    assert good.tpot_ms < some.tpot_ms < bad.tpot_ms
    none = simulate(pipeline, Workload(4, 200, seed=1), "no_exit")
    assert bad.tpot_ms >= 0.99 * none.tpot_ms  # all drafts wrong: never better than no exit


def test_gpu_scenarios_predict_all_three_modes():
    for scenario in SCENARIOS:
        exits = assumed_exit_layers(scenario.num_layers)
        assert len(exits) == 100 and max(exits) == scenario.num_layers and min(exits) >= 2
        result = predict(scenario, concurrency=2, acceptance=0.9, tokens=16)
        assert set(result) == {"no_exit", "early_exit", "speculative"}
        assert result["speculative"]["tpot_ms"] < result["no_exit"]["tpot_ms"]


def test_the_packaged_simulator_inputs_load():
    """The simulator is calibrated on a snapshot of two benchmark runs shipped as package data
    (not the latest results: the served pipeline has changed since), so it runs from a wheel."""
    for name in INPUTS:
        data = json.loads((RESULTS / name).read_text())
        assert data["rows"], name
