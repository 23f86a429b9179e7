"""LoRA adapters in PEFT's format, chosen per sequence and applied inside one batched step.

An adapter is a folder as `peft` saves it: adapter_config.json and adapter_model.safetensors (or
.bin), low-rank pairs A [r, in] and B [out, r] for some of the decoder's projections (q, k, v, o,
gate, up, down). A layer's output for a row of a sequence with adapter X is the base product plus
scaling x (row @ A.T) @ B.T with X's pair: the base product is shared by every row of the step, each
adapter's update touches its own rows only.

Two numerics, as the rest of the engine:
- native (with the native kernels, the default): kernels/lora.c, one call a projection for all of a
  step's adapter rows, each row's update summed in float32 (bfloat16 A and B) in a fixed order
  (`Adapters`): a row's update
  depends on that row alone, so a sequence's numbers are the same alone, beside other adapters'
  rows and whatever its prompt's chunking (prefix caching stays exact; cached blocks are keyed by
  the adapter too);
- `--match-generate` (and wherever the native kernel cannot run): PEFT's own arithmetic, sequence
  by sequence, with the shapes `generate()` on a `PeftModel` uses: float32 A and B, the update cast
  to the layer's dtype and added.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from genrpc.limits import ADAPTER_NAME
from model_svc.engine import kernels

log = logging.getLogger(__name__)

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_MAX_RANK = 64
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[^.]+)?\.weight$")


class AdapterError(ValueError):
    """An adapter that cannot be served, with what is wrong."""


@dataclass
class Pair:
    a: torch.Tensor  # [r, in] float32
    b: torch.Tensor  # [out, r] float32


@dataclass
class Adapter:
    name: str
    path: str
    rank: int
    alpha: float
    scaling: float
    modules: tuple[str, ...]  # the projections it changes
    pairs: dict[tuple[int, str], Pair] = field(default_factory=dict)  # (layer, projection) -> its pair
    digest: str = ""  # of its files (config and weights): the same name loaded again may be other weights

    @property
    def key(self) -> str:
        """Its prefix-cache namespace: the name and the files' digest."""
        return f"{self.name}:{self.digest}"

    def describe(self) -> str:
        return f"{self.name} (rank {self.rank}, {', '.join(self.modules)})"


def parse_flag(value: str) -> tuple[str, str]:
    """`--lora NAME=PATH` -> (NAME, PATH)."""
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise AdapterError(f"--lora {value!r}: expected NAME=PATH (a folder saved by peft)")
    if not re.fullmatch(ADAPTER_NAME, name):
        raise AdapterError(f"--lora {value!r}: a name has 1 to 64 letters, digits, '.', '_' or '-'")
    return name, path


def load(name: str, path: str, model_config, max_rank: int = DEFAULT_MAX_RANK) -> Adapter:
    """Reads and checks a PEFT LoRA adapter for a model with `model_config`; AdapterError names what
    does not fit (its kind, rank, targets, shapes or options)."""
    config_path = os.path.join(path, "adapter_config.json")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise AdapterError(f"adapter {name}: cannot read {config_path}: {exc}") from None
    where = f"adapter {name} ({path})"
    checks = [
        ("peft_type", config.get("peft_type", "LORA") == "LORA", "LORA"),
        ("use_dora", not config.get("use_dora"), "false (DoRA is not served)"),
        ("bias", config.get("bias", "none") == "none", '"none"'),
        ("modules_to_save", not config.get("modules_to_save"), "empty (only low-rank pairs are served)"),
        ("fan_in_fan_out", not config.get("fan_in_fan_out"), "false"),
        ("layer_replication", not config.get("layer_replication"), "unset"),
        ("rank_pattern", not config.get("rank_pattern"), "empty (one rank for every module)"),
        ("alpha_pattern", not config.get("alpha_pattern"), "empty (one alpha for every module)"),
        ("r", isinstance(config.get("r"), int) and 1 <= config["r"] <= max_rank,
         f"in [1, {max_rank}] (--max-lora-rank)"),
    ]
    for key, ok, allowed in checks:
        if not ok:
            raise AdapterError(f"{where}: {key}={config.get(key)!r} is not served: must be {allowed}")
    rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    scaling = alpha / rank ** 0.5 if config.get("use_rslora") else alpha / rank
    tensors, digest = _read_weights(path, where)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.search(key)
        if match is None:
            raise AdapterError(f"{where}: weight {key!r} is not a LoRA pair of a decoder projection")
        layer, module, which = int(match.group(1)), match.group(2), match.group(3)
        if module not in TARGETS:
            raise AdapterError(f"{where}: target module {module!r} is not served: targets must be among "
                               f"{', '.join(TARGETS)}")
        # A fresh (64-byte aligned) copy, as PEFT's own parameters are: a tensor read from the file may
        # start anywhere, and MKL's float32 product then takes another path, with other bits (AVX-512).
        pairs.setdefault((layer, module), {})[which] = tensor.detach().to(torch.float32, copy=True).contiguous()
    if not pairs:
        raise AdapterError(f"{where}: no LoRA weights found")
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    shapes = _shapes(text)
    adapter = Adapter(name, path, rank, alpha, scaling, tuple(sorted({m for _, m in pairs}, key=TARGETS.index)),
                      digest=digest)
    for (layer, module), pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{where}: layer {layer} {module} has lora_{''.join(pair)} without its pair")
        out_features, in_features = shapes[module]
        if not 0 <= layer < text.num_hidden_layers:
            raise AdapterError(f"{where}: layer {layer} is not among the model's {text.num_hidden_layers}")
        if pair["A"].shape != (rank, in_features) or pair["B"].shape != (out_features, rank):
            raise AdapterError(f"{where}: layer {layer} {module}: A {tuple(pair['A'].shape)} and B "
                               f"{tuple(pair['B'].shape)} do not fit the model ([{rank}, {in_features}] and "
                               f"[{out_features}, {rank}] expected): an adapter of another model?")
        adapter.pairs[(layer, module)] = Pair(pair["A"], pair["B"])
    return adapter


