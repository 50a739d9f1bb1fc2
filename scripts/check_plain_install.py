"""What a plain `pip install .` (no extras) can do: build the served app as Serve does and run the
pipeline simulator, with the test and bench extras made unimportable (Ray itself brings jsonschema).

    pip install --no-deps --no-build-isolation --target /tmp/plain .
    cd /tmp && PYTHONPATH=/tmp/plain python /path/to/scripts/check_plain_install.py --tokens 16
"""
import importlib.abc
import runpy
import sys

BLOCKED = {"pytest", "matplotlib", "grpc_tools", "openai", "ruff"}


class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is an extra, not installed")
        return None


sys.meta_path.insert(0, Block())
import sedac_ray  # noqa: E402

print("sedac_ray from", sedac_ray.__file__, file=sys.stderr)
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary  # noqa: E402

from sedac_ray.serve.app import build_app  # noqa: E402

app = call_user_app_builder_with_args_if_necessary(build_app, {"stages": 3})
print("app built:", type(app).__name__, file=sys.stderr)
sys.argv = ["sedac_ray.sim", *sys.argv[1:]]
runpy.run_module("sedac_ray.sim", run_name="__main__")
