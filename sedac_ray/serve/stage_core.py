"""What a pipeline stage knows and computes, without Ray: the core that the Stage deployment wraps.

* **Sequence table and admission.** Each sequence gets one slot of a KV pool sized once, when the
  replica starts, from its KV budget (``num_slots`` x ``max_model_len`` positions): admission is
  a free slot, never a copy, and memory use is known up front.
* **K/V ordering.** A sequence's token at position ``p`` may only run here once this stage holds
  K/V for every position ``< p``. Fills (K/V of tokens that exited upstream) travel on other
  messages than the next token, so each sequence keeps a watermark and a decode row waits for it.
  Ordering is by position, never by timing.
* **Speculative epochs.** The first row of a newer epoch (the position a speculative sequence was
  rolled back to) rolls the sequence back here; rows of older epochs are void and dropped.
* **Batch compute.** Prefill of many sequences at once, in bounded chunks, and one decode step of
  a merged batch: exit group, continue group, fill group, and for speculative rows the VERIFY
  rows of the drafts made here.

Everything here runs on one event loop (bookkeeping) or in one worker thread at a time (tensor
work, under the deployment's compute lock).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np
import torch

from sedac_ray.exit.probes import ExitProbes
from sedac_ray.model.adapter import ModelAdapter
from sedac_ray.policy import ExitPolicy
from sedac_ray.runtime.kv_cache import SlotKVCache
from sedac_ray.runtime.layer_range import LayerRange, TokenRows
from sedac_ray.serve.errors import Overloaded, RequestTooLarge, Unavailable
from sedac_ray.serve.transport import SPECULATIVE, VERIFY, Rows, pack_hidden, unpack_hidden


class SequenceState:
    """What a stage knows about one sequence: its KV slot and how far its K/V is filled."""

    def __init__(self, slot: int, max_length: int):
        self.slot = slot
        self.max_length = max_length  # KV positions it may use
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

    def wrote_prefix(self, length: int) -> None:
        """Positions ``< length`` hold K/V (a prefill)."""
        self.touched = time.monotonic()
        self.filled = max(self.filled, length)
        self._ahead = {p for p in self._ahead if p >= self.filled}
        self.changed.set()

    def rollback(self, epoch: int) -> None:
        """Positions ``>= epoch`` no longer count as written; rows of older epochs are void."""
        self.touched = time.monotonic()
        self.epoch = epoch
        self.filled = min(self.filled, epoch)
        self._ahead = {p for p in self._ahead if p < self.filled}
        self.changed.set()


@dataclass
class StageOutput:
    """One decode batch's results at a stage, as Rows with packed hidden states."""

    exited: Rows  # rows that exited here (at the last stage: every row that finished)
    continuing: Rows  # rows the next stage computes
    fill: Rows  # exited rows whose K/V the next stages still need
    verify: Rows  # drafts made here, run to the end of this stage at full depth (speculative)


@dataclass
class PrefillChunk:
    """Part of one sequence's prompt: tokens (stage 0) or hidden states ``[tokens, D]``, from ``start``."""

    seq_id: str
    start: int
    token_ids: list[int] | None = None
    hidden: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.token_ids) if self.token_ids is not None else int(self.hidden.shape[0])


def kv_bytes_per_position(model_config, num_layers: int, dtype: torch.dtype) -> int:
    """K and V bytes one token position takes in ``num_layers`` layers (from the model config)."""
    heads = model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    return num_layers * 2 * kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()


