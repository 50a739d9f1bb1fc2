"""Calibration: the sweep applies the runtime's own rule, the pick is the sweep table's best, the
comparison policies behave as defined, and calibration files become the engine's and server's
default policy."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sedac_ray import Engine, ExitPolicy
from sedac_ray.calibration.calibrate import Checked, calibrate, choose, validate, write
from sedac_ray.calibration.policies import (
    checkpoint_exits,
    confidence_exits,
    oracle_frontier,
    stability_exits,
    stable_oracle_exits,
    v6_checkpoints,
)
from sedac_ray.calibration.prompts import load_prompts
from sedac_ray.calibration.sweep import CALM, ORACLE, V6, V7, WINDOW, SweepGrid, build_settings, sweep
from sedac_ray.calibration.traces import Readout, Traces, encode_prompts, record_traces
from sedac_ray.calibration.validate import TeacherForcedResult, free_running
from sedac_ray.cli import main
from sedac_ray.exit.store import (
    BUILTIN_SOURCE,
    Calibration,
    calibration_file_name,
    default_policy,
    load_calibration,
    model_name_for_spec,
)
from sedac_ray.policy import DEFAULT_POLICY
from sedac_ray.serve.config import PipelineConfig
from tests.conftest import tiny_model

SMALL_GRID = SweepGrid(
    taus=[0.9, 0.95, 0.97, 0.98, 0.99],
    ks=[1, 2, 3],
    min_layers=[1, 20],
    windows=[(2, 3)],
    window_min_layers=[1],
    v6_quantiles=[0.0, 0.1, 0.3, 0.6],
    calm_thresholds=[0.5, 0.9, 0.99],
    calm_min_layers=[1, 20],
)


def synthetic_traces(tokens: int = 400, num_layers: int = 12, seed: int = 0) -> Traces:
    """Random but structured traces: stabilities rise with depth, readouts settle on the reference."""
    generator = torch.Generator().manual_seed(seed)
    depth = torch.linspace(0.8, 0.999, num_layers)
    stabilities = (depth + 0.03 * torch.randn(tokens, num_layers, generator=generator)).clamp(max=1.0)
    stabilities[:, 0] = math.nan
    reference = torch.randint(0, 50, (tokens,), generator=generator)
    settle = torch.randint(1, num_layers + 1, (tokens,), generator=generator)
    noise = torch.randint(0, 50, (tokens, num_layers), generator=generator)
    layer = torch.arange(1, num_layers + 1)
    tokens_per_layer = torch.where(layer >= settle.unsqueeze(1), reference.unsqueeze(1), noise)
    tokens_per_layer[:, -1] = reference
    confidence = torch.rand(tokens, num_layers, generator=generator)
    entropy = torch.rand(tokens, num_layers, generator=generator) * 5
    return Traces(
        num_layers=num_layers,
        prompt_index=torch.arange(tokens) // 20,
        stabilities=stabilities,
        reference=reference,
        readout=Readout(tokens_per_layer, confidence, entropy),
    )


CALIBRATION_PROMPTS = [
    {"chat": True, "prompt": "Why is the sky blue?"},
    {"chat": False, "prompt": "The three primary colors are"},
    {"chat": True, "prompt": "Name three fruits."},
]
HELDOUT_PROMPTS = [
    {"chat": True, "prompt": "What is the capital of Italy?"},
    {"chat": False, "prompt": "Once upon a time"},
]


def _jsonl(items: list[dict]) -> str:
    return "".join(json.dumps(item) + "\n" for item in items)


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompts")
    calibration = folder / "calibration.jsonl"
    heldout = folder / "heldout.jsonl"
    calibration.write_text(_jsonl(CALIBRATION_PROMPTS))
    heldout.write_text(_jsonl(HELDOUT_PROMPTS))
    return {"calibration": str(calibration), "heldout": str(heldout)}


@pytest.fixture(scope="module")
def small_traces(smollm2, prompt_files):
    return record_traces(smollm2, load_prompts(prompt_files["calibration"]), max_new_tokens=12)


# ---- the policies, offline -----------------------------------------------------------------


def test_sweep_applies_the_runtime_rule_row_for_row():
    traces = synthetic_traces()
    policies = [ExitPolicy(0.95, k=2), ExitPolicy(0.97, k=3, min_layer=6), ExitPolicy(0.96, k=2, window=3)]
    together = stability_exits(traces.stabilities, policies)
    for policy, row in zip(policies, together, strict=True):
        assert torch.equal(row, policy.exit_layers(traces.stabilities))


def test_v6_exits_only_at_its_checkpoints():
    assert v6_checkpoints(30) == [7, 15, 22]
    traces = synthetic_traces(num_layers=30)
    table = sweep(traces, build_settings(traces, SMALL_GRID, families={V6}), progress=False)
    layers = table.exit_layers[V6]
    assert set(layers.unique().tolist()) <= {7, 15, 22, 30}
    assert set(layers.unique().tolist()) & {7, 15, 22}  # some tokens did exit early
    # By hand: exit at the first checkpoint whose entropy is below its threshold.
    entropy = torch.full((3, 30), 9.0)
    entropy[0, 6], entropy[1, 14], entropy[1, 21] = 0.1, 0.1, 0.1
    thresholds = torch.tensor([[1.0, 1.0, 1.0], [-math.inf, -math.inf, 1.0]])
    assert checkpoint_exits(entropy, [7, 15, 22], thresholds).tolist() == [[7, 15, 30], [30, 22, 30]]


def test_calm_exits_at_the_first_confident_layer_from_min_layer():
    confidence = torch.tensor([[0.1, 0.95, 0.2, 0.99, 0.1], [0.1, 0.1, 0.1, 0.1, 0.1]])
    assert confidence_exits(confidence, torch.tensor([0.9]), 1).tolist() == [[2, 5]]
    assert confidence_exits(confidence, torch.tensor([0.9, 0.98]), 3).tolist() == [[4, 5], [4, 5]]


def test_oracle_upper_bounds_every_policy_on_the_same_tokens(small_traces):
    for traces in (synthetic_traces(num_layers=30), small_traces):
        table = sweep(traces, build_settings(traces, SMALL_GRID), progress=False)
        frontier = oracle_frontier(traces.readout, traces.reference)
        assert frontier.agreement[-1] == 1.0  # some choice of layers reproduces every token
        checked = 0
        for row in table.rows:
            if row.family == ORACLE:
                continue
            assert frontier.mean_layers_at(row.agreement) <= row.mean_layers + 1e-6, row
            checked += 1
        assert checked > 50 and {V7, WINDOW, V6, CALM} <= {r.family for r in table.rows}
        # The stable oracle is a real choice of exit layers with agreement 1.
        stable = stable_oracle_exits(traces.readout, traces.reference)
        tokens = traces.readout.tokens.gather(1, stable.T - 1)[:, 0]
        assert torch.equal(tokens, traces.reference)
        assert frontier.mean_layers_at(1.0) <= stable.float().mean() + 1e-6


# ---- calibration picks what its table says --------------------------------------------------


def offline_check(row) -> TeacherForcedResult:
    """A 'runtime' that reproduces the offline numbers (no state-propagation loss)."""
    return TeacherForcedResult(0, row.agreement, row.mean_layers, row.layers_saved, [], [])


@pytest.mark.parametrize("target", [0.6, 0.8, 0.9, 0.97])
def test_calibration_picks_what_its_own_sweep_table_says_is_best(target):
    traces = synthetic_traces(num_layers=30)
    table = sweep(traces, build_settings(traces, SMALL_GRID, families={V7}), progress=False)
    best = max(
        (r for r in table.family(V7) if r.agreement >= target), key=lambda r: (r.layers_saved, r.agreement)
    )
    assert table.best_at(V7, target) == best
    choice = choose(table, target, offline_check)  # bisection along the front finds the same row
    assert choice.best.row == best

    # With a runtime that loses agreement, the pick is the best *checked* row that passes.
    def lossy(row) -> TeacherForcedResult:
        return TeacherForcedResult(0, row.agreement - 0.02, row.mean_layers, row.layers_saved, [], [])

    if best.agreement - 0.02 < target and all(r.agreement - 0.02 < target for r in table.pareto(V7)):
        return
    choice = choose(table, target, lossy)
    passing = [c for c in choice.checked if c.runtime.agreement >= target]
    assert choice.best in passing
    assert choice.best.runtime.layers_saved == max(c.runtime.layers_saved for c in passing)
    assert isinstance(choice.best, Checked)


def test_calibrate_end_to_end_writes_a_file_the_engine_and_server_use(
    smollm2, small_traces, prompt_files, tmp_path, monkeypatch
):
    run = calibrate(
        smollm2,
        target=0.9,
        prompts=prompt_files["calibration"],
        max_new_tokens=12,
        grid=SMALL_GRID,
        fit_adapters=False,
        validate_on=prompt_files["heldout"],
        traces=small_traces,
        progress=False,
        max_checks=2,
        min_layers_saved=0.0,  # the mechanics, not whether the savings pay (tested below)
    )
    path = write(run, tmp_path / calibration_file_name("smollm2-135m", torch.float32))
    loaded = load_calibration(path)
    assert loaded.dtype == "float32" and loaded.target_agreement == 0.9
    assert loaded.details["checked"]  # the runtime checks are on record
    held = loaded.details["validation"]["engine_free_running"]
    if loaded.policy.enabled:  # shipped only if it held the target free-running, on both prompt sets
        assert loaded.policy == run.choice.policy and loaded.agreement >= 0.9 and held["agreement"] >= 0.9
    else:
        assert held["agreement"] < 0.9 and "free-running" in loaded.reason

    monkeypatch.setenv("SEDAC_CALIBRATION_DIR", str(tmp_path))
    engine = Engine(smollm2)
    assert engine.policy == loaded.policy and str(path) in engine.policy_source
    assert Engine(smollm2, ExitPolicy(0.97, k=3)).policy == ExitPolicy(0.97, k=3)
    assert PipelineConfig.from_args({}).default_policy() == loaded.policy
    assert PipelineConfig.from_args({"exit": {"tau": 0.99, "k": 3}}).default_policy() == ExitPolicy(0.99, k=3)
    # keyed by dtype: the float32 file does not apply to bfloat16
    assert PipelineConfig.from_args({"dtype": "bfloat16"}).default_policy() == DEFAULT_POLICY


def write_calibration(folder, name: str, dtype: str, num_layers: int, policy: dict, **extra) -> None:
    (folder / calibration_file_name(name, dtype)).write_text(
        json.dumps(
            {
                "model": name,
                "num_layers": num_layers,
                "dtype": dtype,
                "target_agreement": 0.95,
                "policy": policy,
                "agreement": 0.95,
                "layers_saved": 0.1,
                **extra,
            }
        )
    )


def test_models_without_a_calibration_file_for_their_dtype_do_not_exit(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SEDAC_CALIBRATION_DIR", str(tmp_path))
    assert not DEFAULT_POLICY.enabled
    assert default_policy("no-such-model", 30, "float32") == (DEFAULT_POLICY, BUILTIN_SOURCE)
    write_calibration(tmp_path, "other", "float32", 12, {"tau": 0.9, "k": 2})
    assert default_policy("other", 30, "float32")[0] == DEFAULT_POLICY  # another depth: ignored
    assert default_policy("other", 12, torch.float32)[0] == ExitPolicy(0.9, k=2)
    with caplog.at_level("WARNING", logger="sedac_ray.calibration"):
        assert default_policy("other", 12, torch.bfloat16)[0] == DEFAULT_POLICY  # another dtype: ignored
    assert "other.float32.json" in caplog.text and "bfloat16" in caplog.text
    assert default_policy("other", 12)[0] == DEFAULT_POLICY  # dtype unknown: no file applies
    write_calibration(tmp_path, "refused", "float32", 12, {"disabled": True}, reason="missed 0.95")
    policy, source = default_policy("refused", 12, "float32")
    assert not policy.enabled and "missed 0.95" in source
    assert model_name_for_spec("smollm2-135m") == "smollm2-135m"
    assert model_name_for_spec(str(tmp_path)) == tmp_path.name


def test_free_running_check_agrees_with_itself_at_full_depth_and_not_when_exits_damage(smollm2):
    prompts = [smollm2.tokenizer("The three primary colors are")["input_ids"]]
    full = free_running(smollm2, prompts, ExitPolicy.disabled(), 12, progress=False)
    assert full.tokens == 11 and full.agreement == 1.0 and full.layers_saved == 0.0
    # The uncalibrated rule the configs used to ship: it exits, and the text it writes is wrong.
    damaged = free_running(smollm2, prompts, ExitPolicy(0.99, k=3), 12, progress=False)
    assert damaged.layers_saved > 0 and damaged.agreement < 0.95


def test_calibration_refuses_to_ship_a_policy_that_misses_its_target_on_held_out_prompts(
    smollm2, prompt_files
):
    def candidate(policy: ExitPolicy) -> Calibration:
        return Calibration("smollm2-135m", 30, policy, 0.95, agreement=0.96, layers_saved=0.2)

    aggressive = candidate(ExitPolicy(0.95, k=2))
    result = validate(smollm2, aggressive, None, None, prompt_files["heldout"], 10, progress=False)
    assert result["engine_free_running"]["agreement"] < 0.95
    assert not aggressive.policy.enabled and aggressive.layers_saved == 0.0
    assert "0.95" in aggressive.reason and "free-running" in aggressive.reason
    # a policy that holds its target is kept (min_layer 29: it can only exit one layer early)
    careful = candidate(ExitPolicy(0.999, k=6, min_layer=29))
    result = validate(smollm2, careful, None, None, prompt_files["heldout"], 10, progress=False)
    assert result["engine_free_running"]["agreement"] >= 0.95 and careful.policy.enabled


def test_calibration_without_a_reachable_target_ships_no_exit(smollm2, prompt_files, tmp_path):
    loaded = tiny_model("llama", smollm2.tokenizer)  # random weights: intermediate read-outs are noise
    grid = SweepGrid(taus=[0.5, 0.6], ks=[1], min_layers=[2])
    run = calibrate(
        loaded, 1.0, prompt_files["calibration"], 6, grid, validate_on=None, progress=False, cache=False
    )
    assert run.choice is None and not run.calibration.policy.enabled
    assert "no setting holds agreement 1" in run.calibration.reason
    assert not load_calibration(write(run, tmp_path / "t.float32.json")).policy.enabled


def test_cli_calibrate_then_generate_uses_the_file(prompt_files, tmp_path, monkeypatch, capsys):
    output = tmp_path / "smollm2-135m.float32.json"
    flags = [
        "--validate-on",
        "none",
        "--max-new-tokens",
        "8",
        "--target-agreement",
        "0.9",
        "--no-trace-cache",
    ]
    assert main(["calibrate", "--prompts", prompt_files["calibration"], *flags, "--output", str(output)]) == 0
    assert f"wrote {output}" in capsys.readouterr().out
    policy = load_calibration(output).policy
    monkeypatch.setenv("SEDAC_CALIBRATION_DIR", str(tmp_path))
    assert main(["generate", "--prompt", "Hi", "--max-new-tokens", "2", "--json"]) == 0
    printed = capsys.readouterr()
    assert f"calibration file {output}" in printed.err
    assert json.loads(printed.out)["policy"] == policy.describe()


def test_the_default_policy_holds_its_claimed_agreement_free_running_on_held_out_prompts(smollm2):
    """Runs code, not committed figures: the engine's default (the packaged calibration for this
    model and dtype, if any) generates on the held-out prompts, judged against HF's forward."""
    engine = Engine(smollm2)
    prompts = encode_prompts(engine, load_prompts("heldout"))
    result = free_running(smollm2, prompts, engine.policy, 40, progress=False)
    assert result.tokens > 1000
    if engine.policy.enabled:
        calibration = load_calibration(engine.policy_source.split("calibration file ")[1].split(" ")[0])
        assert result.agreement >= calibration.target_agreement
        assert result.layers_saved == pytest.approx(
            calibration.details["validation"]["engine_free_running"]["layers_saved"], abs=1e-9
        )
    else:
        assert result.agreement == 1.0


def test_a_pick_that_saves_too_little_ships_no_exit(smollm2, prompt_files, tmp_path):
    """A setting holds the target, but saves less than min_layers_saved: no exit, and why."""
    loaded = tiny_model("llama", smollm2.tokenizer)
    grid = SweepGrid(taus=[0.999999], ks=[3], min_layers=[2])  # holds any target: it almost never exits
    run = calibrate(
        loaded,
        0.5,
        prompt_files["calibration"],
        6,
        grid,
        validate_on=None,
        progress=False,
        cache=False,
        min_layers_saved=1.0,
    )
    calibration = load_calibration(write(run, tmp_path / "t.float32.json"))
    assert not calibration.policy.enabled and "saves" in calibration.reason
    assert calibration.details["best_candidate"]["layers_saved"] < 1.0
