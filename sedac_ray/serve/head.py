"""The LM-head deployment: final norm, LM head and sampling for tokens from any stage."""

from __future__ import annotations

import asyncio

import torch

from sedac_ray.exit_adapters import exit_logits
from sedac_ray.model.adapter import ModelAdapter
from sedac_ray.model.loading import load_model
from sedac_ray.sampling import choose_tokens
from sedac_ray.serve.batcher import Batcher
from sedac_ray.serve.config import PipelineConfig
from sedac_ray.serve.transport import Rows, TokenResult, unpack_hidden


class HeadServer:
    def __init__(self, config: dict):
        self.config = PipelineConfig.from_args(config)
        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)
        loaded = load_model(self.config.model, device=self.config.device, dtype=self.config.dtype)
        self.adapter = ModelAdapter(loaded.model)
        self.adapter.release_layers(range(0))  # the head runs no decoder layer
        # Exit groups arrive as whole batches from the stages: no waiting for company.
        self.batcher = Batcher(self.sample_batch, self.config.max_batch_size, wait_s=0.0)

    async def sample(self, rows: Rows) -> dict[str, TokenResult]:
        """The next token of each row, chosen from ``lm_head(final_norm(hidden))``."""
        return await self.batcher.submit(rows)

    async def sample_batch(self, messages: list[Rows]) -> list[dict[str, TokenResult]]:
        rows = Rows.concat(messages)
        tokens = await asyncio.to_thread(self._choose, rows)
        chosen = [
            TokenResult(token, int(layer))
            for token, layer in zip(tokens, rows.exit_layer.tolist(), strict=True)
        ]
        # Split by message, not by sequence: a speculative sequence may have two rows here at once
        # (a draft from one stage and the verification of its previous token from another).
        answers, start = [], 0
        for message in messages:
            answers.append(dict(zip(message.seq_ids, chosen[start : start + len(message)], strict=True)))
            start += len(message)
        return answers

    def _choose(self, rows: Rows) -> list[int]:
        with torch.inference_mode():
            hidden = unpack_hidden(rows.hidden, rows.hidden_dtype, self.adapter.device)
            # The one exit read-out the engine and calibration use (exit adapters when the head has them).
            layers = torch.from_numpy(rows.exit_layer)
            logits = exit_logits(self.adapter, hidden, layers, getattr(self, "exit_adapters", None))
            return choose_tokens(logits, rows.sampling, rows.positions.tolist())
