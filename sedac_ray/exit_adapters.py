"""Exit adapters: a small per-layer map applied to an exited token's hidden state before the head.

A token that exits after layer ``l < L`` is read out as ``lm_head(final_norm(h_l))``, but the head
was trained on ``h_L``. An exit adapter for layer ``l`` moves ``h_l`` towards where ``h_L`` would be
(the "tuned lens" idea): with ``x = h / rms(h)``,

    h' = x + (x @ down) @ up + bias

a residual affine map, low rank when ``down`` is ``[D, r]`` with ``r < D``. Scaling ``h`` does not
change the head's input (the final norm removes it), so the map works in RMS-normalised space.
Tokens that run all ``L`` layers are never touched. :func:`exit_logits` is the one "hidden state at
exit -> logits" step; the engine calls it for every decode token.

Adapters are fitted on calibration traces (:mod:`sedac_ray.calibration.adapter_fit`) and stored as
one safetensors file next to the model's calibration file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sedac_ray.model.adapter import ModelAdapter


class ExitAdapters:
    """``maps[layer] = (down [D, r], up [r, D], bias [D])`` for some layers ``1..L-1``."""

    def __init__(self, maps: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], num_layers: int):
        for layer in maps:
            if not 1 <= layer < num_layers:
                raise ValueError(f"exit adapter layer {layer} is outside 1..{num_layers - 1}")
        self.maps = dict(sorted(maps.items()))
        self.num_layers = num_layers

    @property
    def layers(self) -> list[int]:
        return list(self.maps)

    def to(self, device, dtype=torch.float32) -> ExitAdapters:
        moved = {
            layer: tuple(t.to(device=device, dtype=dtype) for t in parts)
            for layer, parts in self.maps.items()
        }
        return ExitAdapters(moved, self.num_layers)

    def apply(self, hidden: torch.Tensor, exit_layers: torch.Tensor) -> torch.Tensor:
        """``hidden[n, D]`` of tokens that exited after ``exit_layers[n]``; rows whose layer has an
        adapter are mapped, every other row (including full-depth ones) is returned unchanged."""
        if not len(hidden):
            return hidden
        out = hidden.clone()
        layers = exit_layers.to(hidden.device)
        for layer in torch.unique(layers).tolist():
            parts = self.maps.get(int(layer))
            if parts is None:
                continue
            rows = (layers == layer).nonzero()[:, 0]
            out[rows] = self.map_layer(int(layer), hidden[rows])
        return out

    def map_layer(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        down, up, bias = self.maps[layer]
        x = hidden.to(down.dtype)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (x + (x @ down) @ up + bias).to(hidden.dtype)

    def num_parameters(self) -> int:
        return sum(t.numel() for parts in self.maps.values() for t in parts)

    # ---- storage ----------------------------------------------------------------------------

    def save(self, path: str | Path, metadata: dict | None = None, dtype=torch.float16) -> Path:
        """One safetensors file; float16 by default (half the size; the maps are small corrections)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for layer, parts in self.maps.items():
            for name, tensor in zip(("down", "up", "bias"), parts, strict=True):
                tensors[f"{layer}.{name}"] = tensor.detach().to("cpu", dtype).contiguous()
        info = {"num_layers": self.num_layers, **(metadata or {})}
        save_file(tensors, str(path), metadata={"sedac": json.dumps(info)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> ExitAdapters:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"exit adapter file {path} does not exist")
        with safe_open(str(path), framework="pt") as handle:
            info = json.loads((handle.metadata() or {}).get("sedac", "{}"))
        if "num_layers" not in info:
            raise ValueError(f"{path} is not a sedac-ray exit adapter file (no 'sedac' metadata)")
        tensors = load_file(str(path))
        layers = sorted({int(name.split(".")[0]) for name in tensors})
        maps = {
            layer: tuple(tensors[f"{layer}.{name}"].float() for name in ("down", "up", "bias"))
            for layer in layers
        }
        return cls(maps, int(info["num_layers"]))


def exit_logits(
    adapter: ModelAdapter,
    hidden: torch.Tensor,
    exit_layers: torch.Tensor,
    exit_adapters: ExitAdapters | None = None,
) -> torch.Tensor:
    """Logits of tokens whose hidden states ``hidden[n, D]`` left the model after ``exit_layers[n]``
    layers: the exit adapter of that layer (if any), then final norm and LM head."""
    if exit_adapters is not None:
        hidden = exit_adapters.apply(hidden, exit_layers)
    return adapter.logits(hidden)
