"""The exit rule on hand-made stabilities, and its validation."""

import math

import pytest
import torch

from sedac_ray.policy import DEFAULT_POLICY, ExitPolicy, decide


def exits_for(policy: ExitPolicy, stabilities: list[float]) -> int:
    """Exit layer for one token; ``stabilities[l-1]`` is s_l (entry 0 unused)."""
    return int(policy.exit_layers(torch.tensor([stabilities]))[0])


def test_patience_counts_consecutive_stable_layers_from_layer_two():
    nan = math.nan
    # s_2..s_4 > tau -> c_4 = 3 -> exit after layer 4.
    assert exits_for(ExitPolicy(0.9, k=3), [nan, 0.95, 0.95, 0.95, 0.1, 0.1, 0.1, 0.1]) == 4
    # A dip resets the counter: stable at 2,3, unstable 4, stable 5,6,7 -> exit at 7.
    assert exits_for(ExitPolicy(0.9, k=3), [nan, 0.95, 0.95, 0.5, 0.95, 0.95, 0.95, 0.1]) == 7
    # Strictly greater than tau.
    assert exits_for(ExitPolicy(0.9, k=1), [nan, 0.9, 0.9, 0.91, 0.0]) == 4


def test_no_exit_runs_all_layers_and_min_layer_defers_exit():
    nan = math.nan
    assert exits_for(ExitPolicy(0.99, k=3), [nan] + [0.5] * 7) == 8
    assert exits_for(ExitPolicy(0.9, k=2, min_layer=6), [nan] + [0.95] * 7) == 6
    assert exits_for(ExitPolicy.disabled(), [nan] + [1.0] * 7) == 8


def test_window_rule_counts_k_of_last_n():
    nan = math.nan
    # 2 of the last 3 stable: s_2 stable, s_3 not, s_4 stable -> exit at 4.
    assert exits_for(ExitPolicy(0.9, k=2, window=3), [nan, 0.95, 0.5, 0.95, 0.5, 0.5]) == 4
    # Patience with K=2 would need two in a row and wait.
    assert exits_for(ExitPolicy(0.9, k=2), [nan, 0.95, 0.5, 0.95, 0.5, 0.5, 0.95, 0.95, 0.5]) == 8
    # The window forgets: stable at 2 only, then 3 unstable layers -> never 2 in a window of 2.
    assert exits_for(ExitPolicy(0.9, k=2, window=2), [nan, 0.95, 0.5, 0.95, 0.5, 0.95]) == 6


def test_mixed_rules_in_one_batch_equal_each_rule_alone():
    torch.manual_seed(0)
    stabilities = torch.rand(6, 12) * 0.2 + 0.8
    policies = [
        ExitPolicy(0.85, k=2),
        ExitPolicy.disabled(),
        ExitPolicy(0.82, k=3, window=5, min_layer=6),
    ] * 2
    rules = torch.cat([p.rules(1) for p in policies])
    state = torch.zeros(6, dtype=torch.long)
    first_exit = torch.full((6,), 12)
    for layer in range(2, 13):
        state, exits = decide(layer, stabilities[:, layer - 1], state, rules)
        first_exit = torch.where(exits & (first_exit == 12), torch.tensor(layer), first_exit)
    for row, policy in enumerate(policies):
        assert first_exit[row] == policy.exit_layers(stabilities[row : row + 1])[0]
    assert first_exit[1] == 12 and (first_exit[[0, 2]] < 12).all()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(tau=0.0), "tau"),
        (dict(tau=1.5), "tau"),
        (dict(tau=-0.1), "tau"),
        (dict(tau=math.nan), "tau"),
        (dict(tau=0.9, k=0), "k"),
        (dict(tau=0.9, min_layer=0), "min_layer"),
        (dict(tau=0.9, k=4, window=3), "k"),
    ],
)
def test_invalid_values_name_the_field_and_range(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field} must"):
        ExitPolicy(**kwargs)


def test_min_layer_checked_against_depth():
    with pytest.raises(ValueError, match=r"min_layer must be in 1\.\.30"):
        ExitPolicy(0.9, min_layer=31).validate_for(30)
    assert ExitPolicy(0.9, min_layer=30).validate_for(30).min_layer == 30


def test_overrides_and_default():
    # Uncalibrated, nothing exits: an uncalibrated rule damaged text on the default model.
    assert not DEFAULT_POLICY.enabled
    assert DEFAULT_POLICY.exit_layers(torch.ones(3, 8)).tolist() == [8, 8, 8]
    assert not ExitPolicy(0.9).with_overrides(disable=True).enabled
    assert DEFAULT_POLICY.with_overrides(tau=0.95) == ExitPolicy(0.95, k=3)
    assert DEFAULT_POLICY.with_overrides() == DEFAULT_POLICY
    with pytest.raises(ValueError, match="set tau"):
        DEFAULT_POLICY.with_overrides(k=2)
    assert ExitPolicy(0.97, k=4).with_overrides(k=2) == ExitPolicy(0.97, k=2)
    assert DEFAULT_POLICY.with_overrides(probe=0.9) == ExitPolicy(tau=None, probe=0.9)


def reference_exit(policy: ExitPolicy, stabilities: list[float], scores: list[float]) -> int:
    """The documented rule, written out independently: patience on s_l > tau (every layer counts
    as stable without tau), AND score >= probe where a probe is set, from min_layer on."""
    num_layers, count = len(stabilities), 0
    for layer in range(2, num_layers):
        stable = policy.tau is None or stabilities[layer - 1] > policy.tau
        count = count + 1 if stable else 0
        probe_ok = policy.probe is None or scores[layer - 1] >= policy.probe
        if count >= (1 if policy.tau is None else policy.k) and layer >= (policy.min_layer or 1) and probe_ok:
            return layer
    return num_layers


@pytest.mark.parametrize(
    "policy",
    [
        ExitPolicy(tau=None, probe=0.7),
        ExitPolicy(tau=None, probe=0.5, min_layer=5),
        ExitPolicy(0.85, k=2, probe=0.6),
        ExitPolicy(0.85, k=2),
    ],
)
def test_probe_gate_matches_the_rule_written_out(policy):
    generator = torch.Generator().manual_seed(1)
    stabilities = torch.rand(40, 10, generator=generator) * 0.2 + 0.8
    scores = torch.rand(40, 10, generator=generator)
    layers = policy.exit_layers(stabilities, scores)
    # The last layer never "exits" early: rows run to 10 there (the runtime's rule too).
    expected = [
        reference_exit(policy, s.tolist(), p.tolist()) for s, p in zip(stabilities, scores, strict=True)
    ]
    assert layers.tolist() == expected
    assert 2 < sum(x < 10 for x in expected) < 40  # the case is not trivial


def test_probe_rules_need_scores_and_a_disabled_row_ignores_its_probe():
    rules = torch.cat([ExitPolicy(tau=None, probe=0.5).rules(1), ExitPolicy.disabled().rules(1)])
    with pytest.raises(ValueError, match="probe"):
        decide(2, torch.ones(2), torch.zeros(2, dtype=torch.long), rules)
    rules[0, 0] = math.inf  # how a stage switches a row off: column 0 alone
    _, exits = decide(2, torch.ones(2), torch.zeros(2, dtype=torch.long), rules, torch.ones(2))
    assert not exits.any()
    with pytest.raises(ValueError, match="probe must"):
        ExitPolicy(tau=None, probe=1.0)
    with pytest.raises(ValueError, match="tau may be None only"):
        ExitPolicy(tau=None)
