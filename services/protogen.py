"""Regenerates the Python stubs in services/pb from proto/specd.proto.

Run `python -m services.protogen` after editing the .proto; `--check` exits non-zero
when the committed stubs differ from what the .proto generates.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PB_DIR = ROOT / "services" / "pb"
STUBS = ("specd_pb2.py", "specd_pb2.pyi", "specd_pb2_grpc.py")


def generate(out_root: Path) -> Path:
    """Writes the stubs under out_root/services/pb and returns that folder."""
    import grpc_tools
    from grpc_tools import protoc  # build-time dependency only

    include = Path(grpc_tools.__file__).parent / "_proto"
    # Mapping proto/ onto the virtual path services/pb makes the generated
    # specd_pb2_grpc.py import `from services.pb import specd_pb2`.
    args = [
        "protoc",
        f"-I{include}",
        f"-Iservices/pb={PROTO_DIR}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        "services/pb/specd.proto",
    ]
    (out_root / "services" / "pb").mkdir(parents=True, exist_ok=True)
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on proto/specd.proto")
    return out_root / "services" / "pb"


def stale_stubs() -> list[str]:
    """Names of committed stubs that differ from freshly generated ones."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        return [
            name
            for name in STUBS
            if not (PB_DIR / name).exists()
            or (fresh / name).read_bytes() != (PB_DIR / name).read_bytes()
        ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the stubs are current")
    args = parser.parse_args()
    if args.check:
        stale = stale_stubs()
        if stale:
            print(f"stale stubs: {', '.join(stale)}; run python -m services.protogen", file=sys.stderr)
            return 1
        print("stubs are current")
        return 0
    generate(ROOT)
    print(f"wrote {', '.join(STUBS)} to {PB_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
