"""Calibration files: where they live, what they hold, and the default policy they give a model.

A calibration file is ``<model>.<dtype>.json`` (``org/name`` becomes ``org--name``), written by
``sedac calibrate``: exit behaviour depends on the numerics, so a float32 CPU calibration never
applies to bfloat16 on a GPU. Lookup order: ``$SEDAC_CALIBRATION_DIR`` if set, else
``$SEDAC_CACHE_DIR/calibration`` (default ``~/.cache/sedac-ray/calibration``), then the files
shipped in the package (``sedac_ray/data/calibration``). The engine and the server use the
calibrated policy as their default exit policy when a file for the model, its depth and its dtype
exists, and say which file they loaded; otherwise the default is no exit, with a log line saying
why. A calibration that found no policy holding its target records "no exit" itself.

This module is imported by the engine and the server: keep it light (no analysis imports).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from sedac_ray.policy import DEFAULT_POLICY, ExitPolicy

__all__ = [
    "BUILTIN_SOURCE",
    "Calibration",
    "calibrated_default",
    "calibration_file_name",
    "default_policy",
    "dtype_name",
    "find_calibration",
    "load_calibration",
    "model_name_for_spec",
    "packaged_calibration_dir",
    "policy_from_dict",
    "policy_to_dict",
    "user_calibration_dir",
]

log = logging.getLogger("sedac_ray.calibration")

BUILTIN_SOURCE = "built-in default: no exit (no calibration file for this model and dtype)"


def user_calibration_dir() -> Path:
    explicit = os.environ.get("SEDAC_CALIBRATION_DIR")
    if explicit:
        return Path(explicit).expanduser()
    cache = os.environ.get("SEDAC_CACHE_DIR") or "~/.cache/sedac-ray"
    return Path(cache).expanduser() / "calibration"


def packaged_calibration_dir() -> Path:
    return Path(str(resources.files("sedac_ray").joinpath("data/calibration")))


def dtype_name(dtype) -> str:
    """``torch.bfloat16``, ``"torch.bfloat16"`` and ``"bfloat16"`` all become ``"bfloat16"``."""
    name = str(dtype).removeprefix("torch.").strip().lower()
    if not name or name == "none":
        raise ValueError(f"a calibration needs a concrete dtype, got {dtype!r}")
    return name


def calibration_file_name(model_name: str, dtype) -> str:
    safe = model_name.strip().replace("/", "--").replace("\\", "--")
    if not safe or safe.startswith("."):
        raise ValueError(f"cannot name a calibration file after model {model_name!r}")
    return f"{safe}.{dtype_name(dtype)}.json"


def find_calibration(model_name: str, dtype) -> Path | None:
    """The calibration file of ``model_name`` in ``dtype``: the user's first, then the packaged one."""
    name = calibration_file_name(model_name, dtype)
    for folder in (user_calibration_dir(), packaged_calibration_dir()):
        if (folder / name).is_file():
            return folder / name
    return None


def _other_dtype_files(model_name: str, dtype) -> list[Path]:
    """Files for the same model in another dtype, or from before files were keyed by dtype."""
    wanted = calibration_file_name(model_name, dtype)
    stem = wanted.removesuffix(f".{dtype_name(dtype)}.json")
    found = []
    for folder in (user_calibration_dir(), packaged_calibration_dir()):
        if folder.is_dir():
            found += [
                p for p in (*folder.glob(f"{stem}.json"), *folder.glob(f"{stem}.*.json")) if p.name != wanted
            ]
    return found


