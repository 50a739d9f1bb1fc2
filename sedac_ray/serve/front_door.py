"""The ingress: OpenAI-style HTTP (FastAPI) and gRPC (``sedac.v1.SedacService``) in one deployment.

Both protocols go through the same steps: auth, size limit, parsing and validation
(:mod:`~sedac_ray.serve.openai_protocol` for HTTP bodies, then :class:`RequestBuilder` for both),
admission (a concurrency limit here, a KV budget in every stage), then the
:class:`PipelineDriver` runs each of the request's ``n`` choices as a sequence of its own. One
:class:`RequestScope` holds every request's lifecycle: its place under the limit, a client that
left (HTTP 499, gRPC ``CANCELLED``), the mapping of any failure to one
:class:`~sedac_ray.serve.errors.ServeError` with its HTTP status and gRPC code, the metrics, and
one JSON log line that carries the request id the client also gets back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from dataclasses import asdict

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from ray import serve

from sedac_ray.completion import Completion, eos_token_ids
from sedac_ray.model.loading import load_tokenizer_and_config
from sedac_ray.sampling import TokenLogprobs
from sedac_ray.serve.auth import ApiKeyAuth, grpc_authorization
from sedac_ray.serve.config import PipelineConfig
from sedac_ray.serve.driver import PipelineDriver, TokenEvent
from sedac_ray.serve.errors import (
    InvalidRequest,
    MalformedRequest,
    Overloaded,
    RequestTooLarge,
    ServeError,
    as_serve_error,
    http_error,
    set_grpc_error,
)
from sedac_ray.serve.generated import sedac_pb2
from sedac_ray.serve.grpc_service import UnparsableRequest
from sedac_ray.serve.metrics import FrontDoorMetrics
from sedac_ray.serve.openai_protocol import OpenAIResponses, build_arguments, parse_body
from sedac_ray.serve.requests import GenerationRequest, RequestBuilder

logger = logging.getLogger("ray.serve")

app = FastAPI(title="sedac-ray", description="Early-exit LLM serving")


def current_request_id() -> str:
    """Serve's id for the request being handled (it also returns it as the ``x-request-id``
    header and the gRPC ``request_id`` trailer); a fresh one outside a Serve request."""
    from ray.serve.context import _get_serve_request_context

    return _get_serve_request_context().request_id or uuid.uuid4().hex


class RequestScope:
    """One request from arrival to its log line, as an async context manager.

    Inside ``async with scope:`` the handler checks, parses, calls :meth:`admit` and runs the
    request. On leaving, the scope gives the admitted place back, and records the outcome (metrics
    and one JSON log line): success; a client that left (``CancelledError`` or a closed stream:
    HTTP 499, gRPC ``CANCELLED``, re-raised); or any other failure, which becomes
    :attr:`error` (a :class:`ServeError`; set on the gRPC context too) and is not re-raised, so
    the handler answers it after the block. A streaming handler calls :meth:`hand_off` and gives
    the scope to its response generator, which enters it a second time; the handler's own exit
    then leaves the place taken and records nothing.
    """

    def __init__(self, door: FrontDoorServer, protocol: str, grpc_context=None):
        self.door = door
        self.protocol = protocol
        self.grpc_context = grpc_context
        self.request_id = current_request_id()
        self.started = time.perf_counter()
        self.request: GenerationRequest | None = None
        self.completions: list[Completion] = []
        self.error: ServeError | None = None
        self._admitted = False
        self._handed_off = False

    def admit(self, request: GenerationRequest) -> GenerationRequest:
        """Takes the request's place under the concurrency limit (or refuses it: Overloaded)."""
        self.request = request
        self.door.take_place()
        self._admitted = True
        return request

    def hand_off(self) -> RequestScope:
        self._handed_off = True
        return self

    def release(self) -> None:
        """Gives the place back, once (also called when a stream is dropped unstarted)."""
        if self._admitted:
            self._admitted = False
            self.door.give_place_back()

    async def __aenter__(self) -> RequestScope:
        self._handed_off = False
        return self

    async def __aexit__(self, kind, error, traceback) -> bool:
        if error is None and self._handed_off:
            return False
        self.release()
        if error is None:
            self.door.record(self, "200" if self.protocol == "http" else "OK")
            return False
        if not isinstance(error, Exception):  # cancelled, or the stream was closed: the client left
            self.error = ServeError("client disconnected")
            self.door.record(self, "499" if self.protocol == "http" else "CANCELLED")
            return False
        self.error = as_serve_error(error)
        if self.protocol == "grpc":
            set_grpc_error(self.grpc_context, self.error, self.request_id)
            self.door.record(self, self.error.grpc_code.name)
        else:
            self.door.record(self, str(self.error.http_status))
        return True


