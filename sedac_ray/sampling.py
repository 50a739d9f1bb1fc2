"""Next-token choice from logits: greedy, or temperature with nucleus (top-p) filtering."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if (
            not isinstance(self.temperature, (int, float))
            or math.isnan(self.temperature)
            or self.temperature < 0
        ):
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or math.isnan(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, position: int, device) -> torch.Generator | None:
        """A generator seeded by (seed, position): sampling is stateless, so a sequence samples the
        same alone or in a batch, in the engine or in any replica of the serving pipeline."""
        if self.greedy or self.seed is None:
            return None
        generator = torch.Generator(device=device)
        generator.manual_seed((int(self.seed) * 1_000_003 + int(position)) % (1 << 63))
        return generator


def choose_tokens(logits: torch.Tensor, params: list[SamplingParams], positions: list[int]) -> list[int]:
    """One token per row of ``logits`` (``[rows, vocab]``); ``positions`` are the positions of
    the tokens whose logits these are (they seed sampling)."""
    if all(p.greedy for p in params):
        return logits.argmax(dim=-1).tolist()
    return [
        sample(row, p, p.generator(position, logits.device))
        for row, p, position in zip(logits, params, positions, strict=True)
    ]


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
