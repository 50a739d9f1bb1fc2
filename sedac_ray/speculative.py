"""Lossless speculative decoding with the exit rule as the drafter (DESIGN §3, scheme A).

**Draft.** Each step runs every active sequence's newest token with the exit rule, exactly as
plain early exit does (an exited token's deeper K/V comes from state propagation, so the next
draft can attend to it); the token chosen from the exit layer's logits is a *draft*, and it is
the next step's input. A sequence drafts until it holds as many unverified drafts as its current
limit, or a draft ran full depth (the exit rule found nothing stable: verifying now wastes least),
or a draft would end the completion (EOS, the token limit). The limit adapts to how well the
drafts do: after each verification it is one more than the drafts just accepted in a row, at most
``draft_limit`` (so wrong drafts cost one draft step each, and runs of right ones grow the chunk).

**Draft read-out and gating.** With a :class:`~sedac_ray.draft_head.DraftHead` (the LM head over
the most frequent tokens only, FR-Spec), every row is read out cheaply, full-depth rows included:
at full depth the draft is right whenever the full head's choice is in the subset, and the full
head runs once per chunk, batched, at verification instead of once per token. The draft head's
confidence (its softmax probability) gates drafting: a full-depth row below ``confidence`` with no
drafts pending is read out by the full head at once (a direct token, as without a draft head); any
other draft below it ends its chunk (verify now: later drafts would likely be wasted).

**Exactness.** The K/V below a sequence's first unverified position are exact (full depth, from
committed tokens). Draft row ``i`` of a chunk attended, at layers deeper than an earlier draft's
exit, to that draft's propagated (approximate) K/V. So its hidden state is exact up to layer
``x_i = min(exit layers of the chunk's drafts up to and including i)`` and no further; ``x_i``
never increases along the chunk. The draft step keeps each row's output at ``x_i``.

**Verify.** One pass (:meth:`LayerRange.verify`) runs every chunk row from its own ``x_i`` to
full depth, batched over all sequences that are ready. At a layer ``l``, a row that is not
running yet (``x_j >= l``) holds K/V computed from its exact ``h_{l-1}``, and running rows write
their K/V before any attends, so every row attends to exact K/V at every layer: the full-depth
logits of row ``i`` are those of full-depth decoding of the same tokens. They choose the verified
token for the next position, with the same per-(seed, position) sampling as the plain engine.

**Rollback.** Drafts are accepted up to the first that differs from its verified token; that
verified token replaces it, and every layer's K/V of the sequence is truncated back to the
accepted length (:meth:`SlotKVCache.truncate`). Committed tokens are always verified tokens (or
full-depth tokens from an exact prefix), so the output equals full-depth decoding token for token
(greedy, or sampled with a seed), whatever the exit rule drafts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from sedac_ray.completion import Completion
from sedac_ray.draft_head import DraftHead, DraftReader
from sedac_ray.policy import RULE_WIDTH
from sedac_ray.runtime.layer_range import LayerRange, TokenRows
from sedac_ray.sampling import SamplingParams, choose_tokens

DEFAULT_DRAFT_LIMIT = 4

# (hidden [n, D] at the exit, exit layers [n]) -> logits [n, vocab]: how exited tokens are read out.
DraftLogits = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_draft_limit(draft_limit: int) -> int:
    if not isinstance(draft_limit, int) or isinstance(draft_limit, bool) or draft_limit < 1:
        raise ValueError(f"draft_limit must be an integer >= 1, got {draft_limit!r}")
    return draft_limit


@dataclass
class SpeculativeStats:
    """Acceptance statistics of one sequence (or a sum over sequences)."""

    drafts: int = 0  # draft tokens made (each is one draft step of the sequence)
    accepted: int = 0  # drafts the full-depth verification confirmed
    rolled_back: int = 0  # drafts discarded: the first wrong one and all after it (or past the end)
    verifications: int = 0  # verification passes over this sequence's chunk of drafts
    rollbacks: int = 0  # verifications that found a wrong draft
    direct: int = 0  # tokens computed at full depth from an exact prefix (no verification needed)

    @property
    def verified_tokens(self) -> int:
        """Tokens committed by verification: accepted drafts plus one corrected token per rollback."""
        return self.accepted + self.rollbacks

    @property
    def tokens_per_verification(self) -> float:
        return self.verified_tokens / self.verifications if self.verifications else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafts if self.drafts else 0.0

    def __add__(self, other: SpeculativeStats) -> SpeculativeStats:
        return SpeculativeStats(**{k: v + getattr(other, k) for k, v in asdict(self).items()})

    def as_dict(self) -> dict:
        return {
            **asdict(self),
            "verified_tokens": self.verified_tokens,
            "tokens_per_verification": round(self.tokens_per_verification, 4),
            "acceptance_rate": round(self.acceptance_rate, 4),
        }


@dataclass
class _Draft:
    position: int  # position of the input token this row ran; the draft is for position + 1
    token: int
    exit_layer: int
    exact_layer: int  # x_i: the deepest layer whose output is exact for this row
    hidden: torch.Tensor  # [hidden_size] output of exact_layer
    confident: bool = True  # the draft head's confidence reached the gate (always, without one)


class _Sequence:
    def __init__(self, row: int, completion: Completion, slot: int, position: int):
        self.row = row
        self.completion = completion
        self.slot = slot
        self.position = position  # position of the next committed input; K/V exact below it
        self.drafts: list[_Draft] = []
        self.limit = 1  # drafts per verification now; adapts up to the decoder's draft_limit
        self.stats = SpeculativeStats()

    @property
    def next_input(self) -> int:
        return self.drafts[-1].token if self.drafts else self.completion.token_ids[-1]

    @property
    def input_position(self) -> int:
        return self.position + len(self.drafts)

    @property
    def capture_layer(self) -> int:
        """Layer whose output the next draft row must keep (0: its exit layer will do)."""
        return self.drafts[-1].exact_layer if self.drafts else 0


class SpeculativeDecoder:
    """Decodes prefilled sequences speculatively over ``layers`` (a whole-model range whose cache
    holds their prompts' K/V). ``draft_logits`` reads out drafts (default: final norm and LM head;
    the engine passes its own exit read-out, e.g. with exit adapters); or ``draft_head`` reads them
    out over a token subset, gated by ``confidence`` (see the module notes). Verified tokens
    always come from the model's own head at full depth."""

    def __init__(
        self,
        layers: LayerRange,
        draft_limit: int = DEFAULT_DRAFT_LIMIT,
        draft_logits: DraftLogits | None = None,
        draft_head: DraftHead | None = None,
        confidence: float = 0.0,
    ):
        if layers.start != 0 or not layers.is_last:
            raise ValueError("speculative decoding needs a LayerRange over the whole model")
        if draft_logits is not None and draft_head is not None:
            raise ValueError("give draft_logits or draft_head, not both")
        if not 0.0 <= confidence <= 1.0:
            raise ValueError(f"confidence must be in [0, 1], got {confidence!r}")
        self.draft_head = draft_head
        self.confidence = float(confidence)
        self.drafts = DraftReader(draft_head, self.confidence) if draft_head is not None else None
        self.layers = layers
        self.adapter = layers.adapter
        self.num_layers = self.adapter.num_layers
        self.draft_limit = check_draft_limit(draft_limit)
        self.draft_logits = draft_logits or (lambda hidden, _layers: self.adapter.logits(hidden))
        self._ranges: dict[tuple[int, int], LayerRange] = {}

    @torch.inference_mode()
    def run(
        self,
        completions: list[Completion],
        slots: torch.Tensor,
        positions: torch.Tensor,
        params: SamplingParams,
        rules: torch.Tensor,
    ) -> list[SpeculativeStats]:
        """Decode until every completion finishes. ``completions`` hold each sequence's first token
        (from prefill), at ``positions``; ``rules`` are the rows' exit rules. Returns each
        sequence's statistics."""
        self.params, self.rules = params, rules
        sequences = [
            _Sequence(row, completion, int(slot), int(position))
            for row, (completion, slot, position) in enumerate(
                zip(completions, slots.tolist(), positions.tolist(), strict=True)
            )
        ]
        while active := [s for s in sequences if not s.completion.finished]:
            direct = self._draft_step(active)
            ready = [s for s in active if self._should_verify(s)]
            if ready or direct:
                # The full head is read whole per call (memory-bound): chunks whose drafts are all
                # full depth need only the head, so they join the call that happens anyway.
                ready += [s for s in active if s not in ready and s.drafts and self._head_only(s)]
                self._verify(ready, direct)
        return [s.stats for s in sequences]

    def _head_only(self, sequence: _Sequence) -> bool:
        return self.draft_head is not None and sequence.drafts[-1].exact_layer == self.num_layers

    # ---- draft ------------------------------------------------------------------------------

    def _draft_step(self, sequences: list[_Sequence]) -> list[tuple[_Sequence, int, torch.Tensor]]:
        """One draft row per sequence. Returns the rows to read out with the full head (full depth
        from an exact prefix, not confident): (sequence, position, hidden)."""
        adapter = self.adapter
        inputs = torch.tensor([s.next_input for s in sequences], device=adapter.device)
        rows = TokenRows(
            ids=torch.arange(len(sequences)),
            slots=torch.tensor([s.slot for s in sequences]),
            positions=torch.tensor([s.input_position for s in sequences]),
            hidden=adapter.embed_tokens(inputs),
            rules=self.rules[[s.row for s in sequences]],
        )
        capture = [s.capture_layer for s in sequences]
        exited, captured = self._decode_keeping(rows, capture)
        positions = exited.positions.tolist()
        tokens, confident = self._read_drafts(exited.hidden, exited.exit_layer, positions)
        direct: list[tuple[_Sequence, int, torch.Tensor]] = []
        for j, (row, layer, token) in enumerate(
            zip(exited.ids.tolist(), exited.exit_layer.tolist(), tokens, strict=True)
        ):
            sequence = sequences[row]
            if not sequence.drafts and layer == self.num_layers and not (self.draft_head and confident[j]):
                # Full depth from an exact prefix: the full head gives what verification would give.
                if self.draft_head is None:  # and the draft read-out was the full head already
                    self._commit_direct(sequence, token)
                else:
                    direct.append((sequence, positions[j], exited.hidden[j]))
                continue
            keep = capture[row]
            exact, hidden = (keep, captured[row]) if keep and layer > keep else (layer, exited.hidden[j])
            sequence.drafts.append(_Draft(positions[j], token, layer, exact, hidden, confident[j]))
            sequence.stats.drafts += 1
        return direct

    def _commit_direct(self, sequence: _Sequence, token: int) -> None:
        sequence.completion.add(token, self.num_layers)
        sequence.position += 1
        sequence.stats.direct += 1

    def _read_drafts(
        self, hidden: torch.Tensor, exit_layers: torch.Tensor, positions: list[int]
    ) -> tuple[list[int], list[bool]]:
        """Draft tokens of exited rows, and whether each reached the confidence gate."""
        params = [self.params] * len(positions)
        if self.drafts is None:
            tokens = choose_tokens(self.draft_logits(hidden, exit_layers), params, positions)
            return tokens, [True] * len(positions)
        return self.drafts.read(hidden, exit_layers, params, positions)  # as the pipeline reads them

    def _decode_keeping(
        self, rows: TokenRows, capture: list[int]
    ) -> tuple[TokenRows, dict[int, torch.Tensor]]:
        """One decode step with the exit rule over the whole model, also keeping row ``i``'s output
        of layer ``capture[i]`` while it is still running there. The model is cut into ranges at
        the capture layers; chained ranges compute exactly what one range does."""
        boundaries = sorted({layer for layer in capture if 0 < layer < self.num_layers})
        exited, fill, captured = [], None, {}
        start = 0
        for end in [*boundaries, self.num_layers]:
            out = self._range(start, end).decode(rows, fill)
            exited.append(out.exited)
            rows, fill = out.continuing, out.fill
            for j, row in enumerate(rows.ids.tolist()):
                if capture[row] == end:
                    captured[row] = rows.hidden[j]
            start = end
        return TokenRows.concat(exited), captured

    def _range(self, start: int, end: int) -> LayerRange:
        if (start, end) not in self._ranges:
            self._ranges[start, end] = LayerRange(self.adapter, start, end, cache=self.layers.cache)
        return self._ranges[start, end]

    # ---- verify and roll back ---------------------------------------------------------------

    def _should_verify(self, sequence: _Sequence) -> bool:
        if not sequence.drafts:
            return False
        last, completion = sequence.drafts[-1], sequence.completion
        return (
            len(sequence.drafts) >= sequence.limit
            or not last.confident
            # Without a draft head a full-depth draft paid the full head: verifying now wastes least.
            or (last.exit_layer == self.num_layers and self.draft_head is None)
            or last.token in completion.eos_ids
            or len(completion.token_ids) + len(sequence.drafts) >= completion.max_tokens
        )

    def _verify(self, sequences: list[_Sequence], direct: list[tuple[_Sequence, int, torch.Tensor]]) -> None:
        """Verify the drafts of ``sequences`` and read out the ``direct`` rows: one full-head call."""
        drafts = [(s, d) for s in sequences for d in s.drafts]
        hidden = [
            torch.zeros(0, self.adapter.hidden_size, device=self.adapter.device, dtype=self.adapter.dtype)
        ]
        if drafts:
            rows = TokenRows(
                ids=torch.arange(len(drafts)),
                slots=torch.tensor([s.slot for s, _ in drafts]),
                positions=torch.tensor([d.position for _, d in drafts]),
                hidden=torch.stack([d.hidden for _, d in drafts]),
                rules=torch.zeros(len(drafts), RULE_WIDTH),  # verification never exits
            )
            hidden.append(self.layers.verify(rows, torch.tensor([d.exact_layer for _, d in drafts])).hidden)
        if direct:
            hidden.append(torch.stack([h for _, _, h in direct]))
        positions = [d.position for _, d in drafts] + [p for _, p, _ in direct]
        chosen = choose_tokens(
            self.adapter.logits(torch.cat(hidden)), [self.params] * len(positions), positions
        )
        start = 0
        for sequence in sequences:
            count = len(sequence.drafts)
            self._settle(sequence, chosen[start : start + count])
            start += count
        for (sequence, _, _), token in zip(direct, chosen[start:], strict=True):
            self._commit_direct(sequence, token)

    def _settle(self, sequence: _Sequence, verified: list[int]) -> None:
        """Commit the drafts that match their verified tokens, then the first verified token that
        differs, and truncate the sequence's K/V back to what was committed."""
        stats, completion = sequence.stats, sequence.completion
        stats.verifications += 1
        committed = accepted = 0
        for i, (draft, token) in enumerate(zip(sequence.drafts, verified, strict=True)):
            if completion.finished:  # a stop string ended it: later drafts are not needed
                stats.rolled_back += len(sequence.drafts) - i
                break
            committed += 1
            if token == draft.token:
                accepted += 1
                completion.add(token, draft.exit_layer)
            else:
                stats.rollbacks += 1
                stats.rolled_back += len(sequence.drafts) - i
                completion.add(token, self.num_layers)
                break
        stats.accepted += accepted
        sequence.limit = min(self.draft_limit, accepted + 1)
        sequence.position += committed
        sequence.drafts = []
        self.layers.cache.truncate(sequence.slot, sequence.position)
