"""Generate the gRPC modules for ``proto/sedac.proto`` into ``sedac_ray/serve/generated/``.

    python -m sedac_ray.serve.protos        # from the repository root (needs grpcio-tools)

A developer tool: the generated modules are committed and ship inside the package, so every Ray
node imports them without a build step, and nothing at run time reads the .proto file. Paths
are the caller's (relative ones to the working directory), never this module's location, so the
tool works from an installed wheel too. A test fails if the modules drift from the .proto file.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

PROTO = Path("proto") / "sedac.proto"
PACKAGE_DIR = Path("sedac_ray") / "serve" / "generated"


def generate(out_root: Path, proto: Path = PROTO) -> list[Path]:
    """Write ``sedac_pb2.py`` and ``sedac_pb2_grpc.py`` under ``out_root / PACKAGE_DIR``. The proto
    is staged at the package path so the generated imports are absolute package imports."""
    from grpc_tools import protoc

    proto = Path(proto)
    if not proto.is_file():
        raise FileNotFoundError(
            f"no proto file at {proto.resolve()}; run from the repository root or pass --proto"
        )
    with tempfile.TemporaryDirectory() as staging:
        staged = Path(staging) / PACKAGE_DIR / "sedac.proto"
        staged.parent.mkdir(parents=True)
        shutil.copy(proto, staged)
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
            raise RuntimeError(f"protoc failed on {proto}")
    return [out_root / PACKAGE_DIR / name for name in ("sedac_pb2.py", "sedac_pb2_grpc.py")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proto", type=Path, default=PROTO, help=f"the .proto file (default: {PROTO})")
    parser.add_argument("--out", type=Path, default=Path("."), help="the source root to write into")
    args = parser.parse_args()
    for path in generate(args.out, args.proto):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
