"""The SEDAC V7 exit rule, and nothing else.

Layers are numbered 1..L; ``h_l`` is the output of layer ``l`` and ``h_0`` the embedding.
Stability of a token at layer ``l >= 2`` is ``s_l = cos(h_l, h_{l-1})``, per token.

* Patience rule: ``c_l = c_{l-1} + 1`` if ``s_l > tau`` else ``0`` (``c_1 = 0``). The token exits
  after the first layer ``l`` with ``c_l >= k`` and ``l >= min_layer``; its logits are then
  ``lm_head(final_norm(h_l))`` and it has executed ``l`` layers.
* Window rule (optional): exit after the first layer ``l >= min_layer`` where at least ``k`` of the
  last ``window`` stabilities (``s_{l-window+1}..s_l``, counting only ``l >= 2``) exceed ``tau``.

* Probe gate (optional): ``probe`` is a threshold on a learned exit probe's score at layer ``l``
  (:mod:`sedac_ray.exit.probes`, an O(d) logistic classifier predicting that the read-out at ``l``
  equals the full model's token). With ``tau`` set, a token exits where the stability rule AND the
  probe both say so; with ``tau=None`` the probe alone decides (from ``min_layer`` on).

A token that never meets the rule executes all ``L`` layers. The per-token state is one integer:
the patience counter, or a bit history of recent stable flags for the window rule. It is all a
pipeline stage must pass on for the next stage to continue the rule (the probe needs no state).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ExitPolicy:
    """``ExitPolicy(tau, k=3, min_layer=None, window=None, probe=None)``; ``ExitPolicy.disabled()``
    never exits. ``tau=None`` with a ``probe`` threshold is a probe-only policy.

    The runtime applies policies as rows of a rules tensor (:meth:`rules`, :func:`decide`), so one
    batch can mix requests with different policies."""

    tau: float | None = 1.0
    k: int = 3
    min_layer: int | None = None
    window: int | None = None
    enabled: bool = True
    probe: float | None = None

    def __post_init__(self) -> None:
        if not self.enabled:
            return
        if self.probe is not None and (
            not isinstance(self.probe, (int, float)) or math.isnan(self.probe) or not 0.0 < self.probe < 1.0
        ):
            raise ValueError(f"probe must be a threshold in (0, 1), got {self.probe!r}")
        if self.tau is None and self.probe is None:
            raise ValueError("tau may be None only for a probe policy: set tau, or probe, or disable exits")
        if self.tau is not None and (
            not isinstance(self.tau, (int, float)) or math.isnan(self.tau) or not 0.0 < self.tau <= 1.0
        ):
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
        probe: float | None = None,
    ) -> ExitPolicy:
        """This policy with the given fields replaced (what a CLI flag or a request sets). From a
        disabled policy (no calibrated default), only ``tau`` or ``probe`` turns exits on."""
        if disable:
            return ExitPolicy.disabled()
        if not self.enabled:
            if tau is None and probe is None:
                if k is None and min_layer is None and window is None:
                    return self
                raise ValueError(
                    "exits are off for this model (no calibrated policy): set tau (or a probe threshold) "
                    "along with k, min_layer or window"
                )
            base = ExitPolicy(tau=tau, probe=probe)
        else:
            base = self
        return ExitPolicy(
            tau=base.tau if tau is None else tau,
            k=base.k if k is None else k,
            min_layer=base.min_layer if min_layer is None else min_layer,
            window=base.window if window is None else window,
            probe=base.probe if probe is None else probe,
        )

    def validate_for(self, num_layers: int) -> ExitPolicy:
        """Check depth-dependent fields against a model with ``num_layers`` layers."""
        if self.enabled and self.min_layer is not None and not 1 <= self.min_layer <= num_layers:
            raise ValueError(f"min_layer must be in 1..{num_layers} for this model, got {self.min_layer}")
        return self

    def describe(self) -> str:
        if not self.enabled:
            return "no exit"
        parts = []
        if self.tau is not None:
            rule = f"{self.k} of last {self.window}" if self.window else f"K={self.k}"
            parts.append(f"tau={self.tau:g}, {rule}")
        if self.probe is not None:
            parts.append(f"probe>={self.probe:g}")
        return ", ".join(parts) + f", min_layer={self.min_layer or 1}"

    # ---- the rule, applied one layer at a time ----------------------------------------------

    def rule(self) -> list[float]:
        """This policy as one row of a rules tensor: ``[tau, k, min_layer, window, probe]``. Rows of
        one batch may hold different policies (one per request). A disabled policy has
        ``tau = inf``: nothing is ever stable, so nothing exits (stages rely on column 0 alone to
        switch a row off). A probe-only policy has ``tau = -inf, k = 1``: every layer is "stable";
        ``probe = inf`` means no probe gate."""
        if not self.enabled:
            return [math.inf, 1.0, 1.0, 0.0, math.inf]
        tau, k = (-math.inf, 1) if self.tau is None else (float(self.tau), self.k)
        probe = math.inf if self.probe is None else float(self.probe)
        return [tau, float(k), float(self.min_layer or 1), float(self.window or 0), probe]

    def rules(self, count: int) -> torch.Tensor:
        return torch.tensor([self.rule()], dtype=torch.float32).expand(count, RULE_WIDTH).contiguous()

    @property
    def uses_probe(self) -> bool:
        return self.enabled and self.probe is not None

    def exit_layers(
        self, stabilities: torch.Tensor, probe_scores: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Exit layer (1..L) of each token from its stabilities ``[tokens, L]`` (column ``l-1`` holds
        ``s_l``; column 0 is ignored) and, for probe policies, its probe scores ``[tokens, L]``.
        Used by analysis tools on recorded features."""
        return exit_layers(stabilities, self.rules(stabilities.shape[0]), probe_scores)


