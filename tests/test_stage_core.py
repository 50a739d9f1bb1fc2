"""The Ray-free stage core: KV pool admission, batched and chunked prefill, decode steps against
Hugging Face, K/V ordering and speculative rollback. Tiny config-built models: no Ray, no download."""

import asyncio

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from sedac_ray.model.adapter import ModelAdapter
from sedac_ray.policy import ExitPolicy
from sedac_ray.sampling import SamplingParams
from sedac_ray.serve.errors import Overloaded, RequestTooLarge, Unavailable
from sedac_ray.serve.head import read_out
from sedac_ray.serve.stage_core import PrefillChunk, StageCore, kv_bytes_per_position
from sedac_ray.serve.transport import SPECULATIVE, Rows, pack_hidden
from tests.conftest import TINY_CONFIGS

NO_EXIT = ExitPolicy.disabled()
PROMPTS = [[5, 17, 300, 42, 9, 77, 1000], [8, 8, 21], [400, 3, 99, 12, 640]]


@pytest.fixture(scope="module", params=["llama", "gemma2"])
def tiny(request):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(TINY_CONFIGS[request.param]()).eval()


def make_core(model, start=0, end=None, slots=4, length=32) -> StageCore:
    adapter = ModelAdapter(model)
    end = adapter.num_layers if end is None else end
    per_sequence = length * kv_bytes_per_position(model.config, end - start, adapter.dtype)
    return StageCore(adapter, start, end, kv_budget_bytes=slots * per_sequence, max_model_len=length)


def hf_greedy_ids(model, prompt: list[int], count: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, max_new_tokens=count, do_sample=False, attention_mask=torch.ones_like(ids))
    return out[0, len(prompt) :].tolist()


def rows_for(seq_ids, positions, tokens, policy=NO_EXIT) -> Rows:
    return Rows(
        seq_ids=list(seq_ids),
        positions=np.asarray(positions, np.int64),
        rules=policy.rules(len(seq_ids)).numpy(),
        state=np.zeros(len(seq_ids), np.int64),
        sampling=[SamplingParams()] * len(seq_ids),
        routes=[("r",)] * len(seq_ids),
        token_ids=np.asarray(tokens, np.int64),
    )


def prefill(core: StageCore, prompts: list[list[int]], chunk: int) -> list[torch.Tensor]:
    """Every prompt through the core in chunks of ``chunk`` tokens, all sequences batched per round."""
    outputs = [[] for _ in prompts]
    for start in range(0, max(map(len, prompts)), chunk):
        batch = [
            (i, PrefillChunk(f"s{i}", start, token_ids=p[start : start + chunk]))
            for i, p in enumerate(prompts)
            if start < len(p)
        ]
        for (i, _), out in zip(batch, core.prefill([c for _, c in batch]), strict=True):
            outputs[i].append(out)
    for i, p in enumerate(prompts):
        core.sequences[f"s{i}"].wrote_prefix(len(p))
    return [torch.cat(o) for o in outputs]


def test_the_kv_pool_is_sized_once_and_admission_is_a_free_slot(tiny):
    core = make_core(tiny, slots=2, length=16)
    assert core.num_slots == 2 and core.kv_budget_bytes == 2 * 16 * core.position_bytes
    with pytest.raises(RequestTooLarge, match="max_model_len"):
        core.admit("long", 17)
    core.admit("a", 16)
    core.admit("b", 4)
    assert core.kv_bytes_in_use() == 20 * core.position_bytes
    with pytest.raises(Overloaded, match="KV budget"):
        core.admit("c", 4)
    assert core.release(["a", "unknown"]) == ["a"]
    core.admit("c", 4)  # a's slot again
    with pytest.raises(ValueError, match="holds no sequence"):
        make_core(tiny, slots=0)


