"""Speculative mode: lossless against HF greedy and full-depth sampling, with drafts that are really
accepted and rolled back; rollback leaves K/V as if the rejected tokens never existed."""

import json

import pytest
import torch

from sedac_ray import Engine, ExitPolicy
from sedac_ray.cli import main as cli_main
from sedac_ray.completion import Completion
from sedac_ray.model.adapter import ModelAdapter
from sedac_ray.runtime.kv_cache import SlotKVCache
from sedac_ray.runtime.layer_range import LayerRange, TokenRows
from sedac_ray.sampling import SamplingParams
from sedac_ray.speculative import SpeculativeDecoder, SpeculativeStats
from tests.conftest import CHAT_PROMPTS, PLAIN_PROMPTS, hf_greedy

MAX_NEW = 20
DRAFTING = ExitPolicy(0.97, k=3)  # exits often, and its early drafts are mostly wrong on SmolLM2


@pytest.fixture(scope="module")
def adapter(smollm2):
    return ModelAdapter(smollm2.model)


def total(results) -> SpeculativeStats:
    return sum((r.speculative for r in results), SpeculativeStats())


def test_speculative_equals_hf_greedy_with_drafts_accepted_and_rolled_back(smollm2):
    engine = Engine(smollm2, DRAFTING, speculative=True, draft_limit=3)
    chat = engine.generate(CHAT_PROMPTS, max_new_tokens=MAX_NEW, chat=True)
    plain = engine.generate(PLAIN_PROMPTS, max_new_tokens=MAX_NEW)
    for result in chat + plain:
        assert result.token_ids == hf_greedy(smollm2.model, result.prompt_token_ids, MAX_NEW)
    stats = total(chat + plain)
    assert stats.accepted > 0 and stats.rollbacks > 0  # exits were taken, kept and rolled back
    assert stats.drafts == stats.accepted + stats.rolled_back
    assert stats.verifications >= stats.rollbacks
    tokens = sum(len(r.token_ids) for r in chat + plain)
    # The first token of each sequence comes from prefill; every other one is direct or verified.
    assert tokens == len(chat + plain) + stats.direct + stats.verified_tokens
    assert any(layer < 30 for r in chat + plain for layer in r.exit_layers)  # accepted drafts


def test_speculative_sampling_equals_full_depth_with_the_same_seed(smollm2):
    kwargs = dict(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=7, chat=True)
    full = Engine(smollm2, ExitPolicy.disabled()).generate(CHAT_PROMPTS[:2], **kwargs)
    spec = Engine(smollm2, DRAFTING, speculative=True).generate(CHAT_PROMPTS[:2], **kwargs)
    assert [r.token_ids for r in spec] == [r.token_ids for r in full]
    assert total(spec).rollbacks > 0


def test_plain_and_disabled_modes_carry_no_statistics(smollm2):
    engine = Engine(smollm2, ExitPolicy.disabled(), speculative=True)
    result = engine.generate(CHAT_PROMPTS[0], max_new_tokens=4, chat=True)[0]
    stats = result.speculative
    if engine.draft_head is None:  # without a draft head nothing exits, so nothing is drafted
        assert stats.drafts == 0 and stats.direct == len(result.token_ids) - 1
    assert stats.direct + stats.verified_tokens == len(result.token_ids) - 1
    assert (
        engine.generate(CHAT_PROMPTS[0], max_new_tokens=2, chat=True, speculative=False)[0].speculative
        is None
    )
    with pytest.raises(ValueError, match="draft_limit must be"):
        Engine(smollm2, speculative=True, draft_limit=0)


def prefill(adapter, layers: LayerRange, ids: list[int]) -> tuple[int, int]:
    """Prefill ``ids`` into a fresh slot of ``layers``; returns the slot and the greedy next token."""
    (slot,) = layers.cache.allocate(1)
    with torch.inference_mode():
        hidden = layers.prefill(
            torch.tensor([slot]),
            torch.arange(len(ids)).unsqueeze(0),
            adapter.embed_tokens(torch.tensor([ids])),
        )
        return slot, int(adapter.logits(hidden[0, -1]).argmax())


