"""Attention for long prompts' chunks in one native call per layer (kernels/prefill_attention.c).

A prompt longer than the runner's NATIVE_MAX_PROMPT is prefilled in chunks, each attending all of
its sequence's keys so far. Taking those rows one at a time like decoded tokens (decode_attention.py)
costs ~850 ns a (query, key) pair over the model's 30 layers here, and PyTorch's SDPA with a causal
mask for the chunk ~600; this kernel puts 16 query vectors side by side and multiplies with the CPU's
bfloat16 dot-product instructions (figures: README, "Measured costs behind the design"). A query's
numbers depend on nothing but its own keys (see the C source), so they are the same however the
prompt is chunked and whatever else the step holds.

Built and loaded like the other kernels; where there is no compiler or no AVX-512 BF16, `load()`
returns None and long prompts attend through SDPA.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import torch

from model_svc.engine import kernels

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "kernels" / "prefill_attention.c"


class PrefillAttention:
    """Callable over one layer; see `__call__`."""

    def __init__(self, library: ctypes.CDLL):
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self._fns = {}
        for amx, name in ((False, "prefill_attention_bf16"), (True, "prefill_attention_amx_bf16")):
            fn = getattr(library, name)
            fn.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, i64,
                           ctypes.c_float]
            fn.restype = ctypes.c_int
            self._fns[amx] = fn
        self.has_amx = bool(library.prefill_amx_supported())  # built with the tile version (the CPU has AMX)
        self.use_amx(False)

    def use_amx(self, on: bool) -> None:
        """The tile version (on: where the runner's products run on tiles, which holds Linux's permission)
        or the AVX-512 one; each has its own bits, so a runner keeps one. Before the first call."""
        if on and not self.has_amx:
            raise ValueError("this build of the long-prompt attention has no AMX tiles")
        self.amx = on
        self.fn = self._fns[on]
        self.address = ctypes.cast(self.fn, ctypes.c_void_p).value  # for layers.py

    @staticmethod
    def fits(head_dim: int) -> bool:
        return head_dim % 32 == 0 and head_dim <= 256

    def __call__(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, out: torch.Tensor,
                 chunks: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                 block_size: int, scale: float) -> None:
        """query, out: [T, Hq, D] contiguous bfloat16; keys, values: [Hkv, slots, D] bfloat16 with unit
        stride in D. chunks: (starts, lengths, pasts, tables, table_offsets), contiguous int64: chunk c
        is query rows starts[c] .. + lengths[c], after pasts[c] cached tokens of its sequence, whose
        block table is tables[table_offsets[c]:]. Writes those rows of `out`."""
        num_heads, head_dim = query.shape[1], query.shape[2]
        if not (query.dtype == keys.dtype == values.dtype == out.dtype == torch.bfloat16):
            raise TypeError("prefill attention kernel takes bfloat16 tensors")
        if not (query.is_contiguous() and out.is_contiguous() and keys.stride(2) == 1
                and keys.stride() == values.stride()):
            raise ValueError("prefill attention kernel: unexpected layout")
        starts, lengths, pasts, tables, offsets = chunks
        for index in chunks:
            if index.dtype != torch.int64 or not index.is_contiguous():
                raise TypeError("chunk descriptions must be contiguous int64 tensors")
        status = self.fn(query.data_ptr(), keys.data_ptr(), values.data_ptr(), out.data_ptr(), starts.data_ptr(),
                         lengths.data_ptr(), pasts.data_ptr(), tables.data_ptr(), offsets.data_ptr(), len(starts),
                         block_size, num_heads, keys.shape[0], head_dim, keys.stride(0), keys.stride(1), scale)
        if status == -1:
            raise MemoryError("prefill attention kernel could not allocate its buffers")
        if status:
            raise ValueError(f"prefill attention kernel: head_dim {head_dim} with {num_heads} query and "
                             f"{keys.shape[0]} key/value heads is not supported")


def load() -> PrefillAttention | None:
    """The compiled kernel, or None (logged) where it cannot be built or run here."""
    library = kernels.open_library(
        SOURCE, log, "native long-prompt attention unavailable, using SDPA", "prefill_supported",
        "native long-prompt attention needs AVX-512 BF16, which this CPU lacks: using SDPA")
    return PrefillAttention(library) if library is not None else None
