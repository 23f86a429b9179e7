"""One model worker, as the gateway sees it: a long-lived Events stream whose every step message is
detokenized in one tokenizer call and fanned out to the sequences' own queues; Submits of
concurrent requests merged while an earlier one is in flight (coalesce.py); aborts. When the stream
breaks, the worker's sequences end with UNAVAILABLE at once and the client reconnects in the
background."""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from dataclasses import dataclass
from typing import Callable

import grpc

from gateway.coalesce import Coalescer
from gateway.connections import channel, describe
from gateway.tokenizers import TokenizerPool
from genrpc import faults
from genrpc.errors import Unavailable
from genrpc.internal.v1 import model_pb2, model_pb2_grpc, tokenizer_pb2
from genrpc.security import ClientSecurity

log = logging.getLogger("genrpc.gateway.model_worker")

PROMPT_TAIL_TOKENS = 5  # prompt ids that prime incremental detokenization (as TGI)
SUBMITS_IN_FLIGHT = 1  # per model worker; more concurrent requests share the next Submit
SUBMIT_REFUSALS = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
DEFAULT_MAX_STREAM_BUFFER = 1024  # pieces (about a token each) a sequence may have waiting unread


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
    # On the first token, when asked: (id, logprob, text, [(id, logprob, text)]) of prompt tokens 1 ..
    prompt_logprobs: list | None = None
    score: float | None = None  # a beam search's returned sequence's score


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
    max_buffered: int  # pieces the queue may hold unread before the sequence ends (a reader that stopped)
    done: bool = False


