"""A discrete-event simulation of the serving pipeline: no exit, early exit, speculative.

The pipeline is a front door, ``stages`` servers that each run a contiguous slice of the layers,
and an LM-head server. Each server takes everything queued for it as one batch when it is free
(load-adaptive batching, as the stages do). A batch's compute time comes from :class:`Costs`:
per layer, the rows that run it plus the rows that only get their K/V filled; the head's cost
depends on its rows. Every message between servers takes ``hop_ms``; all rows going from one
server to the next in one batch travel as one message.

Batching as served, where :class:`Pipeline` sets it: the front door merges steps into at most
``front_door_in_flight`` stage-0 messages, each waiting up to ``front_door_gather_ms`` for its
group; speculative steps merge only within ``front_door_merge_ms``; stage 0 waits
``stage0_wait_ms`` for company when a lone message finds it idle.

Devices: each server runs on a device. ``shared_slots=None`` gives every stage and the head a
device of its own (one GPU each); ``shared_slots=n`` puts them all on one machine that runs at
most ``n`` computations at once (a CPU box with ``n`` cores, one thread per replica). There a
message between processes is work for those cores too (serialisation, the RPC stack, the event
loops): ``hop_cpu_share`` of each hop holds a core, so hops slow down when the cores are busy; and
each token a client receives costs ``token_cpu_ms`` there (front door and HTTP proxy: detokenising,
streaming), which takes a core but does not hold up the next step.

Per sequence, at every stage, rows run in position order (the stages' K/V watermark).

Modes, for one token at position ``p`` that exits after layer ``e_p`` (drawn from the workload's
exit layers; ``L`` means it never exits):

* ``no_exit``: every row runs every layer; the front door issues ``p + 1`` when ``p``'s token
  comes back from the head.
* ``early_exit`` (token-group separation): the row leaves after the stage holding layer ``e_p``
  for the head; deeper stages only fill its K/V. The front door issues ``p + 1`` on its token.
  Lossy: the token is the exit layer's.
* ``speculative`` (lossless): the exited row is a *draft*; it goes to the head, and the front door
  issues ``p + 1`` on the draft while the row keeps running every deeper layer as a full row
  (verification). When the full-depth token comes back, the draft is accepted with probability
  ``acceptance``; otherwise the front door rolls back and issues the verified token with a new
  epoch. As in the served pipeline, a stage learns of the rollback only when the new epoch's
  first row reaches it: later rows of the old epoch that get there first still run (wasted work),
  and so do their LM-head calls. The last stage drafts nothing (its draft would overlap with
  nothing), and speculative steps go to stage 0 at once, never merged into the front door's
  step messages. At most ``draft_limit`` positions with unverified inputs are in flight per
  sequence. Tokens count once verified, so time per token is what a client streaming verified
  tokens sees.
* ``speculative`` with a draft head (``Pipeline.draft_head``), as served since the draft head:
  ``Workload.full_depth_drafts`` of the positions that reach the last stage pass the draft gate
  there. A last-stage batch is read by the draft head first (its cost in the stage's batch) when
  ``share ** rows`` times the head's cost pays for it, as served; if its rows all pass, they are
  sent back as tokens are (the same messages, without the head's compute);
  their full-head verification runs on the head server after that, and reaches the front door
  with no message of its own (it travels with the sequence's next reply, or answers a poll). Any
  other batch is read out by the full head as without drafts (the draft head's cost included).
  When nothing drafts from an early exit, speculative steps go in the front door's groups, like
  plain ones.
"""

from __future__ import annotations

import heapq
import itertools
import random
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

MODES = ("no_exit", "early_exit", "speculative")


@dataclass(frozen=True)
class Cost:
    """Time of one operation on a batch: ``one_row_ms`` for one row, ``extra_row_ms`` per further
    row; or, where ``samples`` (measured ``(rows, ms)``, ascending) are given, interpolated
    between them and extended past the last one by ``extra_row_ms`` per row."""

    one_row_ms: float
    extra_row_ms: float = 0.0
    samples: tuple[tuple[int, float], ...] = ()

    def __call__(self, rows: int) -> float:
        if rows <= 0:
            return 0.0
        if not self.samples:
            return self.one_row_ms + self.extra_row_ms * (rows - 1)
        if rows <= self.samples[0][0]:
            return self.samples[0][1]
        for (low, low_ms), (high, high_ms) in itertools.pairwise(self.samples):
            if rows <= high:
                return low_ms + (high_ms - low_ms) * (rows - low) / (high - low)
        last, last_ms = self.samples[-1]
        return last_ms + self.extra_row_ms * (rows - last)


