"""The structural adapter on every supported architecture, and its refusals."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from sedac_ray.model.adapter import ModelAdapter, UnsupportedArchitecture
from tests.conftest import TINY_CONFIGS


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_tiny_architectures_are_split_structurally(arch):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[arch]()).eval()
    adapter = ModelAdapter(model)  # verify=True: layer-by-layer logits must equal model(...).logits
    assert adapter.num_layers == model.config.num_hidden_layers
    assert adapter.embed is model.get_input_embeddings()
    assert adapter.head is model.get_output_embeddings()
    assert adapter.layers is model.get_decoder().layers


def test_sliding_window_layers_are_read_from_config():
    gemma2 = AutoModelForCausalLM.from_config(TINY_CONFIGS["gemma2"]())
    assert ModelAdapter(gemma2).sliding_windows == [8, None] * 3
    mistral = AutoModelForCausalLM.from_config(TINY_CONFIGS["mistral"]())
    assert ModelAdapter(mistral).sliding_windows == [8] * 6


def test_real_model_adapter(smollm2):
    adapter = ModelAdapter(smollm2.model)
    assert adapter.num_layers == 30 and adapter.hidden_size == 576
    assert type(adapter.norm).__name__.endswith("RMSNorm")


def test_absolute_position_models_fail_clearly():
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64)
    with pytest.raises(UnsupportedArchitecture, match="rotary"):
        ModelAdapter(AutoModelForCausalLM.from_config(config))


def test_non_causal_lm_fails_clearly():
    with pytest.raises(UnsupportedArchitecture, match="not a Hugging Face causal LM"):
        ModelAdapter(torch.nn.Linear(2, 2))


def test_verification_catches_what_the_adapter_cannot_see():
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS["llama"]()).eval()
    # A hook that changes the decoder's output outside any layer: invisible to a layer-by-layer run.
    model.get_decoder().register_forward_hook(
        lambda module, args, out: out.__class__(last_hidden_state=out[0] * 2)
    )
    with pytest.raises(UnsupportedArchitecture, match="does not reproduce"):
        ModelAdapter(model)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_released_layers_free_their_weights_and_the_kept_range_runs_unchanged(arch):
    from sedac_ray.runtime.layer_range import LayerRange

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[arch]()).eval()
    adapter = ModelAdapter(model)
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    positions = torch.arange(ids.shape[1]).unsqueeze(0)

    def run(start: int, end: int, hidden: torch.Tensor) -> torch.Tensor:
        layers = LayerRange(adapter, start, end)
        with torch.inference_mode():
            return layers.prefill(torch.tensor(layers.cache.allocate(1)), positions, hidden)

    with torch.inference_mode():
        entering = run(0, 2, adapter.embed_tokens(ids))
    before = run(2, 4, entering)
    kept = sum(p.numel() for index in (2, 3) for p in adapter.layers[index].parameters())

    assert adapter.release_layers(range(2, 4)) == adapter.num_layers - 2
    assert sum(p.numel() for p in adapter.layers.parameters()) == kept
    assert torch.equal(run(2, 4, entering), before)
    with pytest.raises(RuntimeError, match="decoder layer 0 is not held"):
        run(0, 2, entering)
    assert adapter.release_layers(range(2, 4)) == 0
