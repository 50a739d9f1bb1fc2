"""The OpenAI-compatible HTTP API: request bodies, and the responses and stream chunks built from
completions.

Every field the official ``openai`` client can send is either honoured as OpenAI and vLLM do, or
refused with HTTP 400 naming it; none is silently ignored. Honoured: ``model``, ``messages`` /
``prompt``, ``max_tokens``, ``max_completion_tokens`` (chat), ``n``, ``temperature``, ``top_p``,
``seed``, ``stop``, ``stream``, ``stream_options.include_usage``, ``presence_penalty``,
``frequency_penalty``, ``logprobs`` / ``top_logprobs`` (chat), ``logprobs`` (an int, completions)
and ``user`` (accepted and not used: it is informational). Fields that ask for nothing (null, or
an "off" value such as ``echo: false``) are accepted too. ``sedac`` is this server's extension
(the exit policy per request).
"""

from __future__ import annotations

from typing import Any

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

from sedac_ray.completion import Completion
from sedac_ray.sampling import TokenLogprobs
from sedac_ray.serve.errors import InvalidRequest, MalformedRequest
from sedac_ray.serve.requests import GenerationRequest

Number = StrictFloat | StrictInt


class SedacOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    disable_exit: StrictBool = False
    tau: Number | None = None
    k: StrictInt | None = None
    min_layer: StrictInt | None = None
    window: StrictInt | None = None
    probe: Number | None = None  # exit-probe threshold: served by the model's calibrated probes
    speculative: StrictBool = False
    stream_drafts: StrictBool = False


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class _Common(BaseModel):
    # Unknown fields never get here: parse_body refuses them by name first (HTTP 400).
    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    max_tokens: StrictInt | None = None
    n: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    user: StrictStr | None = None  # informational (OpenAI uses it for abuse monitoring); not used
    sedac: SedacOptions | None = None


class CompletionBody(_Common):
    prompt: StrictStr
    logprobs: StrictInt | None = None  # alternatives per token; 0: the chosen token's only


class ChatMessageBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: StrictStr
    content: StrictStr


class ChatBody(_Common):
    messages: list[ChatMessageBody] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = False
    top_logprobs: StrictInt | None = None


# Values of fields we do not implement that ask for nothing, so sending them is harmless.
_OFF_VALUES: dict[str, Any] = {
    "echo": False,
    "logit_bias": {},
    "tools": [],
    "functions": [],
    "store": False,
    "metadata": {},
    "suffix": "",
    "response_format": {"type": "text"},
}


def _means_off(name: str, value: Any, data: dict) -> bool:
    if value is None:
        return True
    if name == "best_of":  # best_of == n is plain sampling
        return type(value) is int and value == (data.get("n") or 1)
    off = _OFF_VALUES.get(name, ...)
    return type(value) is type(off) and value == off


def parse_body(data: Any, chat: bool) -> CompletionBody | ChatBody:
    """The checked body of a (chat) completion request: an unsupported field is an
    :class:`InvalidRequest` (400) naming it; a known field of the wrong type a 422."""
    if not isinstance(data, dict):
        raise MalformedRequest("the body must be a JSON object")
    model = ChatBody if chat else CompletionBody
    unsupported = [k for k, v in data.items() if k not in model.model_fields and not _means_off(k, v, data)]
    if unsupported:
        raise InvalidRequest(
            f"not supported by this server: {', '.join(unsupported)}; remove "
            f"{'it' if len(unsupported) == 1 else 'them'} (see the API docs for what is honoured)"
        )
    if chat and isinstance(data.get("messages"), list):
        data = {**data, "messages": [_plain_message(m, i) for i, m in enumerate(data["messages"])]}
    try:
        return model.model_validate({k: v for k, v in data.items() if k in model.model_fields})
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors(include_url=False)
        )
        raise MalformedRequest(problems) from None


def _plain_message(message: Any, index: int) -> Any:
    """A chat message with its content as one string: a list of text parts (as the client may
    send) is joined with newlines, as vLLM does; any other part, or another field, is refused."""
    if not isinstance(message, dict):
        return message  # the schema reports it
    extra = [k for k, v in message.items() if k not in ("role", "content") and v is not None]
    if extra:
        raise InvalidRequest(f"not supported by this server: messages[{index}].{', '.join(extra)}")
    content = message.get("content")
    if not isinstance(content, list):
        return message
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise InvalidRequest(
                f"messages[{index}].content[{j}] is a {kind!r} part; only text parts are supported"
            )
        texts.append(part["text"])
    return {**message, "content": "\n".join(texts)}


