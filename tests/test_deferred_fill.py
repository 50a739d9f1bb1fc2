"""Deferred fill (FREE's synchronized parallel decoding): an exited token's deeper layers run in the
next step beside the next token, so every token attends to exact K/V. Checked on tiny config-built
models against Hugging Face: the tokens and exit layers equal the exit rule recomputed from a full
forward (exact K/V by construction), and the K/V cache equals HF's ``past_key_values``."""

import pytest
import torch
from transformers import AutoTokenizer

from sedac_ray import Engine, ExitPolicy
from sedac_ray.calibration.validate import free_running
from sedac_ray.model.adapter import ModelAdapter
from sedac_ray.model.loading import packaged_smollm2_dir
from sedac_ray.runtime.layer_range import LayerRange, TokenRows
from sedac_ray.sampling import SamplingParams
from tests.conftest import tiny_model
from tests.test_engine_reference import reference_exit

PROMPTS = ["Hello there, how are you doing today my friend?", "Hi", "One two three four five"]
MAX_NEW = 20
# Per architecture, a (tau, k) that exits at every depth from 2 to L-1 on these prompts.
AGGRESSIVE = {"llama": (0.8, 1), "qwen3": (0.8, 1), "gemma2": (0.9, 1)}


@pytest.fixture(scope="module")
def tokenizer():
    # From the packaged GGUF: the fast tier must not depend on the dequantized cache existing.
    gguf = packaged_smollm2_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def generate(engine: Engine, prompt_ids, policy, deferred_fill: bool):
    layers = LayerRange(engine.adapter, 0, engine.num_layers)
    results = engine.generate_ids(
        prompt_ids, MAX_NEW, SamplingParams(), [], policy, deferred_fill=deferred_fill, layers=layers
    )
    return results, layers


def mismatches(model, results, tau: float, k: int) -> list[tuple[int, int]]:
    """Decode steps whose (exit layer, token) differ from the exit rule on exact K/V."""
    wrong = []
    for number, result in enumerate(results):
        for step in range(1, len(result.token_ids)):
            ids = result.prompt_token_ids + result.token_ids[:step]
            expected = reference_exit(model, ids, tau, k)
            if (result.exit_layers[step], result.token_ids[step]) != expected:
                wrong.append((number, step))
    return wrong


def test_deferred_fill_decodes_what_the_exit_rule_gives_on_exact_kv(tokenizer):
    drift = 0
    for arch, (tau, k) in sorted(AGGRESSIVE.items()):
        loaded = tiny_model(arch, tokenizer)
        policy = ExitPolicy(tau, k=k)
        engine = Engine(loaded, policy, deferred_fill=True)
        prompt_ids = [engine.encode(p, chat=False) for p in PROMPTS]
        results, _ = generate(engine, prompt_ids, policy, deferred_fill=True)
        layers_seen = {layer for r in results for layer in r.exit_layers[1:]}
        assert len(layers_seen - {engine.num_layers}) >= 3, (arch, layers_seen)  # exits at several depths
        assert mismatches(loaded.model, results, tau, k) == [], arch
        # Every exited row's deeper layers ran, except the row of each sequence's last token
        # (dropped: nothing attends there). Token 0 comes from prefill.
        for result in results:
            ran_on = result.exit_layers[1:-1]
            assert result.deferred_layers == sum(engine.num_layers - layer for layer in ran_on)
        propagated, _ = generate(engine, prompt_ids, policy, deferred_fill=False)
        assert all(r.deferred_layers is None for r in propagated)
        drift += len(mismatches(loaded.model, propagated, tau, k))
    assert drift  # the reference tells the two apart: with propagated K/V decoding drifts from it


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_deferred_fill_leaves_the_kv_of_full_depth(arch, tokenizer):
    """The cache after generating equals HF's ``past_key_values`` over the same text at every
    layer and position, except the deeper layers of the last input of each sequence: its row is
    dropped when the sequence ends, so they hold nothing."""
    loaded = tiny_model(arch, tokenizer)
    tau, k = AGGRESSIVE[arch]
    policy = ExitPolicy(tau, k=k)
    engine = Engine(loaded, policy)
    prompt_ids = [engine.encode(p, chat=False) for p in PROMPTS]
    differs = 0
    for deferred_fill in (True, False):
        results, layers = generate(engine, prompt_ids, policy, deferred_fill)
        for slot, result in enumerate(results):
            text = result.prompt_token_ids + result.token_ids[:-1]  # every token fed to a layer
            # The last input produced the last token: its row left after exit_layers[-1] layers.
            last, last_exit = len(text) - 1, result.exit_layers[-1]
            assert last_exit < engine.num_layers  # the drop is exercised
            with torch.no_grad():
                cache = loaded.model(input_ids=torch.tensor([text]), use_cache=True).past_key_values
            for layer in range(engine.num_layers):
                theirs = (cache.layers[layer].keys[0], cache.layers[layer].values[0])
                ours = layers.cache.read(layer, slot, len(text))
                for mine, hf in zip(ours, theirs, strict=True):
                    if not deferred_fill:
                        differs += not torch.allclose(mine[:, :last], hf[:, :last], rtol=1e-4, atol=1e-4)
                        continue
                    torch.testing.assert_close(mine[:, :last], hf[:, :last], rtol=1e-4, atol=1e-4)
                    if layer < last_exit:
                        torch.testing.assert_close(mine[:, last], hf[:, last], rtol=1e-4, atol=1e-4)
                    else:
                        assert torch.equal(mine[:, last], torch.zeros_like(mine[:, last]))
    assert differs  # propagated K/V is not exact: the comparison can fail


