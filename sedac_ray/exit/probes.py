"""Learned exit probes: per layer, a logistic classifier that predicts "the read-out at this layer
already equals the full model's token", from features that need no head call.

Features of a token after layer ``l`` (``h_l`` its output, ``h_{l-1}`` its input):

* ``x = h_l / rms(h_l)``: the normalised hidden state (what the final norm sees), ``D`` numbers;
* ``s_l = cos(h_l, h_{l-1})``: the V7 stability;
* ``log(|h_l - h_{l-1}| / |h_l|)``: the relative size of the layer's update.

Score ``p_l = sigmoid(x . w_l + [s_l, u_l] . e_l + b_l)``: O(D) per token and layer, and it needs
nothing but the layer's input and output, so a pipeline stage computes it with no extra state.
A policy gates exits on ``p_l >= probe`` (:class:`~sedac_ray.policy.ExitPolicy`); the weights live
beside the model's calibration file (``<model>.<dtype>.probes.safetensors``).

Fitting (:func:`fit_probes`) is L2-regularised logistic regression per layer on standardised
features, by a few L-BFGS steps; the standardisation is folded into the stored weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

EXTRA_FEATURES = 2  # stability, log relative update size


def probe_features(hidden: torch.Tensor, previous: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [n, D], extra [n, 2])`` of tokens whose layer turned ``previous`` into ``hidden``, in
    float32."""
    h, p = hidden.float(), previous.float()
    x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    stability = torch.nn.functional.cosine_similarity(h, p, dim=-1)
    update = ((h - p).norm(dim=-1) / (h.norm(dim=-1) + 1e-6) + 1e-6).log()
    return x, torch.stack([stability, update], dim=-1)


class ExitProbes:
    """``weight [L, D]``, ``extra [L, 2]``, ``bias [L]``: the probe of layer ``l`` is row ``l - 1``.
    Layers without a probe (``fitted[l-1]`` false) score 0: they never pass a probe gate."""

    def __init__(self, weight: torch.Tensor, extra: torch.Tensor, bias: torch.Tensor, fitted: torch.Tensor):
        num_layers = weight.shape[0]
        if (
            extra.shape != (num_layers, EXTRA_FEATURES)
            or bias.shape != (num_layers,)
            or fitted.shape != (num_layers,)
        ):
            raise ValueError("exit probe tensors disagree on the number of layers")
        self.weight, self.extra, self.bias = weight.float(), extra.float(), bias.float()
        self.fitted = fitted.bool()

    @property
    def num_layers(self) -> int:
        return int(self.weight.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[1])

    def to(self, device) -> ExitProbes:
        return ExitProbes(self.weight.to(device), self.extra.to(device), self.bias.to(device), self.fitted)

    def score(self, layer: int, hidden: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """Probe scores ``[n]`` (CPU, float32) after layer ``layer`` (1-based)."""
        if not self.fitted[layer - 1]:
            return torch.zeros(hidden.shape[0])
        x, extra = probe_features(hidden, previous)
        logit = x @ self.weight[layer - 1] + extra @ self.extra[layer - 1] + self.bias[layer - 1]
        return torch.sigmoid(logit).cpu()

    def scores(self, hidden: torch.Tensor, embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """Scores ``[N, L]`` of recorded layer outputs ``hidden[N, L, D]`` (``h_1..h_L``); column 0
        (layer 1, whose input is the embedding) is 0 unless ``embeddings`` ``[N, D]`` is given."""
        out = torch.zeros(hidden.shape[0], hidden.shape[1])
        if embeddings is not None:
            out[:, 0] = self.score(1, hidden[:, 0], embeddings)
        for layer in range(2, hidden.shape[1] + 1):
            out[:, layer - 1] = self.score(layer, hidden[:, layer - 1], hidden[:, layer - 2])
        return out

    # ---- storage ----------------------------------------------------------------------------

    def save(self, path: str | Path, metadata: dict | None = None) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "weight": self.weight.cpu().contiguous(),
            "extra": self.extra.cpu().contiguous(),
            "bias": self.bias.cpu().contiguous(),
            "fitted": self.fitted.to(torch.uint8).cpu().contiguous(),
        }
        save_file(
            tensors, str(path), metadata={"sedac": json.dumps({"kind": "exit-probes", **(metadata or {})})}
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> ExitProbes:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"exit probe file {path} does not exist (run: sedac calibrate --probes)")
        with safe_open(str(path), framework="pt") as handle:
            info = json.loads((handle.metadata() or {}).get("sedac", "{}"))
        if info.get("kind") != "exit-probes":
            raise ValueError(f"{path} is not a sedac-ray exit probe file")
        t = load_file(str(path))
        return cls(t["weight"], t["extra"], t["bias"], t["fitted"].bool())


def probe_labels(readout_tokens: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``[N, L]`` bool: the read-out after layer ``l`` equals the full model's token."""
    return readout_tokens == reference.unsqueeze(1)


def fit_probes(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    layers: list[int] | None = None,
    l2: float = 1e-2,
    steps: int = 60,
) -> ExitProbes:
    """Fit the probe of each layer in ``layers`` (default ``2..L-1``) on recorded outputs
    ``hidden[N, L, D]`` and ``labels[N, L]`` (:func:`probe_labels`). ``l2`` is the penalty on the
    standardised weights per training token. A layer whose labels are all equal gets a constant
    probe (its bias the log-odds, clamped)."""
    tokens, num_layers, width = hidden.shape
    layers = list(range(2, num_layers)) if layers is None else layers
    weight = torch.zeros(num_layers, width)
    extra = torch.zeros(num_layers, EXTRA_FEATURES)
    bias = torch.zeros(num_layers)
    fitted = torch.zeros(num_layers, dtype=torch.bool)
    for layer in layers:
        if not 2 <= layer <= num_layers:
            raise ValueError(f"probe layer {layer} is outside 2..{num_layers}")
        x, more = probe_features(hidden[:, layer - 1], hidden[:, layer - 2])
        features = torch.cat([x, more], dim=1).double()
        y = labels[:, layer - 1].double()
        w, b = _logistic(features, y, l2, steps)
        weight[layer - 1], extra[layer - 1], bias[layer - 1] = w[:width].float(), w[width:].float(), float(b)
        fitted[layer - 1] = True
    return ExitProbes(weight, extra, bias, fitted)


def _logistic(features: torch.Tensor, y: torch.Tensor, l2: float, steps: int) -> tuple[torch.Tensor, float]:
    """L2-regularised logistic regression on standardised features; returns weights and bias on
    the raw features."""
    rate = float(y.mean())
    if rate in (0.0, 1.0):
        return torch.zeros(features.shape[1], dtype=features.dtype), 12.0 if rate else -12.0
    mean, std = features.mean(0), features.std(0).clamp(min=1e-6)
    z = (features - mean) / std
    w = torch.zeros(z.shape[1], dtype=z.dtype, requires_grad=True)
    b = torch.tensor(float(torch.logit(torch.tensor(rate))), dtype=z.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def loss_fn():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(loss_fn)
    w_raw = (w / std).detach()
    return w_raw, float(b.detach() - (w.detach() * mean / std).sum())
