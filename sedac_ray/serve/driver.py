"""The front door's side of the pipeline: one sequence from prefill to its last token.

Each sequence is prefilled through every stage (which pins its KV to one replica per stage), then
decoded one step at a time through stage 0, which forwards what continues and what exits. Steps
of concurrent sequences merge into one stage-0 message per replica. Whatever ends a sequence
(its last token, an error, a deadline, a client that hung up) releases its KV in every stage.

Failures of the cluster (a replica died, was scaled away, or stopped answering) become
:class:`~sedac_ray.serve.errors.Unavailable`, and cost a *replay*, not the request: the front
door knows the prompt and every committed token, so it prefills them again on a new route and
decoding carries on from the next position (Petals replays a failed span the same way). With
exits off the replayed sequence computes exactly what it would have; with exits on, the tokens
that exited get exact K/V in the replay instead of propagated K/V.

Speculative requests (lossless early exit) step on from drafts while the deeper stages verify
them: :class:`~sedac_ray.serve.speculation.SpeculativeDecode`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from sedac_ray.completion import Completion
from sedac_ray.sampling import TokenLogprobs
from sedac_ray.serve.batcher import Batcher
from sedac_ray.serve.config import PipelineConfig
from sedac_ray.serve.errors import DeadlineExceeded, Overloaded, Unavailable, as_serve_error
from sedac_ray.serve.requests import GenerationRequest
from sedac_ray.serve.routing import pin
from sedac_ray.serve.speculation import SpeculativeDecode
from sedac_ray.serve.transport import SPECULATIVE, PrefillMessage, Rows, StepMessage, TokenResult

logger = logging.getLogger("ray.serve")


@dataclass
class TokenEvent:
    token: int
    exit_layer: int
    text: str  # text this token completes
    index: int
    finish_reason: str | None
    draft: bool = False  # an unverified draft (speculative requests that asked to see drafts)
    logprobs: TokenLogprobs | None = None  # when the request asked for them


class PipelineDriver:
    def __init__(self, config: PipelineConfig, stages: list, num_layers: int):
        self.config = config
        self.stages = stages
        self.num_layers = num_layers
        # Sequences step together: in-flight steps merge into one stage-0 message per replica.
        # The decoding sequences split evenly over `steps_in_flight` groups, and a group waits for
        # its members to come back (each streams its token first) before it steps again.
        self.decoding = 0  # grouped sequences (plain, or drafting at full depth) past prefill, not finished
        self.steps = Batcher(
            self._step_many,
            max_size=config.max_batch_size,
            wait_s=config.step_gather_timeout_s,
            max_in_flight=config.steps_in_flight,
            target=lambda: -(-self.decoding // config.steps_in_flight),
        )
        # Speculative sequences that draft from early exits step again as soon as a draft comes
        # back, and at once after a wrong one: they merge only with what arrives within a few ms,
        # and never wait for a slot (behind a group, or behind their own void step). Those that
        # draft at full depth (the draft head at the last stage) gain nothing from stepping
        # apart, since every row runs every stage: they step in the groups, like plain sequences.
        self.speculative_steps = Batcher(
            self._step_many,
            max_size=config.max_batch_size,
            wait_s=config.batch_wait_timeout_s,
            max_in_flight=config.max_concurrent_requests * config.draft_limit,
        )
        self._releases: set[asyncio.Task] = set()  # kept referenced until done
        self.replays = 0  # sequences moved to a new route after a replica was lost

    async def complete(
        self, request: GenerationRequest, new_completion: Callable[[], Completion]
    ) -> Completion:
        """The whole completion; nothing reaches the client before the end."""
        completion = new_completion()
        async for _ in self.stream(request, completion):
            pass
        return completion

    async def stream(self, request: GenerationRequest, completion: Completion) -> AsyncIterator[TokenEvent]:
        """Tokens as they come. A stage replica lost on the way (it died, was scaled away, or
        stopped answering) costs a replay, never the request: the prompt and the committed tokens
        are prefilled again on a new route and decoding carries on from the next position, so no
        token is repeated or lost. Sampling is seeded per (seed, position), so a replayed request
        samples what it would have."""
        deadline = time.monotonic() + self.config.request_timeout_s
        seq_id, route = await self._open(request, completion, deadline)
        routes = {seq_id: route}  # every route this request held, released at the end
        decoding = self._grouped(request)
        self.decoding += decoding  # step groups wait for the sequences decoding
        try:
            yield self._event(completion, completion.exit_layers[-1])
            while not completion.finished:
                try:
                    if request.speculative:
                        async for event in self._speculate(seq_id, route, request, completion, deadline):
                            yield event
                        return
                    step = await self._decode(seq_id, route, request, completion, deadline)
                    completion.add(step.token, step.exit_layer, step.logprobs)
                    yield self._event(completion, step.exit_layer)
                except Exception as err:
                    error = as_serve_error(err)
                    if not isinstance(error, Unavailable):
                        raise error from err
                    logger.warning(f"replaying sequence {seq_id} on a new route after: {error.message}")
                    self._release_later(seq_id, routes.pop(seq_id))
                    seq_id, route = await self._open(request, completion, deadline, after=error)
                    routes[seq_id] = route
                    self.replays += 1
        finally:
            self.decoding -= decoding
            for held, its_route in routes.items():  # detached: a cancelled request must still free its KV
                self._release_later(held, its_route)

    async def _open(
        self,
        request: GenerationRequest,
        completion: Completion,
        deadline: float,
        after: Unavailable | None = None,
    ) -> tuple[str, tuple[str, ...]]:
        """Prefill the prompt and every committed token but the newest (the next step's input) on
        a fresh route; a new request also gets its first token. Retried while replicas are
        missing, for at most ``step_timeout_s`` of failures in a row."""
        give_up = time.monotonic() + self.config.step_timeout_s
        pause = 0.1
        while True:
            seq_id = uuid.uuid4().hex
            prefix = request.prompt_ids + completion.token_ids[:-1]
            message = PrefillMessage(
                seq_id,
                request.sampling,
                token_ids=prefix,
                max_length=len(request.prompt_ids) + request.max_tokens,
            )
            try:
                result = await self._within(self.stages[0].prefill.remote(message), deadline)
            except Exception as err:
                error = as_serve_error(err)
                # A replay also waits for room: its old route's KV is being freed meanwhile.
                retryable = (Unavailable, Overloaded) if after is not None else Unavailable
                if not isinstance(error, retryable) or time.monotonic() + pause >= min(give_up, deadline):
                    raise error from (after or err)
                logger.warning(f"prefill failed, retrying in {pause:g} s: {error.message}")
                await asyncio.sleep(pause)
                pause = min(2 * pause, 2.0)
                continue
            if not completion.token_ids:  # a replay keeps its tokens; the prefill's own is dropped
                completion.add(result.first.token, result.first.exit_layer, result.first.logprobs)
            return seq_id, result.route

    async def _decode(
        self,
        seq_id: str,
        route: tuple[str, ...],
        request: GenerationRequest,
        completion: Completion,
        deadline: float,
    ) -> TokenResult:
        """One plain decode step from the newest token, as part of a step group."""
        position = len(request.prompt_ids) + len(completion.token_ids) - 1
        token = completion.token_ids[-1]
        return await self._step(
            seq_id, route, request, position, token, deadline, generated=completion.token_ids
        )

    def _release_later(self, seq_id: str, route: tuple[str, ...]) -> None:
        task = asyncio.ensure_future(self._release(seq_id, route))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    @staticmethod
    def _event(completion: Completion, exit_layer: int) -> TokenEvent:
        """The event for the completion's newest token."""
        token, index = completion.token_ids[-1], len(completion.token_ids) - 1
        return TokenEvent(
            token,
            exit_layer,
            completion.new_text(),
            index,
            completion.finish_reason,
            logprobs=completion.logprobs[-1],
        )

    def _step(
        self,
        seq_id: str,
        route: tuple[str, ...],
        request: GenerationRequest,
        position: int,
        token: int,
        deadline: float,
        epoch: int | None = None,
        generated: Sequence[int] = (),
    ) -> Awaitable[TokenResult]:
        """One decode step of the sequence (speculative when ``epoch`` is given)."""
        rows = Rows(
            seq_ids=[seq_id],
            positions=np.asarray([position]),
            rules=np.asarray([request.policy.rule()], dtype=np.float32),
            state=np.zeros(1, np.int64),
            sampling=[request.sampling.for_step(generated)],  # penalties need the tokens so far
            routes=[route],
            token_ids=np.asarray([token]),
        )
        if epoch is not None:
            rows.modes[:], rows.epochs[:] = SPECULATIVE, epoch
        batcher = self.steps if self._grouped(request) else self.speculative_steps
        return self._within(batcher.submit((route[0], rows)), deadline)

    @staticmethod
    def _grouped(request: GenerationRequest) -> bool:
        """Whether the request's steps go in the step groups: all but speculative ones drafting
        from early exits (whose drafts come back before their rows reach the last stage)."""
        return not (request.speculative and request.policy.enabled)

    async def _speculate(
        self,
        seq_id: str,
        route: tuple[str, ...],
        request: GenerationRequest,
        completion: Completion,
        deadline: float,
    ) -> AsyncIterator[TokenEvent]:
        last = self.stages[-1].options(session_id=pin(route[-1]))
        decode = SpeculativeDecode(
            completion,
            prompt_length=len(request.prompt_ids),
            num_layers=self.num_layers,
            draft_limit=self.config.draft_limit,
            step=lambda position, token, epoch: self._step(
                seq_id, route, request, position, token, deadline, epoch
            ),
            verify=lambda position, epoch: self._within(
                last.verified.remote(seq_id, position, epoch), deadline
            ),
        )
        if completion.speculative is not None:  # a replay: the request's statistics carry on
            decode.stats = completion.speculative
        completion.speculative = decode.stats
        async for item in decode.run(show_drafts=request.stream_drafts):
            if item.draft:
                text = completion.tokenizer.decode([item.token], skip_special_tokens=True)
                index = len(completion.token_ids) + len(decode.pending) - 1
                yield TokenEvent(item.token, item.exit_layer, text, index, None, draft=True)
            else:
                yield self._event(completion, item.exit_layer)

    async def _within(self, awaitable, deadline: float):
        """``awaitable``'s result within the step timeout and the request's deadline."""
        remaining = deadline - time.monotonic()
        timeout = min(self.config.step_timeout_s, remaining)
        try:
            return await asyncio.wait_for(awaitable, max(timeout, 0.001))
        except asyncio.TimeoutError:  # an alias of TimeoutError from 3.11 on
            if timeout >= remaining:
                raise DeadlineExceeded(
                    f"the request ran past its {self.config.request_timeout_s:g} s limit; "
                    "lower max_tokens or retry later"
                ) from None
            raise Unavailable(
                f"a pipeline stage did not answer within {self.config.step_timeout_s:g} s; retry the request"
            ) from None

    async def _step_many(self, items: list[tuple[str, Rows]]) -> list[TokenResult | Exception]:
        """One decode step for many sequences: one message per stage-0 replica, so stage 0 sees
        them as one batch. Returns each item's TokenResult, or the error that stopped it alone."""
        groups: dict[str, list[int]] = {}
        for index, (replica, _) in enumerate(items):
            groups.setdefault(replica, []).append(index)
        calls = {
            replica: self.stages[0]
            .options(session_id=pin(replica))
            .step.remote(StepMessage(Rows.concat([items[i][1] for i in indices])))
            for replica, indices in groups.items()
        }
        replies = await asyncio.gather(*calls.values(), return_exceptions=True)
        answers = dict(zip(calls, replies, strict=True))
        results: list[TokenResult | Exception] = []
        for replica, rows in items:
            answer = answers[replica]
            results.append(answer if isinstance(answer, BaseException) else answer[rows.seq_ids[0]])
        return results

    async def _release(self, seq_id: str, route: tuple[str, ...]) -> None:
        calls = [
            stage.options(session_id=pin(replica)).release.remote([seq_id])
            for stage, replica in zip(self.stages, route, strict=True)
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
        for error in (r for r in results if isinstance(r, BaseException)):
            logger.warning(f"could not release sequence {seq_id}: {error!r}")