def assert_kv_as_if_prefilled(adapter, cache: SlotKVCache, slot: int, ids: list[int]) -> None:
    """Every layer's K/V of ``slot`` equal a full-depth prefill of ``ids`` (fp32 tolerance: the
    shapes of the calls differ), and every later position holds exactly zeros, as in a slot that
    never saw more than ``ids``."""
    reference = LayerRange(adapter, 0, adapter.num_layers)
    ref_slot, _ = prefill(adapter, reference, ids)
    for layer in range(adapter.num_layers):
        for ours, theirs in zip(
            cache.read(layer, slot, len(ids)), reference.cache.read(layer, ref_slot, len(ids)), strict=True
        ):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
        keys, values = cache._keys[layer][slot, :, len(ids) :], cache._values[layer][slot, :, len(ids) :]
        assert torch.equal(keys, torch.zeros_like(keys)) and torch.equal(values, torch.zeros_like(values))


def test_rollback_leaves_kv_as_if_the_rejected_tokens_never_existed(adapter, smollm2):
    """One chunk by hand with the pieces a pipeline stage would call: three draft rows exit at
    layers 20, 12 and 16 (so they enter verification at layers 20, 12 and 12), the third input is
    wrong; verification recomputes the approximate deeper K/V, and truncation drops the wrong row."""
    prompt = smollm2.tokenizer("The quick brown fox jumps over the")["input_ids"]
    truth = hf_greedy(smollm2.model, prompt, 3)
    whole = LayerRange(adapter, 0, 30)
    slot, _ = prefill(adapter, whole, prompt)
    cut = [LayerRange(adapter, 0, 12, cache=whole.cache), LayerRange(adapter, 12, 30, cache=whole.cache)]
    wrong = truth[2] + 1
    entries, hidden = [], []
    for step, (token, exit_at) in enumerate(zip([truth[0], truth[1], wrong], [20, 12, 16], strict=True)):
        policy = ExitPolicy(1e-6, k=1, min_layer=exit_at)  # exits right after layer exit_at
        with torch.inference_mode():
            rows = TokenRows(
                ids=torch.tensor([0]),
                slots=torch.tensor([slot]),
                positions=torch.tensor([len(prompt) + step]),
                hidden=adapter.embed_tokens(torch.tensor([token])),
                rules=policy.rules(1),
            )
        if step < 2:
            out = whole.decode(rows)
            entries.append(exit_at)
            hidden.append(out.exited.hidden[0])
        else:  # its output is exact only up to layer 12 (the second row's exit): keep it there
            first = cut[0].decode(rows)
            assert first.exited.ids.numel() == 0
            out = cut[1].decode(first.continuing, first.fill)
            entries.append(12)
            hidden.append(first.continuing.hidden[0])
        assert out.exited.exit_layer.tolist() == [exit_at]
    chunk = TokenRows(
        ids=torch.arange(3),
        slots=torch.tensor([slot] * 3),
        positions=torch.arange(3) + len(prompt),
        hidden=torch.stack(hidden),
        rules=ExitPolicy.disabled().rules(3),
    )
    with torch.inference_mode():
        verified = adapter.logits(whole.verify(chunk, torch.tensor(entries)).hidden).argmax(-1).tolist()
    assert verified[:2] == truth[1:3]  # rows 0 and 1 had correct inputs: full-depth predictions
    whole.cache.truncate(slot, len(prompt) + 2)  # the third input (`wrong`) is rejected
    assert_kv_as_if_prefilled(adapter, whole.cache, slot, prompt + truth[:2])


