"""The engine against independent references: HF generate, and the exit rule recomputed from
HF ``output_hidden_states``."""

import pytest
import torch
import torch.nn.functional as F

from sedac_ray import Engine, ExitPolicy
from tests.conftest import CHAT_PROMPTS, PLAIN_PROMPTS, TINY_CONFIGS, hf_greedy, tiny_model

MAX_NEW = 24


@pytest.fixture(scope="module")
def full_depth(smollm2):
    return Engine(smollm2, ExitPolicy.disabled())


def test_no_exit_equals_hf_generate_on_real_model_batched(smollm2, full_depth):
    chat = full_depth.generate(CHAT_PROMPTS, max_new_tokens=MAX_NEW, chat=True)
    plain = full_depth.generate(PLAIN_PROMPTS, max_new_tokens=MAX_NEW)
    for result in chat + plain:
        assert result.token_ids == hf_greedy(smollm2.model, result.prompt_token_ids, MAX_NEW)
        assert result.exit_layers == [30] * len(result.token_ids)
    assert chat[0].text.strip() == "The capital of France is Paris."
    assert chat[0].finish_reason == "stop" and plain[1].finish_reason == "length"


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_no_exit_equals_hf_generate_on_tiny_architectures(arch, smollm2):
    loaded = tiny_model(arch, smollm2.tokenizer)
    engine = Engine(loaded, ExitPolicy.disabled())
    # Prompts of different lengths in one batch; 20 new tokens cross the sliding window of 8.
    prompts = ["Hello there, how are you doing today my friend?", "Hi", "One two three four five"]
    results = engine.generate(prompts, max_new_tokens=20)
    for result in results:
        assert result.token_ids == hf_greedy(loaded.model, result.prompt_token_ids, 20), arch


def reference_exit(model, ids: list[int], tau: float, k: int) -> tuple[int, int]:
    """Exit layer and token for the last position of ``ids``, from HF's own forward: raw layer
    outputs from ``output_hidden_states`` (whose last entry is post-norm, so layer L's raw output
    comes from a hook), patience counted here, independently of sedac_ray.policy."""
    layers = model.get_decoder().layers
    captured = {}
    handle = layers[-1].register_forward_hook(lambda m, a, out: captured.update(last=out))
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    handle.remove()
    raw = [h[0, -1] for h in out.hidden_states[:-1]] + [captured["last"][0, -1]]  # h_0..h_L
    num_layers = len(layers)
    counter = 0
    for layer in range(2, num_layers + 1):
        counter = counter + 1 if F.cosine_similarity(raw[layer], raw[layer - 1], dim=0) > tau else 0
        if counter >= k and layer < num_layers:
            norm, head = model.get_decoder().norm, model.get_output_embeddings()
            return layer, int(head(norm(raw[layer])).argmax())
    return num_layers, int(out.logits[0, -1].argmax())


def test_exit_rule_equals_reference_from_output_hidden_states(smollm2):
    engine = Engine(smollm2)
    exited_early = 0
    for tau, k in [(0.95, 3), (0.97, 3), (0.98, 2), (0.99, 3)]:
        policy = ExitPolicy(tau, k=k)
        results = engine.generate(CHAT_PROMPTS, max_new_tokens=2, chat=True, policy=policy)
        for result in results:
            layer, token = reference_exit(
                smollm2.model, result.prompt_token_ids + result.token_ids[:1], tau, k
            )
            assert (result.exit_layers[1], result.token_ids[1]) == (layer, token), (tau, k)
            exited_early += layer < 30
    assert exited_early >= 4  # the comparison covered real exits, not only full-depth tokens


@pytest.mark.parametrize("policy", [ExitPolicy(0.97, k=3), ExitPolicy(0.96, k=2, window=3)])
def test_batch_invariance_with_exits(smollm2, policy):
    engine = Engine(smollm2, policy)
    prompts = CHAT_PROMPTS + ["Name a color."]
    batched = engine.generate(prompts, max_new_tokens=16, chat=True)
    assert any(min(r.exit_layers) < 30 for r in batched)
    for prompt, together in zip(prompts, batched, strict=True):
        alone = engine.generate(prompt, max_new_tokens=16, chat=True)[0]
        assert (alone.token_ids, alone.exit_layers) == (together.token_ids, together.exit_layers)


def test_sampling_is_seeded_per_sequence(smollm2):
    engine = Engine(smollm2, ExitPolicy.disabled())
    kwargs = dict(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=7, chat=True)
    batched = engine.generate(CHAT_PROMPTS[:2], **kwargs)
    alone = engine.generate(CHAT_PROMPTS[1], **kwargs)[0]
    assert batched[1].token_ids == alone.token_ids
    assert engine.generate(CHAT_PROMPTS[1], **kwargs)[0].token_ids == alone.token_ids


def test_stop_strings_end_generation(smollm2, full_depth):
    result = full_depth.generate(CHAT_PROMPTS[0], max_new_tokens=20, chat=True, stop=[" of"])[0]
    assert result.text == "The capital"
    assert result.finish_reason == "stop"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompts=""), "prompt is empty"),
        (dict(prompts=[]), "no prompts"),
        (dict(prompts=[{"role": "user", "content": "  "}], chat=True), "prompt is empty"),
        (dict(prompts="hi", max_new_tokens=0), "max_new_tokens must be"),
        (dict(prompts="hi", temperature=-1.0), "temperature must be"),
        (dict(prompts="hi", top_p=0.0), "top_p must be"),
        (dict(prompts="hi", policy=ExitPolicy(0.9, min_layer=31)), "min_layer must be in 1..30"),
        (dict(prompts="word " * 9000), "exceeds the model's context of 8192"),
    ],
)
def test_bad_input_raises_clear_errors(full_depth, kwargs, message):
    with pytest.raises(ValueError, match=message):
        full_depth.generate(**kwargs)
