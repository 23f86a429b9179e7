"""A layer's residual adds, RMSNorms, rotary positions and cache writes, each in one native call.

Eager PyTorch spends ~10 operator calls on a residual add plus an RMSNorm and ~14 on rotary
positions plus the two cache writes; at a few dozen rows a call's dispatch outweighs its
arithmetic, and a step of this model's 30 layers makes ~1,300 such calls. kernels/fused.c does the
same steps with the same bfloat16 roundings, row by row (so batch-invariant), built and loaded like
the attention kernel. The one numeric difference from the eager code: the RMSNorm's mean of
squares is summed in another order. The runner uses these only where it attends natively
(native prefill), never where it promises `generate()`'s numbers.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import torch

from model_svc.engine import kernels

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "kernels" / "fused.c"
# Without it GCC keeps silu_mul's loop scalar on CPUs without AVX-512 (its e^x clamps stay branches: a
# comparison might trap), 2.3-2.8x the time on an AVX2 CPU; with AVX-512 the loop is written out in
# intrinsics (GCC's own vectorization of it was no faster there). No value changes either way
# (tests/unit/test_fused.py checks the scalar build's bits).
FLAGS = ("-fno-trapping-math",)


class FusedOps:
    def __init__(self, library: ctypes.CDLL):
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self._norm = library.add_rmsnorm_bf16
        self._norm.argtypes = [ptr, ptr, ptr, ptr, i64, i64, ctypes.c_float, i64, i64, i64]
        self._norm.restype = None
        self._rope = library.rope_store_bf16
        self._rope.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, ptr, ptr, ptr, i64, i64]
        self._rope.restype = ctypes.c_int
        self._silu_mul = library.silu_mul_bf16
        self._silu_mul.argtypes = [ptr, ptr, i64, i64]
        self._silu_mul.restype = None
        self.functions = {name: ctypes.cast(getattr(library, name), ptr).value
                          for name in ("add_rmsnorm_bf16", "rope_store_bf16", "silu_mul_bf16")}  # for layers.py
        # Built with AVX-512: long prompts' rows take silu_mul_run_long's arithmetic (silu.h).
        self.vector512 = library.fused_vector_width() == 16
        self._argmax = library.argmax_f32
        self._argmax.argtypes = [ptr, i64, i64, i64, ptr]
        self._argmax.restype = None

    def argmax(self, scores: torch.Tensor) -> list[int]:
        """torch.argmax(scores, dim=-1).tolist() for float32 rows [N, V] with unit stride along V (the
        same indices: first NaN, else first largest), rows shared out on the OpenMP pool: PyTorch's
        runs one thread at about a value per cycle, ~0.7 ms for a 32-row step of this vocabulary."""
        if scores.dim() != 2 or scores.dtype != torch.float32 or scores.stride(1) != 1 or scores.device.type != "cpu":
            return scores.argmax(dim=-1).tolist()
        out = torch.empty(scores.shape[0], dtype=torch.int64)
        self._argmax(scores.data_ptr(), scores.shape[0], scores.shape[1], scores.stride(0), out.data_ptr())
        return out.tolist()

    def add_rmsnorm(self, hidden: torch.Tensor, delta: torch.Tensor | None, norm: torch.nn.Module) -> torch.Tensor:
        """hidden [T, H] += delta [T, H] (in place; skipped when None); returns norm(hidden) as
        LlamaRMSNorm computes it. bfloat16, unit stride along H."""
        rows, size = hidden.shape
        weight = norm.weight
        if not (hidden.dtype == weight.dtype == torch.bfloat16 and hidden.stride(1) == 1
                and weight.is_contiguous() and weight.numel() == size):
            raise ValueError("add_rmsnorm: unexpected dtype or layout")
        if delta is not None and (delta.shape != hidden.shape or delta.dtype != torch.bfloat16 or delta.stride(1) != 1):
            raise ValueError("add_rmsnorm: delta must match hidden")
        out = torch.empty((rows, size), dtype=torch.bfloat16)
        self._norm(hidden.data_ptr(), None if delta is None else delta.data_ptr(), weight.data_ptr(), out.data_ptr(),
                   rows, size, float(norm.variance_epsilon), hidden.stride(0),
                   0 if delta is None else delta.stride(0), out.stride(0))
        return out

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor, long_rows: int = 0) -> torch.Tensor:
        """gate = silu(gate) * up in place, rounded as `F.silu(gate, inplace=True).mul_(up)` rounds; silu's
        e^x is the kernel's own (within ~2 ulp of float32 exp, so a value may land one bfloat16 step
        from PyTorch's, rarely). Contiguous bfloat16 tensors of one shape. The first `long_rows` rows
        (long prompts') take silu.h's silu_mul_run_long where built with AVX-512 (a cheaper 2^x, within
        a bfloat16 step of the other). Returns gate."""
        if not (gate.dtype == up.dtype == torch.bfloat16 and gate.shape == up.shape
                and gate.is_contiguous() and up.is_contiguous()):
            raise ValueError("silu_mul: unexpected dtype or layout")
        self._silu_mul(gate.data_ptr(), up.data_ptr(), gate.numel(), long_rows * gate.shape[-1])
        return gate

    def rope_store(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """query [T, Hq, D] and key [T, Hkv, D] get rotary positions in place (cos, sin: [T, D]); key and
        value [T, Hkv, D] are stored at `slots` [T] of one layer's arena keys/values [Hkv, slots, D]."""
        tokens, num_heads, head_dim = query.shape
        num_kv_heads = key.shape[1]
        tensors = (query, key, value, cos, sin)
        if not (all(t.dtype == torch.bfloat16 and t.is_contiguous() for t in tensors)
                and keys.dtype == values.dtype == torch.bfloat16 and keys.stride() == values.stride()
                and keys.stride(2) == 1 and slots.dtype == torch.int64 and slots.is_contiguous()
                and key.shape == value.shape and cos.shape == sin.shape == (tokens, head_dim)
                and len(slots) == tokens):
            raise ValueError("rope_store: unexpected dtype or layout")
        status = self._rope(query.data_ptr(), key.data_ptr(), value.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                            tokens, num_heads, num_kv_heads, head_dim, slots.data_ptr(), keys.data_ptr(),
                            values.data_ptr(), keys.stride(0), keys.stride(1))
        if status != 0:
            raise ValueError(f"rope_store: head size {head_dim} is not supported (even, at most 512)")


def load() -> FusedOps | None:
    """The compiled kernels, or None (logged) where they cannot be built here."""
    library = kernels.open_library(SOURCE, log, "fused elementwise kernels unavailable, using PyTorch's operators",
                                   flags=FLAGS)
    return FusedOps(library) if library is not None else None
