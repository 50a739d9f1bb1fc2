"""Model specs: the packaged default, GGUF paths, directories, and clear refusals; partial loads
of a pipeline part (only its tensors read, same numbers as the whole model)."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sedac_ray.model.adapter import ModelAdapter
from sedac_ray.model.loading import (
    cache_dir,
    load_config,
    load_model,
    packaged_smollm2_dir,
    resolve_dtype,
)
from sedac_ray.model.parts import ModelPart
from sedac_ray.runtime.layer_range import LayerRange
from tests.conftest import TINY_CONFIGS, hf_greedy


def test_unknown_spec_lists_what_is_accepted():
    with pytest.raises(ValueError, match=r"unknown model spec 'nope'.*smollm2-135m.*\.gguf.*hub id"):
        load_model("nope")


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="without config.json"):
        load_model(str(tmp_path))


def test_missing_gguf_file_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "missing.gguf"))


def test_dtype_and_device_choices():
    assert resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype(None, "cuda") == torch.bfloat16
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="dtype 'int3' is not supported"):
        resolve_dtype("int3", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            load_model(device="cuda")


def test_gguf_path_and_cached_copy_give_the_same_model(smollm2, tmp_path, monkeypatch):
    """Loading the packaged GGUF directly (dequantizing it) equals the default spec's cached copy."""
    monkeypatch.setenv("SEDAC_CACHE_DIR", str(tmp_path / "cache"))
    direct = load_model(str(packaged_smollm2_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ids = torch.tensor([smollm2.tokenizer("Hello world")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(direct.model(ids).logits, smollm2.model(ids).logits)
    assert direct.tokenizer("Hello world")["input_ids"] == ids[0].tolist()
    assert not (tmp_path / "cache").exists()  # a .gguf path is not the default spec: nothing cached


def test_cached_copy_loads_as_a_plain_directory_in_any_dtype(smollm2):
    as_dir = load_model(str(cache_dir() / "smollm2-135m-instruct"), dtype="bfloat16")
    assert as_dir.model.dtype == torch.bfloat16 and as_dir.num_layers == 30


# ---- partial loading: a pipeline part reads only its own tensors ------------------------------


def tied(config):
    config.tie_word_embeddings = True
    return config


# Tied and untied heads; llama plus Gemma2 (extra norms, sliding window, logit softcap) and Qwen3
# (Q/K norms). Built from the shared tiny configs so the architectures match the rest of the suite.
PARTIAL_ARCHS = {
    "llama": lambda: TINY_CONFIGS["llama"](),
    "llama-tied": lambda: tied(TINY_CONFIGS["llama"]()),
    "gemma2": lambda: TINY_CONFIGS["gemma2"](),
    "qwen3-tied": lambda: tied(TINY_CONFIGS["qwen3"]()),
}
# Stage 0, a middle stage, the last stage, the head: together the whole tiny (6-layer) model.
PIPELINE = [
    ModelPart(range(0, 2), embed=True),
    ModelPart(range(2, 4)),
    ModelPart(range(4, 6)),
    ModelPart(range(0), head=True),
]


@pytest.fixture(scope="module", params=sorted(PARTIAL_ARCHS))
def sharded(request, tmp_path_factory):
    """A tiny model saved as a sharded safetensors checkpoint, and the in-memory original."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(PARTIAL_ARCHS[request.param]()).eval()
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory, max_shard_size="100KB")
    # From the packaged GGUF: the fast tier must not depend on the dequantized cache existing.
    gguf = packaged_smollm2_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf"
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(directory)
    weight_map = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    assert (
        len(set(weight_map.values())) >= 6
    )  # about a layer a file, or "only the needed files" proves nothing
    return request.param, model, directory, weight_map


def expected_keys(part: ModelPart, weight_map: dict[str, str]) -> set[str]:
    """The checkpoint keys ``part`` needs, spelled out from the checkpoint's own index."""
    keys = {k for k in weight_map for i in part.layers if k.startswith(f"model.layers.{i}.")}
    # A tied embedding and head are stored once, under either name (transformers keeps the
    # embedding, the dequantized SmolLM2 copy the head).
    embedding, head = "model.embed_tokens.weight", "lm_head.weight"
    if part.embed:
        keys.add(embedding if embedding in weight_map else head)
    if part.head:
        keys.add("model.norm.weight")
        keys.add(head if head in weight_map else embedding)
    return keys


@pytest.fixture
def safetensors_reads(monkeypatch) -> dict[str, set[str]]:
    """Every safetensors file opened and tensor read, seen from outside the loader."""
    import safetensors

    reads: dict[str, set[str]] = {"files": set(), "keys": set()}
    real_open = safetensors.safe_open

    class Spy:
        def __init__(self, filename, *args, **kwargs):
            self.name = Path(filename).name
            self.handle = real_open(filename, *args, **kwargs)

        def __enter__(self):
            reads["files"].add(self.name)
            self.opened = self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def keys(self):
            return self.opened.keys()

        def get_tensor(self, key):
            reads["keys"].add(key)
            return self.opened.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    return reads


def test_each_part_reads_exactly_its_tensors_from_only_their_shards(sharded, safetensors_reads):
    arch, _, directory, weight_map = sharded
    for part in PIPELINE:
        safetensors_reads["files"].clear()
        safetensors_reads["keys"].clear()
        loaded = load_model(str(directory), part=part)
        keys = expected_keys(part, weight_map)
        files = {weight_map[k] for k in keys}
        assert safetensors_reads["keys"] == keys, (arch, part)
        assert safetensors_reads["files"] == files, (arch, part)
        assert files < set(weight_map.values())
        assert (loaded.keys_read, loaded.files_read) == (keys, files)  # what the loader reports
        held = {name for name, _ in loaded.model.named_parameters()}
        layer_names = {n for n in held if ".layers." in n}
        assert {int(n.split(".")[2]) for n in layer_names} == set(part.layers)


def test_parts_in_a_pipeline_reproduce_the_whole_model(sharded):
    """Stage 0 -> 1 -> 2 -> head, each loaded alone, against the original model's own forward:
    ``hidden_states[k]`` is the output of layer k (k < L), and ``logits`` the final prediction."""
    arch, model, directory, _ = sharded
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 323, 84, 62, 64]])  # longer than the window
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    with torch.inference_mode():
        reference = model(ids, output_hidden_states=True)
    adapters = [ModelAdapter(load_model(str(directory), part=part).model) for part in PIPELINE]
    hidden = adapters[0].embed_tokens(ids)
    for adapter, part in zip(adapters[:3], PIPELINE[:3], strict=True):
        layers = LayerRange(adapter, part.layers.start, part.layers.stop)
        hidden = layers.prefill(torch.tensor(layers.cache.allocate(1)), positions, hidden)
        if part.layers.stop < 6:
            torch.testing.assert_close(hidden, reference.hidden_states[part.layers.stop], msg=arch)
    with torch.inference_mode():
        torch.testing.assert_close(adapters[3].logits(hidden), reference.logits, msg=arch)


def test_a_part_refuses_to_run_what_it_does_not_hold(sharded):
    _, _, directory, _ = sharded
    stage = ModelAdapter(load_model(str(directory), part=ModelPart(range(2, 4))).model)
    assert stage.is_partial and stage.hidden_size == 64 and stage.dtype == torch.float32
    assert sum(p.numel() for p in stage.layers[0].parameters()) == 0
    with pytest.raises(RuntimeError, match="input embedding .* is not held by this process"):
        stage.embed_tokens(torch.tensor([[1]]))
    with pytest.raises(RuntimeError, match="final norm .* is not held"):
        stage.logits(torch.zeros(1, 1, 64))
    layers = LayerRange(stage, 0, 2)
    with pytest.raises(RuntimeError, match="decoder layer 0 is not held"):
        layers.prefill(
            torch.tensor(layers.cache.allocate(1)), torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, 64)
        )


