"""The fused elementwise kernels (kernels/fused.c) against the eager PyTorch code they replace."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from model_svc.engine import fused
from model_svc.engine.runner import rotate_half

OPS = fused.load()
pytestmark = pytest.mark.skipif(OPS is None, reason="no C compiler")  # the build machine has one: `make` needs cc


@pytest.mark.parametrize("tokens", [7, 12])  # one thread; shared out (from 8 rows)
def test_rope_and_cache_store_are_the_eager_code_bit_for_bit(tokens):
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, dim = 9, 3, 64
    q = (torch.randn(tokens, heads, dim, generator=g) * 3).bfloat16()
    k = (torch.randn(tokens, kv_heads, dim, generator=g) * 3).bfloat16()
    v = torch.randn(tokens, kv_heads, dim, generator=g).bfloat16()
    angles = torch.rand(tokens, dim, generator=g) * 40
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    arena = torch.zeros(2, kv_heads, 50, dim, dtype=torch.bfloat16)
    slots = torch.tensor([3, 4, 5, 20, 21, 40, 49, 6, 7, 30, 31, 0][:tokens])

    want_q = q * cos[:, None] + rotate_half(q) * sin[:, None]
    want_k = k * cos[:, None] + rotate_half(k) * sin[:, None]
    want_arena = arena.clone()
    want_arena[0].index_copy_(1, slots, want_k.transpose(0, 1))
    want_arena[1].index_copy_(1, slots, v.transpose(0, 1))

    OPS.rope_store(q, k, v, cos, sin, slots, arena[0], arena[1])
    assert torch.equal(q, want_q)
    assert torch.equal(k, want_k)
    assert torch.equal(arena, want_arena)  # and nothing outside the slots was touched


def test_residual_add_and_rmsnorm_match_llama_rmsnorm():
    g = torch.Generator().manual_seed(1)
    rows, size = 37, 576
    norm = LlamaRMSNorm(size, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(size, generator=g) * 2)
    norm = norm.bfloat16()
    hidden = (torch.randn(rows, size, generator=g) * 4).bfloat16()
    delta = torch.randn(rows, size, generator=g).bfloat16()

    want_hidden = hidden + delta
    want = norm(want_hidden)
    got_hidden = hidden.clone()
    got = OPS.add_rmsnorm(got_hidden, delta, norm)
    assert torch.equal(got_hidden, want_hidden)  # the residual add: exact
    # The norm: the mean of squares is summed in another order, so a value may land one bfloat16
    # step away, rarely.
    differ = got != want
    assert differ.float().mean() < 0.01
    ulp = want.float().abs().clamp_min(1e-30) * 2 ** -7
    assert ((got.float() - want.float()).abs() <= ulp * 1.01).all()

    alone = OPS.add_rmsnorm(want_hidden.clone(), None, norm)
    assert torch.equal(alone, got)  # no delta: the norm alone


def test_a_rows_result_does_not_depend_on_the_other_rows():
    g = torch.Generator().manual_seed(2)
    norm = LlamaRMSNorm(576).bfloat16()
    hidden = torch.randn(16, 576, generator=g).bfloat16()
    delta = torch.randn(16, 576, generator=g).bfloat16()
    together = OPS.add_rmsnorm(hidden.clone(), delta, norm)
    for r in (0, 7, 15):
        alone = OPS.add_rmsnorm(hidden[r:r + 1].clone(), delta[r:r + 1], norm)
        assert torch.equal(alone[0], together[r])


def test_argmax_is_torchs_answer():
    """First largest value; a NaN wins (the first one); ties, signed zeros, infinities, row tails."""
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(12, 1000, generator=g)
    scores[0, [500, 90]] = float("nan")
    scores[1] = float("-inf")
    scores[2, [7, 700]] = 50.0
    scores[3] = 0.0
    scores[3, 4] = -0.0
    scores[4, 999] = float("inf")
    scores[5, 998] = 99.0
    for rows in (scores, scores[:3], scores[:, :997], scores[::2]):
        assert OPS.argmax(rows) == rows.argmax(dim=-1).tolist()


def test_silu_times_up_is_pytorchs_but_for_rare_last_bits():
    """kernels/fused.c's silu(gate) * up against F.silu(gate).mul_(up): its own e^x (within ~2 ulp of
    float32's), so a value may land one bfloat16 step away, rarely; the special values as PyTorch."""
    g = torch.Generator().manual_seed(2)
    gate = (torch.randn(48, 1536, generator=g) * 4).bfloat16()
    up = torch.randn(48, 1536, generator=g).bfloat16()
    gate[0, :9] = torch.tensor([0.0, -0.0, 100.0, -100.0, 1e-30, -95.0, float("inf"), float("-inf"), -88.5])
    want = torch.nn.functional.silu(gate.clone()).mul_(up)
    got = OPS.silu_mul(gate.clone(), up)
    same = (got == want) | (got.isnan() & want.isnan())
    assert same[0, :9].all()
    assert (~same).float().mean() < 1e-4
    ulp = want.float().abs().clamp_min(1e-30) * 2 ** -7
    assert ((got.float() - want.float()).abs() <= ulp * 1.01)[~same].all()


