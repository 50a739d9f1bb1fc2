"""The structural adapter on every supported architecture, and its refusals."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from sedac_ray.model.adapter import ModelAdapter, UnsupportedArchitecture
from sedac_ray.runtime.check import checked_adapter
from tests.conftest import TINY_CONFIGS


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_tiny_architectures_are_split_structurally(arch):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[arch]()).eval()
    adapter = checked_adapter(model)  # layer-by-layer logits must equal model(...).logits
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


def test_partial_model_is_checked_on_a_small_twin_of_its_architecture(monkeypatch):
    """A part cannot run the model's own forward, so the check runs on a twin built from its config:
    a step outside the layers that the adapter cannot see must still fail the part's check."""
    from sedac_ray.model.parts import ModelPart, restrict
    from sedac_ray.runtime.check import check_adapter

    model = AutoModelForCausalLM.from_config(TINY_CONFIGS["llama"]()).eval()
    adapter = ModelAdapter(restrict(model, ModelPart(range(2, 4))), verify=False)
    assert adapter.is_partial
    check_adapter(adapter)  # the twin agrees with itself layer by layer
    decoder_class = type(model.get_decoder())
    forward = decoder_class.forward

    def doubled(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        return out.__class__(last_hidden_state=out[0] * 2)

    monkeypatch.setattr(decoder_class, "forward", doubled)
    with pytest.raises(UnsupportedArchitecture, match="does not reproduce"):
        check_adapter(adapter)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "llama"])
def test_twin_covers_every_layer_type_with_few_layers_and_a_small_vocabulary(arch):
    from sedac_ray.runtime.check import TWIN_VOCAB, twin_config

    config = TINY_CONFIGS[arch]()
    twin = twin_config(config)
    if arch == "llama":  # one layer type, not listed in the config
        assert twin.num_hidden_layers == 2
    else:
        assert set(twin.layer_types) == set(config.layer_types)
        assert twin.num_hidden_layers == len(twin.layer_types) < config.num_hidden_layers
    assert twin.vocab_size == TWIN_VOCAB and config.vocab_size == 49152  # the original is untouched
    AutoModelForCausalLM.from_config(twin)  # buildable
