"""The load-time self-check of a :class:`ModelAdapter`: running the model piece by piece through
the runtime must reproduce the model's own forward. Any structure the adapter misread (a step
outside the embedding, layers, final norm and head) fails here, loudly, at load time.

A whole model is checked directly. A part of a model (a pipeline stage or the head) cannot run
the model's own forward, so the same check runs on a small twin of the same architecture, built
from the part's config with random weights: the structure is a property of the architecture, not
of the weights or the depth. Whether the part's own weights are the right ones is settled by the
loader, which reads every held tensor by its module name and checks its shape.
"""

from __future__ import annotations

import copy

import torch

from sedac_ray.model.adapter import ModelAdapter, UnsupportedArchitecture
from sedac_ray.runtime.layer_range import LayerRange

TWIN_VOCAB = 512  # the twin's vocabulary: the check needs a few token ids, not the real table
TWIN_MLP_WIDTH = 256  # the MLP's inner width changes no structure, only memory


def check_adapter(adapter: ModelAdapter, num_tokens: int = 6) -> None:
    """Check ``adapter`` on its own model when it holds it all, else on a small twin."""
    if adapter.is_partial:
        check_twin(adapter.config, num_tokens)
    else:
        check_whole_model(adapter, num_tokens)


def checked_adapter(model: torch.nn.Module) -> ModelAdapter:
    """``ModelAdapter(model)``, checked: what the engine and every serving part should build."""
    adapter = ModelAdapter(model, verify=False)
    check_adapter(adapter)
    return adapter


@torch.inference_mode()
def check_whole_model(adapter: ModelAdapter, num_tokens: int = 6) -> None:
    """Logits from embedding -> every layer through :class:`LayerRange` -> norm -> head must equal
    the model's own ``forward`` logits."""
    ids = (torch.arange(num_tokens) * 7919 % adapter.vocab_size).unsqueeze(0).to(adapter.device)
    reference = adapter.model(input_ids=ids, use_cache=False).logits
    layers = LayerRange(adapter, 0, adapter.num_layers)
    slots = torch.tensor(layers.cache.allocate(1))
    hidden = layers.prefill(slots, torch.arange(num_tokens).unsqueeze(0), adapter.embed_tokens(ids))
    ours = adapter.logits(hidden)
    tolerance = 1e-3 if adapter.dtype == torch.float32 else 5e-2
    error = (ours.float() - reference.float()).abs().max().item()
    scale = reference.float().abs().max().item() + 1e-6
    if not error <= tolerance * max(1.0, scale):
        raise UnsupportedArchitecture(
            f"{type(adapter.model).__name__}: running the decoder layer by layer does not reproduce the "
            f"model's own logits (max abs difference {error:.3g}); this architecture does something "
            "outside its embedding, layers, final norm and head that sedac-ray cannot see."
        )


def check_twin(config, num_tokens: int = 6) -> None:
    """:func:`check_whole_model` on a float32 CPU model of ``config``'s architecture with as few
    layers as cover every layer type, a small vocabulary and random weights."""
    from transformers import AutoModelForCausalLM

    twin = AutoModelForCausalLM.from_config(twin_config(config)).eval()
    check_whole_model(ModelAdapter(twin, verify=False), num_tokens)


def twin_config(config):
    """``config`` with the fewest layers that still include each of its layer types (sliding and
    full attention, in their order), a small vocabulary and a narrow MLP; attention keeps its
    shape (heads, head size, hidden size), since that is where architectures differ."""
    twin = copy.deepcopy(config)
    types = list(getattr(config, "layer_types", None) or [])
    depth = min(int(config.num_hidden_layers), 2)
    if types:
        depth = max(depth, max(types.index(t) for t in set(types)) + 1)
        twin.layer_types = types[:depth]
    twin.num_hidden_layers = depth
    if int(getattr(config, "intermediate_size", 0) or 0) > TWIN_MLP_WIDTH:
        twin.intermediate_size = TWIN_MLP_WIDTH
    if int(config.vocab_size) > TWIN_VOCAB:
        twin.vocab_size = TWIN_VOCAB
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(twin, name, None)
            if isinstance(value, int) and value >= TWIN_VOCAB:
                setattr(twin, name, None)
    return twin