@pytest.mark.parametrize("chunk", [2, 3, 100])
def test_batched_chunked_prefill_then_decode_equals_hf_greedy(tiny, chunk):
    """Prompts of different lengths prefilled together, in chunks, then decoded as one batch:
    every sequence's tokens equal Hugging Face's greedy continuation of it alone."""
    core = make_core(tiny)
    for i, p in enumerate(PROMPTS):
        core.admit(f"s{i}", len(p) + 4)
    hidden = prefill(core, PROMPTS, chunk)
    with torch.no_grad():
        for p, h in zip(PROMPTS, hidden, strict=True):
            reference = tiny(torch.tensor([p])).logits[0]
            torch.testing.assert_close(core.adapter.logits(h), reference, rtol=1e-4, atol=1e-4)
    tokens = [int(core.adapter.logits(h[-1:]).argmax()) for h in hidden]
    generated = [[t] for t in tokens]
    positions = [len(p) for p in PROMPTS]
    for _ in range(3):
        rows = rows_for([f"s{i}" for i in range(len(PROMPTS))], positions, tokens)
        out = core.compute(rows, Rows.empty())
        core.wrote(rows)
        assert len(out.continuing) == 0 and len(out.exited) == len(PROMPTS)
        answers = dict(zip(out.exited.seq_ids, read_out(core.adapter, out.exited), strict=True))
        tokens = [answers[f"s{i}"].token for i in range(len(PROMPTS))]
        for g, t in zip(generated, tokens, strict=True):
            g.append(t)
        positions = [p + 1 for p in positions]
    for p, g in zip(PROMPTS, generated, strict=True):
        assert g == hf_greedy_ids(tiny, p, 4)


def test_two_stage_cores_with_forced_exits_pass_fills_on(tiny):
    """Stage 0 with an always-exit rule: its exit group goes to the head, its fill group gives
    stage 1 the K/V it needs; the next token (no exit) then matches the whole model run alone."""
    adapter = ModelAdapter(tiny)
    first, second = make_core(tiny, 0, 3), make_core(tiny, 3, adapter.num_layers)
    prompt = PROMPTS[0]
    for core in (first, second):
        core.admit("s0", len(prompt) + 4)
    (hidden,) = prefill(first, [prompt], 4)
    second.prefill([PrefillChunk("s0", 0, hidden=hidden)])
    second.sequences["s0"].wrote_prefix(len(prompt))
    eager = ExitPolicy(tau=0.01, k=1)  # a residual stream is that stable at once: exits at layer 2
    out = first.compute(rows_for(["s0"], [len(prompt)], [7], eager), Rows.empty())
    assert len(out.exited) == 1 and int(out.exited.exit_layer[0]) == 2 and len(out.fill) == 1
    filled = second.compute(Rows.empty(), out.fill)
    assert len(filled.exited) == len(filled.continuing) == 0
    second.wrote(out.fill)
    assert second.sequences["s0"].filled == len(prompt) + 1


def test_a_decode_row_waits_for_its_fills_and_fails_alone_when_they_stop(tiny):
    core = make_core(tiny)
    core.admit("s0", 16)
    core.sequences["s0"].wrote_prefix(5)

    async def run():
        waiting = asyncio.ensure_future(core.wait_for_kv(rows_for(["s0"], [7], [1]), timeout_s=5))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        core.sequences["s0"].wrote(6)  # out of order: not enough yet
        await asyncio.sleep(0.01)
        assert not waiting.done()
        core.sequences["s0"].wrote(5)
        ready, lost = await waiting
        assert ready.seq_ids == ["s0"] and not lost
        ready, lost = await core.wait_for_kv(rows_for(["s0"], [9], [1]), timeout_s=0.05)
        assert not len(ready) and isinstance(lost["s0"], Unavailable)

    asyncio.run(run())