def test_stage_step_drafts_then_verifies_without_fills(adapter, smollm2):
    """What a speculative pipeline stage does: rows exit by the rule without K/V propagation, run
    on to the end of the stage with verify() from their exit layer, and the next stage verifies
    from its first layer: the full-depth token, and exact K/V in every layer."""
    prompt = smollm2.tokenizer("Paris is the capital of")["input_ids"]
    whole = LayerRange(adapter, 0, 30)
    slot, first = prefill(adapter, whole, prompt)
    stages = [LayerRange(adapter, 0, 12, cache=whole.cache), LayerRange(adapter, 12, 30, cache=whole.cache)]
    policy = ExitPolicy(1e-6, k=1, min_layer=8)
    with torch.inference_mode():
        rows = TokenRows(
            ids=torch.tensor([0]),
            slots=torch.tensor([slot]),
            positions=torch.tensor([len(prompt)]),
            hidden=adapter.embed_tokens(torch.tensor([first])),
            rules=policy.rules(1),
        )
    out = stages[0].decode(rows, propagate=False)
    assert out.exited.exit_layer.tolist() == [8] and len(out.fill) == 0
    draft = stages[0].verify(out.exited, out.exited.exit_layer)
    full = stages[1].verify(draft, torch.tensor([12]))
    with torch.inference_mode():
        token = int(adapter.logits(full.hidden[0]).argmax())
    assert [first, token] == hf_greedy(smollm2.model, prompt, 2)
    assert_kv_as_if_prefilled(adapter, whole.cache, slot, prompt + [first])


def test_engine_loop_leaves_kv_of_committed_tokens_only(adapter, smollm2):
    """The whole speculative loop, with drafts that are nearly always wrong (every token exits at
    layer 8): afterwards the slot's K/V is a full-depth prefill of what was committed."""
    prompt = smollm2.tokenizer("Paris is the capital of")["input_ids"]
    whole = LayerRange(adapter, 0, 30)
    slot, first = prefill(adapter, whole, prompt)
    completion = Completion(smollm2.tokenizer, max_tokens=10, eos_ids=set())
    completion.add(first, 30)
    policy = ExitPolicy(1e-6, k=1, min_layer=8)
    (stats,) = SpeculativeDecoder(whole, draft_limit=3).run(
        [completion], torch.tensor([slot]), torch.tensor([len(prompt)]), SamplingParams(), policy.rules(1)
    )
    assert stats.rollbacks > 0
    assert completion.token_ids == hf_greedy(smollm2.model, prompt, 10)
    assert_kv_as_if_prefilled(adapter, whole.cache, slot, prompt + completion.token_ids[:-1])


def test_kv_truncate_zeroes_the_tail_and_checks_the_slot():
    cache = SlotKVCache(initial_capacity=4)
    slots = cache.allocate(2)
    ones = torch.ones(2, 1, 4, 2)
    cache.view(slots, torch.arange(4).expand(2, 4)).update(ones, ones, layer_idx=0)
    cache.truncate(1, 2)
    keys, values = cache.read(0, 1, 4)
    assert keys[:, :2].eq(1).all() and keys[:, 2:].eq(0).all() and values[:, 2:].eq(0).all()
    assert cache.read(0, 0, 4)[0].eq(1).all()  # other slots untouched
    cache.free([0])
    with pytest.raises(ValueError, match="not allocated"):
        cache.truncate(0, 1)


