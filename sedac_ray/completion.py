"""One sequence's completion as it grows: tokens, exit layers, text, stop conditions.

Shared by the single-process engine and the serving front door, so both stop and detokenize
the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tokenizers.decoders import DecodeStream

if TYPE_CHECKING:
    from sedac_ray.sampling import TokenLogprobs
    from sedac_ray.speculative import SpeculativeStats


class Detokenizer:
    """The text of a growing token list, equal to ``tokenizer.decode(ids, skip_special_tokens=True)``
    at every length, at a cost per new token that does not grow with the text: completed
    characters come from the tokenizer's incremental :class:`DecodeStream`; only the tokens of a
    character still forming are decoded whole (to the same U+FFFD a full decode shows). Tokenizers
    without a Rust backend, or that clean up spaces after decoding, are decoded whole each time."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        cleans_up = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
        self.backend = None if cleans_up else backend
        self.stream = DecodeStream(skip_special_tokens=True) if self.backend is not None else None
        self.stable = ""  # text of the tokens before `self.pending`; later tokens never change it
        self.pending = 0  # index of the first token whose text the stream has not given yet
        self.fed = 0  # tokens given to the stream

    def text(self, ids: list[int]) -> str:
        if self.backend is None:
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        for index in range(self.fed, len(ids)):
            chunk = self.stream.step(self.backend, ids[index])
            if chunk is not None:
                self.stable += chunk
                self.pending = index + 1
        self.fed = len(ids)
        if self.pending == len(ids):
            return self.stable
        return self.stable + self.backend.decode(ids[self.pending :], skip_special_tokens=True)


@dataclass
class Completion:
    tokenizer: object
    max_tokens: int
    eos_ids: set[int]
    stop: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    exit_layers: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)  # per token, when asked for
    finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length" once finished
    speculative: SpeculativeStats | None = None  # acceptance statistics of a speculative decode
    _streamed: int = 0  # characters of text already handed out by new_text()
    _stop_checked: int = 0  # characters of stable text already searched for stop strings
    _detokenizer: Detokenizer | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int, exit_layer: int, logprobs: TokenLogprobs | None = None) -> None:
        """Record one generated token and whether it ends the completion."""
        self.token_ids.append(int(token))
        self.exit_layers.append(int(exit_layer))
        self.logprobs.append(logprobs)
        if token in self.eos_ids:
            self.finish_reason = "stop"
        elif self.stop and self._stop_found():
            self.finish_reason = "stop"
        elif len(self.token_ids) >= self.max_tokens:
            self.finish_reason = "length"

    def _stop_found(self) -> bool:
        """Whether a stop string occurs in the text, searching only where a new one can be."""
        text = self._decoded()
        start = max(0, self._stop_checked - max(len(s) for s in self.stop) + 1)
        self._stop_checked = len(self._detokenizer.stable) if self._detokenizer.backend else 0
        return any(s in text[start:] for s in self.stop)

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
        if self._detokenizer is None:
            self._detokenizer = Detokenizer(self.tokenizer)
        return self._detokenizer.text(self.token_ids)

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
