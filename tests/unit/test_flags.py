"""Start-up flags: one coherent attention choice (contradictions refused, naming the flags), and help."""

import logging
import os
import subprocess
import sys

import pytest

from genrpc.launch import ROOT
from model_svc.__main__ import (
    check_amx,
    check_kv_cache,
    check_layer_loop,
    check_output_layer,
    direct_rows,
    parse_args,
    resolve_attention,
    scheduler_config,
)
from model_svc.engine import gemm
from model_svc.engine.kv_cache import GIB, arena_tokens


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


@pytest.mark.parametrize("flags, message", [
    (["--layer-loop", "native", "--match-generate"], "needs native prefill attention"),
    (["--layer-loop", "native", "--prefill-attention", "sdpa"], r"here sdpa\)"),
    (["--layer-loop", "native", "--matmul", "library"], r"here library\)"),
])
def test_an_explicit_native_layer_loop_is_refused_without_the_native_kernels(flags, message):
    with pytest.raises(SystemExit, match=message):
        check_layer_loop(parse_args(flags))


@pytest.mark.parametrize("flags", [[], ["--layer-loop", "native"], ["--layer-loop", "python", "--match-generate"]])
def test_the_layer_loop_flags_that_pass(flags):
    check_layer_loop(parse_args(flags))


@pytest.mark.parametrize("flags, expected", [
    ([], None), (["--matmul-direct-rows", "auto"], None), (["--matmul-direct-rows", "0"], 0),
    (["--matmul-direct-rows", "12"], 12),
])
def test_matmul_direct_rows_resolve(flags, expected):
    assert direct_rows(parse_args(flags)) == expected


@pytest.mark.parametrize("flags, message", [
    (["--matmul-direct-rows", "-1"], "--matmul-direct-rows=-1 is invalid"),
    (["--matmul-direct-rows", "many"], "--matmul-direct-rows=many is invalid"),
    (["--matmul-direct-rows", "5000"], r"\[0, 4096\]"),
    (["--matmul-direct-rows", "4", "--matmul", "library"], "drop it with --matmul library"),
])
def test_matmul_direct_rows_refused(flags, message):
    with pytest.raises(SystemExit, match=message):
        direct_rows(parse_args(flags))


@pytest.mark.parametrize("flags, message", [
    (["--output-layer", "nf4", "--quantize", "8bit"], "needs --quantize 4bit, not 8bit"),
    (["--output-layer", "nf4", "--quantize", "none"], "needs --quantize 4bit, not none"),
    (["--output-layer", "nf4", "--match-generate"], "drop one of them"),
    (["--output-layer", "int8", "--match-generate"], "drop one of them"),
])
def test_a_quantized_output_layer_is_refused_where_it_cannot_apply(flags, message):
    with pytest.raises(SystemExit, match=message):
        check_output_layer(parse_args(flags))


def test_an_explicit_output_layer_is_kept():
    assert check_output_layer(parse_args(["--output-layer", "nf4"])) == "nf4"
    assert check_output_layer(parse_args(["--output-layer", "int8", "--quantize", "8bit"])) == "int8"
    assert check_output_layer(parse_args(["--output-layer", "none"])) == "none"


@pytest.mark.parametrize("flags", [["--match-generate"], ["--quantize", "8bit"], ["--quantize", "none"],
                                   ["--matmul", "library"], ["--decode-attention", "sdpa"],
                                   ["--prefill-attention", "sdpa"], ["--dtype", "float32"]])
def test_the_default_output_layer_stays_unquantized_off_the_native_path(flags):
    """int8 only where its kernel product runs with native numerics: --match-generate keeps generate()'s
    model, and the libraries' paths would compute it by dequantizing the whole layer every step."""
    assert check_output_layer(parse_args(flags)) == "none"


def test_the_default_output_layer_is_int8_where_the_kernel_has_it():
    from model_svc.engine import gemm

    kernel = gemm.load()
    expected = "int8" if kernel is not None and kernel.has_int8 else "none"
    assert check_output_layer(parse_args([])) == expected


@pytest.mark.parametrize("flags, message", [
    (["--kv-cache-tokens", "4096", "--kv-cache-memory", "1"], "both size the KV cache: give one"),
    (["--kv-cache-tokens", "8"], r"--kv-cache-tokens=8 is invalid: must be >= --block-size \(16\)"),
    (["--kv-cache-memory", "0"], "--kv-cache-memory=0 is invalid"),
    (["--kv-cache-memory", "nan"], "--kv-cache-memory=nan is invalid"),
    (["--block-size", "0"], "--block-size=0 is invalid"),
])
def test_kv_cache_sizes_are_refused_at_start(flags, message):
    with pytest.raises(SystemExit, match=message):
        check_kv_cache(parse_args(flags))