@dataclass(frozen=True)
class Costs:
    layer: Cost  # one decoder layer
    head: Cost  # final norm, LM head and sampling
    fill: Cost  # the K/V fill of exited rows in one layer (state propagation)
    hop_ms: float  # latency of one message between servers
    hop_cpu_share: float = 0.0  # on a shared machine: the part of a hop that is CPU work there
    token_cpu_ms: float = 0.0  # on a shared machine: work per delivered token beside the steps


@dataclass(frozen=True)
class Pipeline:
    num_layers: int
    stages: int
    costs: Costs
    shared_slots: int | None = None  # None: a device per server; n: one machine running n at once
    draft_limit: int = 4
    max_batch: int = 256
    # The front door sends each step at once (None), or merges steps into one stage-0 message
    # with at most this many messages in flight, each until all its rows have come back.
    front_door_in_flight: int | None = None
    # A merged message waits up to this long for its group: the running sequences split evenly
    # over the messages in flight (``step_gather_timeout_s`` of the served front door).
    front_door_gather_ms: float = 0.0
    # Speculative steps skip the groups: they merge with the steps issued within this window.
    front_door_merge_ms: float = 0.0
    # Stage 0 waits this long for company when a lone message reaches it idle (its batcher's wait).
    stage0_wait_ms: float = 0.0
    fused_head: bool = False  # the single-process engine: one stage whose step includes the head
    # Speculative: the last stage's draft read-out (the draft head); None: the last stage drafts nothing.
    draft_head: Cost | None = None

    def __post_init__(self) -> None:
        if self.fused_head and self.stages != 1:
            raise ValueError("fused_head models the single-process engine: it needs stages=1")

    def boundaries(self) -> list[tuple[int, int]]:
        """1-based inclusive layer spans of the stages, as even as possible."""
        cuts = [round(i * self.num_layers / self.stages) for i in range(self.stages + 1)]
        return [(cuts[i] + 1, cuts[i + 1]) for i in range(self.stages)]


@dataclass(frozen=True)
class Workload:
    concurrency: int  # sequences decoding at once (closed loop: each waits for its own tokens)
    tokens: int | Sequence[int]  # decode tokens per sequence, or each one's (prefill is not simulated)
    exit_layers: Sequence[int] = ()  # drawn with replacement per token; empty: nothing exits
    acceptance: float = 1.0  # speculative: probability that a draft is the full-depth token
    # Speculative with a draft head: the share of positions reaching the last stage that draft there.
    full_depth_drafts: float = 0.0
    stagger_ms: float = 0.0  # sequence i starts at i * stagger_ms / concurrency (0: all at once)
    seed: int = 0


@dataclass
class Result:
    mode: str
    tpot_ms: float  # mean over sequences of (time from its start to its last token / tokens)
    tokens_per_s: float  # all tokens / time until the last sequence finishes
    mean_stage_batch_rows: list[float]
    rows_computed: int  # stage rows (all modes), fills excluded
    rows_wasted: int  # speculative: stage rows computed for positions that were rolled back
    drafts_verified: int  # speculative: drafts whose full-depth token came back
    accepted: int
    finished_ms: list[float]  # per sequence: when its last token came

    def as_dict(self) -> dict:
        """The summary, without the per-sequence times."""
        return {k: v for k, v in self.__dict__.items() if k != "finished_ms"}


@dataclass
class _Row:
    seq: int
    position: int
    epoch: int
    exit_layer: int
    role: str  # stages: "decode", "fill", "verify"; head: "token", "draft", "verify"
    full_draft: bool = False  # drafts at the last stage, with the draft head