class FrontDoorServer:
    def __init__(self, config: dict, stages: list, head=None):
        self.config = PipelineConfig.from_args(config)
        self.stages = stages
        self.auth = ApiKeyAuth.from_env(self.config.api_key_env, required=self.config.require_api_key)
        tokenizer, model_config, generation_config = load_tokenizer_and_config(self.config.model)
        self.tokenizer = tokenizer
        self.model_name = self.config.model
        self.num_layers = int(model_config.num_hidden_layers)
        self.eos_ids = eos_token_ids([generation_config, model_config], tokenizer)
        self.driver = PipelineDriver(self.config, stages, self.num_layers)
        self.requests = RequestBuilder(
            tokenizer,
            model_name=self.model_name,
            num_layers=self.num_layers,
            # What every stage's KV pool holds per sequence, within the model's context.
            max_context=self.config.model_len(int(getattr(model_config, "max_position_embeddings", 1 << 30))),
            default_policy=self.config.default_policy(),
            default_max_tokens=self.config.default_max_tokens,
            exit_probes=self.config.exit_probes_path(self.num_layers) is not None,
        )
        self.metrics = FrontDoorMetrics(self.num_layers)
        self.active = 0
        logger.info(
            f"front door: {self.model_name}, {len(stages)} stages, API key "
            f"{'required' if self.auth.enabled else 'off'}, at most "
            f"{self.config.max_concurrent_requests} concurrent requests"
        )

    def new_completion(self, request: GenerationRequest) -> Completion:
        return Completion(self.tokenizer, request.max_tokens, self.eos_ids, request.stop)

    # ---- what both protocols share: admission, the choices, accounting, logs -------------------

    def take_place(self) -> None:
        if self.active >= self.config.max_concurrent_requests:
            raise Overloaded(
                f"the server is at its limit of {self.config.max_concurrent_requests} concurrent "
                "requests; retry shortly"
            )
        self._count(+1)

    def give_place_back(self) -> None:
        self._count(-1)

    def _count(self, change: int) -> None:
        self.active += change
        self.metrics.in_flight.set(self.active)

    async def complete(self, request: GenerationRequest) -> list[Completion]:
        """The request's ``n`` choices, whole; the others stop as soon as one fails."""
        choices = [request.for_choice(i) for i in range(request.n)]
        tasks = [
            asyncio.ensure_future(self.driver.complete(choice, lambda c=choice: self.new_completion(c)))
            for choice in choices
        ]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()  # a no-op for the finished ones

    async def stream(
        self, request: GenerationRequest, completions: list[Completion]
    ) -> AsyncIterator[tuple[int, TokenEvent]]:
        """(choice index, event) of the request's choices as their tokens come, interleaved.
        ``completions`` receives each choice's completion."""
        choices = [request.for_choice(i) for i in range(request.n)]
        completions[:] = [self.new_completion(choice) for choice in choices]
        if len(choices) == 1:
            async for event in self.driver.stream(choices[0], completions[0]):
                yield 0, event
            return
        # A small queue keeps a slow reader's backpressure on every choice.
        queue: asyncio.Queue = asyncio.Queue(maxsize=len(choices))

        async def pump(index: int) -> None:
            try:
                async for event in self.driver.stream(choices[index], completions[index]):
                    await queue.put((index, event, None))
            except Exception as err:
                await queue.put((index, None, err))
                return
            await queue.put((index, None, None))

        tasks = [asyncio.ensure_future(pump(i)) for i in range(len(choices))]
        try:
            running = len(tasks)
            while running:
                index, event, error = await queue.get()
                if error is not None:
                    raise error
                if event is None:
                    running -= 1
                else:
                    yield index, event
        finally:
            for task in tasks:
                task.cancel()

    def record(self, scope: RequestScope, code: str) -> None:
        """Metrics and the JSON log line of a request that ended with ``code``."""
        latency = time.perf_counter() - scope.started
        request, completions, error = scope.request, scope.completions, scope.error
        if error is None:
            prompt_tokens = len(request.prompt_ids) if request else 0
            self.metrics.answered(scope.protocol, code, latency, prompt_tokens)
        else:
            self.metrics.failed(scope.protocol, code)
        for completion in completions:
            self.metrics.tokens(completion.exit_layers)
            if completion.speculative is not None:
                self.metrics.speculative(completion.speculative)
        entry = {
            "event": "request",
            "request_id": scope.request_id,
            "protocol": scope.protocol,
            "status": code,
            "latency_ms": round(latency * 1000, 1),
        }
        if request is not None:
            entry["prompt_tokens"] = len(request.prompt_ids)
        if completions:
            layers = [layer for c in completions for layer in c.exit_layers]
            entry["completion_tokens"] = len(layers)
            entry["mean_layers"] = round(sum(layers) / len(layers), 2) if layers else 0.0
            if len(completions) > 1:
                entry["choices"] = len(completions)
            speculative = [c.speculative for c in completions if c.speculative is not None]
            if speculative:
                entry["speculative"] = sum(speculative[1:], speculative[0]).as_dict()
        if error is not None:
            entry["error"] = error.message
        (logger.warning if error is not None and error.http_status >= 500 else logger.info)(json.dumps(entry))

    # ---- HTTP -------------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {
            "status": "ok",
            "model": self.model_name,
            "num_layers": self.num_layers,
            "stages": len(self.stages),
        }

    @app.get("/v1/models")
    async def models(self, http_request: Request):
        try:
            self.auth.check(http_request.headers.get("authorization"))
        except ServeError as err:
            return http_error(err, current_request_id())
        return {
            "object": "list",
            "data": [{"id": self.model_name, "object": "model", "owned_by": "sedac-ray"}],
        }

    @app.post("/v1/completions")
    async def completions(self, http_request: Request):
        return await self._http(http_request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, http_request: Request):
        return await self._http(http_request, chat=True)

    async def _read_json(self, http_request: Request):
        declared = http_request.headers.get("content-length")
        limit = self.config.max_request_bytes
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestTooLarge(f"the request body is {declared} bytes; the limit is {limit}")
        raw = await http_request.body()
        if len(raw) > limit:
            raise RequestTooLarge(f"the request body is {len(raw)} bytes; the limit is {limit}")
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise MalformedRequest(f"the body is not valid JSON (UTF-8): {err}") from None

    async def _http(self, http_request: Request, chat: bool):
        async with RequestScope(self, "http") as scope:
            self.auth.check(http_request.headers.get("authorization"))
            body = parse_body(await self._read_json(http_request), chat)
            request = scope.admit(self.requests.build(**build_arguments(body, chat)))
            responses = OpenAIResponses(
                self.tokenizer, self.model_name, self.num_layers, chat, scope.request_id, int(time.time())
            )
            if body.stream:
                include_usage = body.stream_options is not None and body.stream_options.include_usage
                stream = self._sse(scope.hand_off(), responses, include_usage)
                # A stream the server never starts (the client left first) must still give its place back.
                weakref.finalize(stream, scope.release)
                return StreamingResponse(
                    stream, media_type="text/event-stream", headers={"x-request-id": scope.request_id}
                )
            scope.completions = await self.complete(request)
            return responses.response(request, scope.completions)
        return http_error(scope.error, scope.request_id)

    async def _sse(self, scope: RequestScope, responses: OpenAIResponses, include_usage: bool):
        async with scope:
            async for index, event in self.stream(scope.request, scope.completions):
                chunk = responses.chunk(index, event, scope.completions[index], include_usage)
                yield f"data: {json.dumps(chunk)}\n\n"
            if include_usage:
                yield f"data: {json.dumps(responses.usage_chunk(scope.request, scope.completions))}\n\n"
        if scope.error is not None:  # the status line is sent: report the error as an event
            error = scope.error
            payload = {"message": error.message, "type": error.kind, "code": error.http_status}
            yield f"data: {json.dumps({'error': {**payload, 'request_id': scope.request_id}})}\n\n"
        yield "data: [DONE]\n\n"

    # ---- gRPC (method names equal the RPC names) ----------------------------------------------

    def _grpc_request(self, message, grpc_context) -> GenerationRequest:
        self.auth.check(grpc_authorization(grpc_context))
        if isinstance(message, UnparsableRequest):
            raise MalformedRequest(
                f"the request is not a valid sedac.v1.GenerateRequest ({message.reason}); string "
                "fields must be UTF-8"
            )
        size = message.ByteSize()
        if size > self.config.max_request_bytes:
            raise RequestTooLarge(
                f"the request is {size} bytes; the limit is {self.config.max_request_bytes}"
            )
        exit_config = message.exit
        overrides = {
            "disable_exit": exit_config.disable,
            "speculative": exit_config.speculative,
            "stream_drafts": exit_config.stream_drafts,
        }
        for name in ("tau", "k", "min_layer", "window"):
            if exit_config.HasField(name):
                overrides[name] = getattr(exit_config, name)
        if message.top_logprobs and not message.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs = true")
        return self.requests.build(
            prompt=message.prompt or None,
            messages=[{"role": m.role, "content": m.content} for m in message.messages] or None,
            max_tokens=message.max_tokens or None,
            temperature=message.temperature,
            top_p=message.top_p or None,
            seed=message.seed or None,
            stop=list(message.stop),
            exit_overrides=overrides,
            model=message.model or None,
            n=message.n or None,
            presence_penalty=message.presence_penalty,
            frequency_penalty=message.frequency_penalty,
            logprobs=message.top_logprobs if message.logprobs else None,
        )

    async def Generate(self, message, grpc_context=None) -> sedac_pb2.GenerateResponse:
        async with RequestScope(self, "grpc", grpc_context) as scope:
            request = scope.admit(self._grpc_request(message, grpc_context))
            scope.completions = completions = await self.complete(request)
            choices = [_choice_pb(i, c) for i, c in enumerate(completions)]
            first = choices[0]
            return sedac_pb2.GenerateResponse(
                text=first.text,
                token_ids=first.token_ids,
                exit_layers=first.exit_layers,
                num_layers=self.num_layers,
                finish_reason=first.finish_reason,
                prompt_tokens=len(request.prompt_ids),
                mean_layers=first.mean_layers,
                request_id=scope.request_id,
                speculative=first.speculative if first.HasField("speculative") else None,
                logprobs=first.logprobs,
                choices=choices,
            )
        return sedac_pb2.GenerateResponse(request_id=scope.request_id)

    async def GenerateStream(self, message, grpc_context=None) -> AsyncIterator[sedac_pb2.GenerateChunk]:
        async with RequestScope(self, "grpc", grpc_context) as scope:
            request = scope.admit(self._grpc_request(message, grpc_context))
            async for index, event in self.stream(request, scope.completions):
                completion = scope.completions[index]
                yield sedac_pb2.GenerateChunk(
                    text=event.text,
                    token_id=event.token,
                    exit_layer=event.exit_layer,
                    index=event.index,
                    finish_reason=event.finish_reason or "",
                    num_layers=self.num_layers,
                    request_id=scope.request_id,
                    draft=event.draft,
                    speculative=_speculative_pb(completion) if event.finish_reason else None,
                    choice_index=index,
                    logprobs=_logprobs_pb(event.logprobs),
                )


def _speculative_pb(completion: Completion) -> sedac_pb2.SpeculativeStats | None:
    if completion.speculative is None:
        return None
    return sedac_pb2.SpeculativeStats(**asdict(completion.speculative))  # the same field names


def _logprobs_pb(logprobs: TokenLogprobs | None) -> sedac_pb2.TokenLogprobs | None:
    if logprobs is None:
        return None
    top = [sedac_pb2.TopLogprob(token_id=t, logprob=value) for t, value in logprobs.top]
    return sedac_pb2.TokenLogprobs(logprob=logprobs.logprob, top=top)


def _choice_pb(index: int, completion: Completion) -> sedac_pb2.Choice:
    return sedac_pb2.Choice(
        index=index,
        text=completion.text,
        token_ids=completion.token_ids,
        exit_layers=completion.exit_layers,
        finish_reason=completion.finish_reason,
        mean_layers=completion.mean_layers,
        speculative=_speculative_pb(completion),
        logprobs=[_logprobs_pb(lp) for lp in completion.logprobs if lp is not None],
    )


FrontDoor = serve.ingress(app)(FrontDoorServer)
