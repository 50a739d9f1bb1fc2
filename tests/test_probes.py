"""Exit probes: the fit against an independent solver, the score against a hand computation from
recorded features, and the runtime's probe gate against HF's own hidden states."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sedac_ray import Engine, ExitPolicy
from sedac_ray.exit.probes import ExitProbes, _logistic, fit_probes, probe_features
from tests.conftest import tiny_model


def newton_logistic(features: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, float]:
    """Independent solver: Newton's method (IRLS) in numpy on the same objective, mean binary
    cross-entropy on standardised features + l2 * |w|^2 (bias not penalised)."""
    mean, std = features.mean(0), features.std(0, ddof=1)
    z = np.hstack([(features - mean) / std, np.ones((len(y), 1))])
    theta = np.zeros(z.shape[1])
    penalty = np.full(z.shape[1], 2 * l2)
    penalty[-1] = 0.0
    for _ in range(50):
        p = 1 / (1 + np.exp(-z @ theta))
        gradient = z.T @ (p - y) / len(y) + penalty * theta
        hessian = (z * (p * (1 - p))[:, None]).T @ z / len(y) + np.diag(penalty)
        theta -= np.linalg.solve(hessian, gradient)
    w = theta[:-1] / std
    return w, float(theta[-1] - (theta[:-1] * mean / std).sum())


def test_logistic_fit_matches_an_independent_newton_solver():
    generator = np.random.default_rng(0)
    features = generator.normal(size=(600, 5)) * [1.0, 3.0, 0.2, 1.0, 5.0] + [0.0, 1.0, -2.0, 0.0, 3.0]
    truth = np.array([1.5, -0.4, 4.0, 0.0, 0.3])
    y = (generator.random(600) < 1 / (1 + np.exp(-(features @ truth - 1.0)))).astype(float)
    w, b = _logistic(torch.tensor(features), torch.tensor(y), l2=1e-2, steps=200)
    w_ref, b_ref = newton_logistic(features, y, l2=1e-2)
    np.testing.assert_allclose(w.numpy(), w_ref, rtol=1e-3, atol=1e-4)
    assert b == pytest.approx(b_ref, abs=1e-3)


def recorded(tokens: int = 300, layers: int = 6, width: int = 16, seed: int = 0):
    """Hidden states that drift towards a fixed direction; the label says whether a token has
    settled (its last update is small), so it is learnable from the update-size feature."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.cumsum(torch.randn(tokens, layers, width, generator=generator), dim=1)
    hidden[:, 3:] += torch.randn(tokens, 1, width, generator=generator) * 8 * (torch.rand(tokens, 1, 1) > 0.5)
    update = (hidden[:, 1:] - hidden[:, :-1]).norm(dim=-1) / hidden[:, 1:].norm(dim=-1)
    labels = torch.zeros(tokens, layers, dtype=torch.bool)
    labels[:, 1:] = update < update.median()
    return hidden, labels


def test_probe_scores_equal_a_hand_computation_from_the_recorded_features():
    hidden, labels = recorded()
    probes = fit_probes(hidden, labels)
    scores = probes.scores(hidden)
    h = hidden.double().numpy()
    for layer in range(2, hidden.shape[1]):  # probes exist for layers 2..L-1
        now, before = h[:, layer - 1], h[:, layer - 2]
        x = now / np.sqrt((now**2).mean(-1, keepdims=True) + 1e-6)
        cos = (now * before).sum(-1) / (np.linalg.norm(now, axis=-1) * np.linalg.norm(before, axis=-1))
        update = np.log(np.linalg.norm(now - before, axis=-1) / (np.linalg.norm(now, axis=-1) + 1e-6) + 1e-6)
        logit = (
            x @ probes.weight[layer - 1].double().numpy()
            + cos * float(probes.extra[layer - 1, 0])
            + update * float(probes.extra[layer - 1, 1])
            + float(probes.bias[layer - 1])
        )
        np.testing.assert_allclose(scores[:, layer - 1].numpy(), 1 / (1 + np.exp(-logit)), atol=1e-5)
        # and the probe learned something: it ranks settled tokens above unsettled ones
        positive, negative = scores[labels[:, layer - 1], layer - 1], scores[~labels[:, layer - 1], layer - 1]
        assert positive.mean() > negative.mean() + 0.2
    assert (scores[:, 0] == 0).all() and (scores[:, -1] == 0).all()  # no probe: never passes a gate


