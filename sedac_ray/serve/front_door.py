"""The ingress: OpenAI-style HTTP (FastAPI) and gRPC (``sedac.v1.SedacService``) in one deployment.

Both protocols go through the same steps: auth, size limit, parsing and validation
(:class:`RequestBuilder`), admission (a concurrency limit here, a KV budget in every stage), then
the :class:`PipelineDriver` runs the sequence. Every outcome is one
:class:`~sedac_ray.serve.errors.ServeError` class with its HTTP status and gRPC code, counted in
the metrics and logged as one JSON line that carries the request id the client also gets back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)
from ray import serve

from sedac_ray.completion import Completion, eos_token_ids
from sedac_ray.model.loading import load_tokenizer_and_config
from sedac_ray.serve.auth import ApiKeyAuth, grpc_authorization
from sedac_ray.serve.config import PipelineConfig
from sedac_ray.serve.driver import PipelineDriver
from sedac_ray.serve.errors import (
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
from sedac_ray.serve.requests import GenerationRequest, RequestBuilder

logger = logging.getLogger("ray.serve")


# ---- HTTP schemas (strict: a string where a number belongs is a 422, not a guess) ----------------


class SedacOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    disable_exit: StrictBool = False
    tau: StrictFloat | StrictInt | None = None
    k: StrictInt | None = None
    min_layer: StrictInt | None = None
    window: StrictInt | None = None
    speculative: StrictBool = False
    stream_drafts: StrictBool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    max_tokens: StrictInt | None = None
    temperature: StrictFloat | StrictInt | None = None
    top_p: StrictFloat | StrictInt | None = None
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    sedac: SedacOptions | None = None


class CompletionBody(_Common):
    prompt: StrictStr


class ChatMessageBody(BaseModel):
    role: StrictStr
    content: StrictStr


class ChatBody(_Common):
    messages: list[ChatMessageBody] = Field(min_length=1)


app = FastAPI(title="sedac-ray", description="Early-exit LLM serving")


def current_request_id() -> str:
    """Serve's id for the request being handled (it also returns it as the ``x-request-id``
    header and the gRPC ``request_id`` trailer); a fresh one outside a Serve request."""
    from ray.serve.context import _get_serve_request_context

    return _get_serve_request_context().request_id or uuid.uuid4().hex


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
            max_context=int(getattr(model_config, "max_position_embeddings", 1 << 30)),
            default_policy=self.config.default_policy(),
            default_max_tokens=self.config.default_max_tokens,
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

    # ---- what both protocols share: admission, accounting, logs --------------------------------

    def _admit(self) -> Admission:
        if self.active >= self.config.max_concurrent_requests:
            raise Overloaded(
                f"the server is at its limit of {self.config.max_concurrent_requests} concurrent "
                "requests; retry shortly"
            )
        self._count(+1)
        return Admission(lambda: self._count(-1))

    def _count(self, change: int) -> None:
        self.active += change
        self.metrics.in_flight.set(self.active)

    def _record(
        self,
        protocol: str,
        request_id: str,
        started: float,
        code: str,
        request: GenerationRequest | None = None,
        completion: Completion | None = None,
        error: ServeError | None = None,
    ) -> None:
        latency = time.perf_counter() - started
        if error is None:
            self.metrics.answered(protocol, code, latency, len(request.prompt_ids) if request else 0)
        else:
            self.metrics.failed(protocol, code)
        if completion is not None:
            self.metrics.tokens(completion.exit_layers)
            if completion.speculative is not None:
                self.metrics.speculative(completion.speculative)
        entry = {"event": "request", "request_id": request_id, "protocol": protocol, "status": code}
        entry["latency_ms"] = round(latency * 1000, 1)
        if request is not None:
            entry["prompt_tokens"] = len(request.prompt_ids)
        if completion is not None:
            entry["completion_tokens"] = len(completion.token_ids)
            entry["mean_layers"] = round(completion.mean_layers, 2)
            if completion.speculative is not None:
                entry["speculative"] = completion.speculative.as_dict()
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

    async def _read_body(self, http_request: Request, chat: bool) -> CompletionBody | ChatBody:
        declared = http_request.headers.get("content-length")
        limit = self.config.max_request_bytes
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestTooLarge(f"the request body is {declared} bytes; the limit is {limit}")
        raw = await http_request.body()
        if len(raw) > limit:
            raise RequestTooLarge(f"the request body is {len(raw)} bytes; the limit is {limit}")
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise MalformedRequest(f"the body is not valid JSON (UTF-8): {err}") from None
        try:
            return (ChatBody if chat else CompletionBody).model_validate(data)
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors(include_url=False)
            )
            raise MalformedRequest(problems) from None

    def _build_http(self, body: CompletionBody | ChatBody, chat: bool) -> GenerationRequest:
        return self.requests.build(
            prompt=None if chat else body.prompt,
            messages=[m.model_dump() for m in body.messages] if chat else None,
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop=[body.stop] if isinstance(body.stop, str) else body.stop,
            exit_overrides=body.sedac.model_dump(exclude_none=True) if body.sedac else {},
            model=body.model,
        )

    async def _http(self, http_request: Request, chat: bool):
        request_id = current_request_id()
        started = time.perf_counter()
        request = completion = None
        try:
            self.auth.check(http_request.headers.get("authorization"))
            body = await self._read_body(http_request, chat)
            request = self._build_http(body, chat)
            admission = self._admit()
        except ServeError as err:
            self._record("http", request_id, started, str(err.http_status), request, error=err)
            return http_error(err, request_id)
        created = int(time.time())
        if body.stream:
            stream = self._sse(request, admission, request_id, started, created, chat)
            # A stream the server never starts (the client left first) must still give its place back.
            weakref.finalize(stream, admission.release)
            return StreamingResponse(
                stream, media_type="text/event-stream", headers={"x-request-id": request_id}
            )
        try:
            completion = await self.driver.complete(request, lambda: self.new_completion(request))
        except asyncio.CancelledError:  # the client hung up
            self._record("http", request_id, started, "499", request, error=ServeError("client disconnected"))
            raise
        except Exception as err:
            error = as_serve_error(err)
            self._record("http", request_id, started, str(error.http_status), request, error=error)
            return http_error(error, request_id)
        finally:
            admission.release()
        self._record("http", request_id, started, "200", request, completion)
        usage = {
            "prompt_tokens": len(request.prompt_ids),
            "completion_tokens": len(completion.token_ids),
            "total_tokens": len(request.prompt_ids) + len(completion.token_ids),
            "num_layers": self.num_layers,
            "mean_layers": completion.mean_layers,
        }
        if completion.speculative is not None:
            usage["speculative"] = completion.speculative.as_dict()
        choice = _choice(
            chat,
            completion.text,
            streaming=False,
            finish_reason=completion.finish_reason,
            token_ids=completion.token_ids,
            exit_layers=completion.exit_layers,
        )
        return {
            "id": ("chatcmpl-" if chat else "cmpl-") + request_id,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": self.model_name,
            "choices": [choice],
            "usage": usage,
        }

    async def _sse(
        self,
        request: GenerationRequest,
        admission: Admission,
        request_id: str,
        started: float,
        created: int,
        chat: bool,
    ):
        kind = "chat.completion.chunk" if chat else "text_completion"
        completion = self.new_completion(request)
        code, error = "200", None
        try:
            async for event in self.driver.stream(request, completion):
                choice = _choice(
                    chat,
                    event.text,
                    streaming=True,
                    finish_reason=event.finish_reason,
                    token_id=event.token,
                    exit_layer=event.exit_layer,
                )
                if event.draft:
                    choice["draft"] = True
                chunk = {
                    "id": ("chatcmpl-" if chat else "cmpl-") + request_id,
                    "object": kind,
                    "created": created,
                    "model": self.model_name,
                    "choices": [choice],
                }
                if event.finish_reason and completion.speculative is not None:
                    chunk["speculative"] = completion.speculative.as_dict()
                yield f"data: {json.dumps(chunk)}\n\n"
        except asyncio.CancelledError:
            code, error = "499", ServeError("client disconnected")
            raise
        except Exception as err:  # the status line is sent: report the error as an event
            error = as_serve_error(err)
            code = str(error.http_status)
            payload = {"message": error.message, "type": error.kind, "code": error.http_status}
            yield f"data: {json.dumps({'error': {**payload, 'request_id': request_id}})}\n\n"
        finally:
            admission.release()
            self._record("http", request_id, started, code, request, completion, error)
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
        )

    def _grpc_failed(self, grpc_context, request_id, started, error: ServeError, request=None) -> None:
        set_grpc_error(grpc_context, error, request_id)
        self._record("grpc", request_id, started, error.grpc_code.name, request, error=error)

    def _grpc_admit(self, message, grpc_context, request_id: str, started: float):
        """The checked request and its admission, or None once the refusal has been answered."""
        request = None
        try:
            request = self._grpc_request(message, grpc_context)
            return request, self._admit()
        except ServeError as err:
            self._grpc_failed(grpc_context, request_id, started, err, request)
            return None

    async def Generate(self, message, grpc_context=None) -> sedac_pb2.GenerateResponse:
        request_id = current_request_id()
        started = time.perf_counter()
        admitted = self._grpc_admit(message, grpc_context, request_id, started)
        if admitted is None:
            return sedac_pb2.GenerateResponse(request_id=request_id)
        request, admission = admitted
        try:
            completion = await self.driver.complete(request, lambda: self.new_completion(request))
        except asyncio.CancelledError:
            self._record("grpc", request_id, started, "CANCELLED", request, error=ServeError("cancelled"))
            raise
        except Exception as err:
            self._grpc_failed(grpc_context, request_id, started, as_serve_error(err), request)
            return sedac_pb2.GenerateResponse(request_id=request_id)
        finally:
            admission.release()
        self._record("grpc", request_id, started, "OK", request, completion)
        return sedac_pb2.GenerateResponse(
            text=completion.text,
            token_ids=completion.token_ids,
            exit_layers=completion.exit_layers,
            num_layers=self.num_layers,
            finish_reason=completion.finish_reason,
            prompt_tokens=len(request.prompt_ids),
            mean_layers=completion.mean_layers,
            request_id=request_id,
            speculative=_speculative_pb(completion),
        )

    async def GenerateStream(self, message, grpc_context=None) -> AsyncIterator[sedac_pb2.GenerateChunk]:
        request_id = current_request_id()
        started = time.perf_counter()
        admitted = self._grpc_admit(message, grpc_context, request_id, started)
        if admitted is None:
            return
        request, admission = admitted
        completion = self.new_completion(request)
        try:
            async for event in self.driver.stream(request, completion):
                yield sedac_pb2.GenerateChunk(
                    text=event.text,
                    token_id=event.token,
                    exit_layer=event.exit_layer,
                    index=event.index,
                    finish_reason=event.finish_reason or "",
                    num_layers=self.num_layers,
                    request_id=request_id,
                    draft=event.draft,
                    speculative=_speculative_pb(completion) if event.finish_reason else None,
                )
        except asyncio.CancelledError:
            self._record(
                "grpc", request_id, started, "CANCELLED", request, completion, ServeError("cancelled")
            )
            raise
        except Exception as err:
            self._grpc_failed(grpc_context, request_id, started, as_serve_error(err), request)
            return
        finally:
            admission.release()
        self._record("grpc", request_id, started, "OK", request, completion)


class Admission:
    """A request's place under the concurrency limit; :meth:`release` gives it back, once."""

    def __init__(self, on_release: Callable[[], None]):
        self._on_release: Callable[[], None] | None = on_release

    def release(self) -> None:
        if self._on_release is not None:
            on_release, self._on_release = self._on_release, None
            on_release()


def _speculative_pb(completion: Completion) -> sedac_pb2.SpeculativeStats | None:
    if completion.speculative is None:
        return None
    return sedac_pb2.SpeculativeStats(**asdict(completion.speculative))  # the same field names


def _choice(chat: bool, text: str, streaming: bool, **fields) -> dict:
    """One OpenAI-style choice: ``text`` for completions, ``message``/``delta`` for chat."""
    choice = {"index": 0, **fields}
    if not chat:
        choice["text"] = text
    elif streaming:
        choice["delta"] = {"content": text}
    else:
        choice["message"] = {"role": "assistant", "content": text}
    return choice


FrontDoor = serve.ingress(app)(FrontDoorServer)
