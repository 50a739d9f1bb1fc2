"""The layer-range runtime: group separation, state propagation, range splitting, the KV cache."""

import pytest
import torch

from sedac_ray.model.adapter import ModelAdapter
from sedac_ray.policy import ExitPolicy
from sedac_ray.runtime.kv_cache import SlotKVCache
from sedac_ray.runtime.layer_range import LayerRange, TokenRows

PROMPTS = ["The quick brown fox jumps over", "Paris is the capital of", "1, 2, 3,"]


def prefilled(adapter: ModelAdapter, tokenizer, ranges: list[tuple[int, int]]):
    """Prompts prefilled through ``ranges``; returns the ranges, slots, lengths and the next tokens."""
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    lengths = torch.tensor([len(i) for i in ids])
    width = int(lengths.max())
    padded = torch.tensor([i + [i[-1]] * (width - len(i)) for i in ids])
    parts = [LayerRange(adapter, a, b) for a, b in ranges]
    slots = torch.tensor(parts[0].cache.allocate(len(ids)))
    for part in parts[1:]:
        part.cache.allocate(len(ids))
    hidden = adapter.embed_tokens(padded)
    with torch.inference_mode():
        for part in parts:
            hidden = part.prefill(slots, torch.arange(width).expand(len(ids), width), hidden)
        last = hidden[torch.arange(len(ids)), lengths - 1]
        next_tokens = adapter.logits(last).argmax(-1)
    return parts, slots, lengths, next_tokens


def decode_rows(adapter, slots, lengths, tokens, policy):
    with torch.inference_mode():
        hidden = adapter.embed_tokens(tokens)
    return TokenRows(
        ids=torch.arange(len(slots)),
        slots=slots,
        positions=lengths.clone(),
        hidden=hidden,
        rules=policy.rules(len(slots)),
    )


@pytest.fixture(scope="module")
def adapter(smollm2):
    return ModelAdapter(smollm2.model)


