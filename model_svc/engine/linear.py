"""Linear layers: bitsandbytes' 4-bit layers through our native kernel (the library's very bits,
faster at a step's many rows), or a short path to the library's own CPU kernel.

A bitsandbytes `Linear4bit` call on the CPU goes through the module, `matmul_4bit`, the torch op
dispatcher and a Python kernel wrapper that, every call, compares a tensor element to tell nf4 from
fp4 and re-derives shapes before it reaches the C kernel; a step of this model makes 210 such calls,
and that overhead was a fifth of a single-stream step. Both paths here skip it. Once a module has
packed its weight for the CPU (its first call does), an nf4 layer goes to gemm.py's kernel, which
computes what bitsandbytes' kernel computes (bfloat16 code values, float32 sums per quantization
block, scaled) in the same order, so the bits are the same; a 32-row step's products take ~0.75x
the time (README, "Measured costs behind the design"). The first call checks, per module, that the
chosen path gives the module's own bits, and takes the module's call otherwise.

An int8 output layer (gemm.Int8Linear) goes to the kernel's int8 product, as its own call does.
`dense=True` also sends bfloat16 `nn.Linear` layers (the output embedding) through the native kernel,
on a copy of the weight packed for it: batch-invariant by construction, but summed in another order
than PyTorch's matmul, so only where the runner promises native numbers. Likewise for 4-bit layers
the library does not pack (no AVX-512 BF16: its call dequantizes the whole weight every time): the
kernel runs on a packed copy, the module is left as it was.
"""

from __future__ import annotations

import copy
import ctypes
import logging
from dataclasses import dataclass

import torch

from model_svc.engine.gemm import Gemm, Int8Linear

log = logging.getLogger(__name__)


@dataclass
class _Packed:
    kernel: object  # bitsandbytes' own C function
    weight: torch.Tensor  # the codes, [n, k / 2] uint8 in the library's CPU packing
    absmax: torch.Tensor
    code_values: torch.Tensor  # the 16 code values, bfloat16 (as the library's kernel uses them)
    out_features: int
    blocksize: int
    bias: torch.Tensor | None
    own: bool = False  # our copy in the CPU packing (the module's weight left as it was)


@dataclass
class _Dense:
    packed: torch.Tensor
    bias: torch.Tensor | None


