"""Which matrix-product path runs at which row count, chosen by timing this CPU on the model's shapes.

The native kernel (gemm.py) has, where it runs on AVX2, two ways through a column block: straight
from the weights (decoded in registers: one or two rows a pass, more in tiles of up to five rows
over half a block) or through a float32 panel decoded once and read by every row tile. Both sum
every output element in the same order, so they give the same bits and the choice may differ by
row count without a row's result depending on its neighbours.
Where the crossover lies depends on the CPU (decode throughput, cache sizes, bandwidth), so it is
measured: at first start, for the loaded model's own layer shapes, at a few row counts, both ways
interleaved; the largest row count up to which the direct way wins at every measured count is the
threshold. The result is kept on disk, keyed by the CPU (model name and flags), the compiled kernel,
the shapes and the thread count: a new CPU or kernel measures again, a corrupt file is ignored.

On a CPU with AMX tiles the AVX-512 BF16 build can also run the 4-bit and int8 products on tiles.
The tiles round a 16-pair sum differently from VDPBF16PS, so a row's bits would depend on its batch's
size if the two were mixed by row count: the choice is one path for every row count, timed at
AMX_ROWS and cached like the threshold above. Tiles win big from a few rows up and can lose at one
row (decoding codes into tile memory costs about what the whole AVX-512 product does), so no path
is best at every count: the rule is the lower mean time per row over AMX_ROWS (`amx_wins`), i.e.
per generated token over batches of 1 to 128 rows. `--matmul-amx on|off` forces it.

`cpu_info()` reports what the CPU offers (AMX tiles, with the permission Linux asks a process to
request before it may use them; AVX-512 BF16; AVX2), for the logs, ModelInfo and the bench.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from genrpc.launch import cpu_model_and_flags

log = logging.getLogger(__name__)

ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)  # row counts timed (a step's decoded rows; more rows take the panel)
KINDS = ("nf4", "dense", "int8")
AMX_ROWS = (1, 2, 4, 8, 32, 128)  # row counts timed for the AMX choice: decoding steps and prompt chunks
_ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA, _SYS_ARCH_PRCTL = 0x1023, 18, 158


@dataclass(frozen=True)
class CpuInfo:
    model: str
    isa: str  # the best the matrix products can use: "amx-bf16", "avx512-bf16", "avx2" or "none"
    flags: tuple[str, ...]  # the ones that matter here
    amx_permitted: bool  # Linux granted this process the AMX tile state

    def describe(self) -> str:
        amx = "" if "amx_bf16" not in self.flags else f", AMX {'permitted' if self.amx_permitted else 'refused'}"
        return f"{self.model} ({' '.join(self.flags) or 'no SIMD flags of note'}{amx}), {os.cpu_count()} CPUs"


_FLAGS_OF_NOTE = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "amx_tile",
                  "amx_bf16", "amx_int8")


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = cpu_model_and_flags()
    return (platform.processor() or platform.machine() if model == "?" else model), flags


def request_amx() -> bool:
    """Asks Linux for the AMX tile data state (arch_prctl ARCH_REQ_XCOMP_PERM), which a process must
    hold before its first tile instruction; False where refused, not Linux x86-64, or no AMX."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


@functools.cache
def cpu_info() -> CpuInfo:
    """What this CPU offers, read (and AMX asked for) once a process."""
    model, flags = _cpuinfo()
    noted = tuple(f for f in _FLAGS_OF_NOTE if f in flags)
    amx = "amx_bf16" in flags and "amx_tile" in flags and request_amx()
    if amx:
        isa = "amx-bf16"
    elif {"avx512_bf16", "avx512f", "avx512bw", "avx512vl"} <= flags:
        isa = "avx512-bf16"
    elif {"avx2", "fma"} <= flags:
        isa = "avx2"
    else:
        isa = "none"
    return CpuInfo(model, isa, noted, amx)