def test_deferred_rows_share_the_next_tokens_layer_calls(tokenizer):
    """Two sequences whose tokens exit after layer 2 with no propagation; next step their rows run
    layers 3..6 in the same calls as the next tokens (one call per layer, 4 rows), and then hold
    the K/V of a full-depth prefill of the same text."""
    loaded = tiny_model("llama", tokenizer)
    adapter = ModelAdapter(loaded.model)
    prompts = [[5, 17, 300, 42, 9], [8, 21, 640]]
    layers = LayerRange(adapter, 0, adapter.num_layers)
    slots = torch.tensor(layers.cache.allocate(2))
    lengths = torch.tensor([len(p) for p in prompts])
    padded = torch.tensor([p + [p[-1]] * (5 - len(p)) for p in prompts])
    calls: dict[int, list[int]] = {}

    def count(module, args, kwargs):
        calls.setdefault(module.self_attn.layer_idx, []).append(args[0].shape[0])

    with torch.inference_mode():
        layers.prefill(slots, torch.arange(5).expand(2, 5), adapter.embed_tokens(padded))
        step = TokenRows(
            ids=torch.arange(2),
            slots=slots,
            positions=lengths.clone(),
            hidden=adapter.embed_tokens(torch.tensor([7, 11])),
            rules=ExitPolicy(1e-6, k=1, min_layer=2).rules(2),  # exits right after layer 2
        )
        exited = layers.decode(step, propagate=False).exited
        assert exited.exit_layer.tolist() == [2, 2]
        handles = [layer.register_forward_pre_hook(count, with_kwargs=True) for layer in adapter.layers]
        try:
            after = TokenRows(
                ids=torch.arange(2),
                slots=slots,
                positions=lengths + 1,
                hidden=adapter.embed_tokens(torch.tensor([13, 19])),
                rules=ExitPolicy.disabled().rules(2),
            )
            out = layers.decode(after, propagate=False, deferred=exited)
        finally:
            for handle in handles:
                handle.remove()
    assert calls == {0: [2], 1: [2], 2: [4], 3: [4], 4: [4], 5: [4]}
    assert out.exited.exit_layer.tolist() == [6, 6]
    texts = [prompts[0] + [7, 13], prompts[1] + [11, 19]]
    for slot, text in zip(slots.tolist(), texts, strict=True):
        with torch.no_grad():
            cache = loaded.model(input_ids=torch.tensor([text]), use_cache=True).past_key_values
            logits = loaded.model(input_ids=torch.tensor([text])).logits[0, -1]
        for layer in range(adapter.num_layers):
            ours = layers.cache.read(layer, slot, len(text))
            theirs = (cache.layers[layer].keys[0], cache.layers[layer].values[0])
            for mine, hf in zip(ours, theirs, strict=True):
                torch.testing.assert_close(mine, hf, rtol=1e-4, atol=1e-4)
        row = out.exited.ids.tolist().index(slot)
        torch.testing.assert_close(adapter.logits(out.exited.hidden[row]), logits, rtol=1e-4, atol=1e-4)


def test_deferred_fill_and_speculative_mode_exclude_each_other(tokenizer):
    with pytest.raises(ValueError, match="deferred_fill does not apply"):
        Engine(tiny_model("llama", tokenizer), ExitPolicy(0.9), speculative=True, deferred_fill=True)


def test_free_running_counts_deferred_layers_as_computed(tokenizer):
    """The benchmark's figure: deferred layers are run, so they are not saved."""
    loaded = tiny_model("llama", tokenizer)
    tau, k = AGGRESSIVE["llama"]
    policy = ExitPolicy(tau, k=k)
    engine = Engine(loaded, policy)
    prompt_ids = [engine.encode(p, chat=False) for p in PROMPTS]
    judged = free_running(loaded, prompt_ids, policy, MAX_NEW, progress=False, deferred_fill=True)
    results, _ = generate(engine, prompt_ids, policy, deferred_fill=True)
    tokens = sum(len(r.token_ids) - 1 for r in results)  # decode tokens; the prefill's is not judged
    exited = sum(sum(r.exit_layers[1:]) for r in results)
    deferred = sum(r.deferred_layers for r in results)
    assert judged.tokens == tokens and judged.deferred_layers == deferred > 0
    assert judged.layers_saved == pytest.approx(1 - (exited + deferred) / (tokens * engine.num_layers))
    assert judged.exit_depth_saved == pytest.approx(1 - exited / (tokens * engine.num_layers))
    assert judged.exit_depth_saved > judged.layers_saved
