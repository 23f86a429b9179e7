"""Connections to the tokenizer replicas and the model workers.

Tokenizer calls are idempotent: a replica that fails (UNAVAILABLE) is skipped
and the call retried on the next one. Each model worker gets one long-lived
Events stream; every step message from it is detokenized in one tokenizer
call and fanned out to the sequences' own queues. When a worker's stream
breaks, its sequences end with UNAVAILABLE at once and the client reconnects
in the background. Concurrent requests' Encodes (per tokenizer pool) and
Submits (per worker) are merged while an earlier one is in flight
(coalesce.py): a burst of requests costs the backends a few calls, not one each.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import uuid
from dataclasses import dataclass, field
from typing import Callable

import grpc

from genrpc.errors import Unavailable
from genrpc.security import ClientSecurity
from genrpc.serving import CHANNEL_OPTIONS
from genrpc.internal.v1 import model_pb2, model_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc
from gateway.coalesce import Coalescer
from gateway.routing import PrefixRouter, block_hashes

log = logging.getLogger("genrpc.gateway.workers")

PROMPT_TAIL_TOKENS = 5  # prompt ids that prime incremental detokenization (as TGI)
RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)
DNS_PREFIX = "dns:///"
RESOLVE_EVERY_S = 5.0
ENCODES_IN_FLIGHT = 1  # per tokenizer replica; more concurrent requests share the next Encode
SUBMITS_IN_FLIGHT = 1  # per model worker; more concurrent requests share the next Submit
SUBMIT_REFUSALS = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
DEFAULT_BLOCK_SIZE = 16  # a worker too old to report its KV-cache block size


def channel(address: str, security: ClientSecurity, server_name: str = "") -> grpc.aio.Channel:
    """A channel; a dns:/// address balances calls over every address the name resolves to.
    `server_name`: the name a resolved IP's certificate carries (the dns:/// name's host)."""
    options = list(CHANNEL_OPTIONS)
    if address.startswith(DNS_PREFIX):
        options.append(("grpc.lb_policy_name", "round_robin"))
    return security.channel(address, options, server_name)


def dns_host(address: str) -> str:
    """The host of a dns:///host:port address ("" for any other)."""
    return address[len(DNS_PREFIX):].rpartition(":")[0] if address.startswith(DNS_PREFIX) else ""


async def resolve(address: str) -> list[str]:
    """host:port for every address a dns:/// name resolves to (the address itself otherwise)."""
    if not address.startswith(DNS_PREFIX):
        return [address]
    host, _, port = address[len(DNS_PREFIX):].rpartition(":")
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except OSError as exc:
        log.warning("cannot resolve %s: %s", address, exc)
        return []
    found = []
    for family, _, _, _, sockaddr in infos:
        ip = sockaddr[0]
        target = f"[{ip}]:{sockaddr[1]}" if family == socket.AF_INET6 else f"{ip}:{sockaddr[1]}"
        if target not in found:
            found.append(target)
    return found


