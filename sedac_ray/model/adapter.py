"""The structural view of a Hugging Face causal LM that the runtime drives layer by layer.

Every call into Hugging Face modules lives here. Parts are found by structure, never by class
name: ``get_decoder()``, ``get_input_embeddings()``, ``get_output_embeddings()``, the decoder's
single ``ModuleList`` of layers, its rotary module (a child whose ``forward`` takes
``position_ids``), and its one remaining parametrised child, the final norm. Layers are called
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


class ReleasedLayer(nn.Module):
    """Stands in for a decoder layer whose weights this process gave up (a pipeline stage holds
    only its own layers); running it is a bug, and says so."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"decoder layer {self.index} was released: this process does not hold it")


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
            if id(child) not in skip and any(True for _ in child.parameters(recurse=True))
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

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def hidden_size(self) -> int:
        return int(self.embed.weight.shape[1])

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

    def release_layers(self, keep: range) -> int:
        """Drop the decoder layers outside ``keep`` so their weights are freed: a pipeline stage
        runs only its own range, and the LM head none. Returns how many were dropped. Afterwards
        the model's own forward (and :meth:`verify`) no longer work."""
        dropped = 0
        for index in range(self.num_layers):
            if index not in keep and not isinstance(self.layers[index], ReleasedLayer):
                self.layers[index] = ReleasedLayer(index)
                dropped += 1
        if dropped and self.device.type == "cuda":
            torch.cuda.empty_cache()  # hand the freed blocks back, for the KV cache and others
        return dropped

    # ---- self-check ----------------------------------------------------------------------

    @torch.inference_mode()
    def verify(self, num_tokens: int = 6) -> None:
        """Run a few tokens through the adapter's pieces and through the model's own forward, and
        insist they agree: any structure we misread fails here, loudly, at load time."""
        from sedac_ray.runtime.layer_range import LayerRange

        vocab = int(self.embed.weight.shape[0])
        ids = (torch.arange(num_tokens) * 7919 % vocab).unsqueeze(0)
        reference = self.model(input_ids=ids.to(self.device), use_cache=False).logits
        layers = LayerRange(self, 0, self.num_layers)
        slots = torch.tensor(layers.cache.allocate(1))
        hidden = layers.prefill(
            slots, torch.arange(num_tokens).unsqueeze(0), self.embed_tokens(ids.to(self.device))
        )
        ours = self.logits(hidden)
        tolerance = 1e-3 if self.dtype == torch.float32 else 5e-2
        error = (ours.float() - reference.float()).abs().max().item()
        scale = reference.float().abs().max().item() + 1e-6
        if not error <= tolerance * max(1.0, scale):
            raise UnsupportedArchitecture(
                f"{type(self.model).__name__}: running the decoder layer by layer does not reproduce the "
                f"model's own logits (max abs difference {error:.3g}); this architecture does something "
                "outside its embedding, layers, final norm and head that sedac-ray cannot see."
            )