@dataclass
class Choice:
    """Up to how many rows each weight kind's products read the weights directly (-1: the kernel has
    no such choice, e.g. the AVX-512 BF16 build), and how that was settled."""

    nf4_direct_rows: int
    dense_direct_rows: int
    int8_direct_rows: int
    source: str  # "measured", "cached", "forced" or "fixed"
    timings: dict | None = None  # per kind and row count: [direct ms, panel ms], where measured

    def describe(self) -> str:
        if self.nf4_direct_rows < 0:
            return "row tiles fixed by the kernel"
        return (f"weights read directly up to {self.nf4_direct_rows} rows (nf4), {self.dense_direct_rows} (bfloat16), "
                f"{self.int8_direct_rows} (int8), through a panel beyond; {self.source}")


def cache_path() -> Path:
    from model_svc.engine import kernels

    return kernels.cache_dir() / "choices.json"


def _key(kernel_id: str, shapes: dict, threads: int) -> str:
    model, flags = _cpuinfo()
    text = json.dumps([model, sorted(flags), kernel_id, shapes, threads], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("ignoring the kernel-choice cache %s (%s): measuring again", path, e)
        return {}


def _valid(entry) -> bool:
    return (isinstance(entry, dict) and all(isinstance(entry.get(f"{kind}_direct_rows"), int)
                                            and entry[f"{kind}_direct_rows"] >= 0 for kind in KINDS))


def _write_cache(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not keep the kernel choice in %s: %s", path, e)


def _threshold(direct: dict[int, float], panel: dict[int, float]) -> int:
    """The largest measured row count up to which the direct way is at least as fast at every count."""
    best = 0
    for m in sorted(direct):
        if direct[m] > panel[m]:
            break
        best = m
    return best


def _operands(kind: str, shapes: list[tuple[int, int, int, int]], rows: int):
    """Random operands of each shape (timing does not depend on the values)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for n, k, blocksize, count in shapes:
        x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
        if kind == "nf4":
            codes = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
            absmax = torch.rand(k // blocksize, n, generator=gen).to(torch.bfloat16)
            values = torch.linspace(-1, 1, 16).to(torch.bfloat16)
            out.append((x, (codes, absmax, values, n, blocksize), count))
        elif kind == "int8":
            codes = torch.randint(-127, 128, (n // 32, k, 32), dtype=torch.int8, generator=gen)
            out.append((x, (codes, torch.rand(n // 32, k // blocksize, 32, generator=gen)), count))
        else:
            out.append((x, torch.randn(n, k, generator=gen).to(torch.bfloat16), count))
    return out


def measure(gemm, kind: str, shapes: list[tuple[int, int, int, int]], repeats: int = 5) -> dict[int, list[float]]:
    """Per row count: [direct, panel] milliseconds for one pass over the model's layers (one call of each
    shape, times how many layers have it), the best of `repeats`, the two ways interleaved so drift
    hits both."""
    largest = max(ROWS)
    operands = _operands(kind, shapes, largest)
    if kind == "dense":
        operands = [(x, gemm.pack(w), count) for x, w, count in operands]

    def one_pass(m: int) -> float:
        total = 0.0
        for x, weight, count in operands:
            start = time.perf_counter()
            if kind == "nf4":
                codes, absmax, values, n, blocksize = weight
                gemm.nf4(x[:m], codes, absmax, values, n, blocksize)
            elif kind == "int8":
                gemm.int8(x[:m], *weight)
            else:
                gemm.dense(x[:m], weight)
            total += (time.perf_counter() - start) * count
        return total * 1e3

    index = KINDS.index(kind)
    results = {}
    try:
        for m in ROWS:
            direct = panel = float("inf")
            for _ in range(repeats):
                gemm.set_direct_rows(index, largest)
                direct = min(direct, one_pass(m))
                gemm.set_direct_rows(index, 0)
                panel = min(panel, one_pass(m))
            results[m] = [round(direct, 4), round(panel, 4)]
    finally:
        gemm.set_direct_rows(index, 2)
    return results


def choose(gemm, nf4_shapes: list[tuple[int, int, int, int]], dense_shapes: list[tuple[int, int, int, int]],
           int8_shapes: list[tuple[int, int, int, int]] = (), forced: int | None = None,
           path: Path | None = None) -> Choice:
    """Sets and returns the direct-rows thresholds for this model: `forced` for every kind, else the
    cached measurement for this CPU, kernel and shapes, else a new measurement (kept on disk).
    Shapes: (n, k, blocksize, how many layers), dense ones with blocksize 0."""
    if gemm.set_direct_rows(0, 2) < 0:
        return Choice(-1, -1, -1, "fixed")
    if forced is not None:
        choice = Choice(forced, forced, forced, "forced")
    else:
        shapes = {"nf4": [list(s) for s in nf4_shapes], "dense": [list(s) for s in dense_shapes],
                  "int8": [list(s) for s in int8_shapes]}
        path = path or cache_path()
        key = _key(gemm.kernel_id, shapes, torch.get_num_threads())
        data = _read_cache(path)
        entry = data.get(key)
        if _valid(entry):
            choice = Choice(entry["nf4_direct_rows"], entry["dense_direct_rows"], entry["int8_direct_rows"], "cached",
                            entry.get("timings"))
        else:
            start = time.perf_counter()
            timings = {}
            thresholds = {}
            for kind, kind_shapes in (("nf4", nf4_shapes), ("dense", dense_shapes), ("int8", int8_shapes)):
                if not kind_shapes:
                    thresholds[kind] = 2
                    continue
                timings[kind] = measure(gemm, kind, kind_shapes)
                t = timings[kind]
                thresholds[kind] = _threshold({m: v[0] for m, v in t.items()}, {m: v[1] for m, v in t.items()})
            choice = Choice(thresholds["nf4"], thresholds["dense"], thresholds["int8"], "measured", timings)
            log.info("kernel choice measured in %.1f s", time.perf_counter() - start)
            data = _read_cache(path)  # another process may have written meanwhile
            data[key] = {**asdict(choice), "source": "measured", "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                         "cpu": _cpuinfo()[0]}
            _write_cache(path, data)
    gemm.set_direct_rows(0, choice.nf4_direct_rows)
    gemm.set_direct_rows(1, choice.dense_direct_rows)
    gemm.set_direct_rows(2, choice.int8_direct_rows)
    return choice


class AmxUnavailable(RuntimeError):
    """AMX forced on where this build or Linux gives no tiles."""


@dataclass
class AmxChoice:
    """Whether the 4-bit and int8 products run on AMX tiles, and how that was settled."""

    on: bool
    source: str  # "measured", "cached", "forced", "unavailable" (no AMX in this build or CPU) or
    # "library bits" (no native numerics: the 4-bit layers keep bitsandbytes' bits, never on tiles)
    timings: dict | None = None  # per row count: [AVX-512 ms, AMX ms], where measured

    def describe(self) -> str:
        if self.source == "unavailable":
            return ""
        if self.on:
            return f"AMX tiles ({self.source}{self._mean()})"
        if self.source == "library bits":
            return "AMX off (bitsandbytes' bits)"
        return f"AMX off ({self.source}{self._mean()})"

    def _mean(self) -> str:
        """The measured ratio the choice rests on, and the row count where tiles fare worst."""
        if not self.timings:
            return ""
        vector, tiles = per_row(self.timings)
        worst = max(self.timings.items(), key=lambda kv: kv[1][1] / kv[1][0])
        return (f": {tiles / vector:.2f}x AVX-512's time per row over {len(self.timings)} row counts, "
                f"{worst[1][1] / worst[1][0]:.2f}x at {worst[0]} row{'' if int(worst[0]) == 1 else 's'}")


def measure_amx(gemm, nf4_shapes: list[tuple[int, int, int, int]], int8_shapes: list[tuple[int, int, int, int]],
                repeats: int = 5) -> dict[int, list[float]]:
    """Per row count: [AVX-512, AMX] milliseconds for one pass over the model's 4-bit and int8 products,
    the best of `repeats`, the two interleaved. Each layer has weights of its own, as in a step, so that
    a pass reads the model's bytes: with one copy a shape, cache-warm, one row measured 1.20x AVX-512's
    time on tiles where steps of one sequence ran 1.0-1.25x faster on them."""
    largest = max(AMX_ROWS)
    nf4 = [(x, weight) for shape in nf4_shapes
           for x, weight, _ in _operands("nf4", [(*shape[:3], 1)] * shape[3], largest)]
    int8 = [(x, weight) for shape in int8_shapes
            for x, weight, _ in _operands("int8", [(*shape[:3], 1)] * shape[3], largest)]

    def one_pass(m: int) -> float:
        start = time.perf_counter()
        for x, (codes, absmax, values, n, blocksize) in nf4:
            gemm.nf4(x[:m], codes, absmax, values, n, blocksize)
        for x, weight in int8:
            gemm.int8(x[:m], *weight)
        return (time.perf_counter() - start) * 1e3

    results = {}
    try:
        for m in AMX_ROWS:
            vector = tiles = float("inf")
            for _ in range(repeats):
                gemm.set_amx(False)
                vector = min(vector, one_pass(m))
                gemm.set_amx(True)
                tiles = min(tiles, one_pass(m))
            results[m] = [round(vector, 4), round(tiles, 4)]
    finally:
        gemm.set_amx(False)
    return results


def per_row(timings: dict[int, list[float]]) -> tuple[float, float]:
    """Mean milliseconds per row over the measured row counts: (AVX-512, AMX)."""
    return tuple(sum(t[i] / int(m) for m, t in timings.items()) / len(timings) for i in (0, 1))


def _valid_timings(timings) -> bool:
    try:
        return bool(timings) and all(int(m) > 0 and len(t) == 2 and min(t) > 0 for m, t in timings.items())
    except (AttributeError, TypeError, ValueError):
        return False


def amx_wins(timings: dict[int, list[float]]) -> bool:
    """AMX where its mean time per row over the measured row counts is lower: a token's cost averaged
    over steps of 1 to 128 rows, so that a small loss at one row does not outweigh large gains at the
    batched and prompt rows (and a large one does)."""
    if not timings:
        return False
    vector, tiles = per_row(timings)
    return tiles < vector


def choose_amx(gemm, nf4_shapes: list[tuple[int, int, int, int]], int8_shapes: list[tuple[int, int, int, int]] = (),
               forced: str = "auto", path: Path | None = None) -> AmxChoice:
    """Sets and returns whether the products run on AMX tiles: `forced` ("on"/"off"), else the cached
    measurement for this CPU, kernel and shapes, else a new one (kept on disk). "on" where the build or
    Linux gives no tiles raises AmxUnavailable."""
    def permitted() -> bool:
        if gemm.set_amx(True) == 1:
            return True
        log.warning("AMX: Linux refused this process the tile state; products stay on AVX-512")
        return False

    if not getattr(gemm, "has_amx", False):
        if forced == "on":
            raise AmxUnavailable("this CPU or kernel build has no AMX tiles")
        return AmxChoice(False, "unavailable")
    if forced in ("on", "off"):
        on = forced == "on"
        if on and gemm.set_amx(True) != 1:
            raise AmxUnavailable("Linux refused this process the AMX tile state")
        gemm.set_amx(on)
        return AmxChoice(on, "forced")
    shapes = {"amx-nf4": [list(s) for s in nf4_shapes], "amx-int8": [list(s) for s in int8_shapes]}
    path = path or cache_path()
    key = _key(gemm.kernel_id, shapes, torch.get_num_threads())
    entry = _read_cache(path).get(key)
    if isinstance(entry, dict) and isinstance(entry.get("amx"), bool):
        timings = entry.get("timings") if _valid_timings(entry.get("timings")) else None
        # the rule applied to the kept timings: a cache written under an earlier rule follows this one
        choice = AmxChoice(amx_wins(timings) if timings else entry["amx"], "cached", timings)
    elif not permitted():
        return AmxChoice(False, "unavailable")
    else:
        start = time.perf_counter()
        timings = measure_amx(gemm, list(nf4_shapes), list(int8_shapes))
        choice = AmxChoice(amx_wins(timings), "measured", timings)
        log.info("AMX choice measured in %.1f s: %s", time.perf_counter() - start,
                 ", ".join(f"{m} rows {t[1] / t[0]:.2f}x" for m, t in timings.items()))
        data = _read_cache(path)
        data[key] = {"amx": choice.on, "timings": timings, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                     "cpu": _cpuinfo()[0]}
        _write_cache(path, data)
    if choice.on and not permitted():
        return AmxChoice(False, "unavailable")
    gemm.set_amx(choice.on)
    return choice
