"""The Go client (clients/go) built from the .proto with Debian's Go toolchain and libraries, no Go
module proxy, and run against the live stack. Skipped, with the reason, only where the packages
cannot be installed (not Debian, or no root)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from genrpc.v1 import generation_pb2 as pb
from tests.helpers import ROOT

GO_DIR = os.path.join(ROOT, "clients", "go")
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def go_client(tmp_path_factory):
    setup = subprocess.run([os.path.join(GO_DIR, "setup.sh")], capture_output=True, text=True, timeout=900)
    if setup.returncode == 3:
        pytest.skip(f"the Go toolchain cannot be installed here: {setup.stderr.strip()}")
    assert setup.returncode == 0, setup.stderr
    out = tmp_path_factory.mktemp("go")
    build = subprocess.run([os.path.join(GO_DIR, "build.sh"), str(out)], capture_output=True, text=True,
                           timeout=900)
    assert build.returncode == 0, build.stderr
    return build.stdout.strip().splitlines()[-1]


# set-up and build may each take up to 900 s on a cold machine (their own limits), beyond the suite's 300
@pytest.mark.timeout(2000)
def test_go_client_against_the_live_stack(stack, stub, go_client):
    run = subprocess.run([go_client, stack.gateway.address, PROMPT], capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    unary, stream = result["unary"], result["stream"]
    assert unary["finish_reason"] == "FINISH_REASON_LENGTH" and unary["seed"] == 42
    assert unary["generated_tokens"] == 12 and len(unary["token_ids"]) == 12
    # Same seed, same sample: streamed or not, and from Python.
    assert stream["token_ids"] == unary["token_ids"] and stream["text"] == unary["text"]
    assert stream["finish_reason"] == "FINISH_REASON_LENGTH" and stream["num_messages"] >= 2
    python = stub.Generate(pb.GenerateRequest(prompts=[PROMPT], config=pb.GenerationConfig(
        max_new_tokens=12, seed=42, do_sample=True)), timeout=60).completions[0]
    assert list(python.token_ids) == unary["token_ids"] and python.text == unary["text"]
    assert result["invalid"]["name"] == "InvalidArgument" and result["invalid"]["code"] == 3
    assert "top_p" in result["invalid"]["details"]
    assert result["deadline"]["name"] == "DeadlineExceeded" and result["deadline"]["code"] == 4