@dataclass
class _Sequence:
    index: int
    tokens: int
    epoch: int = 0
    issued: int = 0  # next position to issue
    next_verified: int = 0  # speculative: first position whose full-depth token has not come back
    pending_draft: int | None = None  # a draft that waits for the draft limit
    committed: int = 0
    started_ms: float = 0.0
    finished_ms: float | None = None
    # position -> (exit layer, drafted, accepted)
    exits: dict[int, tuple[int, bool, bool]] = field(default_factory=dict)
    epoch_start: dict[int, int] = field(default_factory=lambda: {0: 0})  # epoch -> its first position


class _Server:
    def __init__(self, name: str, span: tuple[int, int] | None):
        self.name = name
        self.span = span  # None for the head
        self.queue: list[_Row] = []
        self.busy = False
        self.waiting_for_device = False
        self.batches: list[int] = []
        self.messages = 0  # messages queued since the last batch
        self.waiting_for_company = False  # stage 0: a lone message waits a little for others
        self.waited = False  # that wait is over: the next batch starts without another


class _Device:
    def __init__(self, slots: int):
        self.free = slots
        self.waiting: list[Callable[[], None]] = []


class Simulation:
    def __init__(self, pipeline: Pipeline, workload: Workload, mode: str):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not 0.0 <= workload.acceptance <= 1.0:
            raise ValueError(f"acceptance must be in [0, 1], got {workload.acceptance}")
        self.pipeline, self.workload, self.mode = pipeline, workload, mode
        self.costs = pipeline.costs
        self.num_layers = pipeline.num_layers
        self.random = random.Random(workload.seed)
        self.exit_layers = [min(int(e), self.num_layers) for e in workload.exit_layers]
        if mode == "no_exit" or not self.exit_layers:
            self.exit_layers = [self.num_layers]
        self.now = 0.0
        self._events: list = []
        self._order = itertools.count()
        self.stages = [_Server(f"stage{i}", span) for i, span in enumerate(pipeline.boundaries())]
        self.head = _Server("head", None)
        shared = _Device(pipeline.shared_slots) if pipeline.shared_slots else None
        self.devices = {s.name: shared or _Device(1) for s in [*self.stages, self.head]}
        self.shared = shared
        self._drafts_at_last_stage = mode == "speculative" and pipeline.draft_head is not None
        self._held: dict[int, list[_Row]] = defaultdict(list)  # seq -> verifications riding the next reply
        self.watermark: dict[tuple[int, int], int] = defaultdict(int)  # (stage, seq) -> next position
        self.stage_epoch: dict[tuple[int, int], int] = defaultdict(int)  # (stage, seq) -> newest seen
        lengths = workload.tokens
        if isinstance(lengths, int):
            lengths = [lengths] * workload.concurrency
        if len(lengths) != workload.concurrency or min(lengths) < 1:
            raise ValueError(f"need a length of at least 1 for each of {workload.concurrency} sequences")
        self.sequences = [_Sequence(i, n) for i, n in enumerate(lengths)]
        self.rows_computed = self.drafts_verified = self.accepted = 0
        self._fd_queue: list[_Row] = []
        self._fd_free = pipeline.front_door_in_flight
        self._fd_batches: dict[int, set[tuple[int, int, int]]] = {}  # message -> rows not back yet
        self._fd_held: dict[int, list[_Row]] = {}  # message -> its results back so far
        self._fd_batch_of: dict[tuple[int, int, int], int] = {}
        self._fd_messages = itertools.count()
        self._fd_gather_until: float | None = None  # while a message waits for its group
        self._fd_merging: list[_Row] | None = None  # speculative steps within the merge window

    # ---- the event loop ---------------------------------------------------------------------

    def at(self, delay: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (self.now + delay, next(self._order), action))

    def run(self) -> Result:
        for sequence in self.sequences:
            sequence.started_ms = sequence.index * self.workload.stagger_ms / len(self.sequences)
            self.at(sequence.started_ms, lambda s=sequence: self._issue(s, 0))
        while self._events:
            self.now, _, action = heapq.heappop(self._events)
            action()
        if any(s.finished_ms is None for s in self.sequences):
            raise RuntimeError("simulation ended with unfinished sequences")
        tokens = sum(s.tokens for s in self.sequences)
        useful = tokens * len(self.stages)  # every committed position passes every stage
        return Result(
            mode=self.mode,
            tpot_ms=statistics.fmean((s.finished_ms - s.started_ms) / s.tokens for s in self.sequences),
            tokens_per_s=1000 * tokens / max(s.finished_ms for s in self.sequences),
            mean_stage_batch_rows=[statistics.fmean(s.batches) if s.batches else 0.0 for s in self.stages],
            rows_computed=self.rows_computed,
            rows_wasted=self.rows_computed - useful if self.mode == "speculative" else 0,
            drafts_verified=self.drafts_verified,
            accepted=self.accepted,
            finished_ms=[s.finished_ms for s in self.sequences],
        )

    # ---- messages and devices ---------------------------------------------------------------

    def _send(self, rows: list[_Row], server: _Server | None, hops: int = 1) -> None:
        """A message: after ``hops`` hops of ``hop_ms`` each, the rows reach ``server`` (None: the
        front door). No hops: work that needs no message of its own."""

        def arrive() -> None:
            if server is None:
                self._front_door(rows)
            else:
                server.queue.extend(rows)
                server.messages += 1
                # After every arrival of this instant: a batch takes all rows that arrive together.
                self.at(0.0, lambda: self._try_start(server))

        if self.pipeline.fused_head or hops == 0:
            self.at(0.0, arrive)
            return
        self._hop(arrive if hops == 1 else lambda: self._send(rows, server, hops - 1))

    def _hop(self, then: Callable[[], None]) -> None:
        hop, share = self.costs.hop_ms, self.costs.hop_cpu_share
        if self.shared is None or share <= 0:
            self.at(hop, then)
            return
        shared = self.shared

        def sent() -> None:  # the CPU part is done: the rest is waiting
            self._release(shared)
            self.at(hop * (1 - share), then)

        self._acquire(shared, lambda: self.at(hop * share, sent))

    @staticmethod
    def _acquire(device: _Device, start: Callable[[], None]) -> None:
        if device.free > 0:
            device.free -= 1
            start()
        else:
            device.waiting.append(start)

    @staticmethod
    def _release(device: _Device) -> None:
        if device.waiting:
            device.waiting.pop(0)()  # the slot passes straight to the next in line
        else:
            device.free += 1

    # ---- servers ----------------------------------------------------------------------------

    def _try_start(self, server: _Server) -> None:
        if server.busy or server.waiting_for_device or server.waiting_for_company or not server.queue:
            return
        wait = self.pipeline.stage0_wait_ms
        if server is self.stages[0] and wait > 0 and server.messages == 1 and not server.waited:
            server.waiting_for_company = True

            def waited() -> None:
                server.waiting_for_company, server.waited = False, True
                self._try_start(server)

            self.at(wait, waited)
            return
        server.waiting_for_device = True
        self._acquire(self.devices[server.name], lambda: self._start(server))

    def _start(self, server: _Server) -> None:
        """The server holds a device slot: it takes what is queued now as one batch."""
        server.waiting_for_device = False
        device = self.devices[server.name]
        batch = self._take_batch(server)
        server.messages, server.waited = 0, False
        if not batch:
            self._release(device)
            return
        server.busy = True

        def done() -> None:
            server.busy = False
            self._release(device)
            self._finish_batch(server, batch)
            self._try_start(server)

        self.at(self._compute_ms(server, batch), done)

    def _take_batch(self, server: _Server) -> list[_Row]:
        if server.span is None:  # the head computes whatever reaches it
            batch = server.queue[: self.pipeline.max_batch]
            server.queue = server.queue[self.pipeline.max_batch :]
            return batch
        stage = self.stages.index(server)
        for row in server.queue:  # a row of a newer epoch rolls its sequence back here
            key = (stage, row.seq)
            if row.epoch > self.stage_epoch[key]:
                self.stage_epoch[key] = row.epoch
                start = self.sequences[row.seq].epoch_start[row.epoch]
                self.watermark[key] = min(self.watermark[key], start)
        live = [r for r in server.queue if self._current_here(stage, r)]
        # Stages run a sequence's rows in position order (the K/V watermark).
        live.sort(key=lambda r: (r.seq, r.position))
        batch, rest = [], []
        for row in live:
            key = (stage, row.seq)
            if row.position == self.watermark[key] and len(batch) < self.pipeline.max_batch:
                batch.append(row)
                self.watermark[key] += 1
            else:
                rest.append(row)
        server.queue = rest
        return batch

    def _compute_ms(self, server: _Server, batch: list[_Row]) -> float:
        costs = self.costs
        if server.span is None:
            return costs.head(len(batch))
        first, last = server.span
        # The engine reads every row's token in the same step (rows leaving the range).
        total = costs.head(sum(r.role != "fill" for r in batch)) if self.pipeline.fused_head else 0.0
        if server is self.stages[-1] and self._tries_drafts(sum(r.role == "decode" for r in batch)):
            total += self.pipeline.draft_head(sum(r.role == "decode" for r in batch))  # reads every row
        for layer in range(first, last + 1):
            full = sum(self._runs(row, layer) for row in batch)
            total += costs.layer(full) + costs.fill(len(batch) - full)
        server.batches.append(sum(r.role != "fill" for r in batch))
        self.rows_computed += sum(r.role != "fill" for r in batch)
        return total

    def _runs(self, row: _Row, layer: int) -> bool:
        """Whether ``row`` computes ``layer`` in full (else its K/V is only filled there)."""
        if row.role == "fill":
            return False
        return self.mode == "speculative" or row.role == "verify" or layer <= row.exit_layer

    def _tries_drafts(self, rows: int) -> bool:
        """Whether the last stage reads a batch of ``rows`` with the draft head first: only where
        that may spare the full head often enough to pay for itself (``DraftOdds`` as served)."""
        if not self._drafts_at_last_stage or rows == 0:
            return False
        share = self.workload.full_depth_drafts
        return share**rows * self.costs.head(rows) >= self.pipeline.draft_head(rows)

    def _undraft(self, batch: list[_Row]) -> None:
        """The last stage's batch needs the full head (a row below the gate, or not speculative):
        it reads every row with it, drafting none (as served)."""
        for row in batch:
            if row.full_draft:
                row.full_draft = False
                exits = self.sequences[row.seq].exits
                if row.position in exits:
                    exits[row.position] = (exits[row.position][0], False, True)

    def _verified_quietly(self, row: _Row) -> None:
        """A draft-head draft's verification is ready at the last stage: it travels with the
        sequence's next reply (the front door steps on from the draft), or answers the front
        door's poll (one message) when no further step comes: the last position, or the draft
        limit reached."""
        sequence = self.sequences[row.seq]
        if row.position + 1 < sequence.tokens and sequence.pending_draft is None:
            self._held[row.seq].append(row)
        else:
            self._send([row], None)

    def _current_here(self, stage: int, row: _Row) -> bool:
        """Whether ``stage`` still runs ``row``: its sequence is not finished (released) and no
        newer epoch has reached the stage."""
        sequence = self.sequences[row.seq]
        return sequence.finished_ms is None and row.epoch >= self.stage_epoch[(stage, row.seq)]

    def _finish_batch(self, server: _Server, batch: list[_Row]) -> None:
        if server.span is None:  # the front door ignores results of old epochs
            self._send([r for r in batch if not r.full_draft], None)
            for row in batch:
                if row.full_draft:
                    self._verified_quietly(row)
            return
        stage = self.stages.index(server)
        live = [r for r in batch if self._current_here(stage, r)]
        last = server.span[1]
        is_last = stage == len(self.stages) - 1
        tries = is_last and self._tries_drafts(sum(r.role == "decode" for r in batch))
        if is_last and self._drafts_at_last_stage and not (tries and all(r.full_draft for r in live)):
            self._undraft(live)
        onward, to_head, drafted, verify_quietly = [], [], [], []
        for row in live:
            exits_here = row.role == "decode" and row.exit_layer <= last
            if self.mode == "speculative":
                if exits_here and row.exit_layer < self.num_layers and not is_last:
                    to_head.append(_Row(row.seq, row.position, row.epoch, row.exit_layer, "draft"))
                    row.role = "verify"
                if is_last and row.full_draft and row.role == "decode":  # the draft head's draft
                    drafted.append(_Row(row.seq, row.position, row.epoch, row.exit_layer, "draft"))
                    verify_quietly.append(replace(drafted[-1], role="verify", full_draft=True))
                elif is_last:  # full depth: the verified token (or a token that never exited)
                    to_head.append(_Row(row.seq, row.position, row.epoch, row.exit_layer, "verify"))
                else:
                    onward.append(row)
            elif exits_here:
                to_head.append(_Row(row.seq, row.position, row.epoch, row.exit_layer, "token"))
                if not is_last:
                    onward.append(_Row(row.seq, row.position, row.epoch, row.exit_layer, "fill"))
            elif not is_last:
                onward.append(row)
        if to_head:
            self._send(to_head, None if self.pipeline.fused_head else self.head)
        if drafted:  # the messages a token read out by the head takes, without the head's compute
            self._send(drafted, None, hops=2)
            self._send(verify_quietly, self.head, hops=0)
        if onward:
            self._send(onward, self.stages[stage + 1])

    # ---- the front door ---------------------------------------------------------------------

    def _issue(self, sequence: _Sequence, position: int) -> None:
        exit_layer = self.random.choice(self.exit_layers)
        full_draft = (
            self._drafts_at_last_stage
            and exit_layer >= self.num_layers
            and self.random.random() < self.workload.full_depth_drafts
        )
        drafted = exit_layer < self.num_layers or full_draft
        accepted = not drafted or self.random.random() < self.workload.acceptance
        sequence.exits[position] = (exit_layer, drafted, accepted)
        sequence.issued = position + 1
        row = _Row(sequence.index, position, sequence.epoch, exit_layer, "decode", full_draft)
        # Speculative steps go at once, but those drafting only at full depth (the draft head,
        # no early exits: a policy that is off) step in the groups, as the driver sends them.
        grouped = self._drafts_at_last_stage and self.exit_layers == [self.num_layers]
        if self.mode == "speculative" and not grouped:
            self._merge_speculative(row)
        elif self._fd_free is None:
            self._send([row], self.stages[0])
        else:
            self._fd_queue.append(row)
            self._fd_flush()

    def _merge_speculative(self, row: _Row) -> None:
        """Speculative steps go out at once, merged only with those issued within
        ``front_door_merge_ms`` of the first."""
        if self.pipeline.front_door_merge_ms <= 0:
            self._send([row], self.stages[0])
            return
        if self._fd_merging is not None:
            self._fd_merging.append(row)
            return
        self._fd_merging = [row]

        def send() -> None:
            rows, self._fd_merging = self._fd_merging, None
            self._send(rows, self.stages[0])  # void steps too: the front door does not cancel them

        self.at(self.pipeline.front_door_merge_ms, send)

    def _fd_flush(self) -> None:
        """Merge the queued steps into one stage-0 message while a message slot is free. A message
        waits for its group (the running sequences over the messages in flight) at most
        ``front_door_gather_ms``."""
        while self._fd_free and self._fd_queue:
            self._fd_queue = [r for r in self._fd_queue if r.epoch == self.sequences[r.seq].epoch]
            running = sum(s.issued > 0 and s.finished_ms is None for s in self.sequences)
            size = min(self.pipeline.max_batch, max(1, -(-running // self.pipeline.front_door_in_flight)))
            if len(self._fd_queue) < size and self.pipeline.front_door_gather_ms > 0:
                if self._fd_gather_until is None:
                    self._fd_gather_until = self.now + self.pipeline.front_door_gather_ms
                    self.at(self.pipeline.front_door_gather_ms, self._fd_flush)
                if self.now < self._fd_gather_until:
                    return
            self._fd_gather_until = None
            batch, self._fd_queue = self._fd_queue[:size], self._fd_queue[size:]
            if not batch:
                return
            self._fd_free -= 1
            message = next(self._fd_messages)
            self._fd_batches[message] = {(r.seq, r.position, r.epoch) for r in batch}
            self._fd_held[message] = []
            for key in self._fd_batches[message]:
                self._fd_batch_of[key] = message
            self._send(batch, self.stages[0])

    def _fd_collect(self, rows: list[_Row]) -> list[_Row]:
        """With merged step messages, a message is one call: its results come back together, when
        its last row is back (so an early exit waits for the deepest row of its message)."""
        if self._fd_free is None:
            return rows
        ready = []
        for row in rows:
            key = (row.seq, row.position, row.epoch)
            message = self._fd_batch_of.pop(key, None)
            if message is None:  # not the first result of its row (a verification after a draft)
                ready.append(row)
                continue
            self._fd_held[message].append(row)
            ready += self._fd_settle(message, key)
        return ready

    def _fd_settle(self, message: int, key: tuple[int, int, int]) -> list[_Row]:
        """One row of ``message`` is back (or dropped); once all are, its slot frees and its
        results are handed over."""
        waiting = self._fd_batches[message]
        waiting.discard(key)
        if waiting:
            return []
        del self._fd_batches[message]
        self._fd_free += 1
        self.at(0.0, self._fd_flush)  # the next message forms after this instant's results
        return self._fd_held.pop(message)

    def _drop_in_flight(self, sequence: _Sequence, position: int) -> None:
        """A rollback to ``position`` or the end: the front door forgets the rows in flight."""
        old = sequence.epoch
        sequence.epoch += 1
        sequence.epoch_start[sequence.epoch] = position
        if self._fd_free is None:
            return
        for key in [k for k in self._fd_batch_of if k[0] == sequence.index and k[2] == old]:
            released = self._fd_settle(self._fd_batch_of.pop(key), key)
            if released:
                self.at(0.0, lambda rows=released: self._front_door(rows))

    def _front_door(self, rows: list[_Row]) -> None:
        rows = self._fd_collect(rows)
        for row in [r for r in rows if not r.full_draft]:  # a later row's reply brings them
            held = self._held.get(row.seq, [])
            rows += [h for h in held if h.position < row.position]
            held[:] = [h for h in held if h.position >= row.position]
        # Verified tokens first: a draft that arrives with its own verification is already settled.
        for row in sorted(rows, key=lambda r: (r.role != "verify", r.seq, r.position)):
            sequence = self.sequences[row.seq]
            if row.epoch != sequence.epoch or sequence.finished_ms is not None:
                continue
            if row.role == "token":
                self._commit(sequence)
                if sequence.finished_ms is None:
                    self._issue(sequence, row.position + 1)
            elif row.role == "draft":
                self._on_draft(sequence, row.position)
            else:
                self._on_verified(sequence, row.position)

    def _on_draft(self, sequence: _Sequence, position: int) -> None:
        if position < sequence.next_verified or sequence.issued != position + 1:
            return  # already verified, or not the newest position
        if position + 1 - sequence.next_verified <= self.pipeline.draft_limit:
            self._issue(sequence, position + 1)
        else:
            sequence.pending_draft = position
            if self._held.get(sequence.index):  # no step goes on to bring them: the poll does
                self._send(self._held.pop(sequence.index), None)

    def _on_verified(self, sequence: _Sequence, position: int) -> None:
        _, drafted, accepted = sequence.exits.pop(position)
        sequence.next_verified = position + 1
        self._commit(sequence)
        if drafted:
            self.drafts_verified += 1
            self.accepted += accepted
        if sequence.finished_ms is not None:
            self._drop_in_flight(sequence, position + 1)  # released: rows still in flight stop
            return
        if not accepted:  # roll back: issue the verified token in a new epoch
            self._drop_in_flight(sequence, position + 1)
            sequence.pending_draft = None
            sequence.exits = {}
            self._issue(sequence, position + 1)
        elif sequence.issued == position + 1:  # its draft had not let the next position start
            sequence.pending_draft = None
            self._issue(sequence, position + 1)
        elif sequence.pending_draft is not None:
            pending = sequence.pending_draft
            if pending + 1 - sequence.next_verified <= self.pipeline.draft_limit:
                sequence.pending_draft = None
                self._issue(sequence, pending + 1)

    def _commit(self, sequence: _Sequence) -> None:
        if self.shared is not None and self.costs.token_cpu_ms > 0:
            shared = self.shared
            self._acquire(shared, lambda: self.at(self.costs.token_cpu_ms, lambda: self._release(shared)))
        sequence.committed += 1
        if sequence.committed >= sequence.tokens:
            sequence.finished_ms = self.now


def simulate(pipeline: Pipeline, workload: Workload, mode: str) -> Result:
    return Simulation(pipeline, workload, mode).run()
