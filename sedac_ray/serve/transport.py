"""What crosses process boundaries between pipeline deployments.

Hidden states travel as numpy arrays (bf16 as an int16 view), one message per batch of rows,
never one per token and never as pickled torch tensors. Everything here is plain data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from sedac_ray.policy import RULE_WIDTH
from sedac_ray.sampling import SamplingParams, TokenLogprobs

_BITS_AS_INT16 = {torch.bfloat16}

# What a decode row is for (``Rows.mode``).
PLAIN = 0  # early exit: a row that exits is final, deeper layers get its K/V by propagation
SPECULATIVE = 1  # a row that exits is a draft; the same token then runs on as a VERIFY row
VERIFY = 2  # a drafted token running the rest of the model at full depth (its rule is off)


def pack_hidden(hidden: torch.Tensor) -> tuple[np.ndarray, str]:
    """A device tensor as a compact numpy array and the name of its torch dtype."""
    dtype = str(hidden.dtype).removeprefix("torch.")
    hidden = hidden.detach()
    if hidden.dtype in _BITS_AS_INT16:
        hidden = hidden.view(torch.int16)  # numpy has no bfloat16: ship the bits
    return hidden.cpu().numpy(), dtype


def unpack_hidden(array: np.ndarray, dtype: str, device) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    torch_dtype = getattr(torch, dtype)
    if torch_dtype in _BITS_AS_INT16:
        tensor = tensor.view(torch_dtype)
    return tensor.to(device)


@dataclass
class Rows:
    """Decode tokens of many sequences, one row each. Stage 0 receives ``token_ids``; deeper stages
    and the LM head receive ``hidden``. ``routes[i]`` names the replica of each stage that holds
    row ``i``'s KV. ``epochs[i]`` is the position row ``i``'s sequence was last rolled back to by
    speculative decoding (0: never): a stage drops rows of older epochs."""

    seq_ids: list[str]
    positions: np.ndarray  # [n] int64, position of each row's token
    rules: np.ndarray  # [n, RULE_WIDTH] float32, each row's exit rule
    state: np.ndarray  # [n] int64, exit-policy state carried between stages
    sampling: list[SamplingParams]
    routes: list[tuple[str, ...]]
    token_ids: np.ndarray | None = None  # [n] int64, stage 0 input
    hidden: np.ndarray | None = None  # [n, hidden_size]
    hidden_dtype: str = "float32"
    exit_layer: np.ndarray | None = None  # [n] int64, once rows exit
    modes: np.ndarray | None = None  # [n] int8, PLAIN / SPECULATIVE / VERIFY (None: all PLAIN)
    epochs: np.ndarray | None = None  # [n] int64, rollback positions (None: all 0)

    def __post_init__(self) -> None:
        if self.modes is None:
            self.modes = np.full(len(self.seq_ids), PLAIN, np.int8)
        if self.epochs is None:
            self.epochs = np.zeros(len(self.seq_ids), np.int64)

    def __len__(self) -> int:
        return len(self.seq_ids)

    @staticmethod
    def empty() -> Rows:
        return Rows(
            [], np.zeros(0, np.int64), np.zeros((0, RULE_WIDTH), np.float32), np.zeros(0, np.int64), [], []
        )

    def take(self, index: list[int]) -> Rows:
        pick = np.asarray(index, dtype=np.int64)
        return Rows(
            seq_ids=[self.seq_ids[i] for i in index],
            positions=self.positions[pick],
            rules=self.rules[pick],
            state=self.state[pick],
            sampling=[self.sampling[i] for i in index],
            routes=[self.routes[i] for i in index],
            token_ids=None if self.token_ids is None else self.token_ids[pick],
            hidden=None if self.hidden is None else self.hidden[pick],
            hidden_dtype=self.hidden_dtype,
            exit_layer=None if self.exit_layer is None else self.exit_layer[pick],
            modes=self.modes[pick],
            epochs=self.epochs[pick],
        )

    @staticmethod
    def concat(parts: list[Rows]) -> Rows:
        parts = [p for p in parts if len(p)]
        if not parts:
            return Rows.empty()
        if len(parts) == 1:
            return parts[0]

        def cat(name):
            values = [getattr(p, name) for p in parts]
            return None if any(v is None for v in values) else np.concatenate(values)

        return Rows(
            seq_ids=[s for p in parts for s in p.seq_ids],
            positions=cat("positions"),
            rules=cat("rules"),
            state=cat("state"),
            sampling=[s for p in parts for s in p.sampling],
            routes=[r for p in parts for r in p.routes],
            token_ids=cat("token_ids"),
            hidden=cat("hidden"),
            hidden_dtype=parts[0].hidden_dtype,
            exit_layer=cat("exit_layer"),
            modes=cat("modes"),
            epochs=cat("epochs"),
        )


@dataclass
class StepMessage:
    """One decode step for ``rows``, plus K/V propagation for ``fill`` rows (tokens that exited in
    an earlier stage; this stage and deeper ones still need their K/V)."""

    rows: Rows
    fill: Rows = field(default_factory=Rows.empty)


@dataclass
class PrefillMessage:
    """A whole prompt for one sequence: ``token_ids`` for stage 0, ``hidden`` after it."""

    seq_id: str
    sampling: SamplingParams
    token_ids: list[int] | None = None
    hidden: np.ndarray | None = None  # [tokens, hidden_size]
    hidden_dtype: str = "float32"
    max_length: int = 0  # prompt plus max_tokens: the KV positions each stage reserves


@dataclass
class TokenResult:
    token: int
    exit_layer: int
    logprobs: TokenLogprobs | None = None  # when the row's sampling params ask for them
    # Speculative rows read out by the draft head: a guess that full-depth verification checks
    # (even at full depth: the full head was not applied), and whether it reached the draft gate.
    draft: bool = False
    confident: bool = True
    # Last stage, speculative rows: verifications of the sequence's earlier drafts (position ->
    # full-depth token) ready when this row finished, so the front door needs no call for them.
    verified: dict[int, TokenResult] | None = None


@dataclass
class PrefillResult:
    route: tuple[str, ...]  # the replica of each stage that now holds the sequence's KV
    first: TokenResult