class TokenizerPool:
    """Round-robin over tokenizer replicas, retrying an idempotent call on the next replica."""

    def __init__(self, addresses: list[str], security: ClientSecurity | None = None):
        if not addresses:
            raise ValueError("--tokenizer-addrs: at least one address is needed")
        self.addresses = addresses
        security = security or ClientSecurity()
        self.stubs = [tokenizer_pb2_grpc.TokenizerStub(channel(a, security)) for a in addresses]
        self._next = itertools.cycle(range(len(self.stubs)))
        # A dns:/// channel spreads calls over its replicas, so a retry there can reach another one.
        self.attempts = max(len(self.stubs), 3 if any(a.startswith(DNS_PREFIX) for a in addresses) else 1)
        # Encodes of concurrent requests go as one call while earlier ones are in flight.
        self.encoder = Coalescer("Encode", self._encode_batch, max_in_flight=ENCODES_IN_FLIGHT * self.attempts)

    async def encode(self, request: tokenizer_pb2.EncodeRequest, timeout: float | None = 30.0,
                     metadata=None) -> tokenizer_pb2.EncodeResponse:
        """One Encode; requests with the same options that arrive while others are in flight are
        sent together, and each gets back exactly what it would have got alone."""
        truncate = request.truncate_input_tokens if request.HasField("truncate_input_tokens") else None
        key = (bool(request.chats), truncate, request.pad, request.return_tokens, request.parse_special_tokens)
        return await self.encoder.call(key, (request, metadata), timeout)

    async def _encode_batch(self, items: list, timeout: float | None) -> list:
        if len(items) == 1:
            request, metadata = items[0]
            return [await self.call("Encode", request, timeout, metadata)]
        first = items[0][0]
        merged = tokenizer_pb2.EncodeRequest(pad=first.pad, return_tokens=first.return_tokens,
                                             parse_special_tokens=first.parse_special_tokens)
        if first.HasField("truncate_input_tokens"):
            merged.truncate_input_tokens = first.truncate_input_tokens
        for request, _ in items:
            merged.texts.extend(request.texts)
            merged.chats.extend(request.chats)
        try:
            # The first caller's metadata (request id, trace context) stands for the call.
            response = await self.call("Encode", merged, timeout, items[0][1])
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            # Some caller's input was refused (a chat the template rejects): each alone, so that
            # the error reaches that caller only.
            return await asyncio.gather(*[self.call("Encode", r, timeout, m) for r, m in items],
                                        return_exceptions=True)
        results, offset = [], 0
        for request, _ in items:
            count = len(request.texts) + len(request.chats)
            rows = response.rows[offset:offset + count]
            offset += count
            part = tokenizer_pb2.EncodeResponse(pad_token_id=response.pad_token_id)
            if request.pad and rows:  # padded to the merged batch's longest: trim to this request's own
                longest = max(row.num_tokens for row in rows)
                for row in rows:
                    trimmed = part.rows.add()
                    trimmed.CopyFrom(row)
                    del trimmed.input_ids[:len(row.input_ids) - longest]
                    del trimmed.attention_mask[:len(row.attention_mask) - longest]
            else:
                part.rows.extend(rows)
            results.append(part)
        return results

    async def call(self, method: str, request, timeout: float | None = 30.0, metadata=None):
        last_error: grpc.aio.AioRpcError | None = None
        # Retries walk on from this call's own first replica, so they reach every other one before
        # any twice: taking the shared round-robin turn again could, with calls in flight beside
        # this one, land on the same dead replica twice (seen: a stream failed beside a killed one).
        first = next(self._next)
        for attempt in range(self.attempts):
            stub = self.stubs[(first + attempt) % len(self.stubs)]
            try:
                return await getattr(stub, method)(request, timeout=timeout, wait_for_ready=False, metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE:
                    raise
                last_error = exc
        raise Unavailable(f"no tokenizer replica answered ({', '.join(self.addresses)}): {last_error.details()}")


@dataclass
class SequenceEvent:
    """What one step brought one sequence."""

    sequence_id: int
    token_id: int | None
    text: str
    finish_reason: int  # genrpc.v1.FinishReason; 0 while running
    # With logprobs: (logprob, the token's text, [(id, logprob, text) of the most likely tokens])
    logprob: tuple[float, str, list] | None = None
    error: str = ""
    error_code: int = 0  # a grpc status code for `error` (0: a failure); RESOURCE_EXHAUSTED: retry later


@dataclass
class DetokState:
    """A sequence's incremental-detokenization window (its ids from the prefix offset on)."""

    ids: list[int]
    read_offset: int
    skip_special_tokens: bool

    def request_item(self, final: bool) -> tokenizer_pb2.DecodeStreamItem:
        return tokenizer_pb2.DecodeStreamItem(
            token_ids=self.ids, read_offset=self.read_offset,
            skip_special_tokens=self.skip_special_tokens, final=final,
        )

    def advance(self, result: tokenizer_pb2.DecodeStreamResult) -> None:
        # Offsets come back relative to the ids sent; drop what lies before the new prefix.
        self.ids = self.ids[result.prefix_offset:]
        self.read_offset = result.read_offset - result.prefix_offset


@dataclass
class SequenceHandle:
    """The gateway's side of one running sequence."""

    sequence_id: int
    detok: DetokState
    queue: asyncio.Queue  # shared by the sequences of one request: (SequenceEvent)
    done: bool = False


class ModelWorkerClient:
    """One model worker: its Events stream, its sequences, and its health."""

    def __init__(self, address: str, tokenizers: TokenizerPool, on_health_change: Callable[[], None],
                 security: ClientSecurity | None = None, server_name: str = ""):
        self.address = address
        self.tokenizers = tokenizers
        self.on_health_change = on_health_change
        self.client_id = f"gateway-{uuid.uuid4().hex}"
        self.channel = channel(address, security or ClientSecurity(), server_name)
        self.stub = model_pb2_grpc.ModelWorkerStub(self.channel)
        self.sequences: dict[int, SequenceHandle] = {}
        self.info: model_pb2.WorkerInfoResponse | None = None
        self.healthy = False
        self._ids = itertools.count(1)
        self._task: asyncio.Task | None = None
        self._orphan_aborts: set[asyncio.Task] = set()
        # Submits of concurrent requests go as one call while an earlier one is in flight.
        self.submitter = Coalescer("Submit", self._submit_batch, max_in_flight=SUBMITS_IN_FLIGHT,
                                   on_orphan=self._abort_orphan)

    @property
    def load(self) -> int:
        return len(self.sequences)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"worker {self.address}")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        await self.channel.close()

    async def _run(self) -> None:
        backoff = 0.2
        while True:
            try:
                self.info = await self.stub.WorkerInfo(model_pb2.WorkerInfoRequest(), timeout=10)
                stream = self.stub.Events(model_pb2.EventsRequest(client_id=self.client_id))
                async for step in stream:
                    if not self.healthy:
                        self._set_healthy(True)
                        backoff = 0.2
                        log.info("model worker %s connected", self.address)
                    if step.events:
                        await self._on_step(step)
                raise Unavailable("the Events stream ended")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.healthy:
                    log.warning("model worker %s lost: %s", self.address, _describe(exc))
                self._set_healthy(False)
                self.fail_all(f"model worker {self.address} became unavailable")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    def _set_healthy(self, healthy: bool) -> None:
        if healthy != self.healthy:
            self.healthy = healthy
            self.on_health_change()

    def fail_all(self, message: str) -> None:
        for handle in list(self.sequences.values()):
            handle.queue.put_nowait(SequenceEvent(handle.sequence_id, None, "", 0, error=message))
        self.sequences.clear()

    async def _on_step(self, step: model_pb2.EventsResponse) -> None:
        """Detokenizes one step's new tokens in one call and hands each sequence its piece."""
        targets, items, piece_ids = [], [], []
        for event in step.events:
            handle = self.sequences.get(event.sequence_id)
            if handle is None:
                continue  # ended on our side already (stop string, cancel)
            if event.has_token:
                handle.detok.ids.append(event.token_id)
            targets.append((handle, event))
            items.append(handle.detok.request_item(final=event.finish_reason != 0))
            if event.has_token and event.HasField("logprob"):
                piece_ids.append(event.token_id)
                piece_ids.extend(t.token_id for t in event.top_logprobs)
        if not targets:
            return
        try:
            response = await self.tokenizers.call(
                "DecodeStream", tokenizer_pb2.DecodeStreamRequest(items=items, piece_ids=piece_ids))
        except Exception as exc:
            for handle, _ in targets:
                self._end(handle, SequenceEvent(
                    handle.sequence_id, None, "", 0, error=f"detokenization failed: {_describe(exc)}"))
            return
        texts = dict(zip(piece_ids, response.pieces))
        for (handle, event), result in zip(targets, response.results):
            handle.detok.advance(result)
            logprob = None
            if event.has_token and event.HasField("logprob"):  # 0.0 is a logprob too: presence, not truth
                logprob = (event.logprob, texts.get(event.token_id, ""),
                           [(t.token_id, t.logprob, texts.get(t.token_id, "")) for t in event.top_logprobs])
            piece = SequenceEvent(
                handle.sequence_id, event.token_id if event.has_token else None, result.text, event.finish_reason,
                logprob, event.error, event.error_code,
            )
            if event.finish_reason != 0:
                self._end(handle, piece)
            else:
                handle.queue.put_nowait(piece)

    def _end(self, handle: SequenceHandle, piece: SequenceEvent) -> None:
        handle.done = True
        self.sequences.pop(handle.sequence_id, None)
        handle.queue.put_nowait(piece)

    async def submit(
        self, rows: list[tuple[list[int], list[int]]], params: list[model_pb2.SamplingParams],
        skip_special_tokens: bool, queue: asyncio.Queue, timeout: float | None, metadata=None,
        tenant: str = "", priority: int = 0,
    ) -> list[SequenceHandle]:
        """Submits (input_ids, attention_mask) rows; returns their handles, in order. Their
        events all go to `queue`. The worker schedules them for `tenant` at `priority`, and refuses
        them at once when they could not start within `timeout`."""
        timeout_ms = max(1, int(timeout * 1000)) if timeout is not None else 0
        handles, inputs = [], []
        for (ids, mask), p in zip(rows, params):
            tail = [i for i, m in zip(ids, mask) if m][-PROMPT_TAIL_TOKENS:]
            handle = SequenceHandle(next(self._ids), DetokState(tail, len(tail), skip_special_tokens), queue)
            handles.append(handle)
            inputs.append(model_pb2.SequenceInput(
                sequence_id=handle.sequence_id, input_ids=ids, attention_mask=mask, params=p, tenant=tenant,
                priority=priority, timeout_ms=timeout_ms))
        for handle in handles:
            self.sequences[handle.sequence_id] = handle
        try:
            await self.submitter.call(None, (inputs, metadata), timeout)
        except BaseException:
            for handle in handles:
                self.sequences.pop(handle.sequence_id, None)
            raise
        return handles

    async def _submit_batch(self, items: list, timeout: float | None) -> list:
        """One Submit for the sequences of every request in `items` (the first one's metadata
        stands for the call)."""
        request = model_pb2.SubmitRequest(client_id=self.client_id)
        for inputs, _ in items:
            request.sequences.extend(inputs)
        try:
            await self.stub.Submit(request, timeout=timeout, metadata=items[0][1])
        except grpc.aio.AioRpcError as exc:
            # The worker admits a Submit whole or not at all; when it refused a merged one for
            # some request's sake (bad input, or more sequences than it has room for), each goes
            # alone, so that only the request at fault fails.
            if len(items) == 1 or exc.code() not in SUBMIT_REFUSALS:
                raise
            alone = await asyncio.gather(*[self._submit_batch([item], timeout) for item in items],
                                         return_exceptions=True)
            return [r if isinstance(r, BaseException) else r[0] for r in alone]
        return [None] * len(items)

    def _abort_orphan(self, item, _result) -> None:
        """A request gave up while its merged Submit was in flight, and the Submit went through:
        its sequences are running with nobody to read them."""
        inputs, _ = item
        task = asyncio.get_running_loop().create_task(self._abort_ids([s.sequence_id for s in inputs]))
        self._orphan_aborts.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._orphan_aborts.discard)

    async def abort(self, handles: list[SequenceHandle]) -> None:
        """Ends sequences on the worker (best effort: a worker that is gone has freed them anyway)."""
        ids = [h.sequence_id for h in handles if not h.done]
        for h in handles:
            h.done = True
            self.sequences.pop(h.sequence_id, None)
        await self._abort_ids(ids)

    async def _abort_ids(self, ids: list[int]) -> None:
        if not ids or not self.healthy:
            return
        try:
            await self.stub.Abort(model_pb2.AbortRequest(client_id=self.client_id, sequence_ids=ids), timeout=5)
        except grpc.aio.AioRpcError as exc:
            log.debug("abort on %s failed: %s", self.address, exc.code())


