"""Lossless speculative decoding across pipeline stages: the front door's side of one sequence.

A speculative row that exits at some layer comes back at once as a *draft*, and the front door
steps the sequence on from it while the same token runs on at full depth through the deeper
stages (see :mod:`sedac_ray.serve.stage`). So the next token already computes in the shallow
stages while the deeper ones verify the last: the overlap of DESIGN §3, scheme A.

* Each draft's verification is the full-depth token for the same position, kept by the last
  stage; drafts are committed in order once verified, and only verified tokens are committed.
* A wrong draft is replaced by its verified token, and the steps taken from it are void: decoding
  resumes from that position with a new epoch (the position itself), which rolls the sequence
  back in each stage as the first row of the epoch gets there (no extra round trip).
* A row that runs the whole model without exiting is exact as soon as its input is, unless the
  last stage read it out with the draft head (the engine's cheap draft read-out): then it is a
  draft like an exited row, whose full-head verification follows the reply.
* The draft head's confidence gates drafting as in the engine: no step goes on from a draft below
  the gate until it is verified.
* At most ``draft_limit`` unverified tokens are ahead of the committed ones. Verifications ready
  at the last stage come back with the sequence's next reply from there; when no step is on its
  way (or an early-exit draft waits), one call per sequence collects them (it returns all that
  are ready), so a sequence holds at most one waiting call at the last stage.

So the output equals full-depth decoding token for token, whatever the exit rule drafts.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from sedac_ray.completion import Completion
from sedac_ray.serve.transport import TokenResult
from sedac_ray.speculative import SpeculativeStats

# (position, input token, epoch) -> the row's result: a draft, or a full-depth token
Step = Callable[[int, int, int], Awaitable[TokenResult]]
# (position, epoch) -> full-depth tokens of that row and later ones of the epoch (at least one)
Verify = Callable[[int, int], Awaitable[dict[int, TokenResult]]]


@dataclass
class _Pending:
    position: int  # position of the row that produced it; the token sits at position + 1
    token: int
    exit_layer: int
    check: asyncio.Future | None  # its verification; None: exact (full depth, read out by the full head)
    confident: bool = True  # the draft reached the draft gate: steps may go on from it


@dataclass
class Committed:
    token: int
    exit_layer: int  # the draft's exit layer for an accepted draft; full depth otherwise
    draft: bool = False  # True: an unverified draft, shown to clients who asked for drafts


class SpeculativeDecode:
    def __init__(
        self,
        completion: Completion,
        prompt_length: int,
        num_layers: int,
        draft_limit: int,
        step: Step,
        verify: Verify,
    ):
        self.completion = completion
        self.prompt_length = prompt_length
        self.num_layers = num_layers
        self.draft_limit = draft_limit
        self._step, self._verify = step, verify
        self.epoch = 0  # the position of the latest rollback
        self.stats = SpeculativeStats()
        self.pending: deque[_Pending] = deque()  # unverified tokens, oldest first
        self._stepping: asyncio.Future | None = None
        self._stepping_position = 0
        self._checks: dict[int, asyncio.Future] = {}  # position -> its verification, this epoch
        self._collector: asyncio.Task | None = None
        self._collecting = 0  # the epoch the collector works for

    async def run(self, show_drafts: bool = False) -> AsyncIterator[Committed]:
        """Commits tokens into the completion (whose first token is already there) until it
        finishes, yielding each (and each draft, with ``show_drafts``)."""
        try:
            while not self.completion.finished:
                self._maybe_step()
                head = self.pending[0] if self.pending else None
                if head is not None and head.check is None:  # full depth: exact now
                    self.stats.direct += 1
                    yield self._commit(self.pending.popleft())
                    continue
                if self._checks and self._poll_now():
                    self._ensure_collector()
                waiting = [f for f in (self._stepping, head and head.check) if f is not None]
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if head is not None and head.check.done():
                    yield self._settle(head)
                elif self._stepping is not None and self._stepping.done():
                    draft = self._drafted(self._stepping.result())
                    if draft is not None and show_drafts:
                        yield Committed(draft.token, draft.exit_layer, draft=True)
        finally:  # drafts past the end (or of a request that failed) are discarded too
            self.stats.rolled_back += sum(p.check is not None for p in self.pending)
            self._discard()

    def _maybe_step(self) -> None:
        """Step from the newest token, if none is stepping and the drafts may run further."""
        tokens = len(self.completion.token_ids) + len(self.pending)
        newest = self.pending[-1].token if self.pending else self.completion.token_ids[-1]
        if (
            self._stepping is not None
            or len(self.pending) >= self.draft_limit
            or tokens >= self.completion.max_tokens
            or newest in self.completion.eos_ids
            # Below the draft gate: step on only once it is verified (the engine ends its chunk there).
            or (self.pending and not self.pending[-1].confident)
        ):
            return
        self._stepping_position = self.prompt_length + tokens - 1
        self._stepping = asyncio.ensure_future(self._step(self._stepping_position, newest, self.epoch))

    def _drafted(self, result: TokenResult) -> _Pending | None:
        """Queue a step's result; returns it if it is a draft."""
        position, self._stepping = self._stepping_position, None
        self._deliver(result.verified or {})  # earlier drafts' verifications came back with it
        if result.exit_layer >= self.num_layers and not result.draft:  # the full head's own token
            self.pending.append(_Pending(position, result.token, result.exit_layer, None))
            return None
        self.stats.drafts += 1
        check = self._checks[position] = asyncio.get_running_loop().create_future()
        self.pending.append(_Pending(position, result.token, result.exit_layer, check, result.confident))
        return self.pending[-1]

    def _poll_now(self) -> bool:
        """Whether verifications are worth a call of their own: no step is in flight to bring them
        back with its reply, or an early-exit draft waits (its verification runs the deeper
        stages behind it, so the next steps' replies may not pass the last stage)."""
        return self._stepping is None or any(
            p.check is not None and p.exit_layer < self.num_layers for p in self.pending
        )

    def _ensure_collector(self) -> None:
        if self._collector is None or self._collector.done() or self._collecting != self.epoch:
            self._collecting = self.epoch  # a stale epoch's collector ends when its call does
            self._collector = asyncio.ensure_future(self._collect(self.epoch))

    def _deliver(self, answers: dict[int, TokenResult]) -> None:
        for position, answer in answers.items():
            check = self._checks.pop(position, None)
            if check is not None and not check.done():
                check.set_result(answer)

    async def _collect(self, epoch: int) -> None:
        """Settle this epoch's verifications as they come, one call at a time, while no step's
        reply is on its way to bring them."""
        while self._checks and epoch == self.epoch and self._poll_now():
            try:
                answers = await self._verify(min(self._checks), epoch)
            except Exception as error:
                if epoch == self.epoch:  # a stale call's failure means nothing
                    for check in self._checks.values():
                        if not check.done():
                            check.set_exception(error)
                    self._checks.clear()
                return
            if epoch != self.epoch:
                return
            self._deliver(answers)

    def _settle(self, draft: _Pending) -> Committed:
        """The oldest draft is verified: commit it, or its verified token, rolling back there."""
        verified = draft.check.result()
        self.pending.popleft()
        self.stats.verifications += 1
        if verified.token == draft.token:
            self.stats.accepted += 1
            return self._commit(draft)
        self.stats.rollbacks += 1
        self.stats.rolled_back += 1 + sum(p.check is not None for p in self.pending)
        self._discard()
        self.epoch = draft.position + 1  # where the wrong draft sat: everything from there is void
        return self._commit(_Pending(draft.position, verified.token, self.num_layers, None))

    def _commit(self, pending: _Pending) -> Committed:
        self.completion.add(pending.token, pending.exit_layer)
        return Committed(pending.token, pending.exit_layer)

    def _discard(self) -> None:
        """Forget the step in flight and every unverified draft (they came from a void token).
        They are left to end rather than cancelled: the stages drop their rows by epoch, and their
        calls end there (or when the sequence is released) at less cost than a cancellation."""
        for future in [self._stepping, *(p.check for p in self.pending)]:
            if future is not None:
                future.add_done_callback(_forget)
        self._stepping = None
        self.pending.clear()
        self._checks.clear()  # the collector of the old epoch stops when its call ends


def _forget(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # retrieved, so asyncio does not log it as never retrieved