def test_forced_exit_stores_propagated_kv_in_deeper_layers(adapter, smollm2):
    (whole,), slots, lengths, tokens = prefilled(adapter, smollm2.tokenizer, [(0, 30)])
    policy = ExitPolicy(0.01, k=1, min_layer=10)  # every token exits right after layer 10
    out = whole.decode(decode_rows(adapter, slots, lengths, tokens, policy))
    assert out.exited.exit_layer.tolist() == [10, 10, 10]
    model = smollm2.model
    for row, slot in enumerate(slots.tolist()):
        position = int(lengths[row])
        exited_state = out.exited.hidden[out.exited.ids.tolist().index(row)]
        for index in (10, 17, 29):  # 0-based layers 11, 18 and 30, all deeper than the exit
            layer = model.get_decoder().layers[index]
            normed = layer.input_layernorm(exited_state)
            attn = layer.self_attn
            key = attn.k_proj(normed).view(-1, attn.head_dim)
            value = attn.v_proj(normed).view(-1, attn.head_dim)
            cos, sin = model.get_decoder().rotary_emb(normed[None, None], torch.tensor([[position]]))
            half = attn.head_dim // 2
            rotated = torch.cat([-key[:, half:], key[:, :half]], dim=-1)
            expected_key = key * cos[0] + rotated * sin[0]
            stored_key, stored_value = whole.cache.read(index, slot, position + 1)
            torch.testing.assert_close(stored_key[:, position], expected_key, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(stored_value[:, position], value, rtol=1e-4, atol=1e-5)


def test_only_continuing_tokens_run_deeper_layers(adapter, smollm2):
    (whole,), slots, lengths, tokens = prefilled(adapter, smollm2.tokenizer, [(0, 30)])
    rows_computed = {}

    def count(module, args, kwargs):
        if not kwargs["cache"].fill_only:
            rows_computed[module.self_attn.layer_idx] = args[0].shape[0]

    handles = [layer.register_forward_pre_hook(count, with_kwargs=True) for layer in adapter.layers]
    policy = ExitPolicy(0.01, k=1, min_layer=12)
    rows = decode_rows(adapter, slots, lengths, tokens, policy)
    rows.rules[2] = torch.tensor(ExitPolicy.disabled().rule())  # row 2 never exits
    try:
        out = whole.decode(rows)
    finally:
        for handle in handles:
            handle.remove()
    assert [rows_computed[i] for i in range(12)] == [3] * 12
    assert [rows_computed[i] for i in range(12, 30)] == [1] * 18
    assert sorted(zip(out.exited.ids.tolist(), out.exited.exit_layer.tolist(), strict=True)) == [
        (0, 12),
        (1, 12),
        (2, 30),
    ]


@pytest.mark.parametrize("policy", [ExitPolicy(0.96, k=2), ExitPolicy(0.01, k=1, min_layer=5)])
def test_split_ranges_equal_one_range(adapter, smollm2, policy):
    """Stages chained with the continue group and the fill group reproduce the whole-model range:
    the same exits, the same hidden states, and the same K/V in every layer."""
    (whole,), slots, lengths, tokens = prefilled(adapter, smollm2.tokenizer, [(0, 30)])
    parts, _, _, _ = prefilled(adapter, smollm2.tokenizer, [(0, 7), (7, 19), (19, 30)])
    reference = whole.decode(decode_rows(adapter, slots, lengths, tokens, policy)).exited
    rows, fill, exited = decode_rows(adapter, slots, lengths, tokens, policy), None, []
    for part in parts:
        out = part.decode(rows, fill)
        exited.append(out.exited)
        rows, fill = out.continuing, out.fill
    chained = TokenRows.concat(exited)
    order, chained_order = reference.ids.argsort(), chained.ids.argsort()
    assert torch.equal(reference.exit_layer[order], chained.exit_layer[chained_order])
    torch.testing.assert_close(reference.hidden[order], chained.hidden[chained_order])
    for index in range(30):
        owner = parts[0] if index < 7 else parts[1] if index < 19 else parts[2]
        for slot, length in zip(slots.tolist(), (lengths + 1).tolist(), strict=True):
            torch.testing.assert_close(
                owner.cache.read(index, slot, length), whole.cache.read(index, slot, length)
            )


def test_rows_with_different_policies_decide_independently(adapter, smollm2):
    policies = [ExitPolicy(0.96, k=2), ExitPolicy.disabled(), ExitPolicy(0.9, k=2, window=4, min_layer=8)]
    (mixed,), slots, lengths, tokens = prefilled(adapter, smollm2.tokenizer, [(0, 30)])
    rows = decode_rows(adapter, slots, lengths, tokens, policies[0])
    rows.rules = torch.cat([p.rules(1) for p in policies])
    together = mixed.decode(rows).exited
    for row, policy in enumerate(policies):
        (alone,), _, _, _ = prefilled(adapter, smollm2.tokenizer, [(0, 30)])
        single = alone.decode(decode_rows(adapter, slots, lengths, tokens, policy)).exited
        here = together.ids.tolist().index(row)
        there = single.ids.tolist().index(row)
        assert together.exit_layer[here] == single.exit_layer[there]
        torch.testing.assert_close(together.hidden[here], single.hidden[there], rtol=1e-3, atol=1e-3)
    assert together.exit_layer[together.ids.tolist().index(1)] == 30


def test_kv_cache_slots_are_reused_and_growth_keeps_contents():
    cache = SlotKVCache(initial_capacity=2)
    slots = cache.allocate(2)
    assert slots == [0, 1]
    key = torch.arange(2 * 3 * 1 * 4, dtype=torch.float32).view(2, 3, 1, 4)
    view = cache.view(slots, torch.tensor([[1], [0]]))
    view.update(key, key + 100, layer_idx=5)
    cache.reserve(9)  # grows capacity 2 -> 16
    assert torch.equal(cache.read(5, 0, 2)[0][:, 1], key[0, :, 0])
    assert torch.equal(cache.read(5, 1, 1)[1][:, 0], key[1, :, 0] + 100)
    cache.free([0])
    assert cache.allocate(2) == [0, 2] and cache.slots_in_use == 3
    with pytest.raises(ValueError, match="not allocated"):
        cache.free([7])
