"""Generates the Python stubs from protos/ into genrpc/v1 (public) and genrpc/internal/v1 (the
tokenizer and model services, which only the gateway calls) (`make stubs`); never edit them.

    python -m genrpc.stubs [--out DIR]
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

from grpc_tools import protoc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTO_DIR = os.path.join(ROOT, "protos")


def generate(out: str) -> None:
    protos = sorted(glob.glob(os.path.join(PROTO_DIR, "genrpc", "v1", "*.proto"))
                    + glob.glob(os.path.join(PROTO_DIR, "genrpc", "internal", "v1", "*.proto")))
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}", *protos]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")
    for package in (("v1",), ("internal", "v1")):
        open(os.path.join(out, "genrpc", *package, "__init__.py"), "a").close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=ROOT)
    generate(parser.parse_args().out)


if __name__ == "__main__":
    main()
