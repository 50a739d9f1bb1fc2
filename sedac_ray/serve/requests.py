"""Turning an HTTP or gRPC request into a checked :class:`GenerationRequest`.

Both protocols call :meth:`RequestBuilder.build`, so they accept and refuse exactly the same
things; a refusal is an :class:`InvalidRequest` whose message says what to fix (HTTP 400, gRPC
``INVALID_ARGUMENT``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from sedac_ray.policy import ExitPolicy
from sedac_ray.sampling import SamplingParams
from sedac_ray.serve.errors import InvalidRequest

CHAT_ROLES = ("system", "user", "assistant")
MAX_CHOICES = 16  # choices (`n`) per request: each is a sequence of its own in every stage


def _check_utf8(text: str, field: str) -> None:
    """JSON can carry lone surrogates (\\udc80) that are not text; refuse them by name."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidRequest(
            f"{field} is not valid UTF-8 text (a lone surrogate at character {err.start}); send real text"
        ) from None


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: list[str]
    policy: ExitPolicy
    speculative: bool = False  # lossless: exits are drafts, verified at full depth
    stream_drafts: bool = False  # a stream also shows drafts, marked as such
    n: int = 1  # independent choices, each its own sequence through the pipeline

    def for_choice(self, index: int) -> GenerationRequest:
        """The request for choice ``index`` alone. Choice 0 keeps the seed, so ``n=1`` and the first
        of ``n`` choices agree; the others get seeds derived from it, so seeded choices differ
        from each other yet repeat for the same seed."""
        sampling = self.sampling
        if index and sampling.seed is not None:
            seed = (sampling.seed + index * 0x9E3779B97F4A7C15) % (1 << 63)  # golden-ratio stride
            sampling = dataclasses.replace(sampling, seed=seed)
        return dataclasses.replace(self, sampling=sampling, n=1)


class RequestBuilder:
    def __init__(
        self,
        tokenizer,
        model_name: str,
        num_layers: int,
        max_context: int,
        default_policy,
        default_max_tokens,
        exit_probes: bool = False,
    ):
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.num_layers = num_layers
        self.max_context = max_context
        self.default_policy = default_policy
        self.default_max_tokens = default_max_tokens
        self.exit_probes = exit_probes  # the stages hold the model's exit probes

    def build(
        self,
        prompt: str | None = None,
        messages: list[dict] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: list[str] | None = None,
        exit_overrides: dict | None = None,
        model: str | None = None,
        n: int | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        logprobs: int | None = None,
    ) -> GenerationRequest:
        """``logprobs``: None for none, else how many likeliest alternatives to report per token
        besides the chosen one."""
        if model and model != self.model_name:
            raise InvalidRequest(
                f"model {model!r} is not served here; this server serves {self.model_name!r}"
            )
        for i, text in enumerate(stop or []):
            if not isinstance(text, str):
                raise InvalidRequest(f"stop[{i}] must be a string")
            _check_utf8(text, f"stop[{i}]")
        prompt_ids = self._encode(prompt, messages)
        max_tokens = self.default_max_tokens if max_tokens is None else max_tokens
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        if len(prompt_ids) + max_tokens > self.max_context:
            raise InvalidRequest(
                f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds the "
                f"{self.max_context} tokens a sequence may hold here (max_model_len); shorten the prompt "
                "or lower max_tokens"
            )
        n = 1 if n is None else n
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
            raise InvalidRequest(f"n must be an integer in [1, {MAX_CHOICES}], got {n!r}")
        try:
            sampling = SamplingParams(
                temperature=0.0 if temperature is None else temperature,
                top_p=1.0 if top_p is None else top_p,
                seed=seed,
                presence_penalty=presence_penalty or 0.0,
                frequency_penalty=frequency_penalty or 0.0,
                logprobs=logprobs,
            )
            policy = self._policy(exit_overrides or {})
        except ValueError as err:
            raise InvalidRequest(str(err)) from None
        speculative = bool((exit_overrides or {}).get("speculative"))
        stream_drafts = bool((exit_overrides or {}).get("stream_drafts"))
        if stream_drafts and not speculative:
            raise InvalidRequest("stream_drafts needs speculative: only speculative requests make drafts")
        if speculative and sampling.penalized:
            # A verification would need the history of the drafts it checks; not carried (yet).
            raise InvalidRequest(
                "presence_penalty and frequency_penalty are not supported with sedac.speculative; "
                "drop one of them"
            )
        if speculative and logprobs is not None:
            raise InvalidRequest("logprobs are not supported with sedac.speculative; drop one of them")
        return GenerationRequest(
            prompt_ids,
            max_tokens,
            sampling,
            [s for s in (stop or []) if s],
            policy,
            speculative,
            stream_drafts,
            n,
        )

    def _encode(self, prompt: str | None, messages: list[dict] | None) -> list[int]:
        if messages:
            if prompt:
                raise InvalidRequest("give either a prompt or messages, not both")
            for i, message in enumerate(messages):
                if message.get("role") not in CHAT_ROLES:
                    raise InvalidRequest(
                        f"messages[{i}].role must be one of {list(CHAT_ROLES)}, got {message.get('role')!r}"
                    )
                if not isinstance(message.get("content"), str):
                    raise InvalidRequest(f"messages[{i}].content must be a string")
                _check_utf8(message["content"], f"messages[{i}].content")
            if not any(m["content"].strip() for m in messages):
                raise InvalidRequest("messages are empty: at least one message needs content")
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        else:
            if not isinstance(prompt, str) or not prompt.strip():
                raise InvalidRequest("prompt is empty: send a non-empty prompt (or chat messages)")
            _check_utf8(prompt, "prompt")
            ids = self.tokenizer(prompt)["input_ids"]
        return [int(i) for i in ids]

    def _policy(self, overrides: dict) -> ExitPolicy:
        values = dict(overrides)
        tau = values.get("tau")
        if tau is not None and (
            not isinstance(tau, (int, float)) or isinstance(tau, bool) or math.isnan(tau)
        ):
            raise InvalidRequest(f"tau must be a number in (0, 1], got {tau!r}")
        policy = self.default_policy.with_overrides(
            tau=tau,
            k=values.get("k"),
            min_layer=values.get("min_layer"),
            window=values.get("window"),
            disable=bool(values.get("disable_exit") or values.get("disable")),
            probe=values.get("probe"),
        )
        if policy.uses_probe and not self.exit_probes:
            raise InvalidRequest(
                f"exit policy {policy.describe()} needs exit probes, and {self.model_name} has none here "
                "(`sedac calibrate` fits them); drop probe"
            )
        return policy.validate_for(self.num_layers)
