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

import contextlib
import ctypes
import functools
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
        self._nf4.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, ptr, ptr, i64]
        self._nf4.restype = ctypes.c_int
        # (a, codes, absmax, code_values, m, n, k, blocksize, lda, parts, part_cols, part_c, long_rows) -> status
        self.nf4_function = self._nf4
        self.nf4_address = ctypes.cast(self._nf4, ptr).value  # for layers.py
        # The same product a group of column blocks at a time, for layers.py (a build without groups: -1).
        self.nf4_group_addresses = tuple(ctypes.cast(getattr(library, name), ptr).value
                                         for name in ("gemm_nf4_groups", "gemm_nf4_group"))
        # The gate/up product with silu * up after each group of column blocks (the AVX-512 build: its silu
        # is fused.c's, the same bits as the two calls; up is not written); None elsewhere.
        self._nf4_silu = library.gemm_nf4_silu_bf16
        self._nf4_silu.argtypes = self._nf4.argtypes
        self._nf4_silu.restype = ctypes.c_int
        self.nf4_silu_address = (ctypes.cast(self._nf4_silu, ptr).value if library.gemm_nf4_silu_supported()
                                 else None)
        self._dense = library.gemm_packed_bf16
        self._dense.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, i64]
        self._dense.restype = ctypes.c_int
        self._pack = library.pack_bf16
        self._pack.argtypes = [ptr, ptr, i64, i64]
        self._pack.restype = None
        self._int8 = library.gemm_int8_bf16
        self._int8.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, i64, ptr, i64]
        self._int8.restype = ctypes.c_int
        self.has_int8 = bool(library.gemm_int8_supported())  # this build has the int8 product
        self._set_direct_rows = library.gemm_set_direct_rows
        self._set_direct_rows.argtypes = [i64, i64]
        self._set_direct_rows.restype = i64
        self._set_amx = library.gemm_set_amx
        self._set_amx.argtypes = [i64]
        self._set_amx.restype = i64
        self.has_amx = self._set_amx(0) >= 0  # built with AMX tiles (the CPU has them): kernel_choice.choose_amx
        self.amx = False  # the products run on tiles now (set_amx)
        isa = library.gemm_isa
        isa.restype = ctypes.c_char_p
        self.isa = isa().decode()  # the instructions it was built with: "avx512-bf16" or "avx2"
        self.kernel_id = Path(getattr(library, "_name", "") or "").name  # the build: source, flags and CPU

    def set_direct_rows(self, kind: int, rows: int) -> int:
        """Products of at most `rows` rows read the weights directly (kind 0: nf4, 1: bfloat16, 2: int8), more
        rows through a panel: the same bits either way (kernel_choice.py measures where). Returns -1
        where the build has no such choice (AVX-512 BF16)."""
        return int(self._set_direct_rows(kind, rows))

    def set_amx(self, on: bool) -> int:
        """The 4-bit and int8 products on AMX tiles (on) or AVX-512 (off), at every row count: the tiles round
        their 16-pair sums differently, so a product never mixes the two. Returns 1 on, 0 off (or Linux
        refused the tile state), -1 where the build has no AMX."""
        state = int(self._set_amx(int(on)))
        self.amx = state == 1
        return state

    @contextlib.contextmanager
    def vector_path(self):
        """AVX-512 for the products inside, whose 4-bit bits are bitsandbytes' own (linear.py checks a
        layer's first product against the library's), then tiles again if they were on."""
        was = self.amx
        if was:
            self.set_amx(False)
        try:
            yield
        finally:
            if was:
                self.set_amx(True)

    @staticmethod
    def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
        if x.dtype != torch.bfloat16 or x.shape[-1] != k:
            raise ValueError(f"gemm: expected bfloat16 rows of {k}, got {x.dtype} {tuple(x.shape)}")
        rows = x.reshape(-1, k)
        return rows if rows.stride(-1) == 1 else rows.contiguous()

    def nf4(self, x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, code_values: torch.Tensor,
            n: int, blocksize: int, long_rows: int = 0) -> torch.Tensor:
        """x [..., k] @ W.T -> [..., n] for nf4 W in bitsandbytes' CPU packing: codes [n, k / 2] uint8,
        absmax [k / blocksize, n] bfloat16, code_values: the 16 values of the codes as bfloat16. The
        first `long_rows` rows are long prompts': on AMX tiles, their sums are taken over the
        dequantized bfloat16 weights, all of k at once (other bits than the other rows', the same at
        every row count); elsewhere they are summed as the others."""
        return self.nf4_parts(x, codes, absmax, code_values, [n], blocksize, long_rows)[0]

    def nf4_parts(self, x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, code_values: torch.Tensor,
                  part_cols: list[int], blocksize: int, long_rows: int = 0) -> list[torch.Tensor]:
        """`nf4` for W made of several layers' weights side by side (n = sum(part_cols)): one product,
        each layer's output its own tensor [..., part_cols[i]]."""
        rows = self._rows(x, codes.shape[1] * 2)
        outs = [torch.empty((rows.shape[0], cols), dtype=torch.bfloat16) for cols in part_cols]
        self._nf4_call(self._nf4, rows, codes, absmax, code_values, part_cols, outs, blocksize, long_rows)
        return [out.view(*x.shape[:-1], out.shape[1]) for out in outs]

    def nf4_silu(self, x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, code_values: torch.Tensor,
                 width: int, blocksize: int, long_rows: int = 0) -> torch.Tensor:
        """silu(gate) * up [..., width] for the gated MLP's weight [gate; up] (n = 2 * width) in one call,
        rounded as `nf4_parts` then fused.c's silu_mul round them (the same bits). Where the build has
        no such path (nf4_silu_address is None), ValueError."""
        if self.nf4_silu_address is None:
            raise ValueError("gemm: this build has no product with silu * up")
        rows = self._rows(x, codes.shape[1] * 2)
        gate = torch.empty((rows.shape[0], width), dtype=torch.bfloat16)
        self._nf4_call(self._nf4_silu, rows, codes, absmax, code_values, [width, width], [gate, None], blocksize,
                       long_rows)
        return gate.view(*x.shape[:-1], width)

    @staticmethod
    def _nf4_call(function, rows: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, code_values: torch.Tensor,
                  part_cols: list[int], outs: list, blocksize: int, long_rows: int) -> None:
        """One call of a 4-bit product over `rows` into parts of part_cols[i] columns, part i into
        outs[i] (None: the kernel writes no such part)."""
        cols = (ctypes.c_int64 * len(part_cols))(*part_cols)
        pointers = (ctypes.c_void_p * len(outs))(*[None if out is None else out.data_ptr() for out in outs])
        if rows.shape[0] and function(rows.data_ptr(), codes.data_ptr(), absmax.data_ptr(), code_values.data_ptr(),
                                      rows.shape[0], sum(part_cols), codes.shape[1] * 2, blocksize, rows.stride(0),
                                      len(outs), cols, pointers, long_rows):
            raise MemoryError("gemm: could not allocate the block scales")

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

    def int8(self, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """x [..., k] @ W.T -> [..., n] for int8 W from `quantize_int8` (codes [n / 32, k, 32], scales
        [n / 32, k / blocksize, 32] float32)."""
        blocks, k, _ = codes.shape
        n, blocksize = blocks * COLUMNS, k // scales.shape[1]
        rows = self._rows(x, k)
        out = torch.empty((rows.shape[0], n), dtype=torch.bfloat16)
        if rows.shape[0] and self._int8(rows.data_ptr(), codes.data_ptr(), scales.data_ptr(), rows.shape[0], n, k,
                                        blocksize, rows.stride(0), out.data_ptr(), n):
            raise MemoryError("gemm: could not allocate an int8 panel")
        return out.view(*x.shape[:-1], n)

    @staticmethod
    def fits(n: int, k: int, blocksize: int = 2) -> bool:  # each part's n, for nf4_parts
        """Whether a weight [n, k] (nf4 blocks of `blocksize` along k) has the shapes the kernel takes."""
        return n % COLUMNS == 0 and blocksize % 2 == 0 and k % blocksize == 0 and k > 0


def quantize_int8(weight: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight [n, k] as int8 codes [n / 32, k, 32] and float32 scales [n / 32, k / blocksize, 32]: per
    column and block of `blocksize` inputs, scale = absmax / 127 and code = round(w / scale) (symmetric;
    an all-zero block has scale 0). The layout `Gemm.int8` reads; `dequantize_int8` undoes it."""
    n, k = weight.shape
    if not Gemm.fits(n, k, blocksize):
        raise ValueError(f"int8: a weight [{n}, {k}] in blocks of {blocksize} does not fit the kernel's layout")
    w = weight.detach().float().reshape(n, k // blocksize, blocksize)
    scales = w.abs().amax(dim=2) / 127
    codes = torch.round(w / torch.where(scales > 0, scales, 1).unsqueeze(2)).clamp(-127, 127).to(torch.int8)
    codes = codes.reshape(n // COLUMNS, COLUMNS, k).transpose(1, 2).contiguous()
    scales = scales.reshape(n // COLUMNS, COLUMNS, k // blocksize).transpose(1, 2).contiguous()
    return codes, scales


def dequantize_int8(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """`quantize_int8`'s codes and scales back to a float32 weight [n, k]."""
    blocks, k, _ = codes.shape
    per = k // scales.shape[1]
    w = codes.float() * scales.repeat_interleave(per, dim=1)
    return w.transpose(1, 2).reshape(blocks * COLUMNS, k)


class Int8Linear(torch.nn.Module):
    """An output layer in int8 (--output-layer int8): codes and scales from `quantize_int8`. Its call
    takes bfloat16 rows on the CPU to `Gemm.int8` wherever the kernel has it, so the engine (linear.py
    binds the same product) and generate() on this model get the same, batch-invariant bits; anywhere
    else it multiplies by the dequantized weight in float32 (made on first use)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, blocksize: int = 64):
        super().__init__()
        codes, scales = quantize_int8(weight, blocksize)
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.out_features, self.in_features = weight.shape
        self.blocksize = blocksize
        self._weight: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = int8_kernel() if x.dtype == torch.bfloat16 and x.device.type == "cpu" else None
        if kernel is not None:
            out = kernel.int8(x, self.codes, self.scales)
            return out if self.bias is None else out + self.bias
        if self._weight is None:
            self._weight = dequantize_int8(self.codes, self.scales)
        out = torch.nn.functional.linear(x.float(), self._weight, None if self.bias is None else self.bias.float())
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 blocks of {self.blocksize}"


@functools.cache
def int8_kernel() -> Gemm | None:
    """The kernel, where its build has the int8 product (once a process)."""
    kernel = load()
    return kernel if kernel is not None and kernel.has_int8 else None


def load() -> Gemm | None:
    """The compiled kernel, or None (logged) where it cannot be built or run here."""
    library = kernels.open_library(
        SOURCE, log, "native matrix products unavailable, using the libraries' kernels", "gemm_supported",
        "native matrix products need AVX-512 BF16 or AVX2 with FMA, which this CPU lacks: using the libraries' "
        "kernels")
    return Gemm(library) if library is not None else None
