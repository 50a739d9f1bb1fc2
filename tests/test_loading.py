"""Model specs: the packaged default, GGUF paths, directories, and clear refusals."""

import pytest
import torch

from sedac_ray.model.loading import cache_dir, load_model, packaged_smollm2_dir, resolve_dtype


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
