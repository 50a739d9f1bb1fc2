"""The analysis hook: it records stability during HF's own generate and changes nothing."""

import torch
import torch.nn.functional as F

from sedac_ray import ExitPolicy, StabilityObserver


def test_observer_records_without_changing_outputs_and_detaches(smollm2):
    model, tokenizer = smollm2.model, smollm2.tokenizer
    ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    plain = model.generate(ids, max_new_tokens=6, do_sample=False)
    hooks_before = sum(len(layer._forward_hooks) for layer in model.get_decoder().layers)
    policy = ExitPolicy(0.97, k=3)
    with StabilityObserver(model, policy) as observer:
        watched = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(plain, watched)
    assert sum(len(layer._forward_hooks) for layer in model.get_decoder().layers) == hooks_before
    # One record for the prefill, then one per decode step; every layer from 2 has a stability.
    assert [r.stabilities.shape[1] for r in observer.records] == [ids.shape[1], 1, 1, 1, 1, 1]
    first = observer.records[0]
    assert torch.isnan(first.stabilities[..., 0]).all() and not torch.isnan(first.stabilities[..., 1:]).any()

    # Independent check on the prefill: raw layer outputs from output_hidden_states.
    captured = {}
    handle = model.get_decoder().layers[-1].register_forward_hook(lambda m, a, o: captured.update(h=o))
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    handle.remove()
    raw = list(hidden[1:-1]) + [captured["h"]]  # h_1..h_L
    for layer in (2, 15, 30):
        expected = F.cosine_similarity(raw[layer - 1][0], raw[layer - 2][0], dim=-1)
        torch.testing.assert_close(first.stabilities[0, :, layer - 1], expected)
    assert torch.equal(first.exit_layers[0], policy.exit_layers(first.stabilities[0]))
