"""A Node.js client (@grpc/grpc-js + @grpc/proto-loader from the npm registry) built from the
.proto file alone, against the live stack."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import jsonschema
import pytest

from genrpc.v1 import generation_pb2 as pb
from tests.helpers import ROOT
from tests.polyglot.npm import ATTEMPT_TIMEOUT_S, ATTEMPTS, npm_ci

CLIENT_DIR = os.path.join(ROOT, "clients", "node")


@pytest.fixture(scope="module")
def node_client():
    assert shutil.which("node") and shutil.which("npm"), "Node.js and npm are needed for the polyglot test"
    npm_ci(CLIENT_DIR, os.path.join("@grpc", "grpc-js"))
    return CLIENT_DIR


@pytest.mark.timeout(ATTEMPTS * ATTEMPT_TIMEOUT_S + 300)
def test_node_client_generate_and_stream(stack, stub, node_client):
    out = subprocess.run(["node", "client.js", stack.gateway.address, "The capital of France is"],
                         cwd=node_client, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    unary, stream = result["unary"], result["stream"]
    assert unary["finish_reason"] == "FINISH_REASON_LENGTH"
    assert unary["generated_tokens"] == 12 and len(unary["token_ids"]) == 12
    assert unary["seed"] == "42"
    # Same seed, same sample, streamed or not, and the same as from Python.
    assert stream["token_ids"] == unary["token_ids"]
    assert stream["text"] == unary["text"]
    assert stream["finish_reason"] == "FINISH_REASON_LENGTH"
    assert stream["num_messages"] >= 2
    python = stub.Generate(pb.GenerateRequest(prompts=["The capital of France is"], config=pb.GenerationConfig(
        max_new_tokens=12, seed=42, do_sample=True)), timeout=60).completions[0]
    assert list(python.token_ids) == unary["token_ids"]
    assert python.text == unary["text"]
    assert result["invalid"]["code"] == 3  # INVALID_ARGUMENT
    assert "top_p" in result["invalid"]["details"]
    structured = result["structured"]  # JSON.parse succeeded in Node; the schema holds too
    jsonschema.validate(structured["parsed"], structured["schema"])
