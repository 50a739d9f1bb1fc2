"""Generate the gRPC modules for ``proto/sedac.proto`` into ``sedac_ray/serve/generated/``.

    python -m sedac_ray.serve.protos        # regenerate (needs grpcio-tools)

The generated modules are committed and ship inside the package, so every Ray node imports them
without a build step; a test fails if they drift from the .proto file.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO = REPO / "proto" / "sedac.proto"
PACKAGE_DIR = Path("sedac_ray") / "serve" / "generated"


def generate(out_root: Path) -> list[Path]:
    """Write ``sedac_pb2.py`` and ``sedac_pb2_grpc.py`` under ``out_root / PACKAGE_DIR``. The proto
    is staged at the package path so the generated imports are absolute package imports."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as staging:
        staged = Path(staging) / PACKAGE_DIR / "sedac.proto"
        staged.parent.mkdir(parents=True)
        shutil.copy(PROTO, staged)
        include = Path(protoc.__file__).parent / "_proto"
        args = [
            "protoc",
            f"-I{staging}",
            f"-I{include}",
            f"--python_out={out_root}",
            f"--grpc_python_out={out_root}",
            str(staged.relative_to(staging)),
        ]
        (out_root / PACKAGE_DIR).mkdir(parents=True, exist_ok=True)
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO}")
    return [out_root / PACKAGE_DIR / name for name in ("sedac_pb2.py", "sedac_pb2_grpc.py")]


if __name__ == "__main__":
    for path in generate(REPO):
        print(f"wrote {path.relative_to(REPO)}")
    sys.exit(0)