class StageCore:
    """Decoder layers ``start..end-1`` of ``adapter``'s model, serving many sequences."""

    def __init__(
        self,
        adapter: ModelAdapter,
        start: int,
        end: int,
        *,
        kv_budget_bytes: int | None,
        max_model_len: int,
        max_sequences: int = 64,
        name: str = "stage",
        probes: ExitProbes | None = None,
    ):
        self.adapter = adapter
        self.name = name
        self.is_last = end == adapter.num_layers
        self.position_bytes = kv_bytes_per_position(adapter.config, end - start, adapter.dtype)
        self.max_model_len = max_model_len
        sequence_bytes = max_model_len * self.position_bytes
        num_slots = max_sequences if kv_budget_bytes is None else kv_budget_bytes // sequence_bytes
        if num_slots < 1:
            raise ValueError(
                f"{name}: a KV budget of {kv_budget_bytes / 2**20:g} MiB holds no sequence of "
                f"max_model_len={max_model_len} ({sequence_bytes / 2**20:g} MiB "
                "each); raise kv_budget_mb or lower max_model_len"
            )
        self.kv_budget_bytes = num_slots * sequence_bytes
        self.layers = LayerRange(
            adapter, start, end, SlotKVCache(num_slots=num_slots, capacity=max_model_len), probes=probes
        )
        self.sequences: dict[str, SequenceState] = {}
        self.admitted = 0  # sequences admitted since start
        self._rolled_back: set[str] = set()  # sequences whose K/V past the rollback is not zeroed yet

    # ---- sequence table -----------------------------------------------------------------------

    @property
    def num_slots(self) -> int:
        return self.layers.cache.num_slots

    def admit(self, seq_id: str, max_length: int) -> SequenceState:
        """A slot for a new sequence of at most ``max_length`` positions, or the reason it cannot have one."""
        if seq_id in self.sequences:
            raise ValueError(f"sequence {seq_id} is already prefilled on this replica")
        if max_length > self.max_model_len:
            raise RequestTooLarge(
                f"{max_length} tokens (prompt plus max_tokens) are more than the {self.max_model_len} "
                f"positions per sequence of {self.name} (max_model_len); lower max_tokens"
            )
        if not self.layers.cache.free_slots:
            raise Overloaded(
                f"{self.name} is at its KV budget ({len(self.sequences)} sequences, "
                f"{self.kv_budget_bytes / 2**20:.0f} MiB); retry shortly"
            )
        (slot,) = self.layers.cache.allocate(1)
        self.sequences[seq_id] = sequence = SequenceState(slot, max_length)
        self.admitted += 1
        return sequence

    def release(self, seq_ids: list[str]) -> list[str]:
        """Free the sequences' slots (never under a running batch); returns those that were held."""
        freed = []
        for seq_id in seq_ids:
            sequence = self.sequences.pop(seq_id, None)
            if sequence is not None:
                self.layers.cache.free([sequence.slot])
                sequence.changed.set()  # rows waiting for its K/V see that it is gone
                freed.append(seq_id)
            self._rolled_back.discard(seq_id)
        return freed

    def orphans(self, lease_s: float) -> list[str]:
        """Sequences that saw no traffic for ``lease_s``: their front door lost track of them."""
        now = time.monotonic()
        return [seq_id for seq_id, s in self.sequences.items() if now - s.touched > lease_s]

    def kv_bytes_in_use(self) -> int:
        return sum(s.max_length for s in self.sequences.values()) * self.position_bytes

    # ---- ordering -----------------------------------------------------------------------------

    async def wait_for_kv(self, rows: Rows, timeout_s: float) -> tuple[Rows, dict[str, Unavailable]]:
        """Waits until this stage holds K/V for every position below each row's own. Returns the
        rows that may run, and an error for each row that cannot (its sequence is gone here, or
        its K/V stopped arriving)."""
        lost: dict[str, Unavailable] = {}
        for seq_id, position, epoch in zip(
            rows.seq_ids, rows.positions.tolist(), rows.epochs.tolist(), strict=True
        ):
            self.catch_up(seq_id, epoch)
            while (
                (sequence := self.sequences.get(seq_id)) is not None
                and sequence.epoch == epoch
                and sequence.filled < position
            ):
                sequence.changed.clear()
                try:
                    await asyncio.wait_for(sequence.changed.wait(), timeout_s)
                except asyncio.TimeoutError:  # an alias of TimeoutError from 3.11 on
                    lost[seq_id] = Unavailable(
                        f"{self.name}: K/V of sequence {seq_id} stopped at position "
                        f"{sequence.filled}; position {position} cannot run"
                    )
                    break
            if sequence is None or sequence.epoch != epoch:
                lost[seq_id] = self.gone(seq_id)
        return rows.take([i for i, s in enumerate(rows.seq_ids) if s not in lost]), lost

    def catch_up(self, seq_id: str, epoch: int) -> bool:
        """A row of a newer epoch rolls its sequence back here (a batch computing now may still
        write older rows' K/V; their positions are rewritten before anything reads them).
        Returns whether it did."""
        sequence = self.sequences.get(seq_id)
        if sequence is None or epoch <= sequence.epoch:
            return False
        sequence.rollback(epoch)
        self._rolled_back.add(seq_id)
        return True

    def gone(self, seq_id: str) -> Unavailable:
        if seq_id in self.sequences:  # held, but the row came from before a rollback
            return Unavailable(f"{self.name}: this step of sequence {seq_id} was rolled back")
        return Unavailable(f"{self.name} no longer holds sequence {seq_id}")

    def current(self, rows: Rows) -> Rows:
        """The rows whose sequence this stage holds, at the sequence's current epoch."""
        keep = [
            i
            for i, (seq_id, epoch) in enumerate(zip(rows.seq_ids, rows.epochs.tolist(), strict=True))
            if seq_id in self.sequences and self.sequences[seq_id].epoch == epoch
        ]
        return rows.take(keep)

    def wrote(self, rows: Rows) -> None:
        """Record the K/V a batch wrote (rows of sequences released meanwhile are ignored)."""
        for seq_id, position, epoch in zip(
            rows.seq_ids, rows.positions.tolist(), rows.epochs.tolist(), strict=True
        ):
            if (sequence := self.sequences.get(seq_id)) is not None:
                sequence.wrote(position, epoch)

    # ---- compute (in a worker thread, one call at a time) --------------------------------------

    def prefill(self, chunks: list[PrefillChunk]) -> list[torch.Tensor]:
        """Run prompt chunks of several sequences through every layer at once (right-padded to the
        longest); returns each chunk's output hidden states ``[tokens, D]``. A sequence's chunks
        come in order, so each chunk attends to the K/V its earlier chunks wrote."""
        adapter = self.adapter
        longest = max(len(c) for c in chunks)
        hidden = torch.zeros(
            len(chunks), longest, adapter.hidden_size, dtype=adapter.dtype, device=adapter.device
        )
        positions = torch.zeros(len(chunks), longest, dtype=torch.long)
        with torch.inference_mode():
            for row, chunk in enumerate(chunks):
                n = len(chunk)
                if chunk.token_ids is not None:
                    ids = torch.tensor(chunk.token_ids, device=adapter.device)
                    hidden[row, :n] = adapter.embed_tokens(ids)
                else:
                    hidden[row, :n] = chunk.hidden.to(adapter.device)
                # Padding sits past the chunk, where the sequence's own later tokens overwrite it
                # before any query reads it (queries see keys <= their position only).
                positions[row] = (chunk.start + torch.arange(longest)).clamp(max=self.max_model_len - 1)
            slots = torch.tensor([self.sequences[c.seq_id].slot for c in chunks])
            out = self.layers.prefill(slots, positions, hidden)
        return [out[row, : len(chunk)] for row, chunk in enumerate(chunks)]

    def take_rolled_back(self) -> list[tuple[int, int]]:
        """``(slot, position)`` of each sequence rolled back since the last call: its K/V from that
        position on must be zeroed (:meth:`zero`) before the next batch runs. Taken under the
        compute lock: the batch that runs a rollback's first row, or any batch before it, comes
        after every write of the rolled-back rows."""
        taken = [
            (sequence.slot, sequence.epoch)
            for seq_id in self._rolled_back
            if (sequence := self.sequences.get(seq_id)) is not None
        ]
        self._rolled_back.clear()
        return taken

    def zero(self, rolled_back: list[tuple[int, int]]) -> None:
        """Zero K/V from each position on, so the cache holds exactly what it would had the
        rolled-back rows never run."""
        for slot, position in rolled_back:
            self.layers.cache.truncate(slot, position)

    def compute(self, rows: Rows, fill: Rows) -> StageOutput:
        """Run this stage's layers for a merged batch. Speculative rows run apart: their exits
        propagate no K/V, since the drafted token runs on at full depth (:meth:`LayerRange.verify`)."""
        adapter = self.adapter
        device = adapter.device
        with torch.inference_mode():
            if not len(rows):  # a batch of fills only
                hidden = torch.zeros(0, adapter.hidden_size, device=device, dtype=adapter.dtype)
            elif rows.token_ids is not None:
                hidden = adapter.embed_tokens(torch.from_numpy(rows.token_ids).to(device))
            else:
                hidden = unpack_hidden(rows.hidden, rows.hidden_dtype, device)
            speculative = rows.modes == SPECULATIVE
            if self.is_last and speculative.any():
                # A draft here would overlap with nothing (its deeper layers run in this same
                # step): run these rows at full depth; the stage may still read them out as
                # drafts, with the draft head, and verify them with the full head after replying.
                rows.rules = rows.rules.copy()
                rows.rules[speculative] = ExitPolicy.disabled().rule()
                speculative[:] = False
            fill_rows = None
            if len(fill):
                fill_hidden = unpack_hidden(fill.hidden, fill.hidden_dtype, device)
                fill_rows = self._token_rows(fill, fill_hidden, np.arange(len(fill)))
            out = self.layers.decode(self._token_rows(rows, hidden, np.flatnonzero(~speculative)), fill_rows)
            exited = [self._as_rows(rows, out.exited, exited=True)]
            continuing = [self._as_rows(rows, out.continuing, exited=False)]
            verify = Rows.empty()
            if speculative.any():
                spec = self.layers.decode(
                    self._token_rows(rows, hidden, np.flatnonzero(speculative)), propagate=False
                )
                exited.append(self._as_rows(rows, spec.exited, exited=True))
                continuing.append(self._as_rows(rows, spec.continuing, exited=False))
                drafts = spec.exited.select((spec.exited.exit_layer < adapter.num_layers).nonzero()[:, 0])
                if len(drafts):
                    verify = self._verify_rows(rows, self.layers.verify(drafts, drafts.exit_layer))
        return StageOutput(
            exited=Rows.concat(exited),
            continuing=Rows.concat(continuing),
            fill=self._fill_as_rows(rows, fill, out.fill),
            verify=verify,
        )

    def _verify_rows(self, source: Rows, verified: TokenRows) -> Rows:
        """Drafted tokens, run to the end of this range, as VERIFY rows (their exit rule off)."""
        picked = self._with_hidden(source, verified.ids, verified.hidden)
        picked.modes = np.full(len(picked), VERIFY, np.int8)
        picked.rules = ExitPolicy.disabled().rules(len(picked)).numpy()  # full depth from here on
        if self.is_last:
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

    @staticmethod
    def _with_hidden(source: Rows, ids: torch.Tensor, hidden: torch.Tensor) -> Rows:
        picked = source.take(ids.tolist())
        picked.hidden, picked.hidden_dtype = pack_hidden(hidden)
        picked.token_ids = None
        return picked

    def _as_rows(self, source: Rows, result: TokenRows, exited: bool) -> Rows:
        picked = self._with_hidden(source, result.ids, result.hidden)
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
            parts.append(self._with_hidden(rows, result.ids[incoming:], result.hidden[incoming:]))
        return Rows.concat(parts)