def _quant_state(module: torch.nn.Module, packed: bool):
    """A bitsandbytes 4-bit layer's quantization state, if it is one and packed for the CPU (or not) as asked."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    state = getattr(module.weight, "quant_state", None) if isinstance(module, bnb.nn.Linear4bit) else None
    if state is None or bool(getattr(state, "packing_format_for_cpu", False)) != packed:
        return None
    return state


def _packed_params(module: torch.nn.Module) -> _Packed | None:
    state = _quant_state(module, packed=True)
    if state is None or state.nested:
        return None
    from bitsandbytes.cextension import lib

    name = "gemv_4bit_inference_cpu_fp4_bf16" if float(state.code[1]) > 0 else "gemv_4bit_inference_cpu_nf4_bf16"
    kernel = getattr(lib, name, None)
    if kernel is None or state.absmax.dtype != torch.bfloat16 or module.weight.data.dtype != torch.uint8:
        return None
    bias = None if module.bias is None else module.bias.to(torch.bfloat16)
    return _Packed(kernel, module.weight.data, state.absmax, state.code.to(torch.bfloat16), int(state.shape[0]),
                   int(state.blocksize), bias)


def _own_packed(module: torch.nn.Module) -> _Packed | None:
    """A copy of an nf4/fp4 layer's weight in bitsandbytes' CPU packing, for the native kernel where the
    library does not pack it (CPUs without AVX-512 BF16, whose module call dequantizes the whole
    weight every call: ~8x the native kernel's time at 1-32 rows). The module is left untouched, so
    that its own calls (and generate() on the same model) still compute what the library computes."""
    state = _quant_state(module, packed=False)
    if (state is None or len(state.shape) != 2 or state.shape[0] % 32 or state.shape[1] % 2
            or state.code is None or len(state.code) != 16):
        return None
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    codes, state = _convert_weight_packed_for_cpu(module.weight.data, copy.deepcopy(state))  # it edits the state
    bias = None if module.bias is None else module.bias.detach().to(torch.bfloat16)
    return _Packed(None, codes, state.absmax, state.code.to(torch.bfloat16), int(state.shape[0]),
                   int(state.blocksize), bias, own=True)


class Linears:
    def __init__(self, gemm: Gemm | None = None, dense: bool = False) -> None:
        self.gemm = gemm
        # Rows 0 .. long_rows - 1 of the native 4-bit products' inputs are long prompts' (Gemm.nf4): the
        # runner sets it around a step's layers and back to 0 before the output layer.
        self.long_rows = 0
        self.dense = dense and gemm is not None
        self._packed: dict[int, _Packed | _Dense | None] = {}
        self._native: dict[int, bool] = {}  # nf4 layers: through gemm (else the library's kernel)
        self._calls: dict[int, object] = {}  # native nf4 layers, after their first call: the bound product
        self._many: dict[tuple[int, ...], object] = {}  # layers sharing an input: their joint product, or False

    def __call__(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        call = self._calls.get(id(module))
        if call is not None and x.dtype is torch.bfloat16:
            return call(x)
        key = id(module)
        packed = self._packed.get(key, False)
        if packed is False:
            return self._first_call(module, x)
        if packed is None or x.dtype != torch.bfloat16 or x.device.type != "cpu":
            return module(x)
        if isinstance(packed, _Dense):
            out = self.gemm.dense(x, packed.packed)
            if packed.bias is not None:
                out += packed.bias
            return out
        return self._direct(packed, x)  # (native 4-bit layers are bound in _calls after their first call)

    def _native_call(self, parts: list[_Packed], codes: torch.Tensor, absmax: torch.Tensor):
        """The native product of one layer, or of several side by side (`codes`, `absmax`: theirs
        concatenated), with everything but the rows bound once: a step makes ~210 of these calls,
        and checking and converting the same arguments each time cost ~5 us a call. Returns a
        function of the rows giving each layer's output."""
        fn, k, blocksize = self.gemm.nf4_function, codes.shape[1] * 2, parts[0].blocksize
        widths = [p.out_features for p in parts]
        weights = (codes.data_ptr(), absmax.data_ptr(), parts[0].code_values.data_ptr())
        cols, pointers = (ctypes.c_int64 * len(parts))(*widths), (ctypes.c_void_p * len(parts))()
        biases = [p.bias for p in parts]
        n, empty, bf16 = sum(widths), torch.empty, torch.bfloat16

        def call(x: torch.Tensor) -> list[torch.Tensor]:
            rows = x.reshape(-1, k)
            if not rows.is_contiguous():
                rows = rows.contiguous()
            m = rows.shape[0]
            outs = [empty((m, width), dtype=bf16) for width in widths]
            for i, out in enumerate(outs):
                pointers[i] = out.data_ptr()
            if m and fn(rows.data_ptr(), *weights, m, n, k, blocksize, k, len(outs), cols, pointers, self.long_rows):
                raise MemoryError("gemm: could not allocate the block scales")
            for out, bias in zip(outs, biases):
                if bias is not None:
                    out += bias
            return outs if x.dim() == 2 else [out.view(*x.shape[:-1], out.shape[1]) for out in outs]

        call.weights = (codes, absmax, parts)  # keeps what the pointers point into alive
        return call

    def _bind(self, module: torch.nn.Module, packed: _Packed) -> None:
        product = self._native_call([packed], packed.weight, packed.absmax)
        call = self._calls[id(module)] = lambda x: product(x)[0]
        call.weights = product.weights

    def native_product(self, modules: tuple[torch.nn.Module, ...]):
        """The modules' one native product, as kernels/layers.c calls it: (codes, absmax, code values,
        each module's width, block size), all of them bias-free nf4 layers bound to the kernel (and,
        for several, fused into one product). None while their first calls are still to come; False
        where they will not run so."""
        if len(modules) > 1:
            call = self._many.get(tuple(map(id, modules)))
        elif id(modules[0]) in self._packed:
            call = self._calls.get(id(modules[0]), False)
        else:
            call = None
        if call is None or call is False:
            return call
        if getattr(call, "weights", None) is None:
            return False
        codes, absmax, parts = call.weights
        if any(p.bias is not None for p in parts):
            return False
        return codes, absmax, parts[0].code_values, [p.out_features for p in parts], parts[0].blocksize

    def many(self, modules: tuple[torch.nn.Module, ...], x: torch.Tensor) -> list[torch.Tensor]:
        """Each module applied to x: layers that share their input (q, k and v; gate and up) in one
        native product when all of them run natively, their outputs separate tensors. The same bits
        as one call each (each output element's sum is the same); one kernel call instead of three
        is ~20 us less a layer, most of it for k and v's narrow products."""
        key = tuple(map(id, modules))
        call = self._many.get(key)
        if call is None:
            if not all(id(m) in self._packed for m in modules):  # their first calls: each alone, checked
                return [self(m, x) for m in modules]
            call = self._many[key] = self._fuse(modules)
        if call is False or x.dtype is not torch.bfloat16:
            return [self(m, x) for m in modules]
        return call(x)

    def _fuse(self, modules: tuple[torch.nn.Module, ...]):
        packed = [self._packed[id(m)] for m in modules]
        if not all(self._native[id(m)] and isinstance(p, _Packed) for m, p in zip(modules, packed)):
            return False
        first = packed[0]
        if any(p.weight.shape[1] != first.weight.shape[1] or p.blocksize != first.blocksize
               or not torch.equal(p.code_values, first.code_values) for p in packed):
            return False
        codes = torch.cat([p.weight for p in packed])
        absmax = torch.cat([p.absmax for p in packed], dim=1).contiguous()
        # The layers' codes now live side by side: each module's weight becomes its slice (no second copy).
        start = 0
        for module, p in zip(modules, packed):
            p.weight = codes[start:start + p.out_features]
            if not p.own:
                module.weight.data = p.weight
            start += p.out_features
            self._bind(module, p)
        return self._native_call(packed, codes, absmax)

    def called(self, module: torch.nn.Module) -> bool:
        """Whether the module has had its first call (its path is chosen)."""
        return id(module) in self._native

    def uses_native(self, module: torch.nn.Module) -> bool:
        """Whether a module's calls (after its first) go through the native kernel."""
        return self._native.get(id(module), False)

    def _first_call(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The module's own call (it packs its weight), then the fastest path that agrees with it."""
        key = id(module)
        cpu_bf16 = x.device.type == "cpu" and x.dtype == torch.bfloat16
        if isinstance(module, Int8Linear):
            return self._int8_first_call(module, x, cpu_bf16)
        out = module(x)
        packed = _packed_params(module) if cpu_bf16 else None
        if packed is None and cpu_bf16 and self.dense:
            packed = _own_packed(module)
        self._native[key] = False
        if packed is not None:
            if self.gemm is not None and Gemm.fits(packed.out_features, packed.weight.shape[1] * 2, packed.blocksize):
                self._native[key] = True

                def product() -> torch.Tensor:
                    return self._with_bias(packed, self.gemm.nf4(
                        x, packed.weight, packed.absmax, packed.code_values, packed.out_features, packed.blocksize,
                        self.long_rows))

                with self.gemm.vector_path():  # the bits the library's kernel gives, to check the binding
                    native = product()
                if packed.own:
                    out = native  # its numbers from now on: the kernel's (the module's are another order's)
                elif not torch.equal(native, out):
                    log.warning("native 4-bit product differs from bitsandbytes' own; using the library's kernel")
                    self._native[key] = False
                if self._native[key] and self.gemm.amx:
                    out = product()  # on AMX tiles: their numbers from the first call on
            if self._native[key]:
                self._bind(module, packed)
            elif packed.own:
                packed = None  # no library kernel to call directly: the module's call
            elif not torch.equal(self._direct(packed, x), out):
                log.warning("direct 4-bit kernel call differs from bitsandbytes' own; using the module")
                packed = None
        elif (self.dense and cpu_bf16 and type(module) is torch.nn.Linear and module.weight.dtype == torch.bfloat16
              and Gemm.fits(module.out_features, module.in_features)):
            packed = _Dense(self.gemm.pack(module.weight), None if module.bias is None else module.bias.detach())
            self._native[key] = True
            out = self.gemm.dense(x, packed.packed)  # this layer's numbers from now on: the native kernel's
            if packed.bias is not None:
                out += packed.bias
        self._packed[key] = packed
        return out

    def _int8_first_call(self, module: Int8Linear, x: torch.Tensor, cpu_bf16: bool) -> torch.Tensor:
        """An int8 output layer: the kernel's int8 product bound directly where it runs (the module's own
        call makes the same one: the same bits with or without native numerics), else the module's call."""
        key = id(module)
        native = (cpu_bf16 and self.gemm is not None and self.gemm.has_int8
                  and Gemm.fits(module.out_features, module.in_features, module.blocksize))
        self._native[key] = native
        self._packed[key] = None
        if not native:
            return module(x)
        gemm, codes, scales, bias = self.gemm, module.codes, module.scales, module.bias

        def call(rows: torch.Tensor) -> torch.Tensor:
            out = gemm.int8(rows, codes, scales)
            if bias is not None:
                out += bias
            return out

        self._calls[key] = call
        return call(x)

    @staticmethod
    def _with_bias(packed: _Packed, out: torch.Tensor) -> torch.Tensor:
        if packed.bias is not None:
            out += packed.bias
        return out

    @staticmethod
    def _direct(packed: _Packed, x: torch.Tensor) -> torch.Tensor:
        """bitsandbytes' C kernel, called with the arguments its Python wrapper would pass."""
        rows = x.reshape(-1, x.shape[-1])
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        out = torch.empty((rows.shape[0], packed.out_features), dtype=torch.bfloat16, device=x.device)
        i64 = ctypes.c_int64
        packed.kernel(i64(rows.shape[0]), i64(packed.out_features), i64(rows.shape[1]),
                      ctypes.c_void_p(rows.data_ptr()), ctypes.c_void_p(packed.weight.data_ptr()),
                      ctypes.c_void_p(packed.absmax.data_ptr()), ctypes.c_void_p(out.data_ptr()),
                      i64(packed.blocksize), i64(rows.stride(0)), i64(out.stride(0)))
        return Linears._with_bias(packed, out.view(*x.shape[:-1], packed.out_features))