def test_bf16_part_loads_on_cpu_and_matches_a_bf16_whole_load(sharded):
    arch, _, directory, _ = sharded
    whole = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).eval()
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    with torch.inference_mode():
        reference = whole(ids, output_hidden_states=True).hidden_states
    part = load_model(str(directory), dtype="bf16", part=ModelPart(range(2, 4)))
    assert {p.dtype for p in part.model.parameters()} == {torch.bfloat16}
    adapter = ModelAdapter(part.model)
    layers = LayerRange(adapter, 2, 4)
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    hidden = layers.prefill(torch.tensor(layers.cache.allocate(1)), positions, reference[2])
    assert hidden.dtype == torch.bfloat16
    torch.testing.assert_close(hidden, reference[4], atol=2e-2, rtol=2e-2, msg=arch)


def test_bf16_loads_keep_the_buffers_that_from_pretrained_keeps(sharded):
    """Whole and partial bf16 loads hold what ``from_pretrained(dtype=bf16)`` holds: bf16
    parameters, and buffers in the dtype the model built them in (RoPE's ``inv_freq`` stays
    float32; rounded to bf16 it shifts every position's angle and changes greedy output)."""
    arch, _, directory, _ = sharded
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    expected = {name: buffer.dtype for name, buffer in reference.named_buffers()}
    assert torch.float32 in expected.values(), "no float32 buffer: this case shows nothing"
    for part in (None, ModelPart(range(2, 4))):
        loaded = load_model(str(directory), dtype="bf16", part=part).model
        held = {n: b.dtype for n, b in loaded.named_buffers() if b.device.type != "meta"}
        assert "model.rotary_emb.inv_freq" in held
        assert held == (expected if part is None else {n: expected[n] for n in held}), arch
        assert {p.dtype for p in loaded.parameters() if p.device.type != "meta"} == {torch.bfloat16}


