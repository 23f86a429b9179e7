"""Memory for weights a step reads from end to end, on 2 MB pages where Linux gives them.

A step streams every byte of its weights (and of the adapters' pairs it serves) from memory; with
4 KB pages that is a TLB miss and a page walk every 4 KB. `Arena` takes one anonymous private
mapping, aligned to 2 MB and advised for transparent huge pages (`MADV_HUGEPAGE`: the kernel's
default mode is often "madvise", which gives them only to memory that asks), and hands out tensors
from it back to back. Where the mapping or the advice is not available, the tensors come from the
ordinary allocator: the same values either way, only their pages differ.
"""

from __future__ import annotations

import logging
import mmap

import torch

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
ALIGN = 64  # each tensor's start: a cache line


class Arena:
    """Tensors carved out of one huge-page-advised mapping of `nbytes` (plus alignment)."""

    def __init__(self, nbytes: int):
        self.nbytes, self.used = nbytes, 0
        self._mapping = None
        self._buffer: torch.Tensor | None = None
        self.huge = False  # whether the pages were advised huge
        if nbytes <= 0:
            return
        try:
            size = nbytes + HUGE_PAGE + ALIGN
            mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            whole = torch.frombuffer(mapping, dtype=torch.uint8)
            offset = (-whole.data_ptr()) % HUGE_PAGE
            if hasattr(mmap, "MADV_HUGEPAGE"):
                mapping.madvise(mmap.MADV_HUGEPAGE, offset, size - offset)
                self.huge = True
            self._mapping, self._buffer = mapping, whole[offset:]
        except (OSError, ValueError, AttributeError) as exc:  # no anonymous mappings or advice here
            log.info("huge-page arena unavailable (%s): ordinary allocations", exc)

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A zeroed tensor of `shape` from the arena (from the ordinary allocator once it is used up, or
        where it has no mapping)."""
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        start = -(-self.used // ALIGN) * ALIGN
        if self._buffer is None or start + nbytes > self.nbytes:
            return torch.zeros(shape, dtype=dtype)
        self.used = start + nbytes
        return self._buffer[start:start + nbytes].view(dtype).view(shape)  # fresh anonymous memory is zero


def padded_bytes(nbytes: int) -> int:
    """What a tensor of nbytes takes from an arena, its alignment included (for sizing one)."""
    return -(-nbytes // ALIGN) * ALIGN
