"""The pipeline simulator: exact cases by hand, the speculative mode's mechanics, and the measured
CPU figures (from the committed benchmark results) within 25%."""

import pytest

from sedac_ray.sim.calibration import KNOWN_MISSES, TOLERANCE, figures
from sedac_ray.sim.pipeline import Cost, Costs, Pipeline, Workload, simulate
from sedac_ray.sim.scenarios import SCENARIOS, assumed_exit_layers, predict

COSTS = Costs(layer=Cost(2.0, 0.2), head=Cost(10.0, 1.0), fill=Cost(0.5, 0.05), hop_ms=5.0)


def test_simulator_reproduces_the_measured_cpu_figures():
    checked, fitted = figures()
    predictions = [f.name for f in checked if f.role == "prediction"]
    assert sum(name.startswith("engine") for name in predictions) == 6  # 3 policies at batch 1 and 8
    # The served pipeline's speculative rows: tokens/s at batch 1 and 8, ms per token at batch 8.
    assert sum(name.startswith("pipeline, speculative") for name in predictions) == 6
    assert len(predictions) == 25  # and 4 from the pipeline benchmark, 9 more from the speculative one
    assert fitted["hop_ms"] > 0 and fitted["token_cpu_ms"] > 0
    for figure in checked:
        within = abs(figure.error) <= TOLERANCE
        if figure.name in KNOWN_MISSES and not within:  # documented, with the direction it misses in
            sign, _ = KNOWN_MISSES[figure.name]
            within = 0 < sign * figure.error <= 2 * TOLERANCE
        assert within, (figure.name, figure.measured, figure.predicted)
    assert len(KNOWN_MISSES) <= 1 and all(name in predictions for name in KNOWN_MISSES)


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
