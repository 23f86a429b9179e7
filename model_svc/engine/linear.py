"""Linear layers, with a short path to bitsandbytes' CPU 4-bit kernel.

A bitsandbytes `Linear4bit` call on the CPU goes through the module, `matmul_4bit`, the torch op
dispatcher and a Python kernel wrapper that, every call, compares a tensor element to tell nf4 from
fp4 and re-derives shapes before it reaches the C kernel. A step of this model makes 210 such calls,
and that overhead was a fifth of a single-stream step (README, "Measured costs behind the design").
`Linears` calls the same C kernel with the same arguments directly, once the
module has packed its weight for the CPU (its first call does), and checks on that first call that
both paths give the same bits; anything else (other devices, dtypes, quantizations, a library
without the kernel, a mismatch) takes the module's own call.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass
class _Packed:
    kernel: object
    weight: torch.Tensor
    absmax: torch.Tensor
    out_features: int
    blocksize: int
    bias: torch.Tensor | None


def _packed_params(module: torch.nn.Module) -> _Packed | None:
    try:
        import bitsandbytes as bnb
        from bitsandbytes.cextension import lib
    except ImportError:
        return None
    if not isinstance(module, bnb.nn.Linear4bit):
        return None
    state = getattr(module.weight, "quant_state", None)
    if state is None or not getattr(state, "packing_format_for_cpu", False) or state.nested:
        return None
    name = "gemv_4bit_inference_cpu_fp4_bf16" if float(state.code[1]) > 0 else "gemv_4bit_inference_cpu_nf4_bf16"
    kernel = getattr(lib, name, None)
    if kernel is None or state.absmax.dtype != torch.bfloat16 or module.weight.data.dtype != torch.uint8:
        return None
    bias = None if module.bias is None else module.bias.to(torch.bfloat16)
    return _Packed(kernel, module.weight.data, state.absmax, int(state.shape[0]), int(state.blocksize), bias)


class Linears:
    def __init__(self) -> None:
        self._packed: dict[int, _Packed | None] = {}

    def __call__(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        key = id(module)
        packed = self._packed.get(key, False)
        if packed is False:  # first call: the module's own (it packs its weight), then a check
            out = module(x)
            packed = _packed_params(module) if x.device.type == "cpu" and x.dtype == torch.bfloat16 else None
            if packed is not None and not torch.equal(self._direct(packed, x), out):
                log.warning("direct 4-bit kernel call differs from bitsandbytes' own; using the module")
                packed = None
            self._packed[key] = packed
            return out
        if packed is None or x.dtype != torch.bfloat16 or x.device.type != "cpu":
            return module(x)
        return self._direct(packed, x)

    @staticmethod
    def _direct(packed: _Packed, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        out = torch.empty((rows.shape[0], packed.out_features), dtype=torch.bfloat16, device=x.device)
        i64 = ctypes.c_int64
        packed.kernel(i64(rows.shape[0]), i64(packed.out_features), i64(rows.shape[1]),
                      ctypes.c_void_p(rows.data_ptr()), ctypes.c_void_p(packed.weight.data_ptr()),
                      ctypes.c_void_p(packed.absmax.data_ptr()), ctypes.c_void_p(out.data_ptr()),
                      i64(packed.blocksize), i64(rows.stride(0)), i64(out.stride(0)))
        if packed.bias is not None:
            out += packed.bias
        return out.view(*x.shape[:-1], packed.out_features)
