"""One sequence's completion as it grows: tokens, exit layers, text, stop conditions.

Shared by the single-process engine and the serving front door, so both stop and detokenize
the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sedac_ray.speculative import SpeculativeStats


@dataclass
class Completion:
    tokenizer: object
    max_tokens: int
    eos_ids: set[int]
    stop: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    exit_layers: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length" once finished
    speculative: SpeculativeStats | None = None  # acceptance statistics of a speculative decode
    _streamed: int = 0  # characters of text already handed out by new_text()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int, exit_layer: int) -> None:
        """Record one generated token and whether it ends the completion."""
        self.token_ids.append(int(token))
        self.exit_layers.append(int(exit_layer))
        if token in self.eos_ids:
            self.finish_reason = "stop"
        elif self.stop and any(s in self._decoded() for s in self.stop):
            self.finish_reason = "stop"
        elif len(self.token_ids) >= self.max_tokens:
            self.finish_reason = "length"

    def new_text(self) -> str:
        """Text completed since the last call, for streaming: held back while a stop string or a
        multi-byte character may still be forming."""
        text = self.text
        if not self.finished:
            text = text.rstrip("\ufffd")  # an incomplete UTF-8 sequence decodes to U+FFFD
            if self.stop:  # keep back what could be the start of a stop string
                longest = max(len(s) for s in self.stop) - 1
                text = text[: max(self._streamed, len(text) - longest)]
        delta = text[self._streamed :]
        self._streamed = max(self._streamed, len(text))
        return delta

    def _decoded(self) -> str:
        return self.tokenizer.decode(self.token_ids, skip_special_tokens=True)

    @property
    def text(self) -> str:
        text = self._decoded()
        cut = min((text.find(s) for s in self.stop if s in text), default=-1)
        return text[:cut] if cut >= 0 else text

    @property
    def mean_layers(self) -> float:
        return sum(self.exit_layers) / len(self.exit_layers) if self.exit_layers else 0.0


def eos_token_ids(configs: list, tokenizer) -> set[int]:
    """EOS ids named by any of ``configs`` (model or generation configs) and the tokenizer."""
    ids: set[int] = set()
    for source in configs:
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            ids.update([eos] if isinstance(eos, int) else eos)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids
