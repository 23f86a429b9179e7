"""Which LoRA adapters a model worker serves, and which of them are in memory.

Registered adapters (`--lora`, LoadAdapter) are the names requests may give; at most `max_loras` of
them are resident: read, stacked and applied by the runner (lora.Adapters). A sequence whose adapter
is registered but on disk is parked, not refused: its adapter is read on a thread of its own (one at
a time, so memory holds at most max_loras + 1 adapters) and swapped in between two steps in place
of the least recently used resident adapter that no running or waiting sequence uses; then the
parked sequences join the scheduler in their order of arrival. When every resident adapter is in
use, the parked wait for one to be free. An adapter's prefix-cache namespace is its name and its
files' digest (lora.Adapter.key), so a name loaded again from other files shares nothing cached.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Hashable

from prometheus_client import Counter

from model_svc.engine import lora
from model_svc.engine.sequence import Sequence

if TYPE_CHECKING:
    from model_svc.engine.runner import ModelRunner

log = logging.getLogger("genrpc.model")

DEFAULT_MAX_LORAS = 16
ADAPTER_READS = Counter("genrpc_model_adapter_reads",
                        "LoRA adapters read from disk for a waiting request (--max-loras)")


@dataclass(frozen=True)
class Entry:
    """A registered adapter: where it is and what it is (its weights are read when it is resident)."""

    name: str
    path: str
    rank: int
    modules: tuple[str, ...]
    key: str  # lora.Adapter.key: its prefix-cache namespace


class AdapterStore:
    def __init__(self, runner: ModelRunner | None, model_config=None, max_loras: int = DEFAULT_MAX_LORAS,
                 max_rank: int = lora.DEFAULT_MAX_RANK):
        """runner: whose adapters are the resident ones (None: no adapters served)."""
        self.runner = runner
        self.model_config = model_config
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.registered: dict[str, Entry] = {}
        self.resident: OrderedDict[str, lora.Adapter] = OrderedDict()  # least recently used first
        self.parked: list[Sequence] = []  # waiting for their adapter, in arrival order
        self.pending: dict[str, lora.Adapter] = {}  # read, waiting for a resident slot
        self.loading: str | None = None  # the adapter being read on its thread
        self.failed: list[tuple[Sequence, str]] = []  # parked sequences whose adapter could not be read
        # Runs a function on the engine thread between two steps (EngineLoop.call); None: read inline.
        self.defer: Callable[[Callable[[], None]], object] | None = None
        self.num_loads = 0  # adapters read into memory, since start

    # -- registry (engine thread, or before the engine runs) --

    def register(self, adapter: lora.Adapter) -> None:
        """Serves `adapter` under its name; resident when there is room (else read again when needed)."""
        self.registered[adapter.name] = Entry(adapter.name, adapter.path, adapter.rank, adapter.modules, adapter.key)
        if len(self.resident) < self.max_loras:
            self.resident[adapter.name] = adapter
            self._rebuild()

    def unregister(self, name: str, in_use: int) -> int:
        """Stops serving `name` unless sequences use it: returns how many do (then nothing changed)."""
        users = in_use + sum(seq.adapter == name for seq in self.parked)
        if users:
            return users
        self.registered.pop(name, None)
        self.pending.pop(name, None)
        if self.resident.pop(name, None) is not None:
            self._rebuild()
        return 0

    def _rebuild(self) -> None:
        if self.runner is not None:
            self.runner.set_adapters(list(self.resident.values()))

    # -- sequences (engine thread) --

    def parks(self, seq: Sequence) -> bool:
        """Whether `seq` waits for its adapter (parked); sets its adapter key. ValueError for a name
        not registered."""
        if seq.beam_of is not None:  # a returned sequence of a parked search waits with its leader
            if any(p.seq_id == seq.beam_of for p in self.parked):
                self.parked.append(seq)
                return True
            return False
        if not seq.adapter:
            return False
        entry = self.registered.get(seq.adapter)
        if entry is None:
            raise ValueError(f"adapter {seq.adapter!r} is not loaded on this model worker")
        seq.adapter_key = entry.key
        if seq.adapter in self.resident:
            self.resident.move_to_end(seq.adapter)
            return False
        self.parked.append(seq)
        self._load_next()
        return True

    def abort(self, seq_id: Hashable) -> list[Sequence]:
        """Removes a parked sequence (a leader takes its returned sequences along); [] when not parked."""
        gone = [seq for seq in self.parked if seq.seq_id == seq_id or seq.beam_of == seq_id]
        self.parked = [seq for seq in self.parked if seq not in gone]
        return gone

    def take_all(self) -> list[Sequence]:
        """Every parked sequence, removed (the engine fails them)."""
        parked, self.parked = self.parked, []
        return parked

    def install(self, in_use: set[str]) -> list[Sequence]:
        """Swaps read adapters in where a resident slot is free, or used by no sequence (`in_use`:
        the adapters of the scheduler's sequences); returns the parked sequences now ready, in order."""
        changed = False
        for name in list(self.pending):
            if name not in self.registered:
                del self.pending[name]
                continue
            if len(self.resident) >= self.max_loras:
                victim = next((n for n in self.resident if n not in in_use), None)
                if victim is None:
                    break  # every resident adapter is in use: wait for one to end
                del self.resident[victim]
                log.info("LoRA adapter %s leaves memory for %s (--max-loras %d)", victim, name, self.max_loras)
            self.resident[name] = self.pending.pop(name)
            changed = True
        if changed:
            self._rebuild()
        ready = [seq for seq in self.parked if self._adapter_of(seq) in self.resident]
        self.parked = [seq for seq in self.parked if seq not in ready]
        self._load_next()
        return ready

    def _adapter_of(self, seq: Sequence) -> str:
        """A parked sequence's adapter: its own, or a returned sequence's leader's."""
        if seq.beam_of is None:
            return seq.adapter
        return next((p.adapter for p in self.parked if p.seq_id == seq.beam_of), "")

    def _load_next(self) -> None:
        """Reads the first parked sequence's adapter, if none is being read or waits for a slot."""
        if self.loading is not None or self.pending:
            return
        name = next((seq.adapter for seq in self.parked if seq.adapter and seq.adapter not in self.resident), None)
        if name is None:
            return
        entry = self.registered[name]
        self.loading = name
        if self.defer is None:
            self._read(entry)
        else:
            threading.Thread(target=self._read, args=(entry,), name=f"lora {name}", daemon=True).start()

    def _read(self, entry: Entry) -> None:
        """Reads an adapter (its own thread, or inline); the result is handed to the engine thread."""
        try:
            adapter, error = lora.load(entry.name, entry.path, self.model_config, self.max_rank), ""
            if adapter.key != entry.key:
                adapter, error = None, f"adapter {entry.name}: its files at {entry.path} changed since it was loaded"
        except lora.AdapterError as exc:
            adapter, error = None, str(exc)
        except Exception as exc:  # noqa: BLE001 - any failure fails its waiting sequences, not the worker
            adapter, error = None, f"adapter {entry.name}: reading it failed ({type(exc).__name__})"

        def done() -> None:
            self.loading = None
            if adapter is not None:
                self.num_loads += 1
                ADAPTER_READS.inc()
                self.pending[entry.name] = adapter
                return
            log.error("LoRA adapter %s could not be read again: %s", entry.name, error)
            failed = [seq for seq in self.parked if self._adapter_of(seq) == entry.name]
            self.parked = [seq for seq in self.parked if seq not in failed]
            self.failed += [(seq, error) for seq in failed]

        if self.defer is None:
            done()
        else:
            self.defer(done)

    # -- what it reports --

    def infos(self) -> list[Entry]:
        return list(self.registered.values())

    def waiting_names(self) -> set[str]:
        return {seq.adapter for seq in list(self.parked) if seq.adapter}  # read from the scrape thread
