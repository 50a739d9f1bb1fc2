"""The Stage deployment in process, outside Ray Serve (its replica context is stubbed): how
prefill chunks and decode batches share the layers. The core itself is in test_stage_core.py;
the served pipeline end to end in test_serving.py."""

import asyncio
from types import SimpleNamespace

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from sedac_ray.model.loading import LoadedModel
from sedac_ray.policy import ExitPolicy
from sedac_ray.sampling import SamplingParams
from sedac_ray.serve import stage as stage_module
from sedac_ray.serve.transport import PrefillMessage, PrefillResult, Rows, StepMessage, TokenResult
from tests.conftest import TINY_CONFIGS


def in_process_stage(monkeypatch, config: dict, stage_index: int = 0, next_stage=None):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS["llama"]()).eval()
    replica = SimpleNamespace(replica_id=SimpleNamespace(unique_id="replica"))
    monkeypatch.setattr(stage_module.serve, "get_replica_context", lambda: replica)
    monkeypatch.setattr(stage_module, "load_config", lambda *a, **k: model.config)
    monkeypatch.setattr(stage_module, "load_model", lambda *a, **k: LoadedModel(model, None, "tiny"))
    return stage_module.StageServer(config, stage_index, next_stage=next_stage)


def test_a_long_prompt_yields_the_layers_to_decoding_between_chunks(monkeypatch):
    """A decode step that arrives while a 200-token prompt prefills in chunks of 8 runs after at
    most the chunk in progress and the one already queued, not after the whole prompt."""
    server = in_process_stage(
        monkeypatch, {"stages": 1, "prefill_chunk_tokens": 8, "max_model_len": 256, "exit": {"disable": True}}
    )
    order: list[str] = []
    for name, label in (("prefill", "prefill"), ("compute", "decode")):
        original = getattr(server.core, name)
        monkeypatch.setattr(
            server.core, name, lambda *a, _f=original, _l=label, **k: (order.append(_l), _f(*a, **k))[1]
        )

    async def run():
        await server.prefill(PrefillMessage("short", SamplingParams(), token_ids=[5, 6, 7], max_length=16))
        order.clear()
        long = asyncio.ensure_future(
            server.prefill(
                PrefillMessage("long", SamplingParams(), token_ids=list(range(3, 203)), max_length=210)
            )
        )
        while not order:  # the long prompt's first chunk is computing
            await asyncio.sleep(0.001)
        rows = Rows(
            seq_ids=["short"],
            positions=np.asarray([3]),
            rules=ExitPolicy.disabled().rules(1).numpy(),
            state=np.zeros(1, np.int64),
            sampling=[SamplingParams()],
            routes=[("replica",)],
            token_ids=np.asarray([9]),
        )
        answer = await server.step(StepMessage(rows))
        assert not long.done() and answer["short"].exit_layer == server.adapter.num_layers
        await long

    asyncio.run(run())
    assert order.count("prefill") == 25  # 200 tokens in chunks of 8
    assert order.index("decode") <= 2, order


def test_a_deeper_stage_merges_prompts_that_arrive_one_message_each(monkeypatch):
    """Stage 0 forwards a prefill batch's prompts as one message per sequence, which reach the next
    stage a moment apart: the next stage waits batch_wait_timeout_s for them and prefills them as
    one batch, as stage 0 does with the front door's requests."""
    forwarded = []

    async def next_prefill(message):
        forwarded.append(message.seq_id)
        return PrefillResult(route=("next",), first=TokenResult(0, 0))

    next_stage = SimpleNamespace(prefill=SimpleNamespace(remote=next_prefill))
    config = {"stages": 3, "batch_wait_timeout_s": 0.5, "max_model_len": 64, "exit": {"disable": True}}
    server = in_process_stage(monkeypatch, config, stage_index=1, next_stage=next_stage)
    hidden_size = server.adapter.hidden_size

    async def run():
        calls = []
        for i in range(4):  # a millisecond apart, as stage 0's replies to its batch go out
            hidden = np.random.default_rng(i).standard_normal((5 + i, hidden_size)).astype(np.float32)
            message = PrefillMessage(f"s{i}", SamplingParams(), hidden=hidden, max_length=32)
            calls.append(asyncio.ensure_future(server.prefill(message)))
            await asyncio.sleep(0.001)
        return await asyncio.gather(*calls)

    results = asyncio.run(run())
    assert [r.route for r in results] == [("replica", "next")] * 4
    assert sorted(forwarded) == ["s0", "s1", "s2", "s3"]
    assert server.prefills.batches == 1