@dataclass
class Calibration:
    """The content of a calibration file (see ``sedac calibrate``)."""

    model: str
    num_layers: int
    policy: ExitPolicy  # disabled when no candidate held the target (``reason`` says why)
    target_agreement: float
    agreement: float  # of the shipped policy, in the runtime (see ``details["method"]``)
    layers_saved: float
    dtype: str = "float32"
    adapters: dict | None = None  # {"file", "policy", "agreement", "layers_saved"} when fitted
    probes: dict | None = None  # {"file", ...}: exit probes, needed when ``policy.probe`` is set
    reason: str | None = None  # why the policy is "no exit", when it is
    details: dict = field(default_factory=dict)  # sweep size, prompts, validation, ...
    path: Path | None = None

    @property
    def adapters_path(self) -> Path | None:
        if not self.adapters or self.path is None:
            return None
        return self.path.parent / self.adapters["file"]

    @property
    def probes_path(self) -> Path | None:
        if not self.probes or self.path is None:
            return None
        return self.path.parent / self.probes["file"]

    @property
    def adapter_policy(self) -> ExitPolicy | None:
        return policy_from_dict(self.adapters["policy"]) if self.adapters else None

    def to_dict(self) -> dict:
        return {
            "format": 2,
            "model": self.model,
            "num_layers": self.num_layers,
            "dtype": self.dtype,
            "target_agreement": self.target_agreement,
            "policy": policy_to_dict(self.policy),
            "reason": self.reason,
            "agreement": self.agreement,
            "layers_saved": self.layers_saved,
            "adapters": self.adapters,
            "probes": self.probes,
            **self.details,
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        self.path = path
        return path


def policy_to_dict(policy: ExitPolicy) -> dict:
    if not policy.enabled:
        return {"disabled": True}
    return {
        "tau": policy.tau,
        "k": policy.k,
        "min_layer": policy.min_layer,
        "window": policy.window,
        "probe": policy.probe,
    }


def policy_from_dict(data: dict) -> ExitPolicy:
    if data.get("disabled"):
        return ExitPolicy.disabled()
    tau, probe = data.get("tau"), data.get("probe")
    return ExitPolicy(
        tau=None if tau is None else float(tau),
        k=int(data.get("k", 3)),
        min_layer=data.get("min_layer"),
        window=data.get("window"),
        probe=None if probe is None else float(probe),
    )


def load_calibration(path: str | Path) -> Calibration:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        known = {
            "format",
            "model",
            "num_layers",
            "dtype",
            "target_agreement",
            "policy",
            "reason",
            "agreement",
            "layers_saved",
            "adapters",
            "probes",
        }
        return Calibration(
            model=str(data["model"]),
            num_layers=int(data["num_layers"]),
            policy=policy_from_dict(data["policy"]),
            target_agreement=float(data["target_agreement"]),
            agreement=float(data["agreement"]),
            layers_saved=float(data["layers_saved"]),
            # format 1 files recorded the dtype only under "calibrated_on"
            dtype=dtype_name(data.get("dtype") or data.get("calibrated_on", {}).get("dtype")),
            adapters=data.get("adapters"),
            probes=data.get("probes"),
            reason=data.get("reason"),
            details={k: v for k, v in data.items() if k not in known},
            path=path,
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"calibration file {path} is unreadable: {err}") from None


def calibrated_default(model_name: str, num_layers: int | None, dtype=None) -> tuple[Calibration | None, str]:
    """The calibration that gives ``model_name`` (running in ``dtype``) its default policy, and a
    line saying where the default comes from. Without a dtype no file applies; a file for another
    depth or dtype is ignored with a warning (the default is then no exit)."""
    if dtype is None:
        log.warning("no dtype given for %s: calibration files are per dtype, so none applies", model_name)
        return None, BUILTIN_SOURCE
    path = find_calibration(model_name, dtype)
    if path is None:
        for other in _other_dtype_files(model_name, dtype):
            log.warning(
                "ignoring %s: it is not a calibration for %s in %s; default exit policy is no exit",
                other,
                model_name,
                dtype_name(dtype),
            )
        return None, BUILTIN_SOURCE
    calibration = load_calibration(path)
    if calibration.dtype != dtype_name(dtype):
        log.warning(
            "ignoring %s: calibrated in %s, the model runs in %s", path, calibration.dtype, dtype_name(dtype)
        )
        return None, BUILTIN_SOURCE
    if num_layers is not None and calibration.num_layers != num_layers:
        log.warning(
            "ignoring %s: calibrated for %d layers, the model has %d",
            path,
            calibration.num_layers,
            num_layers,
        )
        return None, BUILTIN_SOURCE
    source = f"calibration file {path}"
    if calibration.reason:
        source += f" (no exit: {calibration.reason})"
    return calibration, source


def default_policy(model_name: str, num_layers: int | None = None, dtype=None) -> tuple[ExitPolicy, str]:
    """The default exit policy of a model: calibrated if a file for its dtype exists, else
    :data:`DEFAULT_POLICY` (no exit). ``num_layers=None`` (the server, before any weights load)
    skips the depth check."""
    calibration, source = calibrated_default(model_name, num_layers, dtype)
    policy = calibration.policy if calibration else DEFAULT_POLICY
    log.info("default exit policy for %s: %s, from %s", model_name, policy.describe(), source)
    return policy, source


def model_name_for_spec(spec: str) -> str:
    """The name :func:`~sedac_ray.model.loading.load_model` gives a model spec, without loading it
    (calibration files are named after it): the default stays ``smollm2-135m``, a ``.gguf`` file
    gives its stem, a directory its name, a hub id itself."""
    from sedac_ray.model.loading import DEFAULT_MODEL

    if spec == DEFAULT_MODEL:
        return spec
    path = Path(os.path.expanduser(str(spec)))
    if path.suffix == ".gguf":
        return path.stem
    if path.is_dir():
        return path.name
    return str(spec)