def test_probes_save_load_round_trip_and_reject_other_files(tmp_path):
    hidden, labels = recorded()
    probes = fit_probes(hidden, labels, layers=[3, 4])
    path = probes.save(tmp_path / "m.float32.probes.safetensors", metadata={"model": "m"})
    again = ExitProbes.load(path)
    assert torch.equal(again.scores(hidden), probes.scores(hidden))
    assert again.fitted.tolist() == [False, False, True, True, False, False]
    with pytest.raises(FileNotFoundError, match="sedac calibrate"):
        ExitProbes.load(tmp_path / "missing.safetensors")


def test_features_are_the_documented_ones():
    h, p = torch.randn(4, 8), torch.randn(4, 8)
    x, extra = probe_features(h, p)
    assert torch.allclose(x.pow(2).mean(-1), torch.ones(4), atol=1e-4)
    assert torch.allclose(extra[:, 0], F.cosine_similarity(h, p, dim=-1))
    assert torch.allclose(extra[:, 1], ((h - p).norm(dim=-1) / h.norm(dim=-1)).log(), atol=1e-4)


def hf_layer_outputs(model, ids: list[int]) -> torch.Tensor:
    """Raw outputs h_0..h_L of the last position, from HF's own forward (a hook for layer L)."""
    layers = model.get_decoder().layers
    captured = {}
    handle = layers[-1].register_forward_hook(lambda m, a, out: captured.update(last=out))
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    handle.remove()
    return torch.stack([h[0, -1] for h in out.hidden_states[:-1]] + [captured["last"][0, -1]])


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_engine_probe_gate_equals_the_rule_on_hf_hidden_states(arch, smollm2):
    loaded = tiny_model(arch, smollm2.tokenizer)
    num_layers = loaded.model.config.num_hidden_layers
    width = loaded.model.config.hidden_size
    generator = torch.Generator().manual_seed(3)
    probes = ExitProbes(
        torch.randn(num_layers, width, generator=generator) * 0.3,
        torch.randn(num_layers, 2, generator=generator),
        torch.randn(num_layers, generator=generator),
        torch.ones(num_layers, dtype=torch.bool),
    )
    engine = Engine(loaded, ExitPolicy.disabled(), probes=probes)
    exited = 0
    for policy in [ExitPolicy(tau=None, probe=0.6), ExitPolicy(tau=None, probe=0.4, min_layer=4)]:
        result = engine.generate("Hello there, how are", max_new_tokens=2, policy=policy)[0]
        raw = hf_layer_outputs(loaded.model, result.prompt_token_ids + result.token_ids[:1])
        expected = num_layers
        for layer in range(max(2, policy.min_layer or 1), num_layers):
            x = raw[layer] / raw[layer].pow(2).mean().add(1e-6).sqrt()
            cos = F.cosine_similarity(raw[layer], raw[layer - 1], dim=0)
            update = ((raw[layer] - raw[layer - 1]).norm() / (raw[layer].norm() + 1e-6) + 1e-6).log()
            logit = x @ probes.weight[layer - 1] + cos * probes.extra[layer - 1, 0]
            logit = logit + update * probes.extra[layer - 1, 1] + probes.bias[layer - 1]
            if torch.sigmoid(logit) >= policy.probe:
                expected = layer
                break
        assert result.exit_layers[1] == expected, policy
        exited += expected < num_layers
    assert exited >= 1  # a real exit was compared, not only full depth
    with pytest.raises(ValueError, match="probe"):
        Engine(loaded, ExitPolicy(tau=None, probe=0.5))  # no probes for it anywhere
