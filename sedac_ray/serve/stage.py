"""A pipeline stage: one range of decoder layers (stage 0 also embeds), as a Ray Serve deployment.

Each step request carries decode rows of one or more sequences; a :class:`Batcher` merges the
requests in flight into one :class:`LayerRange` call, where tokens exit layer by layer. Then:

* the exit group goes straight to the LM head;
* the continue group and the fill group (exited tokens whose K/V deeper layers still need) go to
  the next stage, one message per next-stage replica that holds those sequences.

Every request awaits only the downstream calls that carry its own rows, so a token that exits
here returns without waiting for tokens that continue.

Ordering of K/V: a sequence's token at position ``p`` may only run here once this replica holds
K/V for all positions ``< p``. Fills travel ahead of the next token but on a different message,
so each replica keeps a per-sequence watermark and a decode row waits for it (fills never wait,
so they always make progress). Ordering is by position, never by timing.

Speculative rows (lossless mode): a row that exits is a *draft*. Its token goes back through the
LM head at once, and the same hidden state runs on at full depth as a VERIFY row (from its exit
layer to the end of this range, then through the deeper stages), writing exact K/V. The last
stage drafts nothing (a draft there would overlap with nothing) and keeps each verified token for
the front door (:meth:`StageServer.verified`). When a draft
proves wrong, the front door resumes from the verified token at that position, with a new epoch:
the position it rolled back to. The first row of a newer epoch that reaches a replica rolls the
sequence back there (the watermark drops to that position), and rows of older epochs, computed
from the wrong draft, are dropped wherever they still are. The K/V they wrote past that position
are zeroed before the next batch runs (under the compute lock: a batch computing when the rollback
came may still write there), so the cache holds exactly what it would had they never run.
Correctness does not depend on it: a query never sees keys past its own position, and the
watermark makes the corrected rows overwrite each position before any later row reads it.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
import psutil
import torch
from ray import serve

from sedac_ray.model.adapter import ModelAdapter
from sedac_ray.model.loading import load_model
from sedac_ray.runtime.layer_range import LayerRange, TokenRows
from sedac_ray.serve.batcher import Batcher
from sedac_ray.serve.config import PipelineConfig
from sedac_ray.serve.errors import Overloaded, RequestTooLarge, ServeError, Unavailable, as_serve_error
from sedac_ray.serve.metrics import StageMetrics
from sedac_ray.serve.routing import pin
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


class _Sequence:
    """What a replica knows about one sequence: its KV slot and how far its K/V is filled."""

    def __init__(self, slot: int, max_length: int):
        self.slot = slot
        self.max_length = max_length  # KV positions reserved for it
        self.touched = time.monotonic()  # last prefill, step or fill
        self.filled = 0  # K/V present for every position < filled
        self._ahead: set[int] = set()  # positions written out of order
        self.epoch = 0  # position of the latest speculative rollback; older rows are void
        self.changed = asyncio.Event()

    def wrote(self, position: int, epoch: int = 0) -> None:
        self.touched = time.monotonic()
        if epoch != self.epoch:  # computed from a token rolled back meanwhile
            return
        self._ahead.add(position)
        while self.filled in self._ahead:
            self._ahead.discard(self.filled)
            self.filled += 1
        self.changed.set()

    def rollback(self, epoch: int) -> None:
        """Positions ``>= epoch`` no longer count as written; rows of older epochs are void."""
        self.touched = time.monotonic()
        self.epoch = epoch
        self.filled = min(self.filled, epoch)
        self._ahead = {p for p in self._ahead if p < self.filled}
        self.changed.set()


class StageServer:
    def __init__(self, config: dict, stage_index: int, next_stage=None, head=None):
        self.config = PipelineConfig.from_args(config)
        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)
        loaded = load_model(self.config.model, device=self.config.device, dtype=self.config.dtype)
        self.adapter = ModelAdapter(loaded.model)
        self.stage_index = stage_index
        start, end = self.config.layer_ranges(self.adapter.num_layers)[stage_index]
        self.adapter.release_layers(range(start, end))  # after the adapter's whole-model check
        self.layers = LayerRange(self.adapter, start, end)
        self.next_stage, self.head = next_stage, head
        self.sequences: dict[str, _Sequence] = {}
        self.admitted = 0  # sequences prefilled here since start
        self.rows_computed = 0  # decode rows run here
        self.compute_s = 0.0  # wall time spent in decode compute
        self.compute_lock = asyncio.Lock()  # one LayerRange call at a time; the event loop stays free
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        # Stage 0 gathers single-sequence steps; deeper stages get whole batches, so waiting for
        # company there only adds latency.
        wait_s = self.config.batch_wait_timeout_s if stage_index == 0 else 0.0
        self.batcher = Batcher(self.step_batch, self.config.max_batch_size, wait_s)
        budget = self.config.kv_budget_mb
        self.kv_budget_bytes = None if budget is None else int(budget * 2**20)
        self.position_bytes = _kv_bytes_per_position(loaded.model.config, end - start, self.adapter.dtype)
        self.metrics = StageMetrics(stage_index)
        # Last stage: verified tokens of speculative rows, by sequence and (position, epoch).
        self._verified: dict[str, dict[tuple[int, int], asyncio.Future]] = {}
        self._rolled_back: set[str] = set()  # sequences whose K/V past the rollback are not zeroed yet
        self._sweeper: asyncio.Task | None = None
        logger.info(
            f"stage {stage_index}: layers {start + 1}..{end} on {self.config.device}, KV budget "
            f"{'unbounded' if budget is None else f'{budget:g} MiB'}"
        )

    # ---- prefill: one whole prompt, full depth -------------------------------------------------

    async def prefill(self, message: PrefillMessage) -> PrefillResult:
        try:
            return await self._prefill(message)
        except BaseException:
            # The front door never learns a route for a failed prefill: free this replica's part here.
            await self.release([message.seq_id])
            raise

    async def _prefill(self, message: PrefillMessage) -> PrefillResult:
        async with self.compute_lock:  # admission may resize the cache: never under a running batch
            sequence = self._admit(message.seq_id, message.max_length)
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._reclaim_orphans())
        if message.token_ids is not None:
            count = len(message.token_ids)
        else:
            count = message.hidden.shape[0]
        positions = torch.arange(count).unsqueeze(0)

        def run() -> torch.Tensor:
            with torch.inference_mode():
                if message.token_ids is not None:
                    hidden = self.adapter.embed_tokens(
                        torch.tensor([message.token_ids], device=self.adapter.device)
                    )
                else:
                    hidden = unpack_hidden(
                        message.hidden, message.hidden_dtype, self.adapter.device
                    ).unsqueeze(0)
                return self.layers.prefill(torch.tensor([sequence.slot]), positions, hidden)[0]

        async with self.compute_lock:
            hidden = await asyncio.to_thread(run)
        for position in range(count):
            sequence.wrote(position)
        packed, dtype = pack_hidden(hidden)
        if self.next_stage is not None:
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
        last = Rows(
            seq_ids=[message.seq_id],
            positions=np.array([count - 1]),
            rules=np.zeros((1, 4), np.float32),
            state=np.zeros(1, np.int64),
            sampling=[message.sampling],
            routes=[()],
            hidden=packed[-1:],
            hidden_dtype=dtype,
            exit_layer=np.array([self.adapter.num_layers]),
        )
        first = (await self.head.sample.remote(last))[message.seq_id]
        return PrefillResult(route=(self.replica_id,), first=first)

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
            rows, lost = await self._wait_for_kv(message.rows)
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

    async def _wait_for_kv(self, rows: Rows) -> tuple[Rows, dict[str, ServeError]]:
        """Waits until this replica holds K/V for every position below each row's own. Returns the
        rows that may run, and an error for each row that cannot (its sequence is gone here, or
        its K/V stopped arriving)."""
        lost: dict[str, ServeError] = {}
        for seq_id, position, epoch in zip(
            rows.seq_ids, rows.positions.tolist(), rows.epochs.tolist(), strict=True
        ):
            self._catch_up(seq_id, epoch)
            while (
                (sequence := self.sequences.get(seq_id)) is not None
                and sequence.epoch == epoch
                and sequence.filled < position
            ):
                sequence.changed.clear()
                try:
                    await asyncio.wait_for(sequence.changed.wait(), self.config.step_timeout_s)
                except asyncio.TimeoutError:  # an alias of TimeoutError from 3.11 on
                    lost[seq_id] = Unavailable(
                        f"stage {self.stage_index}: K/V of sequence {seq_id} stopped at position "
                        f"{sequence.filled}; position {position} cannot run"
                    )
                    break
            if sequence is None or sequence.epoch != epoch:
                lost[seq_id] = self._gone(seq_id)
        return rows.take([i for i, s in enumerate(rows.seq_ids) if s not in lost]), lost

    def _catch_up(self, seq_id: str, epoch: int) -> None:
        """A row of a newer epoch rolls its sequence back here (a batch computing now may still
        write older rows' K/V; their positions are rewritten before anything reads them)."""
        sequence = self.sequences.get(seq_id)
        if sequence is None or epoch <= sequence.epoch:
            return
        sequence.rollback(epoch)
        self._rolled_back.add(seq_id)
        waiting = self._verified.get(seq_id, {})
        for key in [k for k in waiting if k[1] < epoch]:
            waiting.pop(key).cancel()

    def _zero_rolled_back(self) -> None:
        """Zero the K/V of rolled-back sequences from their rollback position on. Called under the
        compute lock before each batch: the batch that runs a rollback's first row, or any batch
        before it, comes after every write of the rolled-back rows."""
        for seq_id in self._rolled_back:
            if (sequence := self.sequences.get(seq_id)) is not None:
                self.layers.cache.truncate(sequence.slot, sequence.epoch)
        self._rolled_back.clear()

    def _gone(self, seq_id: str) -> Unavailable:
        if seq_id in self.sequences:  # held, but the row came from before a rollback
            return Unavailable(f"stage {self.stage_index}: this step of sequence {seq_id} was rolled back")
        return Unavailable(
            f"stage {self.stage_index} replica {self.replica_id} no longer holds sequence {seq_id}"
        )

    def _current(self, rows: Rows) -> Rows:
        """The rows whose sequence this replica holds, at the sequence's current epoch."""
        keep = [
            i
            for i, (seq_id, epoch) in enumerate(zip(rows.seq_ids, rows.epochs.tolist(), strict=True))
            if seq_id in self.sequences and self.sequences[seq_id].epoch == epoch
        ]
        return rows.take(keep)

    async def step_batch(self, messages: list[StepMessage]) -> list[dict[str, asyncio.Future]]:
        """Runs the merged batch; for each message, the downstream call that answers each row."""
        async with self.compute_lock:
            # Rows and fills of sequences released while in flight (finished, or the client left)
            # are dropped here, under the lock that release takes, and so are rows of an epoch
            # rolled back meanwhile: each such row fails alone.
            rows = self._current(Rows.concat([m.rows for m in messages]))
            fill = self._current(Rows.concat([m.fill for m in messages]))
            self._zero_rolled_back()
            started = time.perf_counter()
            exited, continuing, fill_out, spawned = await asyncio.to_thread(self._compute, rows, fill)
            self.compute_s += time.perf_counter() - started
            for part in (rows, fill):
                for seq_id, position, epoch in zip(
                    part.seq_ids, part.positions.tolist(), part.epochs.tolist(), strict=True
                ):
                    if seq_id in self.sequences:  # not released while the batch computed
                        self.sequences[seq_id].wrote(position, epoch)
        self.rows_computed += len(rows)
        self.metrics.batch(len(rows), self.batcher.queued)

        futures: dict[str, asyncio.Future] = {}  # seq_id -> the downstream call carrying its row
        verifying = exited.take(np.flatnonzero(exited.modes == VERIFY).tolist())  # last stage only
        exited = exited.take(np.flatnonzero(exited.modes != VERIFY).tolist())
        if len(exited):
            head_call = asyncio.ensure_future(self._await(self.head.sample.remote(exited)))
            futures.update(dict.fromkeys(exited.seq_ids, head_call))
        if self.next_stage is None:
            checked = Rows.concat([verifying, spawned])
            if len(checked):
                call = asyncio.ensure_future(self._keep_verified(checked))
                futures.update(dict.fromkeys(verifying.seq_ids, call))
                if not len(verifying):  # drafted here: nobody upstream waits for the answer
                    call.add_done_callback(self._log_failure)
        else:
            futures.update(self._send_downstream(continuing, fill_out, spawned))
        for seq_id in (s for m in messages for s in m.rows.seq_ids if s not in futures):
            futures[seq_id] = asyncio.get_running_loop().create_future()
            futures[seq_id].set_exception(self._gone(seq_id))
        return [{s: futures[s] for s in m.rows.seq_ids} for m in messages]

    def _compute(self, rows: Rows, fill: Rows) -> tuple[Rows, Rows, Rows, Rows]:
        """Run this stage's layers; returns (exit group, continue group, fill group, VERIFY rows
        of the drafts made here) as Rows. Speculative rows run apart: their exits propagate no
        K/V, since the drafted token runs on at full depth (:meth:`LayerRange.verify`)."""
        device = self.adapter.device
        with torch.inference_mode():
            if not len(rows):  # a batch of fills only
                hidden = torch.zeros(0, self.adapter.hidden_size, device=device, dtype=self.adapter.dtype)
            elif rows.token_ids is not None:
                hidden = self.adapter.embed_tokens(torch.from_numpy(rows.token_ids).to(device))
            else:
                hidden = unpack_hidden(rows.hidden, rows.hidden_dtype, device)
            speculative = rows.modes == SPECULATIVE
            if self.next_stage is None and speculative.any():
                # A draft here would overlap with nothing (its verification ends in this same
                # step) and cost an extra LM-head call: run these rows at full depth instead.
                rows.rules = rows.rules.copy()
                rows.rules[speculative, 0] = np.inf
                speculative[:] = False
            fill_rows = None
            if len(fill):
                fill_rows = self._token_rows(
                    fill, unpack_hidden(fill.hidden, fill.hidden_dtype, device), np.arange(len(fill))
                )
            out = self.layers.decode(self._token_rows(rows, hidden, np.flatnonzero(~speculative)), fill_rows)
            exited = [self._as_rows(rows, out.exited, exited=True)]
            continuing = [self._as_rows(rows, out.continuing, exited=False)]
            spawned = Rows.empty()
            if speculative.any():
                spec = self.layers.decode(
                    self._token_rows(rows, hidden, np.flatnonzero(speculative)), propagate=False
                )
                exited.append(self._as_rows(rows, spec.exited, exited=True))
                continuing.append(self._as_rows(rows, spec.continuing, exited=False))
                drafts = spec.exited.select(
                    (spec.exited.exit_layer < self.adapter.num_layers).nonzero()[:, 0]
                )
                if len(drafts):
                    spawned = self._verify_rows(rows, self.layers.verify(drafts, drafts.exit_layer))
        return (
            Rows.concat(exited),
            Rows.concat(continuing),
            self._fill_as_rows(rows, fill, out.fill),
            spawned,
        )

    def _verify_rows(self, source: Rows, verified: TokenRows) -> Rows:
        """Drafted tokens, run to the end of this range, as VERIFY rows (their exit rule off)."""
        picked = source.take(verified.ids.tolist())
        picked.hidden, picked.hidden_dtype = pack_hidden(verified.hidden)
        picked.token_ids = None
        picked.modes = np.full(len(picked), VERIFY, np.int8)
        picked.rules = picked.rules.copy()
        picked.rules[:, 0] = np.inf  # a disabled rule: full depth from here on
        if self.next_stage is None:
            picked.exit_layer = np.full(len(picked), self.adapter.num_layers)
        return picked

    def _token_rows(self, rows: Rows, hidden: torch.Tensor, index: np.ndarray) -> TokenRows:
        """Rows ``index`` of ``rows`` for the runtime; their ids are their indices in ``rows``."""
        ids = torch.from_numpy(index.astype(np.int64))
        return TokenRows(
            ids=ids,
            slots=torch.tensor([self.sequences[rows.seq_ids[i]].slot for i in index], dtype=torch.long),
            positions=torch.from_numpy(rows.positions[index]),
            hidden=hidden[ids.to(hidden.device)],
            rules=torch.from_numpy(rows.rules[index]),
            state=torch.from_numpy(rows.state[index]),
        )

    def _as_rows(self, source: Rows, result: TokenRows, exited: bool) -> Rows:
        picked = source.take(result.ids.tolist())
        picked.hidden, picked.hidden_dtype = pack_hidden(result.hidden)
        picked.token_ids = None
        picked.state = result.state.numpy()
        picked.exit_layer = result.exit_layer.numpy() if exited else None
        return picked

    def _fill_as_rows(self, rows: Rows, fill: Rows, result: TokenRows) -> Rows:
        """The fill group for the next stage: incoming fills first (ids ``0..len(fill)-1`` of the
        runtime's fill), then rows that exited here (their decode-row ids)."""
        if not len(result):
            return Rows.empty()
        incoming = len(fill)
        parts = [fill] if incoming else []
        if len(result) > incoming:
            new = rows.take(result.ids[incoming:].tolist())
            new.hidden, new.hidden_dtype = pack_hidden(result.hidden[incoming:])
            new.token_ids = None
            parts.append(new)
        return Rows.concat(parts)

    def _send_downstream(self, continuing: Rows, fill: Rows, spawned: Rows) -> dict[str, asyncio.Future]:
        """One message per next-stage replica; returns seq_id -> call for the continuing rows.
        ``spawned`` VERIFY rows travel along, but their answers go to the last stage's store."""
        next_index = self.stage_index + 1
        parts = (continuing, fill, spawned)
        targets = {route[next_index] for part in parts for route in part.routes}
        futures: dict[str, asyncio.Future] = {}
        for target in targets:
            rows, fills, verify = (
                part.take([i for i, r in enumerate(part.routes) if r[next_index] == target]) for part in parts
            )
            message = StepMessage(Rows.concat([rows, verify]), fills)
            call = self.next_stage.options(session_id=pin(target)).step.remote(message)
            future = asyncio.ensure_future(self._await(call))
            if len(rows):
                futures.update(dict.fromkeys(rows.seq_ids, future))
            else:  # nobody waits for the answer, but a failure must not pass silently
                future.add_done_callback(self._log_failure)
        return futures

    # ---- speculative rows: verified tokens ------------------------------------------------

    async def _keep_verified(self, rows: Rows) -> dict[str, TokenResult]:
        """Full-depth tokens of VERIFY rows, kept for :meth:`verified` (and returned)."""
        keys = list(zip(rows.seq_ids, rows.positions.tolist(), rows.epochs.tolist(), strict=True))
        try:
            answers = await self.head.sample.remote(rows)
        except Exception as err:
            for key in keys:
                self._settle(*key, error=as_serve_error(err))
            raise
        for key in keys:
            self._settle(*key, answer=answers[key[0]])
        return answers

    def _settle(self, seq_id: str, position: int, epoch: int, answer=None, error=None) -> None:
        sequence = self.sequences.get(seq_id)
        if sequence is None or sequence.epoch != epoch:  # released or rolled back meanwhile
            return
        future = self._verification(seq_id, position, epoch)
        if future.done():
            return
        if error is None:
            future.set_result(answer)
        else:
            future.set_exception(error)

    def _verification(self, seq_id: str, position: int, epoch: int) -> asyncio.Future:
        waiting = self._verified.setdefault(seq_id, {})
        if (position, epoch) not in waiting:
            waiting[(position, epoch)] = asyncio.get_running_loop().create_future()
        return waiting[(position, epoch)]

    async def verified(self, seq_id: str, position: int, epoch: int) -> TokenResult:
        """The full-depth token of the sequence's row at ``position`` (a draft's verification),
        once it has run through every stage. Last stage only."""
        if self.next_stage is not None:
            raise ValueError(f"stage {self.stage_index} is not the last stage: it keeps no verified tokens")
        if seq_id not in self.sequences:
            raise self._gone(seq_id)
        try:
            return await asyncio.shield(self._verification(seq_id, position, epoch))
        finally:
            self._verified.get(seq_id, {}).pop((position, epoch), None)

    @staticmethod
    async def _await(response):
        return await response

    def _log_failure(self, future: asyncio.Future) -> None:
        if not future.cancelled() and future.exception() is not None:
            logger.error(f"stage {self.stage_index}: K/V fill downstream failed: {future.exception()!r}")

    # ---- sequence table ----------------------------------------------------------------------

    def _admit(self, seq_id: str, max_length: int) -> _Sequence:
        if seq_id in self.sequences:
            raise ValueError(f"sequence {seq_id} is already prefilled on this replica")
        cache = self.layers.cache
        if self.kv_budget_bytes is not None:
            if self._over_budget(max_length):  # free slots and spare capacity may be enough
                cache.shrink(max([max_length, *(s.max_length for s in self.sequences.values())]))
            if _pow2_at_least(max_length) * self.position_bytes > self.kv_budget_bytes:  # even alone
                raise RequestTooLarge(
                    f"{max_length} tokens (prompt plus max_tokens) need more KV than stage "
                    f"{self.stage_index}'s budget of {self.config.kv_budget_mb:g} MiB; lower max_tokens"
                )
            if self._over_budget(max_length):
                raise Overloaded(
                    f"stage {self.stage_index} is at its KV budget ({len(self.sequences)} sequences, "
                    f"{self.config.kv_budget_mb:g} MiB); retry shortly"
                )
        (slot,) = cache.allocate(1)
        cache.reserve(max_length)  # the whole request's KV up front: no growth, no OOM mid-request
        self.sequences[seq_id] = _Sequence(slot, max_length)
        self.admitted += 1
        self._report_kv()
        return self.sequences[seq_id]

    def _over_budget(self, max_length: int) -> bool:
        slots, capacity = self.layers.cache.footprint_after(max_length)
        return slots * capacity * self.position_bytes > self.kv_budget_bytes

    def _report_kv(self) -> None:
        self.metrics.kv(len(self.sequences), self.layers.cache.nbytes(), self.kv_budget_bytes)

    async def _reclaim_orphans(self) -> None:
        """Every sequence sees traffic each step (a row or a fill), so one that saw none for
        ``kv_lease_s`` lost its front door: e.g. a replica upstream died mid-prefill, before the
        front door learned where the sequence lives. Its KV is freed here."""
        lease = self.config.kv_lease_s
        while True:
            await asyncio.sleep(lease / 4)
            now = time.monotonic()
            orphans = [seq_id for seq_id, s in self.sequences.items() if now - s.touched > lease]
            if orphans:
                logger.warning(f"stage {self.stage_index}: freeing KV of {len(orphans)} orphaned sequences")
                await self.release(orphans)

    async def release(self, seq_ids: list[str]) -> int:
        """Free the KV of finished sequences; returns how many sequences this replica still holds."""
        async with self.compute_lock:  # never free a slot under a running batch
            for seq_id in seq_ids:
                sequence = self.sequences.pop(seq_id, None)
                if sequence is not None:
                    self.layers.cache.free([sequence.slot])
                    sequence.changed.set()  # rows waiting for its K/V see that it is gone
                for future in self._verified.pop(seq_id, {}).values():
                    if not future.done():
                        future.set_exception(self._gone(seq_id))
            if not self.sequences:  # idle: give the KV memory back
                self.layers.cache.shrink(0)
        self._report_kv()
        return len(self.sequences)

    async def stats(self) -> dict:
        return {
            "stage": self.stage_index,
            "replica": self.replica_id,
            "sequences": len(self.sequences),
            "admitted": self.admitted,
            "decode_rows": self.rows_computed,
            "decode_batches": self.batcher.batches,
            "mean_batch_rows": self.rows_computed / max(1, self.batcher.batches),
            "decode_compute_s": self.compute_s,
            "torch_threads": torch.get_num_threads(),
            "kv_slots_in_use": self.layers.cache.slots_in_use,
            "kv_bytes": self.layers.cache.nbytes(),
            "kv_budget_bytes": self.kv_budget_bytes,
            "rss_bytes": psutil.Process().memory_info().rss,
        }


def _pow2_at_least(length: int) -> int:
    capacity = 1
    while capacity < length:
        capacity *= 2
    return capacity


def _kv_bytes_per_position(model_config, num_layers: int, dtype: torch.dtype) -> int:
    """K and V bytes one token position takes in ``num_layers`` layers (from the model config)."""
    heads = model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    return num_layers * 2 * kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()
