"""Exit policies evaluated offline on traces, many settings at once.

Each function returns exit layers ``[settings, tokens]`` (1..L; ``L`` means full depth):

* :func:`stability_exits`: SEDAC V7 (patience) and its window variant, through
  :func:`sedac_ray.policy.exit_layers`, the very rule the runtime applies.
* :func:`checkpoint_exits`: V6 style: fixed checkpoints (``L/4, L/2, 3L/4``), one threshold each
  on the entropy of the head's distribution; a token exits at the first checkpoint where the
  entropy is below that checkpoint's threshold.
* :func:`confidence_exits`: CALM style softmax confidence: exit after the first layer (at or after
  ``min_layer``) whose top softmax probability reaches the threshold.
* :func:`oracle_frontier`: the best any per-token choice of exit layer can do, in hindsight.

The comparison policies need the head at intermediate layers, so they exist here only; the serving
engine runs the V7 rule. :func:`score` judges exit layers against the full model's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sedac_ray.policy import ExitPolicy, exit_layers

from .traces import Readout

_ROWS_PER_CHUNK = 1 << 19  # (setting, token) rows per call of the rule, to bound memory


def stability_exits(
    stabilities: torch.Tensor, policies: list[ExitPolicy], probe_scores: torch.Tensor | None = None
) -> torch.Tensor:
    """V7 / window / probe exit layers of every token under every policy: ``[len(policies), tokens]``
    (``probe_scores[tokens, L]`` for policies with a probe gate)."""
    tokens = stabilities.shape[0]
    per_chunk = max(1, _ROWS_PER_CHUNK // max(tokens, 1))
    parts = []
    for start in range(0, len(policies), per_chunk):
        chunk = policies[start : start + per_chunk]
        rules = torch.cat([p.rules(tokens) for p in chunk])  # (setting, token) rows, setting-major
        rows = stabilities.repeat(len(chunk), 1)
        scores = None if probe_scores is None else probe_scores.repeat(len(chunk), 1)
        parts.append(exit_layers(rows, rules, scores).reshape(len(chunk), tokens))
    return torch.cat(parts)


def v6_checkpoints(num_layers: int) -> list[int]:
    """V6's fixed checkpoints at ``L/4, L/2, 3L/4`` (rounded down): 7, 15, 22 for 30 layers."""
    return [num_layers // 4, num_layers // 2, 3 * num_layers // 4]


def checkpoint_exits(entropy: torch.Tensor, checkpoints: list[int], thresholds: torch.Tensor) -> torch.Tensor:
    """``thresholds[settings, len(checkpoints)]``: exit at the first checkpoint whose head entropy is
    below its threshold (``-inf`` disables a checkpoint)."""
    num_layers = entropy.shape[1]
    at_checkpoints = entropy[:, [c - 1 for c in checkpoints]]  # [tokens, C]
    below = at_checkpoints.unsqueeze(0) < thresholds.unsqueeze(1)  # [settings, tokens, C]
    layers = torch.tensor(checkpoints + [num_layers])
    first = torch.cat([below, torch.ones_like(below[..., :1])], dim=-1).int().argmax(dim=-1)
    return layers[first]


def confidence_exits(confidence: torch.Tensor, thresholds: torch.Tensor, min_layer: int = 1) -> torch.Tensor:
    """``thresholds[settings]``: exit after the first layer ``>= min_layer`` whose top softmax
    probability is at least the threshold."""
    num_layers = confidence.shape[1]
    allowed = torch.arange(1, num_layers + 1) >= min_layer
    confident = (confidence.unsqueeze(0) >= thresholds.view(-1, 1, 1)) & allowed  # [settings, tokens, L]
    confident[..., -1] = True  # the last layer always "exits"
    return confident.int().argmax(dim=-1) + 1


def exit_tokens(readout: Readout, layers: torch.Tensor) -> torch.Tensor:
    """The token each row's exit layer reads out: ``[settings, tokens]``."""
    tokens = readout.tokens.unsqueeze(0).expand(layers.shape[0], -1, -1)
    return tokens.gather(2, (layers - 1).unsqueeze(-1)).squeeze(-1)


def score(
    readout: Readout, reference: torch.Tensor, layers: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Agreement with the full model's tokens and mean layers executed, per setting."""
    agreement = (exit_tokens(readout, layers) == reference.unsqueeze(0)).float().mean(dim=1)
    return agreement, layers.float().mean(dim=1)


@dataclass
class OracleFrontier:
    """The hindsight optimum: for each achievable agreement, the fewest mean layers any choice of
    one exit layer per token reaches (with the same readout). No policy's point lies above it."""

    agreement: torch.Tensor  # [points], increasing
    mean_layers: torch.Tensor  # [points], increasing

    def mean_layers_at(self, agreement: float) -> float:
        reach = (self.agreement >= agreement - 1e-9).nonzero()
        return float(self.mean_layers[reach[0, 0]]) if len(reach) else float("nan")


def oracle_frontier(readout: Readout, reference: torch.Tensor) -> OracleFrontier:
    """Each token is right at its earliest layer whose readout matches the reference and wrong at
    its earliest layer that does not; start every token at its cheaper option, then make tokens
    right in order of the fewest extra layers it costs. Exact, since tokens are independent."""
    tokens, num_layers = readout.tokens.shape
    layer = torch.arange(1, num_layers + 1).expand(tokens, -1)
    match = readout.tokens == reference.unsqueeze(1)
    never = torch.full_like(layer, num_layers + 1_000_000)
    right_cost = torch.where(match, layer, never).min(dim=1).values
    wrong_cost = torch.where(~match, layer, never).min(dim=1).values
    right_first = right_cost <= wrong_cost
    base_layers = torch.minimum(right_cost, wrong_cost).sum()
    extra = (right_cost - wrong_cost)[~right_first & (right_cost < never[:, 0])].sort().values
    correct = int(right_first.sum()) + torch.arange(len(extra) + 1)
    total = base_layers + torch.cat([torch.zeros(1, dtype=extra.dtype), extra.cumsum(0)])
    return OracleFrontier(agreement=correct.float() / tokens, mean_layers=total.float() / tokens)


def stable_oracle_exits(readout: Readout, reference: torch.Tensor) -> torch.Tensor:
    """The earliest layer after which the readout equals the full model's token at every deeper
    layer (agreement 1 by construction): ``[1, tokens]``."""
    num_layers = readout.tokens.shape[1]
    mismatch = readout.tokens != reference.unsqueeze(1)
    # last mismatching layer + 1; a token whose final readout mismatches (a float tie) runs all layers
    last_bad = torch.where(mismatch, torch.arange(1, num_layers + 1), torch.zeros_like(readout.tokens)).max(
        dim=1
    )
    return (last_bad.values + 1).clamp(max=num_layers).unsqueeze(0)
