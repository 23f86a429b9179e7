"""LoRA adapters in PEFT's format, chosen per sequence and applied inside one batched step.

An adapter is a folder as `peft` saves it: adapter_config.json and adapter_model.safetensors (or
.bin), low-rank pairs A [r, in] and B [out, r] for some of the decoder's projections (q, k, v, o,
gate, up, down). A layer's output for a row of a sequence with adapter X is the base product plus
scaling x (row @ A.T) @ B.T with X's pair: the base product is shared by every row of the step, each
adapter's update touches its own rows only.

Two numerics, as the rest of the engine:
- native (with the native kernels, the default): kernels/lora.c, one call per group of projections
  that share an input for all of a step's adapter rows, each row's update summed in float32 over
  bfloat16 pairs in a fixed order, A x rounded to bfloat16 before B (`Adapters`; the native layer
  loop runs the calls beside the base products): a row's update depends on that row alone, so a
  sequence's numbers are the same alone, beside other adapters' rows and whatever its prompt's
  chunking (prefix caching stays exact; cached blocks are keyed by the adapter too);
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
from model_svc.engine import hugepages, kernels

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
    native: tuple | None = None  # for the kernel: rows, their adapters' slots and scalings (int64/float32)
    native_args: tuple = ()  # the kernel's arguments for them: (count, and the three tensors' addresses)


class _Pair(ctypes.Structure):
    """kernels/lora.c's Pair: one adapter's pair of one module, packed."""

    _fields_ = [("a", ctypes.c_void_p), ("b", ctypes.c_void_p), ("rank", ctypes.c_int64), ("padded", ctypes.c_int64)]


LANES, WIDTH = 16, 64  # kernels/lora.c: A's columns padded to a multiple of LANES; B in blocks of WIDTH


class Packed:
    """One module's pairs by adapter slot, as kernels/lora.c reads them, in bfloat16: A as input pairs,
    [k / 2][padded][2] (rank rounded up to 16 with zero columns, k up to even with a zero input), and B
    in blocks of 64 outputs, each [rank / 2][64][2] (the last narrower; rank up to even with zeros); a
    slot whose adapter does not target the module has no pair (its rows are left as they are)."""

    def __init__(self, pairs: list[tuple[torch.Tensor, torch.Tensor] | None], arena: hugepages.Arena | None = None):
        """pairs: (A [rank, k], B [n, rank]) or None, by slot; arena: where the packed tensors go."""
        self.tensors: list[torch.Tensor] = []  # kept alive: the array holds their addresses
        self.array = (_Pair * len(pairs))()
        take = (arena or hugepages.Arena(0)).take  # an empty arena: ordinary tensors
        for slot, pair in enumerate(pairs):
            if pair is None:
                continue
            a, b = pair
            rank, k = a.shape
            (k2, padded), (n, even) = self.shapes(a.shape, b.shape)
            at = take((k2 // 2, padded, 2), torch.bfloat16)
            full = torch.zeros((k2, padded), dtype=torch.bfloat16)
            full[:k, :rank] = a.T
            at.copy_(full.view(k2 // 2, 2, padded).transpose(1, 2))
            bp = torch.zeros((n, even), dtype=torch.bfloat16)
            bp[:, :rank] = b
            bt = take((n * even,), torch.bfloat16)
            bt.copy_(torch.cat([bp[q:q + WIDTH].view(-1, even // 2, 2).transpose(0, 1).reshape(-1)
                                for q in range(0, n, WIDTH)]))
            self.tensors += [at, bt]
            self.array[slot] = _Pair(at.data_ptr(), bt.data_ptr(), rank, padded)
        self.address = ctypes.addressof(self.array)

    @staticmethod
    def shapes(a: torch.Size, b: torch.Size) -> tuple[tuple[int, int], tuple[int, int]]:
        """(k rounded up to even, rank rounded up to 16) for A and (n, rank rounded up to even) for B."""
        rank, k = a
        return (k + k % 2, -(-rank // LANES) * LANES), (b[0], rank + rank % 2)

    @classmethod
    def nbytes(cls, pairs: list[tuple[torch.Tensor, torch.Tensor] | None]) -> int:
        """What packing `pairs` takes from an arena."""
        total = 0
        for pair in pairs:
            if pair is not None:
                (k2, padded), (n, even) = cls.shapes(pair[0].shape, pair[1].shape)
                total += hugepages.padded_bytes(k2 * padded * 2) + hugepages.padded_bytes(n * even * 2)
        return total


class Kernel:
    """kernels/lora.c: each row's update in float32 with fused multiply-adds in a fixed order."""

    def __init__(self, library: ctypes.CDLL):
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self.call = library.lora_apply_bf16  # Adapters.apply calls it directly (addresses precomputed)
        # The call in parts (plan; items' sums; items' updates; release), for layers.py's loop beside the
        # base product.
        self.part_addresses = tuple(ctypes.cast(getattr(library, name), ptr).value
                                    for name in ("lora_prepare", "lora_item", "lora_finish_item", "lora_release"))
        self.call.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, i64] + [ptr, ptr, i64, i64] * 3
        self.call.restype = ctypes.c_int

    def apply(self, x: torch.Tensor, rows: tuple, modules: list[tuple[Packed, torch.Tensor]]) -> None:
        """x [T, k] and each out [T, n] bfloat16 with unit stride along a row, changed in place; rows:
        (index, slot, scale) tensors; modules: 1 to 3 (pairs, out) that share x."""
        index, slots, scales = rows
        if not (x.dtype == torch.bfloat16 and x.stride(1) == 1
                and all(o.dtype == torch.bfloat16 and o.stride(1) == 1 for _, o in modules)):
            raise ValueError("lora: unexpected dtype or layout")
        described = [arg for packed, out in modules
                     for arg in (packed.address, out.data_ptr(), out.stride(0), out.shape[1])]
        described += [None, None, 0, 0] * (3 - len(modules))
        if self.call(x.data_ptr(), x.stride(0), x.shape[1], len(index), index.data_ptr(), slots.data_ptr(),
                     scales.data_ptr(), len(modules), *described):
            raise ValueError(f"lora: a rank over {MAX_KERNEL_RANK}, or out of memory")