def test_silu_times_up_depends_on_each_value_alone():
    """An element's bits are the same wherever it falls in a call: vector lanes, the scalar remainder,
    either thread's share (calls from 16,384 values are shared out)."""
    g = torch.Generator().manual_seed(3)
    gate = (torch.randn(40000, generator=g) * 6).bfloat16()
    up = torch.randn(40000, generator=g).bfloat16()
    whole = OPS.silu_mul(gate.clone(), up)
    for start, length in [(0, 1), (5, 1), (3, 17), (1, 1000), (7, 33333)]:
        part = OPS.silu_mul(gate[start:start + length].clone(), up[start:start + length].clone())
        assert torch.equal(part, whole[start:start + length]), (start, length)


def long_silu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu.h's silu_mul_long16 written out: t = max(x * -log2 e, -126), 2^t as a degree-4 polynomial on
    t - floor(t) (each FMA one rounding: in float64, exact for these products, then float32) times
    2^floor(t), silu = x / (1 + 2^t) rounded to bfloat16, times up, rounded."""
    x = gate.float()
    t = torch.maximum(x * -1.44269504088896341, torch.tensor(-126.0))
    whole = torch.floor(t)
    f = torch.where(t.isinf(), 0.0, t - whole).double()  # VREDUCEPS: 0 for x * -log2 e beyond float32
    p = torch.full_like(f, float.fromhex("0x1.b7f214p-7"))
    for c in ("0x1.abfa76p-5", "0x1.ee2414p-3", "0x1.62d6c8p-1", "0x1.0p0"):
        p = (p * f + float.fromhex(c)).float().double()
    power = torch.ldexp(p.float(), whole)  # inf where t reaches 128, as VSCALEFPS gives
    silu = (x / (1.0 + power)).bfloat16()
    return (silu.float() * up.float()).bfloat16()


def test_long_prompt_rows_take_their_silu_arithmetic():
    """The first long_rows rows (long prompts') get silu_mul_long16's arithmetic bit for bit for every
    bfloat16 gate value but NaNs (where built with AVX-512; elsewhere the usual silu), the other rows
    the usual one; row widths that leave ragged tails."""
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    every = every[~every.isnan()]
    g = torch.Generator().manual_seed(6)
    for width in (every.numel(), 1000, 37):
        gate = every[:width * (every.numel() // width)].reshape(-1, width)
        up = (torch.randn(gate.shape, generator=g) * 2).bfloat16()
        long_rows = gate.shape[0] // 2 + 1 if gate.shape[0] > 1 else 1
        got = OPS.silu_mul(gate.clone(), up, long_rows)
        usual = OPS.silu_mul(gate.clone(), up)
        assert torch.equal(got[long_rows:], usual[long_rows:])
        want = long_silu_reference(gate[:long_rows], up[:long_rows]) if OPS.vector512 else usual[:long_rows]
        same = (got[:long_rows] == want) | (got[:long_rows].isnan() & want.isnan())
        assert same.all(), (width, gate[:long_rows][~same][:5], got[:long_rows][~same][:5], want[~same][:5])
    # silu a bfloat16 step from PyTorch's at most (a relative 2^-7 just above a power of two), then
    # the product rounded: within 2^-6 of PyTorch's (past 2^-7 for one value of these ~65,000)
    pytorch = torch.nn.functional.silu(gate.clone()).mul_(up)
    finite = pytorch.isfinite() & (pytorch.float().abs() > 1e-30)
    assert ((got.float() - pytorch.float()).abs() <= pytorch.float().abs() * 2 ** -6 * 1.01)[finite].all()


def _scalar_build():
    """kernels/fused.c built without its AVX-512 paths (the plain loops GCC vectorizes, or not, itself)."""
    import ctypes

    from model_svc.engine import kernels

    plain = ctypes.CDLL(str(kernels.build(fused.SOURCE, extra_flags=("-fopenmp", "-DGENRPC_SCALAR"))))
    return fused.FusedOps(plain)


def _same(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Bit for bit, but any NaN for a NaN (its payload follows the compiler's operand order)."""
    return bool(((got.view(torch.int16) == want.view(torch.int16)) | (got.isnan() & want.isnan())).all())


@pytest.mark.parametrize("size", [576, 600, 40])  # whole vectors; a remainder of 8 after many or two
def test_rmsnorm_gives_its_scalar_loops_bits(size):
    """The residual add and RMSNorm 16 values at a time give the plain loops' bits (infinities, signed
    zeros and subnormals included), with and without a delta, alone and shared out."""
    plain = _scalar_build()
    g = torch.Generator().manual_seed(5)
    rows = 21
    norm = LlamaRMSNorm(size, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(size, generator=g) * 2 - 0.5)
    norm = norm.bfloat16()
    hidden = (torch.randn(rows, size, generator=g) * 4).bfloat16()
    delta = torch.randn(rows, size, generator=g).bfloat16()
    hidden[0, :6] = torch.tensor([0.0, -0.0, 1e-39, -3e-39, 1e38, -1e38])
    delta[1, :4] = torch.tensor([float("inf"), -0.0, 2e-39, float("nan")])
    hidden[2] = 1e-20  # a mean of squares that underflows to a subnormal
    assert hidden[0, 2] != 0  # a subnormal bfloat16 stays one
    for d in (delta, None):
        for part in (slice(0, rows), slice(5, 6)):
            got_h, want_h = hidden[part].clone(), hidden[part].clone()
            got = OPS.add_rmsnorm(got_h, None if d is None else d[part], norm)
            want = plain.add_rmsnorm(want_h, None if d is None else d[part], norm)
            assert torch.equal(got_h.view(torch.int16), want_h.view(torch.int16))
            assert _same(got, want)


@pytest.mark.parametrize("dim", [64, 128, 48])  # halves of whole vectors; 48: the plain loop
def test_rope_gives_its_scalar_loops_bits(dim):
    plain = _scalar_build()
    g = torch.Generator().manual_seed(6)
    tokens, heads, kv_heads = 10, 9, 3
    q = (torch.randn(tokens, heads, dim, generator=g) * 3).bfloat16()
    k = (torch.randn(tokens, kv_heads, dim, generator=g) * 3).bfloat16()
    v = torch.randn(tokens, kv_heads, dim, generator=g).bfloat16()
    q[0, 0, :5] = torch.tensor([float("inf"), -0.0, 1e-39, float("nan"), -1e38])
    angles = torch.rand(tokens, dim, generator=g) * 40
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    slots = torch.arange(tokens) * 3 + 1
    results = []
    for ops in (OPS, plain):
        qq, kk = q.clone(), k.clone()
        arena = torch.zeros(2, kv_heads, 40, dim, dtype=torch.bfloat16)
        ops.rope_store(qq, kk, v, cos, sin, slots, arena[0], arena[1])
        results.append((qq, kk, arena))
    for got, want in zip(*results):
        assert _same(got, want)


def test_silu_times_up_built_without_trapping_math_keeps_every_bit():
    """kernels/fused.c's silu * up gives the bits of its plain scalar loop (built without its AVX-512
    path and without -fno-trapping-math, which lets GCC vectorize the loop on CPUs without AVX-512)
    for every bfloat16 gate value against ordinary, signed-zero, infinite and NaN `up` values; the
    call's last values take the scalar remainder."""
    assert fused.FLAGS == ("-fno-trapping-math",)
    plain = _scalar_build()
    every = torch.arange(-32768, 32768 + 5, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    g = torch.Generator().manual_seed(4)
    ups = torch.cat([torch.randn(12, generator=g) * 3, torch.tensor([0.0, -0.0, float("inf"), float("nan")])])
    for u in ups.bfloat16():
        up = torch.full_like(every, float(u))
        got, want = OPS.silu_mul(every.clone(), up), plain.silu_mul(every.clone(), up)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), float(u)
