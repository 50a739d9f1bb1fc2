"""A cheap draft read-out for speculative decoding: the LM head restricted to frequent tokens (FR-Spec).

The full head is one ``[vocab, D]`` matmul per token (SmolLM2: 49152 x 576, about as much time as
5-6 decoder layers on a CPU, because the whole weight is read for every call). Drafts do not need
it: a draft is only a guess that full-depth verification checks with the full head. The draft
head keeps the rows of the ``V`` most frequent tokens, so a draft costs about ``V / vocab`` of a
full read-out, and its logits are exactly the full head's logits on those tokens. A greedy draft
is right whenever the full-depth argmax is among them; its confidence (max softmax probability
over the subset) says when it is likely to be wrong.

The ranking is built once per model (:func:`rank_tokens`, over the calibration prompts and the
model's own full-depth answers to them: each token's count plus its summed probability at every
position, so tokens the model finds likely rank high even when they were not chosen; unseen ones
by token id, which in byte-level BPE follows merge order, a frequency proxy) and stored beside the
model's calibration file as ``<model>.speculative.json``, with the settings the cost model chose
(:class:`SpeculationFile`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sedac_ray.exit.store import calibration_file_name, packaged_calibration_dir, user_calibration_dir
from sedac_ray.exit_adapters import ExitAdapters
from sedac_ray.model.adapter import ModelAdapter
from sedac_ray.sampling import SamplingParams, choose_tokens


@dataclass
class DraftReadout:
    logits: torch.Tensor  # [n, V] over the subset
    tokens: torch.Tensor  # [n] greedy drafts, ids in the full vocabulary
    confidence: torch.Tensor  # [n] their softmax probability over the subset


class DraftHead:
    """Final norm and LM head over ``token_ids`` only (exit adapters first, for exited tokens)."""

    def __init__(
        self,
        adapter: ModelAdapter,
        token_ids: Iterable[int],
        exit_adapters: ExitAdapters | None = None,
    ):
        ids = torch.tensor(list(token_ids), dtype=torch.long)
        vocab = adapter.head.weight.shape[0]
        if not len(ids):
            raise ValueError("a draft head needs at least one token id")
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"draft token ids must be in 0..{vocab - 1}")
        if len(torch.unique(ids)) != len(ids):
            raise ValueError("draft token ids must be distinct")
        self.adapter = adapter
        self.token_ids = ids.to(adapter.device)
        self.weight = adapter.head.weight.detach()[self.token_ids].contiguous()
        bias = getattr(adapter.head, "bias", None)
        self.bias = None if bias is None else bias.detach()[self.token_ids].contiguous()
        self.exit_adapters = exit_adapters

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])

    def logits(self, hidden: torch.Tensor, exit_layers: torch.Tensor | None = None) -> torch.Tensor:
        """``[n, V]`` logits of the subset for hidden states that left the model after
        ``exit_layers`` layers (the same read-out as the full head, restricted to the subset)."""
        if self.exit_adapters is not None and exit_layers is not None:
            hidden = self.exit_adapters.apply(hidden, exit_layers)
        logits = torch.nn.functional.linear(self.adapter.norm(hidden), self.weight, self.bias)
        softcap = self.adapter.logit_softcap
        return torch.tanh(logits / softcap) * softcap if softcap else logits

    def draft(self, hidden: torch.Tensor, exit_layers: torch.Tensor | None = None) -> DraftReadout:
        """The subset logits, greedy drafts and their confidence (softmax probability over the subset)."""
        logits = self.logits(hidden, exit_layers)
        confidence, index = torch.softmax(logits.float(), dim=-1).max(dim=-1)
        return DraftReadout(logits, self.token_ids[index], confidence)

    def full_vocab_logits(self, subset_logits: torch.Tensor) -> torch.Tensor:
        """Subset logits placed in a full-vocabulary row (-inf elsewhere), to sample drafts with
        the same sampling code (and per-position seeds) as verified tokens."""
        vocab = self.adapter.head.weight.shape[0]
        out = torch.full((subset_logits.shape[0], vocab), float("-inf"), dtype=subset_logits.dtype)
        return out.index_copy_(1, self.token_ids.cpu(), subset_logits.cpu())


@dataclass
class DraftReader:
    """Drafts as speculative decoding reads them out, in the engine and in the pipeline alike: the
    draft head's token (greedy, or sampled over the subset with the same per-position seed as
    verified tokens) and whether its confidence reaches the gate. A draft below the gate is not
    drafted on from (the engine ends its chunk; the pipeline steps on only once it is verified),
    and at full depth with nothing pending the full head reads the token out at once instead."""

    head: DraftHead
    confidence: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.confidence <= 1.0:
            raise ValueError(f"confidence must be in [0, 1], got {self.confidence!r}")

    def read(
        self,
        hidden: torch.Tensor,
        exit_layers: torch.Tensor,
        params: list[SamplingParams],
        positions: list[int],
    ) -> tuple[list[int], list[bool]]:
        """Draft tokens of rows that left the model after ``exit_layers`` layers, and whether each
        reached the confidence gate."""
        readout = self.head.draft(hidden, exit_layers)
        tokens = readout.tokens.tolist()
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if sampled:
            chosen = choose_tokens(
                self.head.full_vocab_logits(readout.logits[sampled]),
                [params[i] for i in sampled],
                [positions[i] for i in sampled],
            )
            for i, token in zip(sampled, chosen, strict=True):
                tokens[i] = token
        return tokens, (readout.confidence >= self.confidence).tolist()


def rank_tokens(scores: torch.Tensor, always: Iterable[int] = ()) -> list[int]:
    """Every token id of the vocabulary, most useful for drafting first: ``always`` (EOS ids), then
    by ``scores[vocab]`` (e.g. counts in the model's answers plus its summed probabilities),
    descending, ties by id (so unseen tokens follow by id: BPE merge order)."""
    vocab = scores.shape[0]
    first = [t for t in dict.fromkeys(int(t) for t in always) if 0 <= t < vocab]
    order = torch.sort(-scores.double(), stable=True).indices.tolist()
    taken = set(first)
    return first + [t for t in order if t not in taken]


# ---- the stored file ----------------------------------------------------------------------------


@dataclass
class SpeculationSettings:
    """What ``Engine(model, speculative=True)`` uses when no policy is given."""

    draft_tokens: int  # V: how many of the ranked tokens the draft head keeps
    confidence: float  # a draft below this ends its chunk; at full depth with no pending drafts
    # it is not drafted at all (the full head reads the token out now)
    draft_limit: int  # most drafts per verification
    exit_policy: dict | None = None  # {"tau", "k", "min_layer"} to draft from early exits; None: full depth

    def __post_init__(self) -> None:
        if not isinstance(self.draft_tokens, int) or self.draft_tokens < 1:
            raise ValueError(f"draft_tokens must be an integer >= 1, got {self.draft_tokens!r}")
        if not 0.0 <= float(self.confidence) <= 1.0:
            raise ValueError(f"confidence must be in [0, 1], got {self.confidence!r}")


@dataclass
class SpeculationFile:
    model: str
    ranked_token_ids: list[int]
    settings: SpeculationSettings
    details: dict = field(default_factory=dict)  # how the ranking was built; the measured costs
    path: Path | None = None

    def draft_token_ids(self, count: int | None = None) -> list[int]:
        return self.ranked_token_ids[: count or self.settings.draft_tokens]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {
            "model": self.model,
            "settings": self.settings.__dict__,
            "details": self.details,
            "ranked_token_ids": self.ranked_token_ids,
        }
        path.write_text(json.dumps(body, indent=1) + "\n")
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | Path) -> SpeculationFile:
        path = Path(path)
        try:
            body = json.loads(path.read_text())
            return cls(
                model=body["model"],
                ranked_token_ids=[int(t) for t in body["ranked_token_ids"]],
                settings=SpeculationSettings(**body["settings"]),
                details=body.get("details", {}),
                path=path,
            )
        except (KeyError, TypeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not a sedac-ray speculation file: {error}") from error


def speculation_file_name(model_name: str) -> str:
    # Named like a calibration file, without a dtype: the token ranking serves every dtype.
    return calibration_file_name(model_name, "float32").removesuffix(".float32.json") + ".speculative.json"


def draft_reader(
    adapter: ModelAdapter, speculation: SpeculationFile | None, exit_adapters: ExitAdapters | None = None
) -> DraftReader | None:
    """The draft read-out a speculation file sets up for a model part holding the final norm and
    LM head (the engine, the LM-head deployment, a pipeline's last stage); None without a file."""
    if speculation is None:
        return None
    head = DraftHead(adapter, speculation.draft_token_ids(), exit_adapters)
    return DraftReader(head, speculation.settings.confidence)


def find_speculation(model_name: str) -> SpeculationFile | None:
    """The model's speculation file: the user's calibration folder first, then the packaged one."""
    name = speculation_file_name(model_name)
    for folder in (user_calibration_dir(), packaged_calibration_dir()):
        if (folder / name).is_file():
            return SpeculationFile.load(folder / name)
    return None
