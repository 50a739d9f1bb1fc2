"""An analysis hook: watch stability on any HF model during its ordinary forward or ``generate``.

``StabilityObserver`` registers a forward hook on every decoder layer (the design's hook
mechanism, with no monkey patching) and records, for each forward call, every token's
stability ``s_l`` at every layer and the layer where the exit policy would stop it. It only
reads outputs, so the model's results are unchanged; ``detach()`` removes every hook.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sedac_ray.model.adapter import ModelAdapter
from sedac_ray.policy import DEFAULT_POLICY, ExitPolicy, stability


@dataclass
class ForwardRecord:
    """One forward call: ``stabilities[b, t, l-1]`` is ``s_l`` of token ``t`` in row ``b`` (NaN at
    ``l = 1``); ``exit_layers[b, t]`` is where the policy would exit it (``L`` if never)."""

    stabilities: torch.Tensor
    exit_layers: torch.Tensor


class StabilityObserver:
    def __init__(self, model: torch.nn.Module, policy: ExitPolicy | None = None):
        layers = ModelAdapter(model, verify=False).layers
        self.num_layers = len(layers)
        self.policy = (policy or DEFAULT_POLICY).validate_for(self.num_layers)
        self.records: list[ForwardRecord] = []
        self._previous: torch.Tensor | None = None
        self._current: list[torch.Tensor] = []
        self._handles = [layer.register_forward_pre_hook(self._before_first) for layer in layers[:1]]
        self._handles += [layer.register_forward_hook(self._after_layer) for layer in layers]

    def _before_first(self, module, args) -> None:
        self._previous, self._current = None, []

    def _after_layer(self, module, args, output) -> None:
        hidden = (output[0] if isinstance(output, tuple) else output).detach()
        if self._previous is None:
            self._current.append(torch.full(hidden.shape[:-1], float("nan")))
        else:
            self._current.append(stability(hidden, self._previous).cpu())
        self._previous = hidden
        if len(self._current) == self.num_layers:
            stabilities = torch.stack(self._current, dim=-1)
            rows, tokens, num_layers = stabilities.shape
            exits = self.policy.exit_layers(stabilities.reshape(-1, num_layers)).reshape(rows, tokens)
            self.records.append(ForwardRecord(stabilities=stabilities, exit_layers=exits))
            self._previous, self._current = None, []

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> StabilityObserver:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()
