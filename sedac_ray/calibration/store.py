"""Calibration files live in the core now (:mod:`sedac_ray.exit.store`); this name stays for the
calibration tooling and older imports."""

from sedac_ray.exit.store import *  # noqa: F403
from sedac_ray.exit.store import __all__  # noqa: F401