def test_cli_speculative_json_reports_statistics(smollm2, capsys):
    code = cli_main(
        ["generate", "--prompt", "Name a color.", "--chat", "--speculative", "--tau", "0.97", "--json"]
        + ["--max-new-tokens", "8", "--draft-limit", "2"]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["token_ids"] == hf_greedy(smollm2.model, out["prompt_token_ids"], 8)
    assert out["speculative"]["drafts"] == out["speculative"]["accepted"] + out["speculative"]["rolled_back"]
    assert {"tokens_per_verification", "acceptance_rate", "verifications"} <= set(out["speculative"])


# ---- the front door's speculative loop (serve/speculation.py) against a scripted pipeline -------


def _truth(position: int) -> int:
    """The full-depth token at ``position`` of a made-up sequence."""
    return 100 + (position * 7919) % 997


@pytest.mark.parametrize("seed", range(6))
def test_pipeline_speculation_commits_exactly_the_verified_sequence(seed):
    """Drafts are right or wrong by a seeded pattern (some at full depth from the draft head, some
    below its gate), rows and verifications come back after random delays; the committed tokens
    must be the true sequence, rollbacks must name the first void position, no step may run from
    a void token, and none from a draft below the gate before its verification."""
    import asyncio
    import random

    from sedac_ray.serve.speculation import SpeculativeDecode
    from sedac_ray.serve.transport import TokenResult

    rng = random.Random(seed)
    prompt_length, max_tokens = 5, 24
    wrong = {p for p in range(prompt_length, prompt_length + max_tokens + 8) if rng.random() < 0.3}
    positions = range(prompt_length, prompt_length + max_tokens + 8)
    full_depth = {p for p in positions if rng.random() < 0.2}
    # Drafts the last stage read out with the draft head at full depth: drafts all the same.
    full_depth_drafts = {p for p in positions if p not in full_depth and rng.random() < 0.3}
    unsure = {p for p in positions if rng.random() < 0.25}  # drafts below the draft gate
    log = {"rollbacks": [], "void_steps": 0}
    gated: set[int] = set()  # positions of unsure drafts handed out, not yet verified

    async def step(position: int, token: int, epoch: int) -> TokenResult:
        if not log["rollbacks"] or log["rollbacks"][-1] != epoch:
            log["rollbacks"].append(epoch)  # a new epoch: the position rolled back to
        assert position >= epoch  # a step never reaches back behind its epoch
        assert position - 1 not in gated, "a step went on from a draft below the gate"
        await asyncio.sleep(rng.random() * 0.004)
        # Some earlier verifications of this epoch come back with the reply, as from the last stage
        # (they are full-depth tokens: right even when the row itself is void).
        came = {q: TokenResult(_truth(q + 1), 30) for q in range(epoch, position) if rng.random() < 0.3}
        gated.difference_update(came)
        if token != _truth(position):  # its input is a wrong draft: whatever it says is void
            log["void_steps"] += 1
            return TokenResult(token + 1, 4, verified=came)
        if position in full_depth:
            return TokenResult(_truth(position + 1), 30, verified=came)
        draft = _truth(position + 1) + (1 if position in wrong else 0)
        if position in unsure:
            gated.add(position)
        layer = 30 if position in full_depth_drafts else 4
        return TokenResult(draft, layer, draft=True, confident=position not in unsure, verified=came)

    polling: dict[int, int] = {}  # epoch -> verification calls waiting

    async def verify(position: int, epoch: int) -> dict[int, TokenResult]:
        polling[epoch] = polling.get(epoch, 0) + 1
        assert polling[epoch] == 1, "one waiting verification call per sequence and epoch"
        await asyncio.sleep(rng.random() * 0.01)
        polling[epoch] -= 1
        ready = range(position, position + rng.choice([1, 1, 2, 3]))  # sometimes several at once
        gated.difference_update(ready)
        return {p: TokenResult(_truth(p + 1), 30) for p in ready}

    async def decode():
        completion = Completion(tokenizer=None, max_tokens=max_tokens, eos_ids=set())
        completion.add(_truth(prompt_length), 30)  # the prefill's token
        spec = SpeculativeDecode(completion, prompt_length, 30, 3, step, verify)
        shown = [c async for c in spec.run(show_drafts=True)]
        return completion, spec.stats, shown

    completion, stats, shown = asyncio.run(decode())
    expected = [_truth(prompt_length + i) for i in range(max_tokens)]
    assert completion.token_ids == expected
    assert [c.token for c in shown if not c.draft] == expected[1:]
    assert stats.drafts == sum(c.draft for c in shown) == stats.accepted + stats.rolled_back
    assert len(completion.token_ids) == 1 + stats.direct + stats.accepted + stats.rollbacks
    # Each new epoch starts where a wrong draft sat, and each wrong draft verified started one
    # (unless the completion ended right there).
    epochs = log["rollbacks"][1:]  # the first is epoch 0
    assert all(p - 1 in wrong for p in epochs) and len(epochs) in (stats.rollbacks, stats.rollbacks - 1)
    assert stats.rollbacks > 0 and stats.accepted > 0
    full_depth_drafts_shown = [c for c in shown if c.draft and c.exit_layer == 30]
    assert full_depth_drafts_shown  # full-depth draft-head reads are drafts, not committed at once


# ---- draft head (FR-Spec subset read-out), confidence gating, cost model -------------------------


def _tiny_adapter(arch: str):
    from transformers import AutoModelForCausalLM

    from tests.conftest import TINY_CONFIGS

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[arch]()).eval()
    return model, ModelAdapter(model)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # gemma2: untied head and logit softcap
