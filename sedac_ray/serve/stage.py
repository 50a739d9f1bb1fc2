"""A pipeline stage as a Ray Serve deployment: one range of decoder layers (stage 0 also embeds;
the last stage also reads out), thin over :class:`~sedac_ray.serve.stage_core.StageCore`.

Each step request carries decode rows of one or more sequences; a :class:`Batcher` merges the
requests in flight into one batch, where tokens exit layer by layer. Then:

* the exit group goes straight to the LM-head deployment (at the last stage, every row that
  finished is read out here, with no hop: most tokens run the whole depth);
* the continue group and the fill group (exited tokens whose K/V deeper layers still need) go to
  the next stage, one message per next-stage replica that holds those sequences.

Every request awaits only the calls that carry its own rows, so a token that exits here returns
without waiting for tokens that continue. Prefills of concurrent sequences are batched, in
chunks of at most ``prefill_chunk_tokens`` tokens per sequence: between chunks, decode batches
get the layers, so a long prompt holds decoding back for one chunk at a time.

Speculative rows (lossless mode): a row that exits is a *draft*. Its token goes to the LM head at
once (read out as the engine reads drafts: the model's draft head and its confidence gate), and
the same hidden state runs on at full depth as a VERIFY row (from its exit layer to the end of
this range, then through the deeper stages), writing exact K/V. At the last stage speculative
rows run to full depth; with a draft head they are drafts too, answered from the draft head, and
their full-head read-out (the verification) follows the reply, so it overlaps with the next
step's first stages. A batch with a row below the gate (or any row that needs the full head)
reads every row with the full head at once, drafting none: the head costs about the same. The last
stage keeps each verified token for the front door (:meth:`StageServer.verified`). A wrong
draft makes the front door resume from the verified token with a new epoch (the position it
rolled back to); the first row of that epoch rolls the sequence back in each stage, and rows of
older epochs are dropped wherever they still are. Their K/V past that position is zeroed before
the next batch runs, so the cache holds exactly what it would had they never run.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import time

import numpy as np
import psutil
import torch
from ray import serve

from sedac_ray.exit.probes import ExitProbes
from sedac_ray.model.loading import load_config, load_model
from sedac_ray.model.parts import ModelPart
from sedac_ray.policy import ExitPolicy
from sedac_ray.runtime.check import checked_adapter
from sedac_ray.serve.batcher import Batcher, wait_set
from sedac_ray.serve.compute_thread import ComputeThread
from sedac_ray.serve.config import PipelineConfig
from sedac_ray.serve.errors import Overloaded, ServeError, as_serve_error
from sedac_ray.serve.head import as_verify, load_drafts, load_exit_adapters, read_out
from sedac_ray.serve.metrics import StageMetrics
from sedac_ray.serve.routing import pin
from sedac_ray.serve.stage_core import PrefillChunk, StageCore, StageOutput, VerifiedTokens
from sedac_ray.serve.transport import (
    SPECULATIVE,
    VERIFY,
    PrefillMessage,
    PrefillResult,
    Rows,
    StepMessage,
    TokenResult,
    pack_hidden,
    unpack_hidden,
)

logger = logging.getLogger("ray.serve")
PREFILL_BATCH = 8


def model_probes(config: PipelineConfig, num_layers: int, dtype) -> ExitProbes | None:
    """The exit probes of the model's calibration, when it has them: they serve any probe policy,
    as the engine's do."""
    path = config.exit_probes_path(num_layers, dtype)
    return ExitProbes.load(path) if path is not None else None


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class StageServer:
    def __init__(self, config: dict, stage_index: int, next_stage=None, head=None):
        self.config = PipelineConfig.from_args(config)
        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)
        self.compute = ComputeThread(self.config.torch_threads)  # tensor work, off the event loop
        self.stage_index = stage_index
        num_layers = load_config(self.config.model).num_hidden_layers
        start, end = self.config.layer_ranges(num_layers)[stage_index]
        # Only this stage's weights: its layers, the embedding at stage 0, the final norm and LM
        # head at the last stage (which reads out the rows that run the whole depth).
        part = ModelPart(range(start, end), embed=stage_index == 0, head=end == num_layers)
        loaded = load_model(self.config.model, device=self.config.device, dtype=self.config.dtype, part=part)
        adapter = checked_adapter(loaded.model)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.core = StageCore(
            adapter,
            start,
            end,
            kv_budget_bytes=None
            if self.config.kv_budget_mb is None
            else int(self.config.kv_budget_mb * 2**20),
            max_model_len=self.config.model_len(adapter.max_context),
            max_sequences=self.config.max_concurrent_requests,
            name=f"stage {stage_index}",
            probes=model_probes(self.config, num_layers, adapter.dtype),
        )
        self.adapter = adapter
        self.next_stage, self.head = next_stage, head
        # The last stage reads out the rows that finish here, exits included, like the LM head.
        self.exit_adapters = load_exit_adapters(self.config, adapter) if next_stage is None else None
        # ... and its speculative rows as the engine reads drafts out (draft head and gate).
        self.drafts, self.draft_odds = (
            load_drafts(self.config, adapter, self.exit_adapters) if next_stage is None else (None, None)
        )
        self.drafted = 0  # last stage: speculative rows answered with a draft, verified later
        self._unverified: list[Rows] = []  # those drafts, waiting for their full-head read-out
        self._verifying: asyncio.Task | None = None  # reads them out between batches
        self.rows_computed = 0  # decode rows run here
        self.compute_s = 0.0  # wall time spent in decode compute
        self.compute_lock = asyncio.Lock()  # one batch at a time; the event loop stays free
        # Decode steps come as whole batches (the front door merges its sequences' steps into
        # one message per replica), so a lone step has no company to wait for: waiting would add
        # batch_wait_timeout_s to every token. Steps that arrive while a batch computes still
        # merge into the next one.
        self.batcher = Batcher(self.step_batch, self.config.max_batch_size, 0.0)
        # Prompts arrive one request at a time (and deeper stages get a batch's prompts as one
        # message each): a stage waits a moment for concurrent ones. At most PREFILL_BATCH prompt
        # chunks share a batch, so a batch (and the wait it imposes on decoding) stays bounded by
        # PREFILL_BATCH x prefill_chunk_tokens tokens.
        self.prefills = Batcher(self._prefill_batch, PREFILL_BATCH, self.config.batch_wait_timeout_s)
        self.metrics = StageMetrics(stage_index)
        self.verifications = VerifiedTokens()  # last stage: drafts' full-depth tokens
        self._slot_freed = asyncio.Event()  # set when a release frees a KV slot
        self._sweeper: asyncio.Task | None = None
        logger.info(
            f"stage {stage_index}: layers {start + 1}..{end} on {self.config.device}, KV pool of "
            f"{self.core.num_slots} sequences x {self.core.max_model_len} positions "
            f"({self.core.kv_budget_bytes / 2**20:.0f} MiB)"
        )

    # ---- prefill: whole prompts, full depth, batched across sequences and chunked ---------------

    async def prefill(self, message: PrefillMessage) -> PrefillResult:
        try:
            return await self._prefill(message)
        except BaseException:
            # The front door never learns a route for a failed prefill: free this replica's part here.
            await self.release([message.seq_id])
            raise

    async def _admit(self, message: PrefillMessage):
        """A KV slot for the sequence; a full pool is waited on for ``admission_wait_s`` (finished
        sequences free their slots a batch later) before the request is refused (Overloaded)."""
        give_up = time.monotonic() + self.config.admission_wait_s
        while True:
            try:
                return self.core.admit(message.seq_id, message.max_length)
            except Overloaded:
                remaining = give_up - time.monotonic()
                if remaining <= 0:
                    raise
                await wait_set(self._slot_freed, remaining)

    async def _prefill(self, message: PrefillMessage) -> PrefillResult:
        sequence = await self._admit(message)
        self._report_kv()
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._reclaim_orphans())
        if message.token_ids is not None:
            count = len(message.token_ids)
        else:
            count = message.hidden.shape[0]
            hidden_in = unpack_hidden(message.hidden, message.hidden_dtype, self.adapter.device)
        outputs = []
        step = self.config.prefill_chunk_tokens
        for start in range(0, count, step):
            end = min(count, start + step)
            chunk = PrefillChunk(message.seq_id, start)
            if message.token_ids is not None:
                chunk.token_ids = message.token_ids[start:end]
            else:
                chunk.hidden = hidden_in[start:end]
            outputs.append(await self.prefills.submit(chunk))
        sequence.wrote_prefix(count)
        if self.next_stage is not None:
            packed, dtype = await self.compute.run(lambda: pack_hidden(torch.cat(outputs)))
            downstream = await self.next_stage.prefill.remote(
                PrefillMessage(
                    message.seq_id,
                    message.sampling,
                    hidden=packed,
                    hidden_dtype=dtype,
                    max_length=message.max_length,
                )
            )
            return PrefillResult(route=(self.replica_id, *downstream.route), first=downstream.first)
        packed, dtype = pack_hidden(outputs[-1][-1:])
        last = Rows(
            seq_ids=[message.seq_id],
            positions=np.array([count - 1]),
            rules=np.asarray([ExitPolicy.disabled().rule()], np.float32),
            state=np.zeros(1, np.int64),
            sampling=[message.sampling],
            routes=[()],
            hidden=packed,
            hidden_dtype=dtype,
            exit_layer=np.array([self.adapter.num_layers]),
        )
        (first,) = await self.compute.run(read_out, self.adapter, last)  # full depth: no adapter
        return PrefillResult(route=(self.replica_id,), first=first)

    async def _prefill_batch(self, chunks: list[PrefillChunk]) -> list[torch.Tensor]:
        async with self.compute_lock:
            chunks_held = [c for c in chunks if c.seq_id in self.core.sequences]  # not released meanwhile
            outputs = await self.compute.run(self.core.prefill, chunks_held) if chunks_held else []
        by_chunk = dict(zip(map(id, chunks_held), outputs, strict=True))
        return [by_chunk[id(c)] if id(c) in by_chunk else self.core.gone(c.seq_id) for c in chunks]

    # ---- decode steps ------------------------------------------------------------------------

    async def step(self, message: StepMessage) -> dict[str, TokenResult | ServeError]:
        """Results for ``message.rows``: the token each of them ends up producing, or the error
        that stopped that row alone (a sequence released meanwhile, a failed replica downstream);
        the other rows of the message carry on."""
        # Fills go in at once and never wait: a message's decode rows may wait for fills that
        # travel in other messages, and those may wait for this message's fills.
        fills = None
        if len(message.fill):
            fills = asyncio.ensure_future(self.batcher.submit(StepMessage(Rows.empty(), message.fill)))
        results: dict[str, TokenResult | ServeError] = {}
        pending: dict[str, asyncio.Future] = {}
        if len(message.rows):
            for seq_id, epoch in zip(message.rows.seq_ids, message.rows.epochs.tolist(), strict=True):
                if self.core.catch_up(seq_id, epoch):  # stale polls are answered at once
                    self.verifications.forget(seq_id, before_epoch=epoch)
            rows, lost = await self.core.wait_for_kv(message.rows, self.config.step_timeout_s)
            results.update(lost)
            if len(rows):
                pending = await self.batcher.submit(StepMessage(rows))
        if fills is not None:
            await fills
        calls = list({id(f): f for f in pending.values()}.values())
        answers = dict(zip(map(id, calls), await asyncio.gather(*calls, return_exceptions=True), strict=True))
        for seq_id, call in pending.items():
            answer = answers[id(call)]
            results[seq_id] = as_serve_error(answer) if isinstance(answer, BaseException) else answer[seq_id]
        return {seq_id: results[seq_id] for seq_id in message.rows.seq_ids}

    async def step_batch(self, messages: list[StepMessage]) -> list[dict[str, asyncio.Future]]:
        """Runs the merged batch; for each message, the call or result that answers each row."""
        async with self.compute_lock:
            # Rows and fills of sequences released while in flight (finished, or the client left)
            # are dropped here, under the lock that release takes, and so are rows of an epoch
            # rolled back meanwhile: each such row fails alone.
            rows = self.core.current(Rows.concat([m.rows for m in messages]))
            fill = self.core.current(Rows.concat([m.fill for m in messages]))
            rolled_back = self.core.take_rolled_back()
            unverified = self._take_unverified()
            started = time.perf_counter()
            out, read, verified = await self.compute.run(self._compute, rows, fill, rolled_back, unverified)
            self.compute_s += time.perf_counter() - started
            self.core.wrote(rows)
            self.core.wrote(fill)
            self._keep_verified(unverified, verified)
        self.rows_computed += len(rows)
        self.metrics.batch(len(rows), self.batcher.queued)

        futures: dict[str, asyncio.Future] = {}  # seq_id -> what answers its row
        loop = asyncio.get_running_loop()
        if read is not None:  # the last stage read its rows out itself
            answers = dict(zip(out.exited.seq_ids, read, strict=True))
            verifying = np.flatnonzero(out.exited.modes == VERIFY).tolist()
            self._keep_verified(out.exited.take(verifying), [read[i] for i in verifying])
            drafted = [i for i, answer in enumerate(read) if answer.draft]
            if drafted:
                self._verify_later(out.exited.take(drafted))
            # Verifications ready here go back with the sequence's next row: no call of their own.
            for i in np.flatnonzero(out.exited.modes == SPECULATIVE).tolist():
                ready = self.verifications.take(out.exited.seq_ids[i], int(out.exited.epochs[i]))
                read[i].verified = ready or None
            done = loop.create_future()
            done.set_result(answers)
            futures.update(dict.fromkeys(answers, done))
        else:
            exited = out.exited
            if len(exited):
                head_call = asyncio.ensure_future(self._await(self.head.sample.remote(exited)))
                futures.update(dict.fromkeys(exited.seq_ids, head_call))
            futures.update(self._send_downstream(out.continuing, out.fill, out.verify))
        for seq_id in (s for m in messages for s in m.rows.seq_ids if s not in futures):
            futures[seq_id] = loop.create_future()
            futures[seq_id].set_exception(self.core.gone(seq_id))
        return [{s: futures[s] for s in m.rows.seq_ids} for m in messages]

    def _compute(
        self, rows: Rows, fill: Rows, rolled_back: list[tuple[int, int]], unverified: Rows
    ) -> tuple[StageOutput, list[TokenResult] | None, list[TokenResult]]:
        """The batch through this stage's layers; the last stage also reads out every row that
        finished, and the full-depth tokens of ``unverified`` drafts in the same head call."""
        self.core.zero(rolled_back)
        out = self.core.compute(rows, fill)
        if self.next_stage is not None:
            return out, None, []
        finished = len(out.exited)
        both = Rows.concat([out.exited, unverified])
        if not len(both):
            return out, [], []
        # Speculative rows end here at full depth: with a draft head they are drafts, read out
        # cheaply, and their full-head verification comes after the reply (_verify_later). That
        # pays only when the batch needs no full head at all: one below the gate is read out by
        # the full head now (as in the engine), and once the full head runs for a batch, every
        # row takes it (it is read whole per call, so a few more rows cost little; the engine's
        # verification takes every pending draft along the same way), drafting none.
        # The draft head's read is skipped where it would rarely spare the full head (DraftOdds).
        if (
            self.drafts is not None
            and bool((both.modes == SPECULATIVE).all())
            and self.draft_odds.worth(len(both))
        ):
            read = read_out(self.adapter, both, self.exit_adapters, self.drafts)
            self.draft_odds.saw([answer.confident for answer in read])
            if all(answer.confident for answer in read):
                return out, read, []
        read = read_out(self.adapter, both, self.exit_adapters)
        return out, read[:finished], read[finished:]

    def _verify_later(self, drafted: Rows) -> None:
        """Drafts made here get their full-depth token from the full head after the reply: in the
        next batch's read-out, or between batches when none comes first (so at one stream it
        overlaps with the next step's first stages). The front door gets it with that
        sequence's next reply, or from its poll (:meth:`verified`)."""
        self.drafted += len(drafted)
        self._unverified.append(as_verify(drafted))
        if self._verifying is None or self._verifying.done():
            self._verifying = asyncio.get_running_loop().create_task(self._verify_between_batches())

    def _take_unverified(self) -> Rows:
        """The drafts still to verify, of sequences held here and not rolled back since."""
        rows = self.core.current(Rows.concat(self._unverified))
        self._unverified = []
        return rows

    async def _verify_between_batches(self) -> None:
        async with self.compute_lock:
            rows = self._take_unverified()
            if not len(rows):  # a batch read them out first
                return
            started = time.perf_counter()
            read = await self.compute.run(read_out, self.adapter, rows, self.exit_adapters)
            self.compute_s += time.perf_counter() - started
        self._keep_verified(rows, read)

    def _send_downstream(self, continuing: Rows, fill: Rows, verify: Rows) -> dict[str, asyncio.Future]:
        """One message per next-stage replica; returns seq_id -> call for the continuing rows.
        ``verify`` rows travel along, but their answers go to the last stage's store."""
        next_index = self.stage_index + 1
        parts = (continuing, fill, verify)
        targets = {route[next_index] for part in parts for route in part.routes}
        futures: dict[str, asyncio.Future] = {}
        for target in targets:
            rows, fills, verifying = (
                part.take([i for i, r in enumerate(part.routes) if r[next_index] == target]) for part in parts
            )
            message = StepMessage(Rows.concat([rows, verifying]), fills)
            call = self.next_stage.options(session_id=pin(target)).step.remote(message)
            future = asyncio.ensure_future(self._await(call))
            if len(rows):
                futures.update(dict.fromkeys(rows.seq_ids, future))
            else:  # nobody waits for the answer, but a failure must not pass silently
                future.add_done_callback(self._log_failure)
        return futures

    # ---- speculative rows: verified tokens (last stage) ----------------------------------------

    def _keep_verified(self, rows: Rows, answers: list[TokenResult]) -> None:
        """Full-depth tokens of VERIFY rows that ended here, kept for :meth:`verified`."""
        for seq_id, position, epoch, answer in zip(
            rows.seq_ids, rows.positions.tolist(), rows.epochs.tolist(), answers, strict=True
        ):
            sequence = self.core.sequences.get(seq_id)
            if sequence is not None and sequence.epoch == epoch:  # not released or rolled back meanwhile
                self.verifications.keep(seq_id, position, epoch, answer)

    async def verified(self, seq_id: str, position: int, epoch: int) -> dict[int, TokenResult]:
        """The full-depth tokens of the sequence's rows at ``position`` and later in ``epoch``
        (drafts' verifications), once at least one has run through every stage. Last stage only.
        A poll for a sequence that is gone or rolled back past ``epoch`` fails at once."""
        if self.next_stage is not None:
            raise ValueError(f"stage {self.stage_index} is not the last stage: it keeps no verified tokens")

        def current() -> None:
            sequence = self.core.sequences.get(seq_id)
            if sequence is None or epoch < sequence.epoch:
                raise self.core.gone(seq_id)

        return await self.verifications.collect(seq_id, position, epoch, current)

    @staticmethod
    async def _await(response):
        return await response

    def _log_failure(self, future: asyncio.Future) -> None:
        if not future.cancelled() and future.exception() is not None:
            logger.error(f"stage {self.stage_index}: a call nobody awaits failed: {future.exception()!r}")

    # ---- sequence table ----------------------------------------------------------------------

    def _report_kv(self) -> None:
        self.metrics.kv(len(self.core.sequences), self.core.kv_bytes_in_use(), self.core.kv_budget_bytes)

    async def _reclaim_orphans(self) -> None:
        """Every sequence sees traffic each step (a row or a fill), so one that saw none for
        ``kv_lease_s`` lost its front door: e.g. a replica upstream died mid-prefill, before the
        front door learned where the sequence lives. Its KV is freed here."""
        lease = self.config.kv_lease_s
        while True:
            await asyncio.sleep(lease / 4)
            orphans = self.core.orphans(lease)
            if orphans:
                logger.warning(f"stage {self.stage_index}: freeing KV of {len(orphans)} orphaned sequences")
                await self.release(orphans)

    async def release(self, seq_ids: list[str]) -> int:
        """Free the KV of finished sequences; returns how many sequences this replica still holds."""
        async with self.compute_lock:  # never free a slot under a running batch
            if self.core.release(seq_ids):
                self._slot_freed.set()
            for seq_id in seq_ids:
                self.verifications.forget(seq_id)  # its polls see that it is gone
        self._report_kv()
        return len(self.core.sequences)

    async def stats(self) -> dict:
        return {
            "stage": self.stage_index,
            "replica": self.replica_id,
            "pid": os.getpid(),
            "sequences": len(self.core.sequences),
            "admitted": self.core.admitted,
            "decode_rows": self.rows_computed,
            "decode_batches": self.batcher.batches,
            "mean_batch_rows": self.rows_computed / max(1, self.batcher.batches),
            "prefill_batches": self.prefills.batches,
            "decode_compute_s": self.compute_s,
            "drafted_here": self.drafted,
            "torch_threads": torch.get_num_threads(),
            "kv_slots_in_use": self.core.layers.cache.slots_in_use,
            "kv_slots": self.core.num_slots,
            "kv_bytes": self.core.kv_bytes_in_use(),
            "kv_budget_bytes": self.core.kv_budget_bytes,
            "rss_bytes": psutil.Process().memory_info().rss,
            "peak_rss_bytes": peak_rss_bytes(),
        }
