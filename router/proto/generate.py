"""Regenerate hybridserve_pb2*.py from hybridserve.proto (run from anywhere: `python -m router.proto.generate`).

The generated files are committed so that serving needs no build step; a unit test checks they match the
.proto. The include root is the repository, so the generated code imports `router.proto.hybridserve_pb2`.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = "router/proto/hybridserve.proto"


def generate(out_dir: Path = ROOT) -> None:
    from grpc_tools import protoc

    args = ["grpc_tools.protoc", f"-I{ROOT}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", str(ROOT / PROTO)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