def test_the_kv_cache_is_sized_by_the_models_bytes_per_token():
    small, large = 23_040, 65_536  # the bundled model's bytes a token in bfloat16; a 1B Llama's
    available = 22 * GIB
    # By default 1/8 of what is available, at most 2 GiB: a costlier token gets fewer tokens.
    assert arena_tokens(small, 16, available=available)[0] == 2 * GIB // small // 16 * 16
    assert arena_tokens(large, 16, available=available)[0] == 32_768
    assert arena_tokens(small, 16, available=4 * GIB)[0] == (4 * GIB // 8) // small // 16 * 16
    assert arena_tokens(small, 16, available=10)[0] == 16  # one block at least
    assert arena_tokens(small, 16)[0] == GIB // small // 16 * 16  # available memory unknown: 1 GiB
    assert arena_tokens(small, 16, memory_gib=0.5, available=available)[0] == (GIB // 2) // small // 16 * 16
    assert arena_tokens(small, 16, tokens=4000, available=available) == (4000, "--kv-cache-tokens")
    check_kv_cache(parse_args(["--kv-cache-memory", "0.5"]))
    check_kv_cache(parse_args([]))


@pytest.mark.parametrize("flags, message", [
    (["--prefill-slowdown", "nan"], "--prefill-slowdown=nan must be >= 1"),
    (["--prefill-slowdown", "0.5"], "--prefill-slowdown=0.5 must be >= 1"),
    (["--idle-step-ms", "0"], "--idle-step-ms=0 must be > 0"),
    (["--tenant-slowdown", "0.5"], "--tenant-slowdown=0.5 must be >= 1, or 0"),
    (["--max-num-seqs", "0"], "--max-num-seqs=0 must be >= 1"),
    (["--max-waiting", "-1"], "--max-waiting=-1 must be >= 0"),
    (["--max-prefill-tokens", "0"], "--max-prefill-tokens=0 must be >= 1"),
    (["--max-num-seqs", "64", "--max-batch-tokens", "32"], "--max-batch-tokens=32 must be >= --max-num-seqs=64"),
])
def test_scheduler_settings_are_checked_once_naming_the_flag(flags, message):
    with pytest.raises(SystemExit, match=message):
        scheduler_config(parse_args(flags))


def test_the_default_scheduler_settings_pass():
    config = scheduler_config(parse_args([]))
    assert config.prefill_tokens <= config.max_batch_tokens and config.max_num_seqs >= 1


def test_the_supervisor_prints_help_instead_of_serving():
    done = subprocess.run([sys.executable, "-m", "genrpc.supervisor", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "GENRPC_<FLAG>" in done.stdout and "started" not in done.stdout


@pytest.mark.parametrize("command, serves, converts", [
    (["run"], "models/SmolLM2-135M-Instruct", True),
    (["run", "MODEL=/srv/models/other"], "/srv/models/other", False),  # another model: no conversion
])
def test_make_run_serves_the_model_it_is_given(command, serves, converts):
    # make -n -B prints every recipe the target would run (-B: as if nothing were built yet)
    env = {k: v for k, v in os.environ.items() if k != "GENRPC_MODEL"}
    done = subprocess.run(["make", "-n", "-B", *command], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=env)
    assert done.returncode == 0, done.stderr
    assert f"GENRPC_MODEL={serves} " in done.stdout
    assert ("genrpc.prepare_model" in done.stdout) is converts


def test_bitsandbytes_hub_kernel_warning_becomes_one_info_line(caplog):
    from model_svc.__main__ import HubKernelNotice
    logger = logging.getLogger("test.bitsandbytes.backends.cpu.ops")
    logger.addFilter(HubKernelNotice())
    with caplog.at_level(logging.INFO, logger=logger.name):
        # the message bitsandbytes 0.50 logs where AVX-512 BF16 is present and `kernels` is not
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
                       "already `pip install kernels` and the kernels >= 0.11.1", ModuleNotFoundError("kernels"))
        logger.warning("another warning")
    assert [(r.levelname, r.getMessage()[:24]) for r in caplog.records] == [
        ("INFO", "bitsandbytes' optional C"), ("WARNING", "another warning")]


@pytest.mark.parametrize("flags", [["--matmul-amx", "on", "--matmul", "library"],
                                   ["--matmul-amx", "off", "--match-generate"],
                                   ["--matmul-amx", "on", "--dtype", "float32"],
                                   ["--matmul-amx", "off", "--decode-attention", "sdpa"]])
def test_matmul_amx_is_refused_where_the_native_kernel_does_not_run(flags):
    with pytest.raises(SystemExit, match="--matmul-amx .* chooses the native kernel's path"):
        check_amx(parse_args(flags))


def test_matmul_amx_on_is_refused_without_tiles_and_auto_always_passes():
    check_amx(parse_args([]))
    check_amx(parse_args(["--matmul-amx", "off"]))
    kernel = gemm.load()
    if kernel is not None and kernel.has_amx:
        check_amx(parse_args(["--matmul-amx", "on"]))
    else:
        with pytest.raises(SystemExit, match="--matmul-amx on: no AMX tiles here"):
            check_amx(parse_args(["--matmul-amx", "on"]))
