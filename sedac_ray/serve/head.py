"""The LM-head deployment: final norm, LM head and sampling for tokens that exit before the last
stage (the last stage reads out its own rows with :func:`read_out`)."""

from __future__ import annotations

import asyncio

import torch

from sedac_ray.exit_adapters import ExitAdapters, exit_logits
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
        self.exit_adapters = load_exit_adapters(self.config, self.adapter)
        # Exit groups arrive as whole batches from the stages: no waiting for company.
        self.batcher = Batcher(self.sample_batch, self.config.max_batch_size, wait_s=0.0)

    async def sample(self, rows: Rows) -> dict[str, TokenResult]:
        """The next token of each row, chosen from ``lm_head(final_norm(hidden))``."""
        return await self.batcher.submit(rows)

    async def sample_batch(self, messages: list[Rows]) -> list[dict[str, TokenResult]]:
        rows = Rows.concat(messages)
        chosen = await asyncio.to_thread(read_out, self.adapter, rows, self.exit_adapters)
        # Split by message, not by sequence: a speculative sequence may have two rows here at once
        # (a draft from one stage and the verification of its previous token from another).
        answers, start = [], 0
        for message in messages:
            answers.append(dict(zip(message.seq_ids, chosen[start : start + len(message)], strict=True)))
            start += len(message)
        return answers


def load_exit_adapters(config: PipelineConfig, adapter: ModelAdapter) -> ExitAdapters | None:
    """The exit adapters a serving part applies to exited tokens (``exit_adapters`` in the config)."""
    if config.exit_adapters is None:
        return None
    adapters = ExitAdapters.load(config.exit_adapters)
    if adapters.num_layers != adapter.num_layers:
        raise ValueError(
            f"exit adapters {config.exit_adapters} are for {adapters.num_layers} layers; "
            f"the model has {adapter.num_layers}"
        )
    return adapters.to(adapter.device)


def read_out(
    adapter: ModelAdapter, rows: Rows, exit_adapters: ExitAdapters | None = None
) -> list[TokenResult]:
    """The next token of each row, from the one exit read-out the engine and calibration use
    (``exit_logits``: the row's exit adapter when there are any, final norm, LM head), with its
    log-probabilities when the row's sampling params ask for them."""
    with torch.inference_mode():
        hidden = unpack_hidden(rows.hidden, rows.hidden_dtype, adapter.device)
        logits = exit_logits(adapter, hidden, torch.from_numpy(rows.exit_layer), exit_adapters)
        tokens = choose_tokens(logits, rows.sampling, rows.positions.tolist())
        logprobs = token_logprobs(logits, tokens, rows.sampling)
    return [
        TokenResult(token, int(layer), logprob)
        for token, layer, logprob in zip(tokens, rows.exit_layer.tolist(), logprobs, strict=True)
    ]