def test_draft_head_logits_are_the_full_heads_on_its_tokens(arch):
    from sedac_ray.draft_head import DraftHead
    from sedac_ray.exit_adapters import ExitAdapters

    model, adapter = _tiny_adapter(arch)
    ids = torch.randperm(49152, generator=torch.Generator().manual_seed(1))[:300].tolist()
    hidden = torch.randn(5, 64)
    with torch.inference_mode():
        full = model.lm_head(model.get_decoder().norm(hidden))  # HF's own modules, not ours
        if arch == "gemma2":
            cap = model.config.final_logit_softcapping
            full = torch.tanh(full / cap) * cap
        head = DraftHead(adapter, ids)
        readout = head.draft(hidden)
        torch.testing.assert_close(readout.logits, full[:, ids])
        assert set(readout.tokens.tolist()) <= set(ids)
        subset_best = full[:, ids].argmax(-1)
        assert readout.tokens.tolist() == [ids[i] for i in subset_best.tolist()]
        torch.testing.assert_close(readout.confidence, torch.softmax(full[:, ids], -1).max(-1).values)
        # Exit adapters map exited rows before the subset head, as before the full head.
        maps = {3: (torch.randn(64, 4), torch.randn(4, 64), torch.randn(64))}
        adapters = ExitAdapters(maps, 6)
        layers = torch.tensor([3, 3, 6, 2, 3])
        mapped = DraftHead(adapter, ids, adapters).logits(hidden, layers)
        torch.testing.assert_close(mapped, adapter.logits(adapters.apply(hidden, layers))[:, ids])
        assert not torch.allclose(mapped[0], readout.logits[0])  # the adapter did change row 0
        placed = head.full_vocab_logits(readout.logits)
        assert placed.shape == (5, 49152) and torch.isinf(placed).sum() == 5 * (49152 - 300)
    for bad, message in (([], "at least one"), ([1, 1], "distinct"), ([49152], "0..49151")):
        with pytest.raises(ValueError, match=message):
            DraftHead(adapter, bad)


def test_served_read_out_drafts_speculative_rows_with_the_engines_draft_read_out():
    """The pipeline's read-out (LM head, last stage): SPECULATIVE rows are drafts from the draft
    head (the subset's best token, flagged below the gate by its softmax over the subset), every
    other row the full head's token; seeded sampling draws drafts as the engine does."""
    import numpy as np

    from sedac_ray.draft_head import DraftHead, DraftReader
    from sedac_ray.policy import RULE_WIDTH
    from sedac_ray.serve.head import read_out
    from sedac_ray.serve.transport import PLAIN, SPECULATIVE, VERIFY, Rows, pack_hidden

    model, adapter = _tiny_adapter("llama")
    ids = torch.randperm(49152, generator=torch.Generator().manual_seed(2))[:300].tolist()
    hidden = torch.randn(6, 64, generator=torch.Generator().manual_seed(3)) * 4
    modes = [SPECULATIVE, SPECULATIVE, PLAIN, VERIFY, SPECULATIVE, SPECULATIVE]
    with torch.inference_mode():
        full = model.lm_head(model.get_decoder().norm(hidden))  # HF's own modules
    probability = torch.softmax(full[:, ids], -1).max(-1).values
    gate = float(probability[[0, 1, 4, 5]].median())  # some drafts above the gate, some below
    reader = DraftReader(DraftHead(adapter, ids), gate)
    greedy = SamplingParams()
    packed, dtype = pack_hidden(hidden)
    rows = Rows(
        seq_ids=[f"s{i}" for i in range(6)],
        positions=np.arange(10, 16),
        rules=np.zeros((6, RULE_WIDTH), np.float32),
        state=np.zeros(6, np.int64),
        sampling=[greedy] * 6,
        routes=[()] * 6,
        hidden=packed,
        hidden_dtype=dtype,
        exit_layer=np.array([6, 3, 4, 6, 6, 6]),
        modes=np.array(modes, np.int8),
    )
    results = read_out(adapter, rows, None, reader)
    for i, (mode, result) in enumerate(zip(modes, results, strict=True)):
        assert result.exit_layer == rows.exit_layer[i]
        if mode == SPECULATIVE:
            assert result.draft and result.token == ids[int(full[i, ids].argmax())]
            assert result.confident == bool(probability[i] >= gate)
        else:
            assert not result.draft and result.token == int(full[i].argmax())
    assert {r.confident for r in results if r.draft} == {True, False}
    assert [r.token for r in read_out(adapter, rows)] == full.argmax(-1).tolist()  # no reader: full head
    # Seeded sampling: the engine's decoder and the served read-out draw the same drafts.
    sampled = SamplingParams(temperature=0.8, seed=5)
    rows.sampling = [sampled] * 6
    picked = [i for i, mode in enumerate(modes) if mode == SPECULATIVE]
    served = read_out(adapter, rows, None, reader)
    engine, _ = reader.read(
        hidden[picked], torch.from_numpy(rows.exit_layer[picked]), [sampled] * 4, [10 + i for i in picked]
    )
    assert [served[i].token for i in picked] == engine and set(engine) <= set(ids)


