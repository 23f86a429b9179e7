"""The step's matrix products through kernels/gemm_bf16.c: nf4 and bfloat16 weights times bfloat16 rows
with the CPU's bfloat16 dot-product instructions (AVX-512 BF16), or, without them, float32 FMAs (AVX2)
that follow those instructions' documented arithmetic.

bitsandbytes' own CPU kernel runs a 32-row step at about half this machine's bfloat16 peak and
PyTorch's bfloat16 matmul (the output embedding) at about the same; this kernel decodes the 4-bit
codes in registers, once for a tile of up to twelve rows, and prefetches the weights it streams
from memory (figures: README, "Measured costs behind the design"). A row's result depends only on
that row (fixed summation order), so it is batch-invariant like the rest of the native path. It rounds
differently from bitsandbytes' kernel (another summation order), so the runner uses it only where
it promises native numbers, never with --match-generate.

Built and loaded like the attention kernel, with OpenMP on PyTorch's thread pool. Where there is no C
compiler, neither AVX-512 BF16 nor AVX2 with FMA, or a weight in another format, the library's own
kernels run. (Without AVX-512 BF16, bitsandbytes dequantizes a whole 4-bit weight every call: the
native kernel took 0.11-0.14x its time for a 576 x 1536 layer at 1-32 rows; linear.py packs a copy.)
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import torch

from model_svc.engine import kernels

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "kernels" / "gemm_bf16.c"
COLUMNS = 32  # output columns per block: bitsandbytes' CPU packing, and the kernel's


class Gemm:
    def __init__(self, library: ctypes.CDLL):
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self._nf4 = library.gemm_nf4_bf16
        self._nf4.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, ptr, ptr]
        self._nf4.restype = ctypes.c_int
        # (a, codes, absmax, code_values, m, n, k, blocksize, lda, parts, part_cols, part_c) -> status
        self.nf4_function = self._nf4
        self._dense = library.gemm_packed_bf16
        self._dense.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, i64]
        self._dense.restype = ctypes.c_int
        self._pack = library.pack_bf16
        self._pack.argtypes = [ptr, ptr, i64, i64]
        self._pack.restype = None
        self._set_direct_rows = library.gemm_set_direct_rows
        self._set_direct_rows.argtypes = [i64, i64]
        self._set_direct_rows.restype = i64
        isa = library.gemm_isa
        isa.restype = ctypes.c_char_p
        self.isa = isa().decode()  # the instructions it was built with: "avx512-bf16" or "avx2"
        self.kernel_id = Path(getattr(library, "_name", "") or "").name  # the build: source, flags and CPU

    def set_direct_rows(self, kind: int, rows: int) -> int:
        """Products of at most `rows` rows read the weights directly (kind 0: nf4, 1: bfloat16), more
        rows through a panel: the same bits either way (kernel_choice.py measures where). Returns -1
        where the build has no such choice (AVX-512 BF16)."""
        return int(self._set_direct_rows(kind, rows))

    @staticmethod
    def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
        if x.dtype != torch.bfloat16 or x.shape[-1] != k:
            raise ValueError(f"gemm: expected bfloat16 rows of {k}, got {x.dtype} {tuple(x.shape)}")
        rows = x.reshape(-1, k)
        return rows if rows.stride(-1) == 1 else rows.contiguous()

    def nf4(self, x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, code_values: torch.Tensor,
            n: int, blocksize: int) -> torch.Tensor:
        """x [..., k] @ W.T -> [..., n] for nf4 W in bitsandbytes' CPU packing: codes [n, k / 2] uint8,
        absmax [k / blocksize, n] bfloat16, code_values: the 16 values of the codes as bfloat16."""
        return self.nf4_parts(x, codes, absmax, code_values, [n], blocksize)[0]

    def nf4_parts(self, x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, code_values: torch.Tensor,
                  part_cols: list[int], blocksize: int) -> list[torch.Tensor]:
        """`nf4` for W made of several layers' weights side by side (n = sum(part_cols)): one product,
        each layer's output its own tensor [..., part_cols[i]]."""
        k, n = codes.shape[1] * 2, sum(part_cols)
        rows = self._rows(x, k)
        outs = [torch.empty((rows.shape[0], cols), dtype=torch.bfloat16) for cols in part_cols]
        cols = (ctypes.c_int64 * len(outs))(*part_cols)
        pointers = (ctypes.c_void_p * len(outs))(*[out.data_ptr() for out in outs])
        if rows.shape[0] and self._nf4(rows.data_ptr(), codes.data_ptr(), absmax.data_ptr(), code_values.data_ptr(),
                                       rows.shape[0], n, k, blocksize, rows.stride(0), len(outs), cols, pointers):
            raise MemoryError("gemm: could not allocate the block scales")
        return [out.view(*x.shape[:-1], out.shape[1]) for out in outs]

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        """A bfloat16 weight [n, k] in the kernel's layout ([n / 32][k / 2][32][2])."""
        weight = weight.detach().contiguous()
        packed = torch.empty_like(weight)
        self._pack(weight.data_ptr(), packed.data_ptr(), weight.shape[0], weight.shape[1])
        return packed

    def dense(self, x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        """x [..., k] @ W.T -> [..., n] for a weight [n, k] packed by `pack`."""
        n, k = packed.shape
        rows = self._rows(x, k)
        out = torch.empty((rows.shape[0], n), dtype=torch.bfloat16)
        if rows.shape[0]:
            self._dense(rows.data_ptr(), packed.data_ptr(), out.data_ptr(), rows.shape[0], n, k, rows.stride(0), n)
        return out.view(*x.shape[:-1], n)

    @staticmethod
    def fits(n: int, k: int, blocksize: int = 2) -> bool:  # each part's n, for nf4_parts
        """Whether a weight [n, k] (nf4 blocks of `blocksize` along k) has the shapes the kernel takes."""
        return n % COLUMNS == 0 and blocksize % 2 == 0 and k % blocksize == 0 and k > 0


def load() -> Gemm | None:
    """The compiled kernel, or None (logged) where it cannot be built or run here."""
    library = kernels.open_library(
        SOURCE, log, "native matrix products unavailable, using the libraries' kernels", "gemm_supported",
        "native matrix products need AVX-512 BF16 or AVX2 with FMA, which this CPU lacks: using the libraries' "
        "kernels")
    return Gemm(library) if library is not None else None
