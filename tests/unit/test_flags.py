"""Start-up flags: one coherent attention choice (contradictions refused, naming the flags), and help."""

import subprocess
import sys

import pytest

from genrpc.launch import ROOT
from model_svc.__main__ import parse_args, resolve_attention


@pytest.mark.parametrize("flags, native_possible, expected", [
    ([], True, ("native", "native")),
    ([], False, ("sdpa", "sdpa")),  # float32, float16 or CUDA: the kernel runs bfloat16 on the CPU only
    (["--prefill-attention", "sdpa"], True, ("native", "sdpa")),
    (["--decode-attention", "sdpa"], True, ("sdpa", "sdpa")),
    (["--match-generate"], True, ("generate", "sdpa")),
    (["--match-generate"], False, ("generate", "sdpa")),
    (["--no-prefix-caching"], True, ("native", "native")),
])
def test_flags_resolve(flags, native_possible, expected):
    assert resolve_attention(parse_args(flags), native_possible) == expected


@pytest.mark.parametrize("flags, native_possible, message", [
    (["--match-generate", "--decode-attention", "sdpa"], True, "--match-generate"),
    (["--match-generate", "--prefill-attention", "native"], True, "--match-generate"),
    (["--match-generate", "--no-prefix-caching"], True, "already off"),
    (["--decode-attention", "sdpa", "--prefill-attention", "native"], True, "needs --decode-attention native"),
    (["--prefill-attention", "sdpa", "--no-prefix-caching"], True, "already off"),
    (["--decode-attention", "sdpa", "--no-prefix-caching"], True, "already off"),
    (["--decode-attention", "native"], False, "bfloat16 models on the CPU only"),
])
def test_contradictions_are_refused(flags, native_possible, message):
    with pytest.raises(SystemExit, match=message):
        resolve_attention(parse_args(flags), native_possible)


def test_the_supervisor_prints_help_instead_of_serving():
    done = subprocess.run([sys.executable, "-m", "genrpc.supervisor", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "GENRPC_<FLAG>" in done.stdout and "started" not in done.stdout
