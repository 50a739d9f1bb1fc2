"""The ingress: OpenAI-style HTTP (FastAPI) and gRPC (``sedac.v1.SedacService``) in one deployment.

Each request becomes a sequence: prefill through every stage (which pins the sequence's KV to one
replica per stage), then one decode step at a time through stage 0, which forwards what
continues and what exits. Tokens come back in order per request and are streamed as they come.
When the sequence ends, for any reason, its KV is released in every stage.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from ray import serve

from sedac_ray.completion import Completion, eos_token_ids
from sedac_ray.model.loading import load_tokenizer_and_config
from sedac_ray.serve.batcher import Batcher
from sedac_ray.serve.config import PipelineConfig
from sedac_ray.serve.generated import sedac_pb2
from sedac_ray.serve.requests import GenerationRequest, InvalidRequest, RequestBuilder
from sedac_ray.serve.routing import pin
from sedac_ray.serve.transport import PrefillMessage, Rows, StepMessage

logger = logging.getLogger("ray.serve")


@dataclass
class TokenEvent:
    token: int
    exit_layer: int
    text: str  # text this token completes
    index: int
    finish_reason: str | None


# ---- HTTP schemas (strict: a string where a number belongs is a 422, not a guess) ----------------


class SedacOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    disable_exit: StrictBool = False
    tau: StrictFloat | StrictInt | None = None
    k: StrictInt | None = None
    min_layer: StrictInt | None = None
    window: StrictInt | None = None


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


class FrontDoorServer:
    def __init__(self, config: dict, stages: list, head=None):
        self.config = PipelineConfig.from_args(config)
        self.stages = stages
        tokenizer, model_config, generation_config = load_tokenizer_and_config(self.config.model)
        self.tokenizer = tokenizer
        self.model_name = self.config.model
        self.num_layers = int(model_config.num_hidden_layers)
        self.eos_ids = eos_token_ids([generation_config, model_config], tokenizer)
        # Sequences step together: in-flight steps merge into one stage-0 message per replica.
        self.steps = Batcher(
            self._step_many,
            max_size=self.config.max_batch_size,
            wait_s=self.config.batch_wait_timeout_s,
            max_in_flight=self.config.steps_in_flight,
        )
        self.requests = RequestBuilder(
            tokenizer,
            model_name=self.model_name,
            num_layers=self.num_layers,
            max_context=int(getattr(model_config, "max_position_embeddings", 1 << 30)),
            default_policy=self.config.default_policy(),
            default_max_tokens=self.config.default_max_tokens,
        )

    # ---- the decode loop shared by both protocols -----------------------------------------------

    def new_completion(self, request: GenerationRequest) -> Completion:
        return Completion(self.tokenizer, request.max_tokens, self.eos_ids, request.stop)

    async def generate(self, request: GenerationRequest, completion: Completion) -> AsyncIterator[TokenEvent]:
        """Run one sequence; yields each token as it arrives and records it in ``completion``."""
        seq_id = uuid.uuid4().hex
        rule = np.asarray([request.policy.rule()], dtype=np.float32)
        timeout = self.config.step_timeout_s
        route: tuple[str, ...] = ()
        try:
            prefill = PrefillMessage(seq_id, request.sampling, token_ids=request.prompt_ids)
            result = await asyncio.wait_for(self._call(self.stages[0].prefill, prefill), timeout)
            route, step = result.route, result.first
            position = len(request.prompt_ids)
            while True:
                completion.add(step.token, step.exit_layer)
                text = completion.new_text()
                yield TokenEvent(
                    step.token, step.exit_layer, text, len(completion.token_ids) - 1, completion.finish_reason
                )
                if completion.finished:
                    return
                rows = Rows(
                    seq_ids=[seq_id],
                    positions=np.asarray([position]),
                    rules=rule,
                    state=np.zeros(1, np.int64),
                    sampling=[request.sampling],
                    routes=[route],
                    token_ids=np.asarray([step.token]),
                )
                step = await asyncio.wait_for(self.steps.submit((route[0], rows)), timeout)
                position += 1
        finally:
            if route:
                await self._release(seq_id, route)

    @staticmethod
    async def _call(method, message):
        return await method.remote(message)

    async def _step_many(self, items: list[tuple[str, Rows]]) -> list:
        """One decode step for many sequences: one message per stage-0 replica, so stage 0 sees
        them as one batch. Returns each item's TokenResult."""
        groups: dict[str, list[int]] = {}
        for index, (replica, _) in enumerate(items):
            groups.setdefault(replica, []).append(index)
        calls = {
            replica: self.stages[0]
            .options(session_id=pin(replica))
            .step.remote(StepMessage(Rows.concat([items[i][1] for i in indices])))
            for replica, indices in groups.items()
        }
        answers = dict(zip(calls, await asyncio.gather(*calls.values()), strict=True))
        return [answers[replica][rows.seq_ids[0]] for replica, rows in items]

    async def _release(self, seq_id: str, route: tuple[str, ...]) -> None:
        calls = [
            stage.options(session_id=pin(replica)).release.remote([seq_id])
            for stage, replica in zip(self.stages, route, strict=True)
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
        for error in (r for r in results if isinstance(r, Exception)):
            logger.warning(f"could not release sequence {seq_id}: {error!r}")

    async def complete(self, request: GenerationRequest) -> Completion:
        completion = self.new_completion(request)
        async for _ in self.generate(request, completion):
            pass
        return completion

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
    async def models(self) -> dict:
        return {
            "object": "list",
            "data": [{"id": self.model_name, "object": "model", "owned_by": "sedac-ray"}],
        }

    @app.post("/v1/completions")
    async def completions(self, body: CompletionBody):
        return await self._http(body, prompt=body.prompt, messages=None, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatBody):
        messages = [m.model_dump() for m in body.messages]
        return await self._http(body, prompt=None, messages=messages, chat=True)

    async def _http(self, body: _Common, prompt, messages, chat: bool):
        sedac = body.sedac.model_dump(exclude_none=True) if body.sedac else {}
        try:
            request = self.requests.build(
                prompt=prompt,
                messages=messages,
                max_tokens=body.max_tokens,
                temperature=body.temperature,
                top_p=body.top_p,
                seed=body.seed,
                stop=[body.stop] if isinstance(body.stop, str) else body.stop,
                exit_overrides=sedac,
                model=body.model,
            )
        except InvalidRequest as err:
            return JSONResponse(
                status_code=400, content={"error": {"message": str(err), "type": "invalid_request_error"}}
            )
        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if body.stream:
            return StreamingResponse(
                self._sse(request, request_id, created, chat), media_type="text/event-stream"
            )
        completion = await self.complete(request)
        choice = _choice(
            chat,
            completion.text,
            streaming=False,
            finish_reason=completion.finish_reason,
            token_ids=completion.token_ids,
            exit_layers=completion.exit_layers,
        )
        return {
            "id": request_id,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": self.model_name,
            "choices": [choice],
            "usage": {
                "prompt_tokens": len(request.prompt_ids),
                "completion_tokens": len(completion.token_ids),
                "total_tokens": len(request.prompt_ids) + len(completion.token_ids),
                "num_layers": self.num_layers,
                "mean_layers": completion.mean_layers,
            },
        }

    async def _sse(self, request: GenerationRequest, request_id: str, created: int, chat: bool):
        kind = "chat.completion.chunk" if chat else "text_completion"
        async for event in self.generate(request, self.new_completion(request)):
            choice = _choice(
                chat,
                event.text,
                streaming=True,
                finish_reason=event.finish_reason,
                token_id=event.token,
                exit_layer=event.exit_layer,
            )
            chunk = {
                "id": request_id,
                "object": kind,
                "created": created,
                "model": self.model_name,
                "choices": [choice],
            }
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    # ---- gRPC (method names equal the RPC names) ----------------------------------------------

    def _grpc_request(self, message: sedac_pb2.GenerateRequest) -> GenerationRequest:
        exit_config = message.exit
        overrides = {"disable_exit": exit_config.disable}
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

    def _grpc_request_or_refuse(self, message, grpc_context) -> GenerationRequest | None:
        """The checked request, or None after setting INVALID_ARGUMENT with what to fix."""
        try:
            return self._grpc_request(message)
        except InvalidRequest as err:
            grpc_context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            grpc_context.set_details(str(err))
            return None

    async def Generate(
        self, message: sedac_pb2.GenerateRequest, grpc_context=None
    ) -> sedac_pb2.GenerateResponse:
        request = self._grpc_request_or_refuse(message, grpc_context)
        if request is None:
            return sedac_pb2.GenerateResponse()
        completion = await self.complete(request)
        return sedac_pb2.GenerateResponse(
            text=completion.text,
            token_ids=completion.token_ids,
            exit_layers=completion.exit_layers,
            num_layers=self.num_layers,
            finish_reason=completion.finish_reason,
            prompt_tokens=len(request.prompt_ids),
            mean_layers=completion.mean_layers,
        )

    async def GenerateStream(self, message: sedac_pb2.GenerateRequest, grpc_context=None):
        request = self._grpc_request_or_refuse(message, grpc_context)
        if request is None:
            return
        async for event in self.generate(request, self.new_completion(request)):
            yield sedac_pb2.GenerateChunk(
                text=event.text,
                token_id=event.token,
                exit_layer=event.exit_layer,
                index=event.index,
                finish_reason=event.finish_reason or "",
                num_layers=self.num_layers,
            )


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
