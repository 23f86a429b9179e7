"""The 4-bit and int8 products on AMX tiles (gemm_bf16.c, `gemm_set_amx`): the int8 product's bits are
TDPBF16PS's arithmetic written out in torch; each row's bits are the same alone and in batches of every
size (every way the tiles take rows: few, streamed in 32-row groups, decoded once); against AVX-512 they
differ only where the tiles' 16-pair sums round differently (rarely, by an ulp); and the start-up
choice between the two (one path for every row count) follows the timings, the cache and the flag.
Tests of the tiles themselves skip on a CPU without AMX, saying so; the choice's logic runs everywhere
against a fake kernel."""

import json
import re
import time

import pytest
import torch

from model_svc.engine import gemm, kernel_choice
from tests.unit.test_gemm_bits import reference


@pytest.fixture(scope="module")
def amx():
    kernel = gemm.load()
    if kernel is None:
        pytest.skip("no C compiler, or neither AVX-512 BF16 nor AVX2 with FMA here: the native kernel cannot run")
    if not kernel.has_amx:
        pytest.skip(f"no AMX tiles on this CPU ({kernel_choice.cpu_info().describe()}): the tile path is not built")
    if kernel.set_amx(True) != 1:
        pytest.skip("Linux refused this process the AMX tile state")
    yield kernel
    kernel.set_amx(False)