def test_last_stage_drafts_a_batch_only_when_the_draft_head_may_spare_the_full_head():
    """A 300-token draft head of a 49152-token head costs 1/163.84 of it: a batch of n rows is
    worth a draft read while pass_rate ** n * 163.84 >= 1. The rate starts at the file's share and
    follows the rows read."""
    from sedac_ray.draft_head import DraftHead, DraftReader
    from sedac_ray.serve.head import DraftOdds

    _, adapter = _tiny_adapter("llama")
    reader = DraftReader(DraftHead(adapter, range(300)), 0.5)
    odds = DraftOdds(reader, 49152, start=0.5)
    assert odds.pass_rate == 0.5
    assert [odds.worth(n) for n in (1, 7, 8)] == [True, True, False]  # 0.5**7 * 163.84 = 1.28
    odds.saw([False] * 60)  # 10 of 80 rows passed, with the 20 the start weighs as
    assert odds.pass_rate == pytest.approx(10 / 80)
    assert odds.worth(2) and not odds.worth(3)  # (1/8)**2 * 163.84 = 2.56; (1/8)**3 = 0.32
    odds.saw([True] * 920)
    assert odds.pass_rate == pytest.approx(930 / 1000) and odds.worth(8)


def test_rank_tokens_puts_eos_then_counts_then_ids():
    from sedac_ray.draft_head import rank_tokens

    scores = torch.zeros(12)
    scores[[5, 7, 9, 2]] = torch.tensor([1.0, 3.0, 1.0, 0.5])
    ranked = rank_tokens(scores, always=[2])
    assert ranked[:4] == [2, 7, 5, 9]  # EOS, then by score (ties by id)
    assert ranked[4:] == [0, 1, 3, 4, 6, 8, 10, 11]
    assert sorted(ranked) == list(range(12))


def _full_depth_choices(model, ids: list[int], prefix: list[int], params: SamplingParams) -> list[int]:
    """Full-depth choices (greedy, or seeded sampling with the per-position generator) at each
    position from the last prompt token on, teacher-forced on ``ids + prefix``, from HF logits."""
    from sedac_ray.sampling import sample

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids + prefix])).logits[0]
    positions = range(len(ids) - 1, len(ids) + len(prefix))
    return [sample(logits[p], params, params.generator(p, logits.device)) for p in positions]