@pytest.mark.slow
def test_the_engine_in_bf16_equals_hf_greedy_in_bf16(smollm2):
    """bf16 end to end against Hugging Face's own bf16 model (``from_pretrained(dtype=bf16)``), one
    prompt at a time as ``hf_greedy`` runs them: on CPUs with native bf16 matrix products
    (avx512_bf16) a batch of two rounds differently from a batch of one, in HF as in the engine
    ("The three primary colors are" parts at token 9)."""
    from sedac_ray import Engine, ExitPolicy

    hf = AutoModelForCausalLM.from_pretrained(cache_dir() / "smollm2-135m-instruct", dtype=torch.bfloat16)
    engine = Engine(load_model(dtype="bfloat16"))
    for prompt in ["The three primary colors are", "def fibonacci(n):"]:
        (result,) = engine.generate(prompt, max_new_tokens=12, policy=ExitPolicy.disabled())
        assert result.token_ids == hf_greedy(hf, smollm2.tokenizer(prompt)["input_ids"], 12), prompt


def test_bad_parts_are_refused_clearly(sharded):
    _, _, directory, _ = sharded
    assert load_config(str(directory)).num_hidden_layers == 6  # what a part is sized against
    with pytest.raises(ValueError, match="holds nothing"):
        ModelPart(range(0))
    with pytest.raises(ValueError, match="contiguous"):
        ModelPart(range(0, 6, 2))
    with pytest.raises(ValueError, match="beyond the model's 6 layers"):
        load_model(str(directory), part=ModelPart(range(4, 8)))


@pytest.mark.slow
@pytest.mark.parametrize(
    "part",
    [ModelPart(range(0, 10), embed=True), ModelPart(range(10, 20)), ModelPart(range(0), head=True)],
    ids=["stage0", "stage1", "head"],
)
def test_smollm2_parts_read_exactly_their_layers(part):
    from safetensors import safe_open

    directory = cache_dir() / "smollm2-135m-instruct"
    load_model()  # makes sure the dequantized copy exists
    with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
        stored = set(handle.keys())
    loaded = load_model(part=part)
    assert loaded.keys_read == expected_keys(part, dict.fromkeys(stored, "model.safetensors"))
    assert len(loaded.keys_read) == 9 * len(part.layers) + part.embed + 2 * part.head


@pytest.mark.slow
def test_smollm2_middle_stage_reproduces_the_whole_model(smollm2):
    ids = torch.tensor([smollm2.tokenizer("The three primary colors are")["input_ids"]])
    with torch.inference_mode():
        reference = smollm2.model(ids, output_hidden_states=True).hidden_states
    adapter = ModelAdapter(load_model(part=ModelPart(range(10, 20))).model)
    layers = LayerRange(adapter, 10, 20)
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    hidden = layers.prefill(torch.tensor(layers.cache.allocate(1)), positions, reference[10])
    torch.testing.assert_close(hidden, reference[20])


def test_a_checkpoint_without_safetensors_is_loaded_whole_then_cut_to_the_part(tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS["llama"]()).eval()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    loaded = load_model(str(tmp_path), part=ModelPart(range(2, 4)))
    assert loaded.keys_read is None  # nothing to read selectively
    held = {n for n, _ in loaded.model.named_parameters()}
    assert held and all(n.startswith(("model.layers.2.", "model.layers.3.")) for n in held)
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.inference_mode():
        reference = model(ids, output_hidden_states=True).hidden_states
    layers = LayerRange(ModelAdapter(loaded.model), 2, 4)
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    hidden = layers.prefill(torch.tensor(layers.cache.allocate(1)), positions, reference[2])
    torch.testing.assert_close(hidden, reference[4])


def test_a_part_holding_everything_is_the_whole_model(sharded):
    arch, model, directory, weight_map = sharded
    loaded = load_model(str(directory), part=ModelPart.whole(6))
    assert loaded.keys_read == set(weight_map) and loaded.files_read == set(weight_map.values())
    adapter = ModelAdapter(loaded.model)  # holds everything: the whole-model check runs
    assert not adapter.is_partial
    if model.config.tie_word_embeddings:  # one tensor, as in the checkpoint
        assert adapter.head.weight.data_ptr() == adapter.embed.weight.data_ptr()
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(ids).logits, model(ids).logits, msg=arch)
