"""Attention for all of a step's one-token query rows in one native call.

The rows are the decoded tokens and, with native prefill attention (the default), every prompt
token, each seeing its sequence's keys up to its own position. Attending each decoded token through its own
SDPA call costs a fixed dispatch per sequence and layer (a third of a 16-stream step), and one padded
SDPA call for the batch changes a sequence's numbers with its neighbours' lengths. The C kernel in
kernels/decode_attention.c reads each sequence's keys and values where they lie in the arena's
blocks (through its block table) and does one (sequence, key/value head) pair per pass in a fixed
order, so it is batch-invariant by construction and costs a tenth as much for the same work
(figures: README, "Measured costs behind the design").

The kernel is compiled on first use (kernels/__init__.py, ~0.5 s). Where it cannot be built,
`load()` returns None and the runner attends per sequence.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import torch

from model_svc.engine import kernels

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "kernels" / "decode_attention.c"


class DecodeAttention:
    """Callable over one layer; see `__call__`."""

    def __init__(self, library: ctypes.CDLL):
        self.fn = library.decode_attention_bf16
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self.fn.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, ctypes.c_float,
                            i64, i64]
        self.fn.restype = ctypes.c_int
        self.address = ctypes.cast(self.fn, ptr).value  # for layers.py

    def __call__(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, out: torch.Tensor,
                 rows: torch.Tensor, tables: torch.Tensor, table_offsets: torch.Tensor, lengths: torch.Tensor,
                 block_size: int, scale: float) -> None:
        """query, out: [T, Hq, D] contiguous bfloat16; keys, values: [Hkv, slots, D] bfloat16 with unit
        stride in D (views of the arena); rows, table_offsets, lengths: [B] int64; tables: the block
        tables, concatenated, int64. Writes out[rows[b]] for every b: query row rows[b] attending the
        first lengths[b] keys of its sequence, whose blocks are tables[table_offsets[b]:]."""
        num_heads, head_dim = query.shape[1], query.shape[2]
        num_kv_heads = keys.shape[0]
        if not (query.dtype == keys.dtype == values.dtype == out.dtype == torch.bfloat16):
            raise TypeError("decode attention kernel takes bfloat16 tensors")
        if not (query.is_contiguous() and out.is_contiguous() and keys.stride(2) == 1
                and keys.stride() == values.stride() and num_heads % num_kv_heads == 0):
            raise ValueError("decode attention kernel: unexpected layout")
        for index in (rows, tables, table_offsets, lengths):
            if index.dtype != torch.int64 or not index.is_contiguous():
                raise TypeError("rows, tables, table_offsets and lengths must be contiguous int64 tensors")
        status = self.fn(query.data_ptr(), keys.data_ptr(), values.data_ptr(), out.data_ptr(), rows.data_ptr(),
                         tables.data_ptr(), table_offsets.data_ptr(), lengths.data_ptr(), block_size, num_heads,
                         num_kv_heads, head_dim, keys.stride(0), keys.stride(1), scale, 0,
                         len(rows) * num_kv_heads)
        if status != 0:
            raise MemoryError("decode attention kernel could not allocate its buffers")


def load() -> DecodeAttention | None:
    """The compiled kernel, or None (logged) where it cannot be built here."""
    library = kernels.open_library(SOURCE, log, "native decode attention unavailable, attending per sequence")
    return DecodeAttention(library) if library is not None else None
