"""Calibration files: where they live, what they hold, and the default policy they give a model.

A calibration file is ``<model>.json`` (``org/name`` becomes ``org--name.json``), written by
``sedac calibrate``. Lookup order for a model: ``$SEDAC_CALIBRATION_DIR`` if set, else
``$SEDAC_CACHE_DIR/calibration`` (default ``~/.cache/sedac-ray/calibration``), then the files
shipped in the package (``sedac_ray/data/calibration``). The engine and the server use the
calibrated policy as their default exit policy when a file exists, and say which file they loaded.

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

log = logging.getLogger("sedac_ray.calibration")

BUILTIN_SOURCE = "built-in default (no calibration file for this model)"


def user_calibration_dir() -> Path:
    explicit = os.environ.get("SEDAC_CALIBRATION_DIR")
    if explicit:
        return Path(explicit).expanduser()
    cache = os.environ.get("SEDAC_CACHE_DIR") or "~/.cache/sedac-ray"
    return Path(cache).expanduser() / "calibration"


def packaged_calibration_dir() -> Path:
    return Path(str(resources.files("sedac_ray").joinpath("data/calibration")))


def calibration_file_name(model_name: str) -> str:
    safe = model_name.strip().replace("/", "--").replace("\\", "--")
    if not safe or safe.startswith("."):
        raise ValueError(f"cannot name a calibration file after model {model_name!r}")
    return f"{safe}.json"


def find_calibration(model_name: str) -> Path | None:
    """The calibration file of ``model_name``: the user's first, then the packaged one."""
    name = calibration_file_name(model_name)
    for folder in (user_calibration_dir(), packaged_calibration_dir()):
        if (folder / name).is_file():
            return folder / name
    return None


@dataclass
class Calibration:
    """The content of a calibration file (see ``sedac calibrate``)."""

    model: str
    num_layers: int
    policy: ExitPolicy
    target_agreement: float
    agreement: float  # on the calibration set, offline (traces)
    layers_saved: float
    adapters: dict | None = None  # {"file", "policy", "agreement", "layers_saved"} when fitted
    details: dict = field(default_factory=dict)  # sweep size, prompts, validation, ...
    path: Path | None = None

    @property
    def adapters_path(self) -> Path | None:
        if not self.adapters or self.path is None:
            return None
        return self.path.parent / self.adapters["file"]

    @property
    def adapter_policy(self) -> ExitPolicy | None:
        return policy_from_dict(self.adapters["policy"]) if self.adapters else None

    def to_dict(self) -> dict:
        return {
            "format": 1,
            "model": self.model,
            "num_layers": self.num_layers,
            "target_agreement": self.target_agreement,
            "policy": policy_to_dict(self.policy),
            "agreement": self.agreement,
            "layers_saved": self.layers_saved,
            "adapters": self.adapters,
            **self.details,
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        self.path = path
        return path


def policy_to_dict(policy: ExitPolicy) -> dict:
    return {"tau": policy.tau, "k": policy.k, "min_layer": policy.min_layer, "window": policy.window}


def policy_from_dict(data: dict) -> ExitPolicy:
    return ExitPolicy(
        tau=float(data["tau"]), k=int(data["k"]), min_layer=data.get("min_layer"), window=data.get("window")
    )


def load_calibration(path: str | Path) -> Calibration:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        known = {
            "format",
            "model",
            "num_layers",
            "target_agreement",
            "policy",
            "agreement",
            "layers_saved",
            "adapters",
        }
        return Calibration(
            model=str(data["model"]),
            num_layers=int(data["num_layers"]),
            policy=policy_from_dict(data["policy"]),
            target_agreement=float(data["target_agreement"]),
            agreement=float(data["agreement"]),
            layers_saved=float(data["layers_saved"]),
            adapters=data.get("adapters"),
            details={k: v for k, v in data.items() if k not in known},
            path=path,
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"calibration file {path} is unreadable: {err}") from None


def calibrated_default(model_name: str, num_layers: int | None) -> tuple[Calibration | None, str]:
    """The calibration that gives ``model_name`` its default policy, and a line saying where the
    default comes from. A file for another depth is ignored with a warning."""
    path = find_calibration(model_name)
    if path is None:
        return None, BUILTIN_SOURCE
    calibration = load_calibration(path)
    if num_layers is not None and calibration.num_layers != num_layers:
        log.warning(
            "ignoring %s: calibrated for %d layers, the model has %d",
            path,
            calibration.num_layers,
            num_layers,
        )
        return None, BUILTIN_SOURCE
    return calibration, f"calibration file {path}"


def default_policy(model_name: str, num_layers: int | None = None) -> tuple[ExitPolicy, str]:
    """The default exit policy of a model: calibrated if a file exists, else :data:`DEFAULT_POLICY`.
    ``num_layers=None`` (the server, before any weights load) skips the depth check."""
    calibration, source = calibrated_default(model_name, num_layers)
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
