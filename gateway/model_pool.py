"""The model workers: each request goes to the healthy one most likely to hold its prompt's leading
blocks in its prefix cache, within a load bound, else the least-loaded (routing.py)."""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from gateway.connections import DNS_PREFIX, RESOLVE_EVERY_S, dns_host, resolve
from gateway.model_worker import DEFAULT_MAX_STREAM_BUFFER, ModelWorkerClient
from gateway.routing import PrefixRouter, block_hashes
from gateway.tokenizers import TokenizerPool
from genrpc.errors import Unavailable
from genrpc.internal.v1 import model_pb2
from genrpc.security import ClientSecurity

log = logging.getLogger("genrpc.gateway.model_pool")

DEFAULT_BLOCK_SIZE = 16  # a worker too old to report its KV-cache block size


class ModelPool:
    """The model workers; routes each request to the healthy one most likely to hold its prompt's
    leading blocks in its prefix cache, within a load bound, else the least-loaded (routing.py). A
    dns:/// address stands for every worker its name resolves to, re-resolved every few seconds, so
    a scaled Deployment behind a headless Service is followed without a restart."""

    def __init__(self, addresses: list[str], tokenizers: TokenizerPool, on_health_change: Callable[[bool], None],
                 security: ClientSecurity | None = None, max_stream_buffer: int = DEFAULT_MAX_STREAM_BUFFER):
        if not addresses:
            raise ValueError("--model-addrs: at least one address is needed")
        self.max_stream_buffer = max_stream_buffer
        self.addresses = addresses
        self.tokenizers = tokenizers
        self.security = security or ClientSecurity()
        self.router = PrefixRouter()
        self._on_health_change = on_health_change
        self.workers: list[ModelWorkerClient] = []
        self._resolver: asyncio.Task | None = None

    def start(self) -> None:
        self._resolver = asyncio.create_task(self._keep_resolved(), name="model worker resolver")

    async def close(self) -> None:
        if self._resolver:
            self._resolver.cancel()
        for worker in self.workers:
            await worker.close()

    async def _keep_resolved(self) -> None:
        while True:
            await self.update_workers()
            if not any(a.startswith(DNS_PREFIX) for a in self.addresses):
                return
            await asyncio.sleep(RESOLVE_EVERY_S)

    async def update_workers(self) -> None:
        names = {t: dns_host(address) for address in self.addresses for t in await resolve(address)}
        targets = list(names)
        current = {w.address: w for w in self.workers}
        for target in targets:
            if target not in current:
                worker = ModelWorkerClient(target, self.tokenizers, self._health_changed, self.security, names[target],
                                           self.max_stream_buffer)
                self.workers.append(worker)
                worker.start()
        for address, worker in current.items():
            if address not in targets:
                log.info("model worker %s left the name's addresses", address)
                self.workers.remove(worker)
                worker.fail_all(f"model worker {address} was removed")
                await worker.close()
                self._health_changed()

    def _health_changed(self) -> None:
        for worker in self.workers:
            if not worker.healthy:  # back later with an empty cache
                self.router.forget(worker.address)
        self._on_health_change(self.any_healthy)

    @property
    def any_healthy(self) -> bool:
        return any(w.healthy for w in self.workers)

    @property
    def healthy_workers(self) -> list[ModelWorkerClient]:
        return [w for w in self.workers if w.healthy]

    def pick(self, token_ids: list[int] | None = None, cache_salt: str = "", adapter: str = "") -> ModelWorkerClient:
        """The worker for a prompt with these ids (its first one, for a batch) in the prefix-cache
        namespace `cache_salt` (a worker holds a prompt for that salt only), through LoRA `adapter`
        (only workers serving it; that adapter's last worker first, routing.py)."""
        healthy = self.healthy_workers
        if not healthy:
            raise Unavailable(
                "no healthy model worker (" + ", ".join(w.address for w in self.workers) + "); retry later")
        if adapter:
            serving = [w for w in healthy if w.info is not None and any(a.name == adapter for a in w.info.adapters)]
            healthy = serving or healthy  # none: the worker's NOT_FOUND names it
        if len(healthy) == 1 or token_ids is None:
            return min(healthy, key=lambda w: w.load)
        block_size = (healthy[0].info.kv_block_size if healthy[0].info else 0) or DEFAULT_BLOCK_SIZE
        hashes = block_hashes(token_ids, block_size, cache_salt + ("\0adapter:" + adapter if adapter else ""))
        worker = self.router.choose(healthy, [w.load for w in healthy], [w.address for w in healthy], hashes,
                                    adapter)
        self.router.record(worker.address, hashes, adapter)
        return worker

    def info(self) -> model_pb2.WorkerInfoResponse:
        """The model's facts (from a healthy worker), with the adapters any healthy worker serves."""
        infos = [w.info for w in (self.healthy_workers or self.workers) if w.info is not None]
        if not infos:
            raise Unavailable("no model worker has answered yet; retry later")
        names = {a.name for a in infos[0].adapters}
        more = [a for info in infos[1:] for a in info.adapters if a.name not in names and not names.add(a.name)]
        if not more:
            return infos[0]
        merged = model_pb2.WorkerInfoResponse()
        merged.CopyFrom(infos[0])
        merged.adapters.extend(more)
        return merged
