"""sedac-ray: early-exit LLM serving with token-group separation over Ray Serve pipeline stages."""

from sedac_ray.engine import Engine, GenerationResult
from sedac_ray.model.adapter import ModelAdapter, UnsupportedArchitecture
from sedac_ray.model.loading import DEFAULT_MODEL, LoadedModel, load_model
from sedac_ray.observer import StabilityObserver
from sedac_ray.policy import DEFAULT_POLICY, ExitPolicy

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_POLICY",
    "Engine",
    "ExitPolicy",
    "GenerationResult",
    "LoadedModel",
    "ModelAdapter",
    "StabilityObserver",
    "UnsupportedArchitecture",
    "load_model",
]