def exit_layers(
    stabilities: torch.Tensor, rules: torch.Tensor, probe_scores: torch.Tensor | None = None
) -> torch.Tensor:
    """Exit layer (1..L) of each row from its stabilities ``[rows, L]`` (and probe scores, same
    shape) under its own rule (``rules[rows, RULE_WIDTH]``): :func:`decide` applied layer by
    layer, exactly as the runtime does. Calibration sweeps many policies at once by stacking
    (policy, token) pairs as rows."""
    rows, num_layers = stabilities.shape
    exit_at = torch.full((rows,), num_layers, dtype=torch.long)
    state = torch.zeros(rows, dtype=torch.long)
    decided = torch.zeros(rows, dtype=torch.bool)
    for layer in range(2, num_layers + 1):
        scores = None if probe_scores is None else probe_scores[:, layer - 1].cpu()
        state, exits = decide(layer, stabilities[:, layer - 1].cpu(), state, rules, scores)
        exit_at[exits & ~decided] = layer
        decided |= exits
    return exit_at


RULE_WIDTH = 5


def rules_use_probe(rules: torch.Tensor) -> bool:
    """Whether any enabled row of ``rules`` gates its exits on a probe score."""
    return bool(((rules[:, 0] <= 1.0) & (rules[:, 4] <= 1.0)).any())


def decide(
    layer: int,
    stabilities: torch.Tensor,
    state: torch.Tensor,
    rules: torch.Tensor,
    probe_scores: torch.Tensor | None = None,
):
    """Apply each row's rule after layer ``layer`` (1-based, ``>= 2``) given that layer's
    stabilities ``s_l`` (``[n]``) and, for rows with a probe gate, probe scores (``[n]``).
    ``state`` is the patience counter, or for window rules the bit history of recent stable
    flags. Returns the new state and the bool mask of rows that exit."""
    tau, k, min_layer, window, probe = rules.unbind(dim=1)
    stable = stabilities > tau
    patience = torch.where(stable, state + 1, torch.zeros_like(state))
    new_state, count = patience, patience
    windowed = window > 0
    if bool(windowed.any()):
        bits = window.long()
        history = ((state << 1) | stable.long()) & ((1 << bits) - 1)
        new_state = torch.where(windowed, history, patience)
        count = torch.where(windowed, _popcount(history, int(bits.max())), patience)
    exits = (count >= k) & (layer >= min_layer) & (tau <= 1.0)
    gated = probe <= 1.0
    if bool((gated & exits).any()):
        if probe_scores is None:
            raise ValueError(
                "a rule uses an exit probe but no probe scores were given (load the model's probes)"
            )
        exits &= ~gated | (probe_scores >= probe)
    return new_state, exits


def stability(hidden: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Per-token cosine between adjacent layers' hidden states, computed in float32."""
    return F.cosine_similarity(hidden.float(), previous.float(), dim=-1)


def _popcount(bits: torch.Tensor, width: int) -> torch.Tensor:
    count = torch.zeros_like(bits)
    for shift in range(width):
        count += (bits >> shift) & 1
    return count


DEFAULT_POLICY = ExitPolicy.disabled()
"""No exit. An uncalibrated rule damages text (on SmolLM2-135M, tau=0.99, K=3 turned "The three
primary colors are" into garbage), so exits are on only where a calibration file for the model and
dtype says a policy holds its quality (:mod:`sedac_ray.exit.store`), or where the caller asks."""
