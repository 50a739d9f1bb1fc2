"""The SEDAC V7 exit rule, and nothing else.

Layers are numbered 1..L; ``h_l`` is the output of layer ``l`` and ``h_0`` the embedding.
Stability of a token at layer ``l >= 2`` is ``s_l = cos(h_l, h_{l-1})``, per token.

* Patience rule: ``c_l = c_{l-1} + 1`` if ``s_l > tau`` else ``0`` (``c_1 = 0``). The token exits
  after the first layer ``l`` with ``c_l >= k`` and ``l >= min_layer``; its logits are then
  ``lm_head(final_norm(h_l))`` and it has executed ``l`` layers.
* Window rule (optional): exit after the first layer ``l >= min_layer`` where at least ``k`` of the
  last ``window`` stabilities (``s_{l-window+1}..s_l``, counting only ``l >= 2``) exceed ``tau``.

A token that never meets the rule executes all ``L`` layers. The per-token state is one integer:
the patience counter, or a bit history of recent stable flags for the window rule. It is all a
pipeline stage must pass on for the next stage to continue the rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ExitPolicy:
    """``ExitPolicy(tau, k=3, min_layer=None, window=None)``; ``ExitPolicy.disabled()`` never exits.

    The runtime applies policies as rows of a rules tensor (:meth:`rules`, :func:`decide`), so one
    batch can mix requests with different policies."""

    tau: float = 1.0
    k: int = 3
    min_layer: int | None = None
    window: int | None = None
    enabled: bool = True

    def __post_init__(self) -> None:
        if not self.enabled:
            return
        if not isinstance(self.tau, (int, float)) or math.isnan(self.tau) or not 0.0 < self.tau <= 1.0:
            raise ValueError(f"tau must be in (0, 1], got {self.tau!r}")
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be an integer >= 1, got {self.k!r}")
        if self.min_layer is not None and (not isinstance(self.min_layer, int) or self.min_layer < 1):
            raise ValueError(f"min_layer must be an integer >= 1, got {self.min_layer!r}")
        if self.window is not None:
            if not isinstance(self.window, int) or not 1 <= self.window <= 62:
                raise ValueError(f"window must be an integer in 1..62, got {self.window!r}")
            if self.k > self.window:
                raise ValueError(f"k must be <= window ({self.window}) for the window rule, got {self.k}")

    @classmethod
    def disabled(cls) -> ExitPolicy:
        return cls(enabled=False)

    def with_overrides(
        self,
        tau: float | None = None,
        k: int | None = None,
        min_layer: int | None = None,
        window: int | None = None,
        disable: bool = False,
    ) -> ExitPolicy:
        """This policy with the given fields replaced (what a CLI flag or a request sets)."""
        if disable:
            return ExitPolicy.disabled()
        base = self if self.enabled else DEFAULT_POLICY
        return ExitPolicy(
            tau=base.tau if tau is None else tau,
            k=base.k if k is None else k,
            min_layer=base.min_layer if min_layer is None else min_layer,
            window=base.window if window is None else window,
        )

    def validate_for(self, num_layers: int) -> ExitPolicy:
        """Check depth-dependent fields against a model with ``num_layers`` layers."""
        if self.enabled and self.min_layer is not None and not 1 <= self.min_layer <= num_layers:
            raise ValueError(f"min_layer must be in 1..{num_layers} for this model, got {self.min_layer}")
        return self

    def describe(self) -> str:
        if not self.enabled:
            return "no exit"
        rule = f"{self.k} of last {self.window}" if self.window else f"K={self.k}"
        return f"tau={self.tau:g}, {rule}, min_layer={self.min_layer or 1}"

    # ---- the rule, applied one layer at a time ----------------------------------------------

    def rule(self) -> list[float]:
        """This policy as one row of a rules tensor: ``[tau, k, min_layer, window]``. Rows of one
        batch may hold different policies (one per request). A disabled policy has ``tau = inf``:
        nothing is ever stable, so nothing exits."""
        if not self.enabled:
            return [math.inf, 1.0, 1.0, 0.0]
        return [float(self.tau), float(self.k), float(self.min_layer or 1), float(self.window or 0)]

    def rules(self, count: int) -> torch.Tensor:
        return torch.tensor([self.rule()], dtype=torch.float32).expand(count, RULE_WIDTH).contiguous()

    def exit_layers(self, stabilities: torch.Tensor) -> torch.Tensor:
        """Exit layer (1..L) of each token from its stabilities ``[tokens, L]`` (column ``l-1`` holds
        ``s_l``; column 0 is ignored). Used by analysis tools on recorded stabilities."""
        return exit_layers(stabilities, self.rules(stabilities.shape[0]))


def exit_layers(stabilities: torch.Tensor, rules: torch.Tensor) -> torch.Tensor:
    """Exit layer (1..L) of each row from its stabilities ``[rows, L]`` under its own rule
    (``rules[rows, RULE_WIDTH]``): :func:`decide` applied layer by layer, exactly as the runtime
    does. Calibration sweeps many policies at once by stacking (policy, token) pairs as rows."""
    rows, num_layers = stabilities.shape
    exit_at = torch.full((rows,), num_layers, dtype=torch.long)
    state = torch.zeros(rows, dtype=torch.long)
    decided = torch.zeros(rows, dtype=torch.bool)
    for layer in range(2, num_layers + 1):
        state, exits = decide(layer, stabilities[:, layer - 1].cpu(), state, rules)
        exit_at[exits & ~decided] = layer
        decided |= exits
    return exit_at


RULE_WIDTH = 4


def decide(layer: int, stabilities: torch.Tensor, state: torch.Tensor, rules: torch.Tensor):
    """Apply each row's rule after layer ``layer`` (1-based, ``>= 2``) given that layer's
    stabilities ``s_l`` (``[n]``). ``state`` is the patience counter, or for window rules the bit
    history of recent stable flags. Returns the new state and the bool mask of rows that exit."""
    tau, k, min_layer, window = rules.unbind(dim=1)
    stable = stabilities > tau
    patience = torch.where(stable, state + 1, torch.zeros_like(state))
    new_state, count = patience, patience
    windowed = window > 0
    if bool(windowed.any()):
        bits = window.long()
        history = ((state << 1) | stable.long()) & ((1 << bits) - 1)
        new_state = torch.where(windowed, history, patience)
        count = torch.where(windowed, _popcount(history, int(bits.max())), patience)
    exits = (count >= k) & (layer >= min_layer)
    return new_state, exits


def stability(hidden: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Per-token cosine between adjacent layers' hidden states, computed in float32."""
    return F.cosine_similarity(hidden.float(), previous.float(), dim=-1)


def _popcount(bits: torch.Tensor, width: int) -> torch.Tensor:
    count = torch.zeros_like(bits)
    for shift in range(width):
        count += (bits >> shift) & 1
    return count


DEFAULT_POLICY = ExitPolicy(tau=0.99, k=3)
"""Conservative default: on SmolLM2-135M it keeps about 98% agreement with the full model
(DESIGN §6). Calibrated per-model defaults replace it once `sedac calibrate` has run."""