def _read_weights(path: str, where: str) -> tuple[dict[str, torch.Tensor], str]:
    """The adapter's tensors, and a digest of its config and weights files."""
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        weights = os.path.join(path, name)
        if os.path.exists(weights):
            break
    else:
        raise AdapterError(f"{where}: neither adapter_model.safetensors nor adapter_model.bin is there")
    digest = hashlib.sha256()
    try:
        for file in (os.path.join(path, "adapter_config.json"), weights):
            with open(file, "rb") as f:
                digest.update(f.read())
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(weights), digest.hexdigest()[:16]
        return torch.load(weights, map_location="cpu", weights_only=True), digest.hexdigest()[:16]
    except Exception as exc:  # a truncated or foreign file: the caller hears what, the server goes on
        raise AdapterError(f"{where}: cannot read {name}: {type(exc).__name__}: {exc}") from None


def _shapes(config) -> dict[str, tuple[int, int]]:
    """(out, in) of each target projection."""
    hidden, inter = config.hidden_size, config.intermediate_size
    head = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q, kv = config.num_attention_heads * head, config.num_key_value_heads * head
    return {"q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, q),
            "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}


@dataclass
class StepRows:
    """Which rows of a step's packed batch belong to which adapter."""

    runs: dict[str, list[tuple[int, int]]]  # (start, length) runs per adapter
    native: tuple | None = None  # for the kernel: rows, their columns, ranks and scalings (int64/float32)
    native_args: tuple = ()  # the kernel's arguments for them: (count, and the four tensors' addresses)


class Kernel:
    """kernels/lora.c: each row's update in float32 with fused multiply-adds in a fixed order."""

    def __init__(self, library: ctypes.CDLL):
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self.rows = library.lora_rows_bf16  # Adapters.apply calls it directly (addresses precomputed)
        self.rows.argtypes = [ptr, i64, ptr, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64]
        self.rows.restype = ctypes.c_int

    def apply(self, x: torch.Tensor, out: torch.Tensor, rows: tuple, at: torch.Tensor, bt: torch.Tensor) -> None:
        """x [T, k] and out [T, n] bfloat16 with unit stride along a row; out changed in place."""
        index, cols, ranks, scales = rows
        if not (x.dtype == out.dtype == torch.bfloat16 and x.stride(1) == 1 and out.stride(1) == 1):
            raise ValueError("lora: unexpected dtype or layout")
        if self.rows(x.data_ptr(), x.stride(0), out.data_ptr(), out.stride(0), len(index), index.data_ptr(),
                      cols.data_ptr(), ranks.data_ptr(), scales.data_ptr(), at.data_ptr(), bt.data_ptr(),
                      at.shape[1], at.shape[0], bt.shape[1]):
            raise ValueError(f"lora: a rank over {MAX_KERNEL_RANK}")


MAX_KERNEL_RANK = 256
SOURCE = Path(__file__).parent / "kernels" / "lora.c"


def load_kernel() -> Kernel | None:
    """The compiled kernel, or None (logged) where it cannot be built here."""
    library = kernels.open_library(SOURCE, log, "LoRA kernel unavailable, using PEFT's arithmetic")
    return Kernel(library) if library is not None else None


class Adapters:
    """The adapters a model service holds, and their updates applied to a step's products.

    Native numerics (kernels/lora.c): every adapter's A of a projection stacked, transposed and in
    bfloat16 ([k, all ranks], a zero block where an adapter does not target it), B likewise
    ([all ranks, n]); one call a projection does every row that has an adapter with that row's
    columns. A step reads each of its adapters' pairs: a rank-16 adapter on all seven projections
    of this model is ~10 MB in bfloat16 (20 in float32, which made 8 adapters cost more bytes a step
    than the 4-bit model). As products of the native bfloat16 GEMM instead (two a projection,
    ~60-250 us each at a few rows), 8 adapters ran at 0.46x the base model's speed (bench/lora.py)."""

    def __init__(self, adapters: list[Adapter], kernel: Kernel | None = None):
        """kernel: native numerics (kernels/lora.c), or None (PEFT's arithmetic)."""
        self.by_name = {a.name: a for a in adapters}
        self.kernel = kernel
        self.columns: dict[str, int] = {}  # native: each adapter's first column in the stacked matrices
        self.stacked: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}  # (A.T, B.T) bfloat16
        # The kernel's arguments for each (A.T, B.T): their addresses and sizes (a call a projection a
        # layer: ~210 a step, whose Python work was ~5 us each)
        self.arguments: dict[tuple[int, str], tuple[int, int, int, int, int]] = {}
        if kernel is not None and adapters:
            self._stack(adapters)

    def __bool__(self) -> bool:
        return bool(self.by_name)

    def _stack(self, adapters: list[Adapter]) -> None:
        total = 0
        for adapter in adapters:
            self.columns[adapter.name] = total
            total += adapter.rank
        for key in sorted({key for adapter in adapters for key in adapter.pairs}):
            pairs = {a.name: a.pairs[key] for a in adapters if key in a.pairs}
            first = next(iter(pairs.values()))
            at = torch.zeros((first.a.shape[1], total), dtype=torch.bfloat16)
            bt = torch.zeros((total, first.b.shape[0]), dtype=torch.bfloat16)
            for name, pair in pairs.items():
                col, rank = self.columns[name], pair.a.shape[0]
                at[:, col:col + rank] = pair.a.T
                bt[col:col + rank] = pair.b.T
            self.stacked[key] = (at.contiguous(), bt.contiguous())
            at, bt = self.stacked[key]
            self.arguments[key] = (at.data_ptr(), bt.data_ptr(), total, at.shape[0], bt.shape[1])

    def rows(self, adapters: list[str], starts: list[int], lengths: list[int]) -> StepRows | None:
        """The step's rows by adapter, from each scheduled sequence's adapter and rows; None when no row
        has one."""
        runs: dict[str, list[tuple[int, int]]] = {}
        for name, start, length in zip(adapters, starts, lengths):
            if name:
                runs.setdefault(name, []).append((start, length))
        if not runs:
            return None
        step = StepRows(runs)
        if self.kernel is not None:
            rows = [(name, r) for name, spans in runs.items() for s, n in spans for r in range(s, s + n)]
            step.native = (torch.tensor([r for _, r in rows], dtype=torch.int64),
                           torch.tensor([self.columns[name] for name, _ in rows], dtype=torch.int64),
                           torch.tensor([self.by_name[name].rank for name, _ in rows], dtype=torch.int64),
                           torch.tensor([self.by_name[name].scaling for name, _ in rows], dtype=torch.float32))
            step.native_args = (len(rows), *(t.data_ptr() for t in step.native))
        return step

    def apply(self, step: StepRows, layer: int, modules: tuple[str, ...], x: torch.Tensor,
              outs: list[torch.Tensor]) -> None:
        """Adds each adapter's update to its rows of `outs` (the base products of `modules` of `x`)."""
        x2 = x.reshape(-1, x.shape[-1])
        if step.native is not None:
            if not (x2.dtype == torch.bfloat16 and x2.stride(1) == 1):
                raise ValueError("lora: unexpected dtype or layout")
            x_ptr, x_stride, rows = x2.data_ptr(), x2.stride(0), self.kernel.rows
            for module, out in zip(modules, outs):
                arguments = self.arguments.get((layer, module))
                if arguments is None:
                    continue
                out2 = out.view(-1, out.shape[-1])
                if not (out2.dtype == torch.bfloat16 and out2.stride(1) == 1):
                    raise ValueError("lora: unexpected dtype or layout")
                if rows(x_ptr, x_stride, out2.data_ptr(), out2.stride(0), *step.native_args, *arguments):
                    raise ValueError(f"lora: a rank over {MAX_KERNEL_RANK}")
            return
        for name, spans in step.runs.items():  # PEFT's arithmetic, a sequence at a time (its shapes in generate())
            adapter = self.by_name[name]
            for module, out in zip(modules, outs):
                pair = adapter.pairs.get((layer, module))
                if pair is None:
                    continue
                out2 = out.view(-1, out.shape[-1])
                for start, length in spans:
                    rows = x2[start:start + length].to(torch.float32)
                    update = F.linear(F.linear(rows, pair.a), pair.b) * adapter.scaling
                    out2[start:start + length] = out2[start:start + length] + update.to(out2.dtype)
