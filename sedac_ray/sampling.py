"""Next-token choice from logits: OpenAI presence/frequency penalties, then greedy, or temperature
with nucleus (top-p) filtering; and the log-probabilities a client may ask for."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

MAX_TOP_LOGPROBS = 20  # alternatives per token a request may ask for (OpenAI's limit)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    # OpenAI semantics: logit[t] -= frequency_penalty * count[t] + presence_penalty * (count[t] > 0),
    # where count[t] is how often t was generated so far (prompt tokens do not count).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: none; n >= 0: the chosen token's and the n likeliest others'
    generated: tuple[int, ...] = ()  # tokens generated so far; carried only while penalties apply

    def __post_init__(self) -> None:
        if not _number(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature!r}")
        if not _number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _number(value) or not -2 <= value <= 2:
                raise ValueError(f"{name} must be a number in [-2, 2], got {value!r}")
        if self.logprobs is not None and (
            isinstance(self.logprobs, bool)
            or not isinstance(self.logprobs, int)
            or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS
        ):
            raise ValueError(
                f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs!r}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0

    def for_step(self, generated: Sequence[int]) -> SamplingParams:
        """These params for the next token after ``generated``: the history travels with the row
        only when penalties need it."""
        return dataclasses.replace(self, generated=tuple(generated)) if self.penalized else self

    def generator(self, position: int, device) -> torch.Generator | None:
        """A generator seeded by (seed, position): sampling is stateless, so a sequence samples the
        same alone or in a batch, in the engine or in any replica of the serving pipeline."""
        if self.greedy or self.seed is None:
            return None
        generator = torch.Generator(device=device)
        generator.manual_seed((int(self.seed) * 1_000_003 + int(position)) % (1 << 63))
        return generator


@dataclass
class TokenLogprobs:
    """The chosen token's log-probability under the model (raw logits: before penalties,
    temperature and top-p, as vLLM reports by default) and the ``top`` likeliest tokens'."""

    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), likeliest first


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """``logits`` (``[rows, vocab]``) with each row's presence/frequency penalty applied to the
    tokens its sequence generated so far; the input itself is left unchanged."""
    rows = [i for i, p in enumerate(params) if p.penalized and p.generated]
    if not rows:
        return logits
    logits = logits.clone()
    for i in rows:
        p = params[i]
        tokens, counts = torch.unique(torch.tensor(p.generated, device=logits.device), return_counts=True)
        penalty = counts.to(logits.dtype) * p.frequency_penalty + p.presence_penalty
        logits[i, tokens] -= penalty
    return logits


def choose_tokens(logits: torch.Tensor, params: list[SamplingParams], positions: list[int]) -> list[int]:
    """One token per row of ``logits`` (``[rows, vocab]``); ``positions`` are the positions of
    the tokens whose logits these are (they seed sampling)."""
    logits = apply_penalties(logits, params)
    if all(p.greedy for p in params):
        return logits.argmax(dim=-1).tolist()
    return [
        sample(row, p, p.generator(position, logits.device))
        for row, p, position in zip(logits, params, positions, strict=True)
    ]


def token_logprobs(
    logits: torch.Tensor, tokens: list[int], params: list[SamplingParams]
) -> list[TokenLogprobs | None]:
    """For each row that asked (``params[i].logprobs`` set), the chosen token's log-probability
    and its ``logprobs`` likeliest alternatives; None for the other rows."""
    wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
    answers: list[TokenLogprobs | None] = [None] * len(params)
    if not wanted:
        return answers
    logprobs = torch.log_softmax(logits[wanted].float(), dim=-1)
    top_k = max(params[i].logprobs for i in wanted)
    top_values, top_ids = logprobs.topk(top_k, dim=-1) if top_k else (logprobs[:, :0], logprobs[:, :0])
    chosen = logprobs.gather(1, torch.tensor([[tokens[i]] for i in wanted], device=logits.device))
    for row, i in enumerate(wanted):
        count = params[i].logprobs
        top = list(zip(top_ids[row, :count].tolist(), top_values[row, :count].tolist(), strict=True))
        answers[i] = TokenLogprobs(float(chosen[row, 0]), top)
    return answers


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Choose one token from ``logits`` (``[vocab]``)."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