def test_a_rollback_leaves_kv_as_if_the_void_rows_never_existed(tiny):
    """A speculative sequence steps on from a wrong token; a row of the new epoch rolls it back.
    Its K/V must then equal a sequence that only ever saw the right tokens, zeros past them."""
    core = make_core(tiny, length=32)
    prompt = PROMPTS[0]
    n = len(prompt)
    right, wrong, void = hf_greedy_ids(tiny, prompt, 2), 13, 17
    for seq_id in ("rolled back", "reference"):
        core.admit(seq_id, n + 8)
        core.prefill([PrefillChunk(seq_id, 0, token_ids=prompt)])
        core.sequences[seq_id].wrote_prefix(n)

    def step(seq_id, position, token, epoch):
        rows = rows_for([seq_id], [position], [token], ExitPolicy(0.97, k=3))
        rows.modes[:], rows.epochs[:] = SPECULATIVE, epoch
        core.catch_up(seq_id, epoch)
        rows = core.current(rows)
        core.zero(core.take_rolled_back())
        core.compute(rows, Rows.empty())
        core.wrote(rows)

    for position, token, epoch in [(n, right[0], 0), (n + 1, wrong, 0), (n + 2, void, 0)]:
        step("rolled back", position, token, epoch)
    step("rolled back", n + 1, right[1], n + 1)
    for position, token in [(n, right[0]), (n + 1, right[1])]:
        step("reference", position, token, 0)
    ours, theirs = (core.sequences[s].slot for s in ("rolled back", "reference"))
    assert core.sequences["rolled back"].filled == n + 2
    for layer in range(core.adapter.num_layers):
        for mine, reference in zip(
            core.layers.cache.read(layer, ours, 32), core.layers.cache.read(layer, theirs, 32), strict=True
        ):
            torch.testing.assert_close(mine[:, : n + 2], reference[:, : n + 2], rtol=1e-5, atol=1e-5)
            assert torch.count_nonzero(mine[:, n + 2 :]) == 0  # the void row's K/V are gone


@pytest.mark.slow
def test_three_stage_cores_in_bf16_equal_the_engine_in_bf16():
    """SmolLM2 in bf16 split over three stage cores (hidden states crossing as packed bf16 bits,
    as between replicas) decodes exactly what the single-process engine decodes in bf16."""
    from sedac_ray import Engine
    from sedac_ray.model.loading import load_model

    loaded = load_model(dtype="bfloat16")
    engine = Engine(loaded, policy=NO_EXIT)
    prompts = ["The three primary colors are", "def fibonacci(n):"]
    expected = [r.token_ids for r in engine.generate(prompts, max_new_tokens=12, ignore_eos=True)]
    prompt_ids = [loaded.tokenizer(p)["input_ids"] for p in prompts]
    adapter = ModelAdapter(loaded.model, verify=False)
    cores = [
        StageCore(adapter, a, b, kv_budget_bytes=None, max_model_len=64, max_sequences=2)
        for a, b in ((0, 10), (10, 20), (20, 30))
    ]
    seq_ids = [f"s{i}" for i in range(len(prompts))]
    for core in cores:
        for seq_id, ids in zip(seq_ids, prompt_ids, strict=True):
            core.admit(seq_id, len(ids) + 12)
    chunks = [PrefillChunk(s, 0, token_ids=ids) for s, ids in zip(seq_ids, prompt_ids, strict=True)]
    for core in cores:
        hidden = core.prefill(chunks)
        chunks = [PrefillChunk(c.seq_id, 0, hidden=h) for c, h in zip(chunks, hidden, strict=True)]
        for seq_id, ids in zip(seq_ids, prompt_ids, strict=True):
            core.sequences[seq_id].wrote_prefix(len(ids))
    last = Rows.concat([rows_for([s], [len(p) - 1], [0]) for s, p in zip(seq_ids, prompt_ids, strict=True)])
    last.token_ids = None
    last.hidden, last.hidden_dtype = pack_hidden(torch.stack([c.hidden[-1] for c in chunks]))
    last.exit_layer = np.full(len(seq_ids), adapter.num_layers)
    tokens = [a.token for a in read_out(adapter, last)]
    generated = [[t] for t in tokens]
    positions = [len(p) for p in prompt_ids]
    for _ in range(11):
        rows = rows_for(seq_ids, positions, tokens)
        for core in cores:
            out = core.compute(rows, Rows.empty())
            core.wrote(rows)
            rows = out.continuing
        assert out.exited.hidden_dtype == "bfloat16"
        answers = dict(zip(out.exited.seq_ids, read_out(adapter, out.exited), strict=True))
        tokens = [answers[s].token for s in seq_ids]
        for g, t in zip(generated, tokens, strict=True):
            g.append(t)
        positions = [p + 1 for p in positions]
    assert generated == expected
