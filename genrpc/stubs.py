"""Generates the Python stubs from protos/ into genrpc/v1 (public) and genrpc/internal/v1 (the
tokenizer and model services, which only the gateway calls), and vLLM's engine protocol from the
pinned `smg-grpc-proto` package into genrpc/vllm (`make stubs`); never edit them.

    python -m genrpc.stubs [--out DIR]
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import tempfile

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
    generate_vllm(out, include)


VLLM_PROTOS = ("common.proto", "vllm_engine.proto")  # vllm.grpc.engine.VllmEngine and what it imports


def generate_vllm(out: str, include: str) -> None:
    """vLLM's engine protocol (model_svc/vllm_engine.py serves it), from the .proto files the pinned
    smg-grpc-proto package ships. They import each other by bare name; copied under genrpc/vllm/ with
    that one import's path made full, the stubs import as a package and their descriptors cannot clash
    with the package's own generated modules (the wire names, vllm.grpc.engine.*, are unchanged)."""
    import smg_grpc_proto

    source = os.path.join(os.path.dirname(smg_grpc_proto.__file__), "proto")
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "genrpc", "vllm")
        os.makedirs(folder)
        for name in VLLM_PROTOS:
            with open(os.path.join(source, name)) as f:
                text = f.read()
            for other in VLLM_PROTOS:
                text = text.replace(f'import "{other}";', f'import "genrpc/vllm/{other}";')
            with open(os.path.join(folder, name), "w") as f:
                f.write(text)
        protos = [os.path.join(folder, name) for name in VLLM_PROTOS]
        args = ["protoc", f"-I{tmp}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
                f"--grpc_python_out={out}", *protos]
        if protoc.main(args) != 0:
            sys.exit("protoc failed on smg-grpc-proto's files")
    open(os.path.join(out, "genrpc", "vllm", "__init__.py"), "a").close()
    shutil.rmtree(os.path.join(out, "genrpc", "vllm", "__pycache__"), ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=ROOT)
    generate(parser.parse_args().out)


if __name__ == "__main__":
    main()
