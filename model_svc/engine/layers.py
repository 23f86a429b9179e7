"""The decoder layers of a step in one native call (kernels/layers.c), where every token attends natively.

The runner's Python loop over the layers makes about a dozen calls a layer, each checking its
arguments and allocating its result: at one row that was about a third of a step. layers.c makes
the very same kernel calls in the same order with the same arguments (it has no arithmetic of its
own), so a step gets the same bits through either loop, and a sequence's numbers do not depend on
which loop its step took. It runs a step when:
- the runner has native numerics (fused.py, the native attention and matrix kernels),
- every projection of every layer is a bias-free nf4 layer bound to the native kernel, q/k/v and
  gate/up each as one joint product (linear.py, after the layers' first calls),
- every token of the step attends through a native attention kernel (the decode kernel, or the
  long-prompt kernel for long prompts' chunks; not SDPA), and rows with a LoRA adapter have the
  native LoRA kernel (lora.py; its calls made here too);
otherwise the Python loop runs it. A step can still be stopped between layers (`Interrupt`).
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path

import torch

from model_svc.engine import kernels

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "kernels" / "layers.c"
_ptr, _i64, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class _Kernels(ctypes.Structure):
    _fields_ = [("nf4", _ptr), ("norm", _ptr), ("rope", _ptr), ("attend", _ptr), ("attend_long", _ptr),
                ("silu_mul", _ptr), ("lora", _ptr), ("nf4_groups", _ptr), ("nf4_group", _ptr),
                ("lora_prepare", _ptr), ("lora_item", _ptr), ("lora_finish_item", _ptr), ("lora_release", _ptr),
                ("nf4_silu", _ptr)]


class _Lora(ctypes.Structure):
    _fields_ = [("modules", _i64), ("index", _i64 * 3), ("pairs", _ptr * 3)]


class _Product(ctypes.Structure):
    _fields_ = [("codes", _ptr), ("absmax", _ptr), ("code_values", _ptr), ("n", _i64), ("k", _i64),
                ("blocksize", _i64), ("parts", _i64), ("part_cols", _ptr)]


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", _ptr), ("post_norm", _ptr), ("input_eps", _f32), ("post_eps", _f32),
                ("scale", _f32), ("qkv", _Product), ("o", _Product), ("gate_up", _Product), ("down", _Product),
                ("keys", _ptr), ("values", _ptr), ("lora", _Lora * 4)]


class _Step(ctypes.Structure):
    _fields_ = [(name, _i64) for name in ("tokens", "hidden", "num_heads", "num_kv_heads", "head_dim",
                                          "intermediate", "head_stride", "slot_stride", "block_size", "dummy")] + \
               [(name, _ptr) for name in ("cos", "sin", "slots", "rows", "tables", "table_offsets", "lengths")] + \
               [("num_rows", _i64)] + \
               [(name, _ptr) for name in ("long_starts", "long_lengths", "long_pasts", "long_tables",
                                          "long_offsets")] + \
               [("num_chunks", _i64), ("long_rows", _i64), ("out_rows", _ptr), ("num_out_rows", _i64)] + \
               [(name, _ptr) for name in ("hidden_state", "delta", "normed", "q", "k", "v", "attended", "gate", "up",
                                          "stop")] + \
               [("lora_rows", _i64), ("lora_row", _ptr), ("lora_slot", _ptr), ("lora_scale", _ptr)]


class Interrupt(threading.Event):
    """A threading.Event that native code can poll too: `flag` is 1 while it is set."""

    def __init__(self) -> None:
        super().__init__()
        self.flag = ctypes.c_int32(0)

    def set(self) -> None:
        self.flag.value = 1
        super().set()

    def clear(self) -> None:
        super().clear()
        self.flag.value = 0


class NativeLayers:
    """One model's layers planned for layers.c: weights' addresses bound once."""

    def __init__(self, library: ctypes.CDLL, kernel_table: _Kernels, layers, keep: list, dims: dict):
        self._run = library.decode_layers
        self._run.argtypes = [ctypes.POINTER(_Kernels), ctypes.POINTER(_Layer), _i64, ctypes.POINTER(_Step)]
        self._run.restype = ctypes.c_int
        self._kernels = kernel_table
        self._layers = layers
        self._keep = keep  # what the addresses point into
        self.dims = dims
        self.adapters = False  # set_adapters: whether adapter rows can run here
        self._adapters_kept = None  # set_adapters: the lora.Adapters whose pairs the addresses point into

    # The modules of each product with a LoRA call, in layers.c's order.
    GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))

    def set_adapters(self, adapters) -> None:
        """The resident adapters' pairs (lora.Adapters) for each product's LoRA call, as Adapters.apply
        plans them; steps with adapter rows run here only with the native LoRA kernel."""
        kernel = adapters.kernel if adapters else None
        self._kernels.lora = None if kernel is None else ctypes.cast(kernel.call, _ptr).value
        (self._kernels.lora_prepare, self._kernels.lora_item, self._kernels.lora_finish_item,
         self._kernels.lora_release) = (None,) * 4 if kernel is None else kernel.part_addresses
        for i, layer in enumerate(self._layers):
            for g, modules in enumerate(self.GROUPS):
                found = [(m, adapters.packed[i, module].address) for m, module in enumerate(modules)
                         if kernel is not None and (i, module) in adapters.packed]
                layer.lora[g] = _Lora(len(found), (_i64 * 3)(*[m for m, _ in found]),
                                      (_ptr * 3)(*[address for _, address in found]))
        self._adapters_kept = adapters
        self.adapters = kernel is not None

    def __call__(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                 native: tuple[torch.Tensor, ...] | None, long: tuple[torch.Tensor, ...] | None, dummy: bool,
                 block_size: int, interrupt: Interrupt | None,
                 lora_rows: tuple = (0, None, None, None), long_rows: int = 0,
                 out_rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """Runs every layer on the step: hidden [T, H] bfloat16 is the residual stream, updated in place;
        returns the last layer's MLP output [T, H] (not yet added), or None if `interrupt` was set
        before a layer. cos, sin: [T, D]; slots [T]; native: the attention kernel's rows, tables,
        table offsets and key counts (PackedBatch.native); long: the long-prompt kernel's chunks
        (PackedBatch.long: starts, lengths, pasts, tables, table offsets); every row is in one of the
        two but a dummy row; dummy: T's last row is a one-token step's dummy row; lora_rows:
        lora.StepRows.native_args, for rows with an adapter (set_adapters first); long_rows: rows
        0 .. long_rows - 1 are long prompts' (PackedBatch.long_rows: their products' own sums);
        out_rows: the rows whose hidden state and delta the caller reads (ascending int64; None: all):
        where they are at most half the step, the last layer's attention, o and MLP run on them alone,
        and the other rows' outputs are left undefined."""
        d = self.dims
        t = hidden.shape[0]
        bf16 = torch.bfloat16
        delta, normed = torch.empty((t, d["hidden"]), dtype=bf16), torch.empty((t, d["hidden"]), dtype=bf16)
        q, attended = torch.empty((t, d["q_width"]), dtype=bf16), torch.empty((t, d["q_width"]), dtype=bf16)
        k, v = torch.empty((t, d["kv_width"]), dtype=bf16), torch.empty((t, d["kv_width"]), dtype=bf16)
        gate, up = torch.empty((t, d["intermediate"]), dtype=bf16), torch.empty((t, d["intermediate"]), dtype=bf16)
        rows, tables, offsets, lengths = native if native is not None else (None,) * 4
        long_starts, long_lengths, long_pasts, long_tables, long_offsets = long if long is not None else (None,) * 5
        address = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        step = _Step(t, d["hidden"], d["num_heads"], d["num_kv_heads"], d["head_dim"], d["intermediate"],
                     d["head_stride"], d["slot_stride"], block_size, int(dummy),
                     cos.data_ptr(), sin.data_ptr(), slots.data_ptr(), address(rows), address(tables),
                     address(offsets), address(lengths), 0 if lengths is None else len(lengths),
                     address(long_starts), address(long_lengths), address(long_pasts), address(long_tables),
                     address(long_offsets), 0 if long_starts is None else len(long_starts), long_rows,
                     address(out_rows), t if out_rows is None else len(out_rows),
                     hidden.data_ptr(), delta.data_ptr(), normed.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(),
                     attended.data_ptr(), gate.data_ptr(), up.data_ptr(),
                     None if interrupt is None else ctypes.addressof(interrupt.flag), *lora_rows)
        status = self._run(ctypes.byref(self._kernels), self._layers, len(self._layers), ctypes.byref(step))
        if status < 0:
            raise RuntimeError("native layer loop: a kernel failed (out of memory, or an adapter's rank over the "
                               "LoRA kernel's)" if status == -1 else "native layer loop: adapter rows, no LoRA kernel")
        return None if status == 1 else delta