class VerifiedTokens:
    """The last stage's full-depth tokens of VERIFY rows (drafts' verifications), kept until the
    front door collects them. The front door polls once per sequence at a time, for every
    verification from a position on, so a sequence never holds more than one waiting call here
    however many drafts it has in flight."""

    def __init__(self) -> None:
        self._kept: dict[str, dict[tuple[int, int], object]] = {}  # seq -> (position, epoch) -> token
        self._changed: dict[str, asyncio.Event] = {}

    def take(self, seq_id: str, epoch: int) -> dict[int, object]:
        """Every verification of the sequence's ``epoch`` kept so far (position -> token), taken."""
        kept = self._kept.get(seq_id, {})
        return {p: kept.pop((p, e)) for p, e in list(kept) if e == epoch}

    def keep(self, seq_id: str, position: int, epoch: int, answer) -> None:
        self._kept.setdefault(seq_id, {})[(position, epoch)] = answer
        self.wake(seq_id)

    def wake(self, seq_id: str) -> None:
        """Something changed for the sequence (a verification, a rollback, its release)."""
        if (event := self._changed.get(seq_id)) is not None:
            event.set()

    def forget(self, seq_id: str, before_epoch: int | None = None) -> None:
        """Drop the sequence's verifications (of epochs older than ``before_epoch`` only, if given)."""
        kept = self._kept.get(seq_id, {})
        for key in [k for k in kept if before_epoch is None or k[1] < before_epoch]:
            del kept[key]
        self.wake(seq_id)
        if before_epoch is None:
            self._kept.pop(seq_id, None)
            self._changed.pop(seq_id, None)

    async def collect(self, seq_id: str, position: int, epoch: int, current) -> dict[int, object]:
        """Every verification of ``epoch`` at ``position`` or later, once there is at least one.
        ``current()`` raises once the sequence is gone or rolled back past ``epoch``."""
        event = self._changed.setdefault(seq_id, asyncio.Event())
        while True:
            current()
            kept = self._kept.get(seq_id, {})
            ready = {p: kept.pop((p, e)) for p, e in list(kept) if e == epoch and p >= position}
            if ready:
                return ready
            event.clear()
            await event.wait()
