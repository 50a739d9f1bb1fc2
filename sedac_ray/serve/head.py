"""The LM-head deployment: final norm, LM head and sampling for tokens that exit before the last
stage (the last stage reads out its own rows with :func:`read_out`, and verifies the drafts it
makes at full depth itself); speculative drafts from early exits are read out by the draft head."""

from __future__ import annotations

import time

import numpy as np
import torch

from sedac_ray.draft_head import DraftReader, draft_reader, find_speculation
from sedac_ray.exit.store import model_name_for_spec
from sedac_ray.exit_adapters import ExitAdapters, exit_logits
from sedac_ray.model.adapter import ModelAdapter
from sedac_ray.model.loading import load_model
from sedac_ray.model.parts import ModelPart
from sedac_ray.runtime.check import checked_adapter
from sedac_ray.sampling import choose_tokens, token_logprobs
from sedac_ray.serve.batcher import Batcher
from sedac_ray.serve.compute_thread import ComputeThread
from sedac_ray.serve.config import PipelineConfig
from sedac_ray.serve.transport import SPECULATIVE, VERIFY, Rows, TokenResult, unpack_hidden


class HeadServer:
    def __init__(self, config: dict):
        self.config = PipelineConfig.from_args(config)
        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)
        self.compute = ComputeThread(self.config.torch_threads)  # tensor work, off the event loop
        # The final norm and the LM head alone (the embedding too only where tied and stored once).
        part = ModelPart(range(0), head=True)
        loaded = load_model(self.config.model, device=self.config.device, dtype=self.config.dtype, part=part)
        self.adapter = checked_adapter(loaded.model)
        self.exit_adapters = load_exit_adapters(self.config, self.adapter)
        self.drafts, _ = load_drafts(self.config, self.adapter, self.exit_adapters)
        self.rows_read = 0  # rows read out here
        self.compute_s = 0.0  # wall time spent reading out
        # Exit groups arrive as whole batches from the stages: no waiting for company.
        self.batcher = Batcher(self.sample_batch, self.config.max_batch_size, wait_s=0.0)

    async def sample(self, rows: Rows) -> dict[str, TokenResult]:
        """The next token of each row, chosen from ``lm_head(final_norm(hidden))``."""
        return await self.batcher.submit(rows)

    async def sample_batch(self, messages: list[Rows]) -> list[dict[str, TokenResult]]:
        rows = Rows.concat(messages)
        started = time.perf_counter()
        chosen = await self.compute.run(read_out, self.adapter, rows, self.exit_adapters, self.drafts)
        self.compute_s += time.perf_counter() - started
        self.rows_read += len(rows)
        # Split by message, not by sequence: a speculative sequence may have two rows here at once
        # (a draft from one stage and the verification of its previous token from another).
        answers, start = [], 0
        for message in messages:
            answers.append(dict(zip(message.seq_ids, chosen[start : start + len(message)], strict=True)))
            start += len(message)
        return answers

    async def stats(self) -> dict:
        return {"rows": self.rows_read, "batches": self.batcher.batches, "compute_s": self.compute_s}


class DraftOdds:
    """Whether a batch of ``n`` speculative rows that would otherwise take the full head is worth
    reading with the draft head first (the pipeline's last stage). It saves the full head only if
    every row passes the gate, and the full head costs about ``vocab / V`` draft heads (both read
    their whole weight per call: FR-Spec), so it pays when ``pass_rate ** n * vocab / V >= 1``:
    at one stream, yes; in a batch of 8 at a pass rate near one half, no. The pass rate is the
    share of rows read so far that passed, starting from the speculation file's measured share."""

    PRIOR_ROWS = 20  # how many rows the starting share weighs as

    def __init__(self, drafts: DraftReader, vocab: int, start: float):
        self.ratio = vocab / len(drafts.head)
        self.start = start
        self.seen = self.passed = 0

    @property
    def pass_rate(self) -> float:
        return (self.passed + self.PRIOR_ROWS * self.start) / (self.seen + self.PRIOR_ROWS)

    def worth(self, rows: int) -> bool:
        return self.pass_rate**rows * self.ratio >= 1.0

    def saw(self, passed: list[bool]) -> None:
        self.seen += len(passed)
        self.passed += sum(passed)


def as_verify(rows: Rows) -> Rows:
    """The rows as VERIFY rows: the full head reads them out (their full-depth verification)."""
    rows.modes = np.full(len(rows), VERIFY, np.int8)
    return rows


def load_drafts(
    config: PipelineConfig, adapter: ModelAdapter, exit_adapters: ExitAdapters | None
) -> tuple[DraftReader | None, DraftOdds | None]:
    """Speculative drafts' read-out for a part holding the final norm and LM head: the model's
    draft head and gate from its speculation file, found and built as the engine does; and the
    odds that a batch drafts (from the file's measured share of drafted tokens)."""
    speculation = find_speculation(model_name_for_spec(config.model)) if config.draft_head else None
    drafts = draft_reader(adapter, speculation, exit_adapters)
    if drafts is None:
        return None, None
    share = speculation.details.get("choice", {}).get("draft_share", 0.5)  # unmeasured: even odds
    return drafts, DraftOdds(drafts, adapter.head.weight.shape[0], share)


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
    adapter: ModelAdapter,
    rows: Rows,
    exit_adapters: ExitAdapters | None = None,
    drafts: DraftReader | None = None,
) -> list[TokenResult]:
    """The next token of each row, from the one exit read-out the engine and calibration use
    (``exit_logits``: the row's exit adapter when there are any, final norm, LM head), with its
    log-probabilities when the row's sampling params ask for them. With ``drafts``, SPECULATIVE
    rows are drafts and are read out as the engine reads its drafts (:class:`DraftReader`: the
    draft head, exit adapters first, and its confidence gate); verification uses the full head."""
    results: list[TokenResult | None] = [None] * len(rows)
    drafting = (rows.modes == SPECULATIVE) if drafts is not None else np.zeros(len(rows), bool)
    with torch.inference_mode():
        hidden = unpack_hidden(rows.hidden, rows.hidden_dtype, adapter.device)
        exit_layers = torch.from_numpy(rows.exit_layer)
        positions = rows.positions.tolist()
        if drafting.any():
            index = np.flatnonzero(drafting).tolist()
            tokens, confident = drafts.read(
                hidden[index],
                exit_layers[index],
                [rows.sampling[i] for i in index],
                [positions[i] for i in index],
            )
            for i, token, sure in zip(index, tokens, confident, strict=True):
                results[i] = TokenResult(token, int(rows.exit_layer[i]), draft=True, confident=sure)
        if not drafting.all():
            index = np.flatnonzero(~drafting).tolist()
            sampling = [rows.sampling[i] for i in index]
            logits = exit_logits(adapter, hidden[index], exit_layers[index], exit_adapters)
            tokens = choose_tokens(logits, sampling, [positions[i] for i in index])
            logprobs = token_logprobs(logits, tokens, sampling)
            for i, token, logprob in zip(index, tokens, logprobs, strict=True):
                results[i] = TokenResult(token, int(rows.exit_layer[i]), logprob)
    return results