@pytest.mark.parametrize(
    ("arch", "confidence", "policy"),
    [
        ("llama", 0.0, ExitPolicy.disabled()),  # every draft from the subset head at full depth
        ("llama", 0.5, ExitPolicy(1e-6, k=1, min_layer=3)),  # drafts from layer 3, gated
        ("gemma2", 0.2, ExitPolicy(0.5, k=2)),  # the V7 rule, softcapped head
    ],
)
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_draft_head_decoding_is_lossless_batched(arch, confidence, policy, temperature):
    """Three sequences decoded together with a small draft head (its subset holds the right token
    only sometimes: real rollbacks): every token equals HF's full-depth choice, greedy or seeded."""
    from sedac_ray.draft_head import DraftHead
    from tests.conftest import hf_greedy

    model, adapter = _tiny_adapter(arch)
    layers = LayerRange(adapter, 0, adapter.num_layers)
    prompts = [[1, 450, 4996, 17354], [1, 22172], [1, 3118, 1023, 338, 278, 7483]]
    new_tokens = 12
    params = SamplingParams(temperature=temperature, seed=11 if temperature else None)
    # The subset: the first two prompts' greedy tokens and 200 others (the third's mostly missing).
    greedy = [t for p in prompts[:2] for t in hf_greedy(model, p, new_tokens)]
    subset = list(dict.fromkeys(greedy + list(range(1000, 1200))))
    completions, slots = [], []
    for ids in prompts:
        slot, _ = prefill(adapter, layers, ids)
        completion = Completion(tokenizer=None, max_tokens=new_tokens, eos_ids=set())
        completion.add(_full_depth_choices(model, ids, [], params)[0], adapter.num_layers)
        completions.append(completion)
        slots.append(slot)
    decoder = SpeculativeDecoder(
        layers, draft_limit=4, draft_head=DraftHead(adapter, subset), confidence=confidence
    )
    stats = decoder.run(
        completions,
        torch.tensor(slots),
        torch.tensor([len(p) for p in prompts]),
        params,
        policy.rules(len(prompts)),
    )
    for ids, completion in zip(prompts, completions, strict=True):
        tokens = completion.token_ids
        assert len(tokens) == new_tokens
        assert tokens == _full_depth_choices(model, ids, tokens[:-1], params)
    total_stats = sum(stats, SpeculativeStats())
    assert total_stats.rollbacks > 0  # drafts outside the subset were caught
    # Greedy drafts on the subset are often right; sampled ones on a random model's flat
    # distribution rarely are (their acceptance is covered with the real model below).
    assert total_stats.accepted > 0 or temperature


@pytest.mark.slow
def test_engine_speculative_defaults_are_lossless_greedy_and_sampled(smollm2):
    """``Engine(model, speculative=True)`` with the packaged speculation file (draft head, gate,
    limit, depth chosen by the cost model): batched greedy equals HF greedy, seeded sampling equals
    full-depth sampling, and drafts were really made and accepted."""
    engine = Engine(smollm2, speculative=True)
    assert engine.draft_head is not None and "speculation settings" in engine.policy_source
    greedy = engine.generate(CHAT_PROMPTS, max_new_tokens=MAX_NEW, chat=True)
    for result in greedy:
        assert result.token_ids == hf_greedy(smollm2.model, result.prompt_token_ids, MAX_NEW)
    assert total(greedy).accepted > 0
    kwargs = dict(max_new_tokens=12, temperature=0.7, top_p=0.9, seed=3, chat=True)
    full = Engine(smollm2, ExitPolicy.disabled()).generate(CHAT_PROMPTS, **kwargs)
    sampled = engine.generate(CHAT_PROMPTS, **kwargs)
    assert [r.token_ids for r in sampled] == [r.token_ids for r in full]
    assert total(sampled).accepted > 0


# ---- cost model (synthetic costs and drafts) --------------------------------------------------


def _costs(layer: float, head: float, fill: float = 0.1, draft: float = 0.5, batching: bool = True):
    from sedac_ray.cost_model import MeasuredCosts

    def flat(ms: float):  # batching nearly free up to 8 rows, then linear: a memory-bound CPU
        return {1: ms, 8: ms * 1.2, 32: ms * 4.8}

    def linear(ms: float):  # every row costs the same: compute-bound
        return {1: ms, 8: ms * 8, 32: ms * 32}

    rows = flat if batching else linear
    return MeasuredCosts(30, rows(layer), rows(fill), flat(head), {1024: flat(draft)})


def _trace(depth: int, wrong_every: int):
    from sedac_ray.cost_model import DraftTrace

    flags = [[(True, i % wrong_every != wrong_every - 1) for i in range(60)] for _ in range(4)]
    return DraftTrace(depth, 1024, 0.0, flags)


