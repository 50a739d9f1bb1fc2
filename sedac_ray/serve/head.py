"""The LM-head deployment: final norm, LM head and sampling for tokens that exit before the last
stage (the last stage reads out its own rows with :func:`read_out`)."""

from __future__ import annotations

import asyncio

import torch

from sedac_ray.model.adapter import ModelAdapter
from sedac_ray.model.loading import load_model
from sedac_ray.model.parts import ModelPart
from sedac_ray.runtime.check import checked_adapter
from sedac_ray.sampling import choose_tokens, token_logprobs
from sedac_ray.serve.batcher import Batcher
from sedac_ray.serve.config import PipelineConfig
from sedac_ray.serve.transport import Rows, TokenResult, unpack_hidden


class HeadServer:
    def __init__(self, config: dict):
        self.config = PipelineConfig.from_args(config)
        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)
        # The final norm and the LM head alone (the embedding too only where tied and stored once).
        part = ModelPart(range(0), head=True)
        loaded = load_model(self.config.model, device=self.config.device, dtype=self.config.dtype, part=part)
        self.adapter = checked_adapter(loaded.model)
        # Exit groups arrive as whole batches from the stages: no waiting for company.
        self.batcher = Batcher(self.sample_batch, self.config.max_batch_size, wait_s=0.0)

    async def sample(self, rows: Rows) -> dict[str, TokenResult]:
        """The next token of each row, chosen from ``lm_head(final_norm(hidden))``."""
        return await self.batcher.submit(rows)

    async def sample_batch(self, messages: list[Rows]) -> list[dict[str, TokenResult]]:
        rows = Rows.concat(messages)
        chosen = await asyncio.to_thread(read_out, self.adapter, rows)
        # Split by message, not by sequence: a speculative sequence may have two rows here at once
        # (a draft from one stage and the verification of its previous token from another).
        answers, start = [], 0
        for message in messages:
            answers.append(dict(zip(message.seq_ids, chosen[start : start + len(message)], strict=True)))
            start += len(message)
        return answers


def read_out(adapter: ModelAdapter, rows: Rows) -> list[TokenResult]:
    """The next token of each row, chosen from ``lm_head(final_norm(hidden))`` (with its
    log-probabilities when the row's sampling params ask for them)."""
    with torch.inference_mode():
        hidden = unpack_hidden(rows.hidden, rows.hidden_dtype, adapter.device)
        logits = adapter.logits(hidden)
        tokens = choose_tokens(logits, rows.sampling, rows.positions.tolist())
        logprobs = token_logprobs(logits, tokens, rows.sampling)
    return [
        TokenResult(token, int(layer), logprob)
        for token, layer, logprob in zip(tokens, rows.exit_layer.tolist(), logprobs, strict=True)
    ]
