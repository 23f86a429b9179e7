"""The C kernels' loader: each source here is compiled on first use with the machine's C compiler
(`cc`, or $CC) into a cache folder keyed by the source, its headers, the flags and the CPU
($GENRPC_KERNEL_CACHE, else ~/.cache/genrpc/kernels), and loaded with ctypes: no Python headers,
no torch headers. Where a kernel cannot be built, its module's `load()` returns None and the
runner uses the libraries' path (logged, and reported in ModelInfo).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from genrpc.launch import cpu_model_and_flags

# -march=native: built where it runs. Contraction on, so scalar and vector loops both use FMA and a
# value rounds the same whichever loop computes it.
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-shared", "-fPIC", "-std=c11"]


def cache_dir() -> Path:
    return Path(os.environ.get("GENRPC_KERNEL_CACHE") or Path.home() / ".cache" / "genrpc" / "kernels")


def _cpu_signature() -> str:
    """What a build depends on: the CPU's flags (-march=native)."""
    flags = cpu_model_and_flags()[1]
    return " ".join(sorted(flags)) if flags else platform.processor()


def build(source_path: Path, compiler: str | None = None, extra_flags: tuple[str, ...] = ()) -> Path:
    """Compiles a kernel source (once per source, flags and CPU) and returns the shared library's path.
    `extra_flags`: e.g. -fopenmp, for a kernel that shares out its work on PyTorch's OpenMP pool."""
    flags = [*FLAGS, *extra_flags]
    compiler = compiler or os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise FileNotFoundError(f"C compiler {compiler!r} not found")
    source = source_path.read_bytes()
    headers = [h.read_bytes() for h in sorted(source_path.parent.glob("*.h"))]  # what it may #include
    key = hashlib.sha256(b"\0".join([source, *headers, " ".join(flags).encode(), _cpu_signature().encode(),
                                     platform.machine().encode()])).hexdigest()[:16]
    target = cache_dir() / f"{source_path.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # concurrent builds: the last rename wins
        partial = Path(tmp) / target.name
        result = subprocess.run([compiler, *flags, "-o", str(partial), str(source_path), "-lm"],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"compiling {source_path.name} failed:\n{result.stderr}")
        os.replace(partial, target)
    return target


def open_library(source_path: Path, logger: logging.Logger, unavailable: str, supported: str | None = None,
                 lacking: str = "", flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """A kernel source built (with OpenMP, on PyTorch's pool, and its own `flags`) and loaded; None where
    it cannot be built here (a warning: `unavailable`, then why) or where its function `supported` says
    it was built without the instructions it needs (logged: `lacking`). Every kernel in kernels/ loads
    through this."""
    try:
        library = ctypes.CDLL(str(build(source_path=source_path, extra_flags=("-fopenmp", *flags))))
    except (OSError, RuntimeError) as exc:
        logger.warning("%s: %s", unavailable, exc)
        return None
    if supported is not None and not getattr(library, supported)():
        logger.info("%s", lacking)
        return None
    return library