class ModelPool:
    """The model workers; routes each request to the healthy one most likely to hold its prompt's
    leading blocks in its prefix cache, within a load bound, else the least-loaded (routing.py). A
    dns:/// address stands for every worker its name resolves to, re-resolved every few seconds, so
    a scaled Deployment behind a headless Service is followed without a restart."""

    def __init__(self, addresses: list[str], tokenizers: TokenizerPool, on_health_change: Callable[[bool], None],
                 security: ClientSecurity | None = None):
        if not addresses:
            raise ValueError("--model-addrs: at least one address is needed")
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
                worker = ModelWorkerClient(target, self.tokenizers, self._health_changed, self.security, names[target])
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

    def pick(self, token_ids: list[int] | None = None) -> ModelWorkerClient:
        """The worker for a prompt with these ids (its first one, for a batch)."""
        healthy = self.healthy_workers
        if not healthy:
            raise Unavailable(
                "no healthy model worker (" + ", ".join(w.address for w in self.workers) + "); retry later")
        if len(healthy) == 1 or token_ids is None:
            return min(healthy, key=lambda w: w.load)
        block_size = (healthy[0].info.kv_block_size if healthy[0].info else 0) or DEFAULT_BLOCK_SIZE
        hashes = block_hashes(token_ids, block_size)
        worker = self.router.choose(healthy, [w.load for w in healthy], [w.address for w in healthy], hashes)
        self.router.record(worker.address, hashes)
        return worker

    def info(self) -> model_pb2.WorkerInfoResponse:
        for worker in self.healthy_workers or self.workers:
            if worker.info is not None:
                return worker.info
        raise Unavailable("no model worker has answered yet; retry later")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"