MAX_KERNEL_RANK = 256
SOURCE = Path(__file__).parent / "kernels" / "lora.c"


def load_kernel() -> Kernel | None:
    """The compiled kernel, or None (logged) where it cannot be built here."""
    library = kernels.open_library(SOURCE, log, "LoRA kernel unavailable, using PEFT's arithmetic")
    return Kernel(library) if library is not None else None


class Adapters:
    """The adapters a model service holds, and their updates applied to a step's products.

    Native numerics (kernels/lora.c): every module's pairs packed by adapter slot (`Packed`, ~10 MB a
    rank-16 adapter on all seven projections of this model, in bfloat16), all of them back to back in
    one arena on 2 MB pages (a step of 8 adapters streams ~80 MB of them); one call per group of
    modules that share an input (q/k/v, o, gate/up, down: 120 a step) does every row that has an
    adapter, rows in blocks that share each load or read several streams at once. Measured
    alternatives are in docs/lora.md ("Speed")."""

    def __init__(self, adapters: list[Adapter], kernel: Kernel | None = None):
        """kernel: native numerics (kernels/lora.c), or None (PEFT's arithmetic)."""
        self.by_name = {a.name: a for a in adapters}
        self.kernel = kernel
        self.slots: dict[str, int] = {a.name: slot for slot, a in enumerate(adapters)}  # native: index in Packed
        self.packed: dict[tuple[int, str], Packed] = {}  # (layer, module) -> its pairs by slot
        # (layer, modules) -> (index in modules, its Packed's address) of those some adapter targets
        self.plans: dict[tuple[int, tuple[str, ...]], tuple[tuple[int, int], ...]] = {}
        self.arena: hugepages.Arena | None = None  # the packed pairs' memory (native numerics)
        if kernel is not None and adapters:
            by_key = {key: [(p.a, p.b) if (p := a.pairs.get(key)) is not None else None for a in adapters]
                      for key in sorted({key for adapter in adapters for key in adapter.pairs})}
            # every pair back to back on 2 MB pages: a step with 8 adapters reads ~80 MB of them
            self.arena = hugepages.Arena(sum(Packed.nbytes(pairs) for pairs in by_key.values()))
            for key, pairs in by_key.items():
                self.packed[key] = Packed(pairs, self.arena)

    def __bool__(self) -> bool:
        return bool(self.by_name)

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
                           torch.tensor([self.slots[name] for name, _ in rows], dtype=torch.int64),
                           torch.tensor([self.by_name[name].scaling for name, _ in rows], dtype=torch.float32))
            step.native_args = (len(rows), *(t.data_ptr() for t in step.native))
        return step

    def apply(self, step: StepRows, layer: int, modules: tuple[str, ...], x: torch.Tensor,
              outs: list[torch.Tensor]) -> None:
        """Adds each adapter's update to its rows of `outs` (the base products of `modules` of `x`)."""
        if step.native is not None:
            plan = self.plans.get((layer, modules))
            if plan is None:
                plan = self.plans[layer, modules] = tuple(
                    (i, packed.address) for i, module in enumerate(modules)
                    if (packed := self.packed.get((layer, module))) is not None)
            if not plan:
                return
            described = []
            for i, address in plan:  # the runner's products: fresh bfloat16 tensors, rows contiguous
                out = outs[i]
                if out.dtype is not torch.bfloat16 or not out.is_contiguous():
                    raise ValueError("lora: unexpected dtype or layout")
                n = out.shape[-1]
                described += (address, out.data_ptr(), n, n)
            if x.dtype is not torch.bfloat16 or not x.is_contiguous():
                raise ValueError("lora: unexpected dtype or layout")
            k = x.shape[-1]
            described += (None, None, 0, 0) * (3 - len(plan))
            if self.kernel.call(x.data_ptr(), k, k, *step.native_args, len(plan), *described):
                raise ValueError(f"lora: a rank over {MAX_KERNEL_RANK}, or out of memory")
            return
        x2 = x.reshape(-1, x.shape[-1])
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