class ModelWorkerClient:
    """One model worker: its Events stream, its sequences, and its health."""

    def __init__(self, address: str, tokenizers: TokenizerPool, on_health_change: Callable[[], None],
                 security: ClientSecurity | None = None, server_name: str = "",
                 max_stream_buffer: int = DEFAULT_MAX_STREAM_BUFFER):
        """max_stream_buffer: a sequence's pieces that may wait unread (a client that stopped reading)."""
        self.address = address
        self.max_stream_buffer = max_stream_buffer
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

    async def refresh_info(self) -> None:
        """Asks the worker's facts again (its adapters changed)."""
        self.info = await self.stub.WorkerInfo(model_pb2.WorkerInfoRequest(), timeout=10)

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
            stream = None
            try:
                self.info = await self.stub.WorkerInfo(model_pb2.WorkerInfoRequest(), timeout=10)
                stream = self.stub.Events(model_pb2.EventsRequest(client_id=self.client_id))
                async for step in stream:
                    if not self.healthy:
                        self._set_healthy(True)
                        backoff = 0.2
                        log.info("model worker %s connected", self.address)
                    faults.check("gateway.model_stream")
                    if step.events:
                        await self._on_step(step)
                raise Unavailable("the Events stream ended")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.healthy:
                    log.warning("model worker %s lost: %s", self.address, describe(exc))
                self._set_healthy(False)
                self.fail_all(f"model worker {self.address} became unavailable")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                if stream is not None:  # the worker then aborts every sequence this stream carried
                    stream.cancel()

    def _set_healthy(self, healthy: bool) -> None:
        if healthy != self.healthy:
            self.healthy = healthy
            self.on_health_change()

    def fail_all(self, message: str) -> None:
        for handle in list(self.sequences.values()):
            handle.queue.put_nowait(SequenceEvent(handle.sequence_id, None, "", 0, error=message))
        self.sequences.clear()

    async def _on_step(self, step: model_pb2.EventsResponse) -> None:
        """Detokenizes one step's new tokens in one call and hands each sequence its pieces: one per
        token, in order (a speculative step brings a sequence several, each with its own text)."""
        groups: dict[int, tuple[SequenceHandle, list]] = {}
        for event in step.events:
            handle = self.sequences.get(event.sequence_id)
            if handle is None:
                continue  # ended on our side already (stop string, cancel)
            groups.setdefault(event.sequence_id, (handle, []))[1].append(event)
        if not groups:
            return
        items, piece_ids = [], []
        for handle, events in groups.values():
            new = [event.token_id for event in events if event.has_token]
            handle.detok.ids.extend(new)
            item = handle.detok.request_item(final=events[-1].finish_reason != 0)
            if len(new) > 1:
                item.num_new_tokens = len(new)
            items.append(item)
            for event in events:
                if event.has_token and event.HasField("logprob"):
                    piece_ids.append(event.token_id)
                    piece_ids.extend(t.token_id for t in event.top_logprobs)
                for entry in event.prompt_logprobs:
                    piece_ids.append(entry.token_id)
                    piece_ids.extend(t.token_id for t in entry.top)
        try:
            response = await self.tokenizers.call(
                "DecodeStream", tokenizer_pb2.DecodeStreamRequest(items=items, piece_ids=piece_ids))
        except Exception as exc:
            for handle, _ in groups.values():
                self._end(handle, SequenceEvent(
                    handle.sequence_id, None, "", 0, error=f"detokenization failed: {describe(exc)}"))
            self._abort_in_background([handle.sequence_id for handle, _ in groups.values()])
            return
        texts = dict(zip(piece_ids, response.pieces))
        # What each request's queue held unread before this step: a step may bring a sequence many
        # pieces at once (a beam search's whole output), but a reader that stopped is one that left
        # earlier steps' pieces waiting.
        backlog: dict[int, int] = {}
        for handle, _ in groups.values():
            backlog.setdefault(id(handle.queue), handle.queue.qsize())
        for (handle, events), result in zip(groups.values(), response.results):
            handle.detok.advance(result)
            if backlog[id(handle.queue)] >= handle.max_buffered:
                self._end(handle, SequenceEvent(handle.sequence_id, None, "", 0, error=(
                    f"{handle.max_buffered} pieces of the stream waited unread; "
                    "a stream's reader must keep up (--max-stream-buffer)"), error_code=RESOURCE_EXHAUSTED))
                self._abort_in_background([handle.sequence_id])
                continue
            token_texts = iter(result.texts if len(result.texts) > 1 else [result.text])
            any_token = any(event.has_token for event in events)
            for event in events:
                logprob = None
                if event.has_token and event.HasField("logprob"):  # 0.0 is a logprob too: presence, not truth
                    logprob = (event.logprob, texts.get(event.token_id, ""),
                               [(t.token_id, t.logprob, texts.get(t.token_id, "")) for t in event.top_logprobs])
                text = next(token_texts, "") if event.has_token or not any_token else ""
                piece = SequenceEvent(
                    handle.sequence_id, event.token_id if event.has_token else None, text, event.finish_reason,
                    logprob, event.error, event.error_code,
                )
                if event.HasField("sequence_score"):
                    piece.score = event.sequence_score
                if event.prompt_logprobs:
                    piece.prompt_logprobs = [
                        (p.token_id, p.logprob, texts.get(p.token_id, ""),
                         [(t.token_id, t.logprob, texts.get(t.token_id, "")) for t in p.top])
                        for p in event.prompt_logprobs]
                if event.finish_reason != 0:
                    self._end(handle, piece)
                    break
                handle.queue.put_nowait(piece)

    def _end(self, handle: SequenceHandle, piece: SequenceEvent) -> None:
        handle.done = True
        self.sequences.pop(handle.sequence_id, None)
        handle.queue.put_nowait(piece)

    async def submit(
        self, rows: list[tuple[list[int], list[int]]], params: list[model_pb2.SamplingParams],
        skip_special_tokens: bool, queue: asyncio.Queue, timeout: float | None, metadata=None,
        tenant: str = "", priority: int = 0, cache_salt: str = "", beam_ranks: list[int] | None = None,
        adapter: str = "",
    ) -> list[SequenceHandle]:
        """Submits (input_ids, attention_mask) rows; returns their handles, in order. Their
        events all go to `queue`. The worker schedules them for `tenant` at `priority`, and refuses
        them at once when they could not start within `timeout`; they share cached prompts only with
        sequences of the same `cache_salt`. beam_ranks: with beam search, each row's returned rank
        (0: it leads a search; r > 0: the r-th sequence of the last leader before it). adapter: the
        LoRA adapter they run through ("": the base model)."""
        timeout_ms = max(1, int(timeout * 1000)) if timeout is not None else 0
        handles, inputs = [], []
        max_buffered = self.max_stream_buffer * len(rows)  # the request's sequences share the queue
        leader = 0
        for n, ((ids, mask), p) in enumerate(zip(rows, params)):
            tail = [i for i, m in zip(ids, mask) if m][-PROMPT_TAIL_TOKENS:]
            handle = SequenceHandle(next(self._ids), DetokState(tail, len(tail), skip_special_tokens), queue,
                                    max_buffered)
            handles.append(handle)
            rank = beam_ranks[n] if beam_ranks else 0
            leader = handle.sequence_id if rank == 0 else leader
            inputs.append(model_pb2.SequenceInput(
                sequence_id=handle.sequence_id, input_ids=ids, attention_mask=mask, params=p, tenant=tenant,
                priority=priority, timeout_ms=timeout_ms, cache_salt=cache_salt,
                beam_of=leader if rank else 0, beam_rank=rank, adapter=adapter))
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
        self._abort_in_background([s.sequence_id for s in inputs])

    def _abort_in_background(self, ids: list[int]) -> None:
        """Aborts sequences that ended on this side (a sequence that ends here ends on the worker)."""
        task = asyncio.get_running_loop().create_task(self._abort_ids(ids))
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