def test_replay_follows_the_decoders_rules_by_hand():
    from sedac_ray.cost_model import replay

    flags = [(True, True), (True, True), (True, False), (False, True), (True, True), (True, True)]
    counts = replay([flags], full_depth=True, draft_limit=3)
    # limit 1: [0] right; limit 2: [1] right, [2] wrong (committed corrected); [3] unconfident at
    # full depth: direct; limit 2: [4], [5] right.
    assert (counts.tokens, counts.draft_rows, counts.verified_rows) == (6, 5, 5)
    assert (counts.verifications, counts.direct, counts.accepted) == (3, 1, 4)
    below = replay([flags], full_depth=False, draft_limit=3)  # no direct read-out below full depth
    assert below.direct == 0 and below.draft_rows == 6 and below.verifications == 4

    from sedac_ray.cost_model import Plan, breakdown

    costs = _costs(layer=1.0, head=20.0)
    split = breakdown(costs, Plan(30, 1024, 0.5, 3), counts, 1)
    # The direct token ran all 30 layers and the draft head before the full head.
    assert split["direct_ms"] == pytest.approx((30 * 1.0 + 0.5 + 20.0) / 6)
    assert split["draft_ms"] == pytest.approx(5 * (30 * 1.0 + 0.5) / 6)


def test_cost_model_choice_follows_the_measured_costs():
    from sedac_ray.cost_model import choose

    traces = [_trace(30, 20), _trace(10, 5)]  # full depth: 95% right; layer 10: 80% right
    limits = [1, 2, 4, 8]
    # Batched layers nearly free: drafting at layer 10 and verifying chunks from there wins.
    batched = choose(_costs(layer=3.0, head=1.0), traces, limits, widths=[1])
    assert batched.plan.draft_depth == 10 and batched.speedup > 1.2
    # Every row costs a layer in full, and the head is expensive: re-running 20 layers per draft
    # at verification no longer pays; drafting at full depth and amortising the head does.
    linear = choose(_costs(layer=1.0, head=20.0, batching=False), traces, limits, widths=[1])
    assert linear.plan.draft_depth == 30 and linear.speedup > 1.1
    assert linear.plan.draft_limit > 1  # amortising the head needs chunks
    # A cheap head and linear layers: nothing helps; the least bad plan is still reported.
    hopeless = choose(_costs(layer=1.0, head=0.5, batching=False), traces, limits, widths=[1])
    assert hopeless.speedup < 1.0


def test_required_acceptance_and_interpolation():
    from sedac_ray.cost_model import at, fixed_chunk_ms, required_acceptance

    assert at({1: 1.0, 8: 8.0}, 4) == pytest.approx(4.0)
    assert at({1: 1.0, 8: 8.0}, 16) == pytest.approx(16.0)  # linear beyond the last width
    costs = _costs(layer=1.0, head=20.0)
    low = required_acceptance(costs, 30, 1024, 4, 1, 1.05)
    high = required_acceptance(costs, 30, 1024, 4, 1, 1.2)
    assert 0.0 < low < high < 1.0
    plain = costs.plain_ms(1)
    assert fixed_chunk_ms(costs, 30, 1024, 4, high, 1) == pytest.approx(plain / 1.2, rel=1e-6)
    assert required_acceptance(costs, 30, 1024, 4, 1, 3.0) is None  # the layers alone cost more
    with pytest.raises(ValueError, match="no draft-head cost"):
        required_acceptance(costs, 30, 4096, 4, 1, 1.1)


def test_speculation_file_round_trip_and_lookup(tmp_path, monkeypatch):
    from sedac_ray.draft_head import (
        SpeculationFile,
        SpeculationSettings,
        find_speculation,
        speculation_file_name,
    )

    monkeypatch.setenv("SEDAC_CALIBRATION_DIR", str(tmp_path))
    settings = SpeculationSettings(draft_tokens=3, confidence=0.4, draft_limit=6, exit_policy=None)
    written = SpeculationFile("org/tiny", [5, 2, 9, 1], settings, {"note": "x"})
    written.save(tmp_path / speculation_file_name("org/tiny"))
    assert (tmp_path / "org--tiny.speculative.json").is_file()
    found = find_speculation("org/tiny")
    assert found.settings == settings and found.draft_token_ids() == [5, 2, 9]
    assert found.draft_token_ids(2) == [5, 2] and found.details == {"note": "x"}
    (tmp_path / "bad.speculative.json").write_text('{"model": "bad"}')
    with pytest.raises(ValueError, match="not a sedac-ray speculation file"):
        SpeculationFile.load(tmp_path / "bad.speculative.json")
    with pytest.raises(ValueError, match="confidence must be in"):
        SpeculationSettings(draft_tokens=3, confidence=1.5, draft_limit=2)
