"""The structural view of a Hugging Face causal LM that the runtime drives layer by layer.

Every call into Hugging Face modules lives here. Parts are found by structure, never by class
name: ``get_decoder()``, ``get_input_embeddings()``, ``get_output_embeddings()``, the decoder's
single ``ModuleList`` of layers, its rotary module (a child whose ``forward`` takes
``position_ids``), and its one remaining parametrised child, the final norm. A pipeline part
(:mod:`sedac_ray.model.parts`) holds only some of these; the others are :class:`NotHeld`
placeholders, which raise if used, and the adapter reads sizes from the config. Layers are called
with their own public signature and an engine-owned cache object, so per-architecture details
(Gemma's extra norms, Phi3's fused QKV, Qwen3's Q/K norms) stay inside the layer's own modules.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn


class UnsupportedArchitecture(ValueError):
    """The model does not have the structure the runtime needs."""


class KVWritten(Exception):
    """Raised by a fill-only cache view once a layer has stored its K/V: the rest of the layer
    (attention, MLP) is skipped. This is state propagation without touching the model's code."""


class NotHeld(nn.Module):
    """Stands in for a module whose weights this process does not hold (a pipeline part loads
    only its own pieces): it has no parameters, and calling it is a bug that says so."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def forward(self, *args, **kwargs):
        raise RuntimeError(
            f"{self.what} is not held by this process: it loaded only its own part of the model"
        )


class ReleasedLayer(NotHeld):
    """A decoder layer this process does not hold."""

    def __init__(self, index: int):
        super().__init__(f"decoder layer {index}")
        self.index = index


class ModelAdapter:
    """Embedding, decoder layers, final norm, LM head, rotary embedding and masks of one model."""

    def __init__(self, model: nn.Module, verify: bool = True):
        name = type(model).__name__
        if not all(hasattr(model, a) for a in ("config", "get_decoder", "get_output_embeddings")):
            raise UnsupportedArchitecture(f"{name} is not a Hugging Face causal LM (no get_decoder()).")
        self.model = model
        self.config = model.config
        self.decoder = model.get_decoder()
        self.embed = model.get_input_embeddings()
        self.head = model.get_output_embeddings()
        if self.embed is None or self.head is None:
            raise UnsupportedArchitecture(f"{name} has no input or output embeddings.")
        self.layers = self._find_layers(name)
        self.num_layers = len(self.layers)
        self.rotary, self._rotary_takes_layer_type = self._find_rotary(name)
        self.norm = self._find_final_norm(name)
        self.logit_softcap = getattr(self.config, "final_logit_softcapping", None)
        self.layer_types = self._layer_types()
        self.sliding_windows = [self._sliding_window(t) for t in self.layer_types]
        # sdpa applies causality itself when given no mask; eager attention needs an explicit one.
        self.implicit_causal = getattr(self.config, "_attn_implementation", None) == "sdpa"
        if verify:
            self.verify()

    # ---- structure discovery -------------------------------------------------------------

    def _find_layers(self, name: str) -> nn.ModuleList:
        lists = [m for m in self.decoder.children() if isinstance(m, nn.ModuleList) and len(m) > 0]
        if len(lists) != 1:
            raise UnsupportedArchitecture(
                f"{name}: expected one ModuleList of decoder layers in {type(self.decoder).__name__}, "
                f"found {len(lists)}."
            )
        return lists[0]

    def _find_rotary(self, name: str) -> tuple[nn.Module, bool]:
        for child in self.decoder.children():
            params = inspect.signature(child.forward).parameters
            if "position_ids" in params and child is not self.layers:
                return child, "layer_type" in params
        raise UnsupportedArchitecture(
            f"{name}: no rotary position module found in the decoder (a child whose forward takes "
            "position_ids). Models with absolute position embeddings (GPT-2 style) are not supported."
        )

    def _find_final_norm(self, name: str) -> nn.Module:
        skip = {id(self.embed), id(self.layers), id(self.rotary)}
        candidates = [
            child
            for child in self.decoder.children()
            if id(child) not in skip
            and (isinstance(child, NotHeld) or any(True for _ in child.parameters(recurse=True)))
        ]
        if len(candidates) != 1:
            found = [type(c).__name__ for c in candidates]
            raise UnsupportedArchitecture(
                f"{name}: expected one final norm beside the embeddings and layers, found {found}."
            )
        return candidates[0]

    def _layer_types(self) -> list[str]:
        types = getattr(self.config, "layer_types", None)
        if types:
            return list(types)[: self.num_layers]
        # Without per-layer types, a configured window applies to every layer (Mistral, Phi3).
        window = getattr(self.config, "sliding_window", None)
        return ["sliding_attention" if window else "full_attention"] * self.num_layers

    def _sliding_window(self, layer_type: str) -> int | None:
        if layer_type == "sliding_attention":
            return int(self.config.sliding_window)
        if layer_type != "full_attention":
            raise UnsupportedArchitecture(f"layer type {layer_type!r} is not supported.")
        return None

    # ---- the pieces the runtime calls ----------------------------------------------------

    # Read from what this process holds (any part holds at least one weight) and the config,
    # never from one named piece, which a partial model may lack.
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.model.parameters() if p.is_floating_point())

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def is_partial(self) -> bool:
        """Whether some pieces are not held (a pipeline stage, the head, or released layers)."""
        return any(isinstance(m, NotHeld) for m in self.model.modules())

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    @property
    def max_context(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 0) or 1 << 30)

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(token_ids)

    def position_embeddings(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict[str, object]:
        """Rotary (cos, sin) for ``position_ids``, per distinct layer type."""
        if not self._rotary_takes_layer_type:
            shared = self.rotary(hidden, position_ids)
            return dict.fromkeys(set(self.layer_types), shared)
        return {t: self.rotary(hidden, position_ids, t) for t in set(self.layer_types)}

    def run_layer(self, index: int, hidden, position_ids, position_embeddings, attention_mask, cache):
        out = self.layers[index](
            hidden,
            attention_mask=attention_mask,
            position_ids=position_ids,
            position_embeddings=position_embeddings,
            cache=cache,
            use_cache=True,
        )
        return out[0] if isinstance(out, tuple) else out

    def fill_layer_kv(self, index: int, hidden, position_ids, position_embeddings, cache) -> None:
        """Store layer ``index``'s K/V for ``hidden`` without running its attention or MLP."""
        try:
            self.run_layer(index, hidden, position_ids, position_embeddings, None, cache)
        except KVWritten:
            return
        raise UnsupportedArchitecture(f"decoder layer {index} never wrote to the cache it was given.")

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.norm(hidden))
        if self.logit_softcap:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits

    # ---- self-check ----------------------------------------------------------------------

    def verify(self) -> None:
        """The load-time self-check, :func:`sedac_ray.runtime.check.check_adapter`.

        Transitional: the check drives layers through the runtime, which the model package must
        not import, so callers should call ``check_adapter`` themselves; this (and
        ``ModelAdapter(model, verify=True)``) stays until engine and serving do."""
        from sedac_ray.runtime.check import check_adapter

        check_adapter(self)