def nf4_operands(seed: int, n: int = 320, k: int = 576, blocksize: int = 64):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8)
    absmax = (torch.rand(k // blocksize, n, generator=gen) + 0.05).to(torch.bfloat16)
    values = torch.tensor([-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0, 0.0796, 0.1609,
                           0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0]).to(torch.bfloat16)
    return codes, absmax, values, n, blocksize


def test_every_row_is_the_same_alone_and_in_batches_of_every_size(amx):
    codes, absmax, values, n, blocksize = nf4_operands(1)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(70, 576, generator=gen).to(torch.bfloat16)
    full = amx.nf4_parts(x, codes, absmax, values, [64, 256], blocksize)
    weight = torch.randn(256, 576, generator=gen) * 0.05
    int8_codes, int8_scales = gemm.quantize_int8(weight, 64)
    full8 = amx.int8(x, int8_codes, int8_scales)
    for m in [*range(1, 41), 47, 48, 63, 64, 65, 69]:  # few rows, streamed (up to 64), decoded once (70)
        for start in (0, 70 - m):
            part = amx.nf4_parts(x[start:start + m], codes, absmax, values, [64, 256], blocksize)
            assert all(torch.equal(p, f[start:start + m]) for p, f in zip(part, full)), (m, start)
            rows8 = amx.int8(x[start:start + m], int8_codes, int8_scales)
            assert torch.equal(rows8, full8[start:start + m]), (m, start)


def tile_partial(rows: torch.Tensor, weight: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Inputs start .. stop - 1's float32 partial sums as TDPBF16PS makes them: per instruction (16
    input pairs), the even inputs' products and the odd inputs' each summed in order from zero, then
    their sum added to the partial (measured on Sapphire Rapids-class cores, bit for bit over millions
    of random pairs: Intel documents this order)."""
    part = torch.zeros(rows.shape[0], weight.shape[1])
    for t in range(start, stop, 32):
        even, odd = torch.zeros_like(part), torch.zeros_like(part)
        for p in range(t, t + 32, 2):
            even = even + rows[:, p:p + 1] * weight[p]
            odd = odd + rows[:, p + 1:p + 2] * weight[p + 1]
        part = part + (even + odd)
    return part


def test_the_int8_product_on_tiles_is_its_written_out_arithmetic(amx):
    """The int8 product's sums (test_gemm_bits.reference) with the tiles' partials, at a size where the
    order shows: AVX-512's order differs in an output or two of these ~72,000 (seeds 5 and 6)."""
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(1024, 1536, generator=gen) * 0.05
    weight[:32, :64] = 0  # an all-zero block: scale 0
    codes, scales = gemm.quantize_int8(weight, 64)
    x = torch.randn(70, 1536, generator=gen).to(torch.bfloat16)
    expected = reference(x, codes, scales, partial=tile_partial)
    assert not torch.equal(expected, reference(x, codes, scales))  # the test can tell the two orders apart
    for m in (1, 2, 16, 17, 32, 33, 48, 64, 65, 70):
        assert torch.equal(amx.int8(x[:m], codes, scales), expected[:m]), m


def dequantized(codes: torch.Tensor, absmax: torch.Tensor, values: torch.Tensor, blocksize: int) -> torch.Tensor:
    """The nf4 weight [k, n] as the long prompts' rows use it: bitsandbytes' CPU packing ([n / 32][k / 2][32]
    bytes; byte j of an input pair: column j / 2's code in its low half, column 16 + j / 2's in its high
    half, input 2p + j % 2) decoded, each code value times its block's absmax rounded to bfloat16."""
    n, k = codes.shape[0], codes.shape[1] * 2
    packed = codes.reshape(n // 32, k // 2, 16, 2).long()  # [block][pair][j / 2][j % 2]
    halves = [(packed & 15), (packed >> 4)]  # columns 0-15, 16-31
    index = torch.cat([h.permute(0, 2, 1, 3).reshape(n // 32, 16, k) for h in halves], dim=1).reshape(n, k)
    scale = absmax.float().repeat_interleave(blocksize, dim=0).T  # [n, k]
    return (values.float()[index] * scale).to(torch.bfloat16).float().T


def test_long_prompt_rows_are_their_written_out_arithmetic_and_leave_the_others_alone(amx):
    """Rows 0 .. long_rows - 1 (long prompts'): each row's sum over all of k of x times the dequantized
    bfloat16 weight, TDPBF16PS after TDPBF16PS from zero (tile_partial over the whole of k), rounded to
    bfloat16; the same at every row count and split, and the rows after them exactly what a call
    without long rows gives them."""
    codes, absmax, values, n, blocksize = nf4_operands(7, n=256, k=576)
    x = torch.randn(70, 576, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    expected = tile_partial(x.float(), dequantized(codes, absmax, values, blocksize), 0, 576).to(torch.bfloat16)
    usual = amx.nf4_parts(x, codes, absmax, values, [64, 192], blocksize)
    assert not torch.equal(torch.cat(usual, dim=1), expected)  # the test can tell the two arithmetics apart
    for m, long_rows in [(1, 1), (2, 1), (16, 16), (17, 5), (33, 32), (40, 33), (70, 64), (70, 70), (64, 0)]:
        got = amx.nf4_parts(x[:m], codes, absmax, values, [64, 192], blocksize, long_rows=long_rows)
        whole = torch.cat(got, dim=1)
        assert torch.equal(whole[:long_rows], expected[:long_rows]), (m, long_rows)
        rest = amx.nf4_parts(x[long_rows:m], codes, absmax, values, [64, 192], blocksize)
        assert torch.equal(whole[long_rows:], torch.cat(rest, dim=1)), (m, long_rows)
    width = 128
    gate_up = amx.nf4_parts(x, codes, absmax, values, [width, width], blocksize, long_rows=40)
    silu = amx.nf4_silu(x, codes, absmax, values, width, blocksize, long_rows=40)
    from model_svc.engine import fused
    kernel = fused.load()
    if kernel is not None:
        assert torch.equal(silu, kernel.silu_mul(*gate_up, long_rows=40))


def test_tiles_differ_from_avx512_only_in_rare_last_bits(amx):
    """TDPBF16PS rounds a 16-pair sum its own way (measured: ~1 output in 27,000 differs after the
    scales and the rounding to bfloat16); a layout or indexing error would change most outputs."""
    codes, absmax, values, n, blocksize = nf4_operands(3, n=1024, k=1536)
    x = torch.randn(64, 1536, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    tiles = amx.nf4(x, codes, absmax, values, n, blocksize)
    amx.set_amx(False)
    try:
        vector = amx.nf4(x, codes, absmax, values, n, blocksize)
    finally:
        amx.set_amx(True)
    differ = tiles != vector
    assert differ.float().mean().item() < 1e-3, differ.float().mean().item()
    # where they differ, by a step or two of the output's last bit (a relative 2^-7 each), or, where the
    # sum cancels to a value much smaller than its terms, by a little of the terms' size
    gap = (tiles.float() - vector.float()).abs()[differ]
    bound = vector.float().abs()[differ] * 2 ** -6 + vector.float().abs().mean() * 2 ** -12
    assert bool((gap <= bound).all()), (gap, vector.float()[differ])


class FakeKernel:
    """A kernel whose AMX and AVX-512 paths take given times per row count (pure choice logic)."""

    kernel_id = "fake-kernel"

    def __init__(self, vector_ms, amx_ms, has_amx=True, permitted=True):
        self.vector_ms, self.amx_ms, self.has_amx, self.permitted = vector_ms, amx_ms, has_amx, permitted
        self.on = False

    def set_amx(self, on: bool) -> int:
        if not self.has_amx:
            return -1
        self.on = bool(on) and self.permitted
        return int(self.on)

    def _spend(self, rows: int) -> None:
        time.sleep((self.amx_ms if self.on else self.vector_ms)(rows) / 1e3)

    def nf4(self, x, *args):
        self._spend(x.shape[0])

    def int8(self, x, *args):
        self._spend(x.shape[0])


SHAPES = [(64, 128, 64, 1)]


def test_tiles_are_chosen_by_the_mean_time_per_row(tmp_path, monkeypatch):
    monkeypatch.setattr(kernel_choice, "AMX_ROWS", (1, 8, 32))
    slower_alone = FakeKernel(lambda m: 2 + m * 0.2, lambda m: 4 + m * 0.02)  # 2x at one row: too dear
    choice = kernel_choice.choose_amx(slower_alone, SHAPES, path=tmp_path / "a.json")
    assert (choice.on, choice.source, slower_alone.on) == (False, "measured", False)
    assert re.fullmatch(r"AMX off \(measured: [\d.]+x AVX-512's time per row over 3 row counts, [\d.]+x at 1 row\)",
                        choice.describe()), choice.describe()
    # 1.2x at one row, far faster from 8: tiles, and the figures say so
    dearer_alone = FakeKernel(lambda m: 2 + m * 0.5, lambda m: 3 + m * 0.01)
    choice = kernel_choice.choose_amx(dearer_alone, SHAPES, path=tmp_path / "b.json")
    assert (choice.on, dearer_alone.on) == (True, True)
    assert choice.describe().startswith("AMX tiles (measured: 0.")
    assert choice.describe().endswith("x at 1 row)"), choice.describe()
    assert kernel_choice.amx_wins({1: [1.0, 1.1], 8: [4.0, 1.0]})  # 1.225 against 1.5 ms a row
    assert not kernel_choice.amx_wins({1: [1.0, 1.6], 8: [4.0, 1.0]})  # 1.725 against 1.5
    assert not kernel_choice.amx_wins({1: [1.0, 1.0], 8: [4.0, 4.0]})  # a tie keeps AVX-512
    assert not kernel_choice.amx_wins({})


def test_a_cached_choice_follows_the_rule_on_its_timings(tmp_path, monkeypatch):
    """A cache entry written under another rule: its kept timings decide, without measuring again."""
    monkeypatch.setattr(kernel_choice, "AMX_ROWS", (1, 4))
    path = tmp_path / "choices.json"
    kernel = FakeKernel(lambda m: 1.0 + m, lambda m: 1.1 + m * 0.1)
    assert kernel_choice.choose_amx(kernel, SHAPES, path=path).on
    data = json.loads(path.read_text())
    for entry in data.values():
        entry["amx"] = False  # as the earlier rule (no slower at every count) had it
    path.write_text(json.dumps(data))
    monkeypatch.setattr(kernel_choice, "measure_amx", lambda *a, **k: pytest.fail("measured a cached choice"))
    kernel.on = False
    cached = kernel_choice.choose_amx(kernel, SHAPES, path=path)
    assert (cached.on, cached.source, kernel.on) == (True, "cached", True)


def test_the_choice_is_cached_and_a_corrupt_cache_measures_again(tmp_path, monkeypatch):
    monkeypatch.setattr(kernel_choice, "AMX_ROWS", (1, 4))
    path = tmp_path / "choices.json"
    kernel = FakeKernel(lambda m: 3.0, lambda m: 1.0)
    assert kernel_choice.choose_amx(kernel, SHAPES, path=path).source == "measured"
    monkeypatch.setattr(kernel_choice, "measure_amx", lambda *a, **k: pytest.fail("measured a cached choice"))
    kernel.on = False
    cached = kernel_choice.choose_amx(kernel, SHAPES, path=path)
    assert (cached.on, cached.source, kernel.on) == (True, "cached", True)
    monkeypatch.undo()
    monkeypatch.setattr(kernel_choice, "AMX_ROWS", (1, 4))
    path.write_text("{not json")
    assert kernel_choice.choose_amx(kernel, SHAPES, path=path).source == "measured"
    data = json.loads(path.read_text())
    for entry in data.values():
        entry["amx"] = "yes"  # not a bool: measured again
    path.write_text(json.dumps(data))
    assert kernel_choice.choose_amx(kernel, SHAPES, path=path).source == "measured"


def test_forced_and_unavailable_choices(tmp_path, monkeypatch):
    monkeypatch.setattr(kernel_choice, "measure_amx", lambda *a, **k: pytest.fail("measured a forced choice"))
    path = tmp_path / "choices.json"
    kernel = FakeKernel(lambda m: 1.0, lambda m: 9.0)
    assert kernel_choice.choose_amx(kernel, SHAPES, forced="on", path=path).on and kernel.on
    assert not kernel_choice.choose_amx(kernel, SHAPES, forced="off", path=path).on and not kernel.on
    assert not path.exists()
    none = FakeKernel(lambda m: 1.0, lambda m: 1.0, has_amx=False)
    assert kernel_choice.choose_amx(none, SHAPES, path=path).source == "unavailable"
    assert kernel_choice.choose_amx(none, SHAPES, path=path).describe() == ""
    with pytest.raises(kernel_choice.AmxUnavailable, match="no AMX"):
        kernel_choice.choose_amx(none, SHAPES, forced="on", path=path)
    refused = FakeKernel(lambda m: 1.0, lambda m: 1.0, permitted=False)
    with pytest.raises(kernel_choice.AmxUnavailable, match="refused"):
        kernel_choice.choose_amx(refused, SHAPES, forced="on", path=path)
    assert kernel_choice.choose_amx(refused, SHAPES, path=path).source == "unavailable"


def test_the_real_kernel_says_whether_it_has_tiles():
    kernel = gemm.load()
    if kernel is None:
        pytest.skip("no C compiler, or neither AVX-512 BF16 nor AVX2 with FMA here: the native kernel cannot run")
    flags = set(kernel_choice._cpuinfo()[1])
    if kernel.isa == "avx512-bf16" and {"amx_tile", "amx_bf16"} <= flags:
        assert kernel.has_amx
    else:
        assert not kernel.has_amx and kernel.set_amx(True) == -1


def test_the_vector_path_turns_tiles_off_inside_and_back_on_after():
    """linear.py checks a layer's first product against bitsandbytes' on AVX-512 (`Gemm.vector_path`)."""
    class Switch:
        def __init__(self, on):
            self.amx, self.calls = on, []

        def set_amx(self, on):
            self.calls.append(on)
            self.amx = on
            return int(on)

    on = Switch(True)
    with pytest.raises(RuntimeError):
        with gemm.Gemm.vector_path(on):
            assert on.amx is False
            raise RuntimeError("a failing product")
    assert (on.amx, on.calls) == (True, [False, True])
    off = Switch(False)
    with gemm.Gemm.vector_path(off):
        assert off.amx is False
    assert off.calls == []
