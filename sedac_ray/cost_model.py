"""Which speculative settings maximise tokens/s: measured costs priced over replayed drafts.

**Costs** (:class:`MeasuredCosts`, from the probe in ``benchmarks/speculative_speed.py``): one
decoder layer, one exited row's K/V fill per layer, the full LM head and the draft head (per
subset size), each at several row counts; values between measured widths are interpolated.

**Drafts** (:class:`DraftTrace`): for each calibration sequence and position, whether a draft read
out at depth ``d`` by the draft head was confident (reached the gate) and right (equal to the
full-depth token). :func:`replay` runs the decoder's own control logic over them (drafting until
the limit or an unconfident draft, direct full-head tokens at full depth, the adaptive limit,
rollback) and counts draft rows, verified rows, verification calls and direct tokens. Drafts at
``d < L`` are judged on full-depth K/V (teacher forcing), so their acceptance is an upper bound.

**Price** (:func:`time_per_token`) at batch width ``w`` (sequences decode in lockstep):
a draft row costs ``(d*layer(w) + (L-d)*fill(w) + draft_head(w)) / w``; a direct token a draft
row plus ``head(w) / w``; a verified row ``((L-d)*layer(W) + head(W)) / W`` with ``W`` = ``w`` times the
rows per verification. Plain decoding costs ``(L*layer(w) + head(w)) / w`` per token.

:func:`choose` picks the settings with the least time per token; :func:`required_acceptance`
says what per-draft acceptance a draft depth would need for a target speed-up.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

Table = dict[int, float]  # rows -> milliseconds


def at(table: Table, rows: float) -> float:
    """``table`` at ``rows``: linear between measured widths, linear extrapolation beyond them."""
    if not table:
        raise ValueError("no measurements")
    widths = sorted(table)
    if len(widths) == 1:
        return table[widths[0]]
    if rows <= widths[0]:
        low, high = widths[0], widths[1]
    elif rows >= widths[-1]:
        low, high = widths[-2], widths[-1]
    else:
        high = next(w for w in widths if w >= rows)
        low = widths[widths.index(high) - 1]
    slope = (table[high] - table[low]) / (high - low)
    return max(0.0, table[low] + slope * (rows - low))


@dataclass
class MeasuredCosts:
    num_layers: int
    layer_ms: Table  # one decoder layer (decode rows, attention included)
    fill_ms: Table  # K/V fill of exited rows, per layer
    head_ms: Table  # full LM head
    draft_head_ms: dict[int, Table] = field(default_factory=dict)  # subset size -> widths

    @classmethod
    def from_dict(cls, body: dict) -> MeasuredCosts:
        def table(t: dict) -> Table:
            return {int(k): float(v) for k, v in t.items()}

        return cls(
            num_layers=int(body["num_layers"]),
            layer_ms=table(body["layer_ms"]),
            fill_ms=table(body["fill_ms"]),
            head_ms=table(body["head_ms"]),
            draft_head_ms={int(v): table(t) for v, t in body.get("draft_head_ms", {}).items()},
        )

    def plain_ms(self, width: int) -> float:
        """Time per token of plain full-depth decoding at ``width`` sequences."""
        return (self.num_layers * at(self.layer_ms, width) + at(self.head_ms, width)) / width


@dataclass(frozen=True)
class Plan:
    draft_depth: int  # drafts read out after this many layers (L: full depth, only the head is cheap)
    draft_tokens: int  # draft head size V
    confidence: float  # the gate
    draft_limit: int


@dataclass
class DraftTrace:
    """Per sequence, per position: (confident, right) of the draft at one depth, size and gate."""

    draft_depth: int
    draft_tokens: int
    confidence: float
    sequences: list[list[tuple[bool, bool]]]

    @property
    def share(self) -> float:
        """Fraction of positions whose draft reached the gate."""
        flags = [c for seq in self.sequences for c, _ in seq]
        return sum(flags) / len(flags) if flags else 0.0

    @property
    def acceptance(self) -> float:
        """Fraction of confident drafts that are right (an upper bound on the decoder's rate)."""
        right = [r for seq in self.sequences for c, r in seq if c]
        return sum(right) / len(right) if right else 0.0


@dataclass
class ReplayCounts:
    tokens: int = 0
    draft_rows: int = 0
    verified_rows: int = 0
    verifications: int = 0
    direct: int = 0
    accepted: int = 0


def replay(
    sequences: Iterable[Sequence[tuple[bool, bool]]], full_depth: bool, draft_limit: int
) -> ReplayCounts:
    """The decoder's control logic (:mod:`sedac_ray.speculative`) over recorded (confident, right)
    flags; each sequence's positions are the tokens it must produce after its first."""
    counts = ReplayCounts()
    for flags in sequences:
        position, limit = 0, 1
        while position < len(flags):
            chunk = 0
            while position + chunk < len(flags):
                confident, _ = flags[position + chunk]
                if chunk == 0 and full_depth and not confident:
                    counts.direct += 1  # read out by the full head at once, exact
                    position += 1
                    continue
                counts.draft_rows += 1
                chunk += 1
                if chunk >= limit or not confident:
                    break
            if not chunk:
                continue
            counts.verifications += 1
            counts.verified_rows += chunk
            accepted = 0
            while accepted < chunk and flags[position + accepted][1]:
                accepted += 1
            counts.accepted += accepted
            position += accepted + (accepted < chunk)
            limit = min(draft_limit, accepted + 1)
        counts.tokens += len(flags)
    return counts


def breakdown(costs: MeasuredCosts, plan: Plan, counts: ReplayCounts, width: int) -> dict[str, float]:
    """Expected milliseconds per output token at ``width`` sequences, by where they go: draft rows,
    verification, direct full-head read-outs (see the module notes)."""
    if plan.draft_tokens not in costs.draft_head_ms:
        raise ValueError(f"no draft-head cost measured for {plan.draft_tokens} tokens")
    depth, layers = plan.draft_depth, costs.num_layers
    draft_row = (
        depth * at(costs.layer_ms, width)
        + (layers - depth) * at(costs.fill_ms, width)
        + at(costs.draft_head_ms[plan.draft_tokens], width)
    ) / width
    direct_row = at(costs.head_ms, width) / width
    rows = max(width * counts.verified_rows / max(counts.verifications, 1), 1.0)
    verify_row = ((layers - depth) * at(costs.layer_ms, rows) + at(costs.head_ms, rows)) / rows
    tokens = max(counts.tokens, 1)
    return {
        "draft_ms": counts.draft_rows * draft_row / tokens,
        "verify_ms": counts.verified_rows * verify_row / tokens,
        # A direct token ran its draft row too (all layers, the draft head) before the full head.
        "direct_ms": counts.direct * (draft_row + direct_row) / tokens,
    }


def time_per_token(costs: MeasuredCosts, plan: Plan, counts: ReplayCounts, width: int) -> float:
    return sum(breakdown(costs, plan, counts, width).values())


@dataclass
class Choice:
    plan: Plan
    ms_per_token: float
    plain_ms_per_token: float
    counts: ReplayCounts

    @property
    def speedup(self) -> float:
        return self.plain_ms_per_token / self.ms_per_token


def evaluate(
    costs: MeasuredCosts, traces: Iterable[DraftTrace], limits: Iterable[int], width: int
) -> list[Choice]:
    """Every (trace, draft limit) priced at ``width``, best first."""
    out = []
    for trace in traces:
        for limit in limits:
            plan = Plan(trace.draft_depth, trace.draft_tokens, trace.confidence, limit)
            counts = replay(trace.sequences, trace.draft_depth == costs.num_layers, limit)
            out.append(
                Choice(plan, time_per_token(costs, plan, counts, width), costs.plain_ms(width), counts)
            )
    return sorted(out, key=lambda c: c.ms_per_token)


def choose(
    costs: MeasuredCosts, traces: Iterable[DraftTrace], limits: Iterable[int], widths: Sequence[int]
) -> Choice:
    """The plan with the least time per token summed over ``widths`` (each weighted by its plain
    time, so every width counts as much), priced at the first width."""
    traces, limits = list(traces), list(limits)
    per_width = [evaluate(costs, traces, limits, w) for w in widths]
    score: dict[Plan, float] = {}
    for width, choices in zip(widths, per_width, strict=True):
        for choice in choices:
            score[choice.plan] = score.get(choice.plan, 0.0) + choice.ms_per_token / costs.plain_ms(width)
    best = min(score, key=score.get)
    return next(c for c in per_width[0] if c.plan == best)


def fixed_chunk_ms(
    costs: MeasuredCosts, depth: int, draft_tokens: int, limit: int, acceptance: float, width: int
) -> float:
    """Time per token with every draft confident, chunks of ``limit`` drafts and independent
    per-draft ``acceptance`` (every chunk is drafted whole, then verified)."""
    plan = Plan(depth, draft_tokens, 0.0, limit)
    if acceptance >= 1.0:
        tokens = float(limit)
    else:
        tokens = (1 - acceptance**limit) / (1 - acceptance)  # committed tokens per chunk
    # One chunk, priced as one "token", then shared among the tokens it commits.
    per_chunk = ReplayCounts(tokens=1, draft_rows=limit, verified_rows=limit, verifications=1)
    return time_per_token(costs, plan, per_chunk, width) / tokens


def required_acceptance(
    costs: MeasuredCosts, depth: int, draft_tokens: int, limit: int, width: int, speedup: float
) -> float | None:
    """The least per-draft acceptance at which drafting at ``depth`` (chunks of ``limit``) reaches
    ``speedup`` over plain decoding at ``width``; None if even acceptance 1 does not."""
    target = costs.plain_ms(width) / speedup
    if fixed_chunk_ms(costs, depth, draft_tokens, limit, 1.0, width) > target:
        return None
    low, high = 0.0, 1.0
    for _ in range(40):
        middle = (low + high) / 2
        if fixed_chunk_ms(costs, depth, draft_tokens, limit, middle, width) <= target:
            high = middle
        else:
            low = middle
    return high
