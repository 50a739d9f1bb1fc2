"""A pipeline stage in process, outside Ray Serve: which layers it holds, and how a speculative
rollback leaves its K/V. The served pipeline end to end is in test_serving.py."""

import asyncio

import numpy as np
import pytest
import torch

from sedac_ray import ExitPolicy
from sedac_ray.model.adapter import ReleasedLayer
from sedac_ray.sampling import SamplingParams
from sedac_ray.serve.transport import SPECULATIVE, PrefillMessage, Rows, StepMessage, TokenResult
from tests.conftest import hf_greedy

DRAFTING = ExitPolicy(0.97, k=3)


@pytest.fixture
def in_process_stage(monkeypatch):
    """StageServer outside Ray Serve: the replica context it asks for its id is stubbed."""
    from types import SimpleNamespace

    from sedac_ray.serve import stage as stage_module

    replica = SimpleNamespace(replica_id=SimpleNamespace(unique_id="replica"))
    monkeypatch.setattr(stage_module.serve, "get_replica_context", lambda: replica)
    return stage_module.StageServer


def test_a_stage_holds_only_its_own_layers(in_process_stage):
    server = in_process_stage({"stages": 3}, 1)
    held = [i for i, layer in enumerate(server.adapter.layers) if not isinstance(layer, ReleasedLayer)]
    assert held == list(range(10, 20))


def test_a_stage_rollback_leaves_kv_as_if_the_void_rows_never_existed(smollm2, in_process_stage):
    """A pipeline stage in process (one stage: every layer), fed by hand as the front door would:
    a speculative sequence steps on from a wrong token, then a row of the new epoch rolls it back.
    Its K/V must then equal a sequence that only ever saw the right tokens, zeros past them."""

    class Head:  # the LM head's reply is not what this test is about
        class sample:  # noqa: N801 - mirrors a deployment handle's method
            @staticmethod
            async def remote(rows: Rows) -> dict[str, TokenResult]:
                return {seq_id: TokenResult(0, 30) for seq_id in rows.seq_ids}

    prompt = smollm2.tokenizer("The quick brown fox jumps over the")["input_ids"]
    n = len(prompt)
    right, wrong, void = hf_greedy(smollm2.model, prompt, 2), 13, 17

    def step(seq_id: str, position: int, token: int, epoch: int) -> StepMessage:
        rows = Rows(
            seq_ids=[seq_id],
            positions=np.asarray([position]),
            rules=np.asarray([DRAFTING.rule()], dtype=np.float32),
            state=np.zeros(1, np.int64),
            sampling=[SamplingParams()],
            routes=[("replica",)],
            token_ids=np.asarray([token]),
        )
        rows.modes[:], rows.epochs[:] = SPECULATIVE, epoch
        return StepMessage(rows)

    async def run():
        server = in_process_stage({"stages": 1}, 0, head=Head())
        for seq_id in ("rolled back", "reference"):
            await server.prefill(PrefillMessage(seq_id, SamplingParams(), token_ids=prompt, max_length=n + 8))
        # The first token was drafted wrong: the next two positions run from it, then the
        # verified token arrives at position n + 1 in epoch n + 1.
        for position, token, epoch in [
            (n, right[0], 0),
            (n + 1, wrong, 0),
            (n + 2, void, 0),
            (n + 1, right[1], n + 1),
        ]:
            assert "rolled back" in await server.step(step("rolled back", position, token, epoch))
        for position, token in [(n, right[0]), (n + 1, right[1])]:
            await server.step(step("reference", position, token, 0))
        return server

    server = asyncio.run(run())
    cache, capacity = server.layers.cache, n + 8
    ours, theirs = (server.sequences[s].slot for s in ("rolled back", "reference"))
    assert server.sequences["rolled back"].filled == n + 2
    for layer in range(smollm2.model.config.num_hidden_layers):
        for mine, reference in zip(
            cache.read(layer, ours, capacity), cache.read(layer, theirs, capacity), strict=True
        ):
            torch.testing.assert_close(mine[:, : n + 2], reference[:, : n + 2], rtol=1e-5, atol=1e-5)
            assert torch.count_nonzero(mine[:, n + 2 :]) == 0  # the void row's K/V are gone