def build_arguments(body: CompletionBody | ChatBody, chat: bool) -> dict:
    """Keyword arguments for :meth:`RequestBuilder.build` from a parsed body."""
    max_tokens = body.max_tokens
    if chat and body.max_completion_tokens is not None:
        if max_tokens is not None and max_tokens != body.max_completion_tokens:
            raise InvalidRequest(
                f"max_tokens ({max_tokens}) and max_completion_tokens ({body.max_completion_tokens}) "
                "disagree; send only max_completion_tokens"
            )
        max_tokens = body.max_completion_tokens
    if body.stream_options is not None and not body.stream:
        raise InvalidRequest("stream_options is only allowed with stream: true")
    if chat:
        if body.top_logprobs is not None and not body.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
    else:
        logprobs = body.logprobs
    return dict(
        prompt=None if chat else body.prompt,
        messages=[m.model_dump() for m in body.messages] if chat else None,
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=[body.stop] if isinstance(body.stop, str) else body.stop,
        exit_overrides=body.sedac.model_dump(exclude_none=True) if body.sedac else {},
        model=body.model,
        n=body.n,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logprobs=logprobs,
    )


# ---- responses -------------------------------------------------------------------------------


class OpenAIResponses:
    """Builds the response bodies and stream chunks of one request."""

    def __init__(
        self, tokenizer, model_name: str, num_layers: int, chat: bool, request_id: str, created: int
    ):
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.num_layers = num_layers
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.created = created

    def _envelope(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_name}

    def usage(self, request: GenerationRequest, completions: list[Completion]) -> dict:
        """OpenAI's token counts, plus the layers executed per generated token (all choices)."""
        prompt = len(request.prompt_ids)
        generated = sum(len(c.token_ids) for c in completions)
        layers = [layer for c in completions for layer in c.exit_layers]
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": generated,
            "total_tokens": prompt + generated,
            "num_layers": self.num_layers,
            "mean_layers": sum(layers) / len(layers) if layers else 0.0,
        }
        speculative = [c.speculative for c in completions if c.speculative is not None]
        if speculative:
            usage["speculative"] = sum(speculative[1:], speculative[0]).as_dict()
        return usage

    def response(self, request: GenerationRequest, completions: list[Completion]) -> dict:
        choices = []
        for index, completion in enumerate(completions):
            choice: dict = {"index": index}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": completion.text}
            else:
                choice["text"] = completion.text
            choice["logprobs"] = self.logprobs(completion.token_ids, completion.logprobs)
            choice["finish_reason"] = completion.finish_reason
            choice["token_ids"] = completion.token_ids
            choice["exit_layers"] = completion.exit_layers
            choices.append(choice)
        body = self._envelope("chat.completion" if self.chat else "text_completion")
        return {**body, "choices": choices, "usage": self.usage(request, completions)}

    def chunk(self, index: int, event, completion: Completion, include_usage: bool) -> dict:
        """The stream chunk of one token event of choice ``index``."""
        choice: dict = {"index": index}
        if self.chat:
            choice["delta"] = (
                {"role": "assistant", "content": event.text} if event.index == 0 else {"content": event.text}
            )
        else:
            choice["text"] = event.text
        choice["logprobs"] = self.logprobs([event.token], [event.logprobs])
        choice["finish_reason"] = event.finish_reason
        choice["token_id"] = event.token
        choice["exit_layer"] = event.exit_layer
        if event.draft:
            choice["draft"] = True
        chunk = {
            **self._envelope("chat.completion.chunk" if self.chat else "text_completion"),
            "choices": [choice],
        }
        if event.finish_reason and completion.speculative is not None:
            chunk["speculative"] = completion.speculative.as_dict()
        if include_usage:
            chunk["usage"] = None  # as OpenAI: only the last chunk carries usage
        return chunk

    def usage_chunk(self, request: GenerationRequest, completions: list[Completion]) -> dict:
        """The final chunk of a stream with ``stream_options.include_usage``: no choices."""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._envelope(kind), "choices": [], "usage": self.usage(request, completions)}

    def logprobs(self, token_ids: list[int], logprobs: list[TokenLogprobs | None]) -> dict | None:
        """OpenAI's logprobs object for these tokens (chat or completions shape); None when the
        request did not ask for them."""
        if not logprobs or any(lp is None for lp in logprobs):
            return None
        if self.chat:
            return {
                "content": [
                    {
                        **self._token(token, lp.logprob),
                        "top_logprobs": [self._token(t, value) for t, value in lp.top],
                    }
                    for token, lp in zip(token_ids, logprobs, strict=True)
                ]
            }
        tokens = [self._text(t) for t in token_ids]
        offsets, offset = [], 0
        for text in tokens:
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{self._text(t): value for t, value in lp.top} for lp in logprobs],
            "text_offset": offsets,
        }

    def _text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _token(self, token: int, logprob: float) -> dict:
        text = self._text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