def _product(linear, modules, parts: int, keep: list):
    """A _Product for the modules' joint native product (linear.py), or None/False as native_product says."""
    found = linear.native_product(modules)
    if not found:
        return found  # None: their first calls are still to come; False: they never run so
    if len(found[3]) != parts:
        return False
    codes, absmax, code_values, widths, blocksize = found
    cols = (ctypes.c_int64 * len(widths))(*widths)
    keep.append(cols)
    return _Product(codes.data_ptr(), absmax.data_ptr(), code_values.data_ptr(), sum(widths), codes.shape[1] * 2,
                    blocksize, len(widths), ctypes.addressof(cols))


def plan(library: ctypes.CDLL, runner, kv) -> NativeLayers | None | bool:
    """The runner's layers planned for the native loop; None while some layer's products are not bound
    yet (try again after a step); False where this model's layers cannot take it."""
    keep: list = []
    layers = (_Layer * len(runner.base.layers))()
    keys0 = None
    for i, layer in enumerate(runner.base.layers):
        attn, mlp = layer.self_attn, layer.mlp
        products = [_product(runner.linear, (attn.q_proj, attn.k_proj, attn.v_proj), 3, keep),
                    _product(runner.linear, (attn.o_proj,), 1, keep),
                    _product(runner.linear, (mlp.gate_proj, mlp.up_proj), 2, keep),
                    _product(runner.linear, (mlp.down_proj,), 1, keep)]
        if any(p is False for p in products):
            return False
        if any(p is None for p in products):
            return None
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if not all(n.weight.dtype == torch.bfloat16 and n.weight.is_contiguous() for n in norms):
            return False
        keys, values = kv.layer(i)
        if keys.stride() != values.stride() or keys.stride(2) != 1:
            return False
        keys0 = keys
        layers[i] = _Layer(norms[0].weight.data_ptr(), norms[1].weight.data_ptr(), float(norms[0].variance_epsilon),
                           float(norms[1].variance_epsilon), float(attn.scaling), *products,
                           keys.data_ptr(), values.data_ptr())
        keep.extend(norms)
    config = runner.model.config
    q_width, kv_width = runner.num_heads * runner.head_dim, runner.num_kv_heads * runner.head_dim
    first = layers[0]
    if not (runner.head_dim % 2 == 0 and runner.head_dim <= 512  # rope_store's
            and all(layer.qkv.k == config.hidden_size and layer.o.k == q_width and layer.o.n == config.hidden_size
                    and layer.qkv.n == q_width + 2 * kv_width and layer.gate_up.n == 2 * config.intermediate_size
                    and layer.down.k == config.intermediate_size and layer.down.n == config.hidden_size
                    for layer in layers)
            and list(ctypes.cast(first.qkv.part_cols, ctypes.POINTER(ctypes.c_int64))[:3]) == [q_width, kv_width,
                                                                                              kv_width]):
        return False
    fused = runner.fused.functions
    table = _Kernels(runner.linear.gemm.nf4_address, fused["add_rmsnorm_bf16"], fused["rope_store_bf16"],
                     runner.native_decode.address, runner.long_prefill.address if runner.long_prefill else None,
                     fused["silu_mul_bf16"], None, *runner.linear.gemm.nf4_group_addresses)
    table.nf4_silu = runner.linear.gemm.nf4_silu_address  # None: the product, then silu_mul
    dims = dict(hidden=config.hidden_size, num_heads=runner.num_heads, num_kv_heads=runner.num_kv_heads,
                head_dim=runner.head_dim, intermediate=config.intermediate_size,
                q_width=q_width, kv_width=kv_width,
                head_stride=keys0.stride(0), slot_stride=keys0.stride(1))
    planned = NativeLayers(library, table, layers, keep + [kv], dims)
    planned.set_adapters(runner.adapters)
    return planned


def load() -> ctypes.CDLL | None:
    """The compiled loop, or None (logged) where it cannot be built here."""
    return kernels.open_library(SOURCE, log, "native layer loop unavailable, looping over the layers in Python")
