"""One request's lifecycle: tokenize, submit, receive, stop strings, time limit, abort.

`Generator.stream()` yields `Delta`s for all of a request's sequences as they
arrive; the unary API collects them, the streaming API forwards them, so the
two give the same text by construction. Whatever ends the request (EOS, length,
stop string, time limit, client gone, error), every sequence still running on
the model worker is aborted in `finally`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import AsyncIterator

import grpc
from opentelemetry.trace import SpanKind

from gateway import metrics
from gateway.model_pool import ModelPool
from gateway.model_worker import SequenceEvent
from gateway.quotas import Quotas, refuse
from gateway.stop_strings import StopStringMatcher
from gateway.tokenizers import TokenizerPool
from gateway.validation import ResolvedConfig, fit_to_context
from genrpc import tracing
from genrpc.errors import GenrpcError, ResourceExhausted, Unavailable
from genrpc.internal.v1 import model_pb2, tokenizer_pb2
from genrpc.logs import REQUEST_ID_HEADER, request_id
from genrpc.rights import DEFAULT as DEFAULT_RIGHTS
from genrpc.rights import Rights
from genrpc.v1 import generation_pb2 as gen_pb2

log = logging.getLogger("genrpc.gateway.generation")

RUNNING = gen_pb2.FINISH_REASON_UNSPECIFIED
SAMPLING_FIELDS = [f.name for f in model_pb2.SamplingParams.DESCRIPTOR.fields]  # each one a ResolvedConfig field


@dataclass
class Prompts:
    """What to generate from: plain texts or chats as (role, content) pairs."""

    texts: list[str] = field(default_factory=list)
    chats: list[list[tuple[str, str]]] = field(default_factory=list)


@dataclass
class Delta:
    """A piece of one sequence's output."""

    index: int  # the prompt's position in the request
    text: str
    token_ids: list[int]
    # (id, logprob, text, [(id, logprob, text) of the most likely tokens])
    logprobs: list[tuple[int, float, str, list]] = field(default_factory=list)
    finish_reason: int = RUNNING
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seed: int = 0
    stop_sequence: str = ""
    sample_index: int = 0  # with num_return_sequences: which sample of its prompt
    prompt_logprobs: list | None = None  # on a sample's first delta, when asked (as logprobs' items)
    sequence_score: float | None = None  # a beam search's returned sequence's score (on each of its deltas)


@dataclass
class SequenceRun:
    index: int  # the sequence's position: prompt * num_return_sequences + sample
    sample_index: int
    seed: int
    prompt_tokens: int
    matcher: StopStringMatcher
    started: float = 0.0
    last_token_at: float = 0.0
    num_generated: int = 0
    finished: bool = False

    def count_token(self) -> None:
        now = time.monotonic()
        if self.num_generated == 0:
            metrics.TIME_TO_FIRST_TOKEN.observe(now - self.started)
        else:
            metrics.INTER_TOKEN_LATENCY.observe(now - self.last_token_at)
        self.last_token_at = now
        self.num_generated += 1
        metrics.GENERATED_TOKENS.inc()

    def delta(self, text: str, token_ids: list[int], logprobs: list, finish_reason: int = RUNNING,
              stop: str = "") -> Delta:
        return Delta(self.index, text, token_ids, logprobs, finish_reason, self.prompt_tokens,
                     self.num_generated, self.seed, stop, self.sample_index)


class Generator:
    def __init__(self, tokenizers: TokenizerPool, models: ModelPool, max_inflight_sequences: int,
                 parse_special_tokens: bool = False, max_inflight_per_client: int | None = None):
        """max_inflight_per_client: one client's share of max_inflight_sequences (default: half), so
        that a client flooding the gateway is refused before anyone else is."""
        self.tokenizers = tokenizers
        self.models = models
        self.max_inflight_sequences = max_inflight_sequences
        self.max_inflight_per_client = max_inflight_per_client or max(1, max_inflight_sequences // 2)
        self.parse_special_tokens = parse_special_tokens  # markup in callers' text may become special tokens
        self.quotas = Quotas()
        self.num_inflight = 0
        self.inflight_by_client: Counter[str] = Counter()  # only clients with sequences in flight
        metrics.ACTIVE_CLIENTS.set_function(lambda: len(self.inflight_by_client))

    async def encode(self, prompts: Prompts, truncate: int | None, pad: bool, return_tokens: bool,
                     timeout: float | None, rights: Rights = DEFAULT_RIGHTS) -> tokenizer_pb2.EncodeResponse:
        """Tokenizes; the caller's markup becomes special tokens as its rights say (else the flag)."""
        raw_markup = rights.raw_markup if rights.raw_markup is not None else self.parse_special_tokens
        request = tokenizer_pb2.EncodeRequest(
            texts=prompts.texts,
            chats=[gen_pb2.Chat(messages=[gen_pb2.Message(role=r, content=c) for r, c in chat])
                   for chat in prompts.chats],
            pad=pad, return_tokens=return_tokens, parse_special_tokens=raw_markup,
        )
        if truncate is not None:
            request.truncate_input_tokens = truncate
        with tracing.tracer().start_as_current_span("tokenizer.Encode", kind=SpanKind.CLIENT):
            return await self.tokenizers.encode(request, timeout=timeout, metadata=_metadata())

    def _sampling_params(self, config: ResolvedConfig, max_new_tokens: int, seed: int,
                         bad_words_ids: list[list[int]]) -> model_pb2.SamplingParams:
        """The resolved config's token-selection fields (the .proto message's names), with this
        sequence's own length limit and seed, and the banned words as token ids."""
        values = {name: getattr(config, name) for name in SAMPLING_FIELDS if name != "bad_words_ids"}
        values = {name: value for name, value in values.items() if value is not None}  # unset: the worker's
        values.update(max_new_tokens=max_new_tokens, min_new_tokens=min(config.min_new_tokens, max_new_tokens),
                      num_return_sequences=config.num_return_sequences if config.num_beams > 1 else 1, seed=seed,
                      bad_words_ids=[model_pb2.BannedTokens(ids=ids) for ids in bad_words_ids],
                      sequence_bias=[gen_pb2.SequenceBias(token_ids=ids, bias=bias)
                                     for ids, bias in config.sequence_bias])
        if config.watermarking_config is not None:
            values["watermarking_config"] = gen_pb2.WatermarkingConfig(**config.watermarking_config)
        if config.exponential_decay_length_penalty is not None:
            start, factor = config.exponential_decay_length_penalty
            values["exponential_decay_length_penalty"] = gen_pb2.ExponentialDecayLengthPenalty(
                start_index=start, decay_factor=factor)
        return model_pb2.SamplingParams(**values)

    async def _bad_words_ids(self, words: list[str], deadline: float | None) -> list[list[int]]:
        """Each banned string's token ids, as written and after a space (where a word usually
        starts), as generate()'s bad_words_ids are made."""
        if not words:
            return []
        request = tokenizer_pb2.EncodeRequest(texts=[v for w in words for v in (w, " " + w)], fragments=True)
        response = await self.tokenizers.call("Encode", request, _remaining(deadline), _metadata())
        return [list(ids) for ids in dict.fromkeys(tuple(row.input_ids) for row in response.rows if row.input_ids)]

    async def stream(self, prompts: Prompts, config: ResolvedConfig, deadline: float | None = None,
                     client: str = "", rights: Rights = DEFAULT_RIGHTS) -> AsyncIterator[Delta]:
        """Generates every prompt for `client` (the identity fair shares, caps and rates are kept by,
        within its token's `rights`); yields deltas as tokens arrive (sequences interleaved)."""
        started = time.monotonic()
        num_seqs = (len(prompts.texts) + len(prompts.chats)) * config.num_return_sequences
        mine = self.inflight_by_client[client]
        cap = rights.max_inflight if rights.max_inflight is not None else self.max_inflight_per_client
        if mine + num_seqs > cap:
            metrics.CLIENT_CAP_REFUSALS.inc()
            error = ResourceExhausted(f"this client has {mine} sequences in flight and asks for {num_seqs} more: "
                                      f"at most {cap} per client; retry later")
            raise refuse(rights, "max_inflight", error) if rights.max_inflight is not None else error
        if self.num_inflight + num_seqs > self.max_inflight_sequences:
            raise ResourceExhausted(
                f"the gateway is at capacity ({self.num_inflight} sequences in flight, "
                f"max {self.max_inflight_sequences}); retry later")
        self.quotas.admit(client, rights)
        self.num_inflight += num_seqs
        self.inflight_by_client[client] += num_seqs
        metrics.INFLIGHT_SEQUENCES.inc(num_seqs)
        num_finished = 0
        ended_by = gen_pb2.FINISH_REASON_CANCELLED  # unless an error ends it: client gone, deadline
        try:
            async for delta in self._stream(prompts, config, deadline, started, client, rights):
                self.quotas.charge(client, rights, len(delta.token_ids))
                if delta.finish_reason != RUNNING:
                    num_finished += 1
                    metrics.FINISHED_SEQUENCES.labels(gen_pb2.FinishReason.Name(delta.finish_reason)).inc()
                yield delta
        except (asyncio.CancelledError, asyncio.TimeoutError, GeneratorExit):
            raise
        except BaseException:
            ended_by = gen_pb2.FINISH_REASON_ERROR
            raise
        finally:
            if num_finished < num_seqs:  # sequences that ended without a finish reason of their own
                metrics.FINISHED_SEQUENCES.labels(gen_pb2.FinishReason.Name(ended_by)).inc(num_seqs - num_finished)
            self.num_inflight -= num_seqs
            self.inflight_by_client[client] -= num_seqs
            if not self.inflight_by_client[client]:
                del self.inflight_by_client[client]
            metrics.INFLIGHT_SEQUENCES.dec(num_seqs)

    async def _stream(self, prompts, config, deadline, started, client, rights) -> AsyncIterator[Delta]:
        info = self.models.info()
        context_limit = min(info.max_context_tokens, info.kv_cache_tokens or info.max_context_tokens)
        encoded = await self.encode(prompts, config.truncate_input_tokens, True, False, _remaining(deadline), rights)
        bad_words_ids = await self._bad_words_ids(config.bad_words, deadline)
        field_name = "prompts" if prompts.texts else "chats"
        rows, params, runs = [], [], {}
        samples = config.num_return_sequences
        # With beams, a prompt's first sequence leads the search and the others are its returned
        # sequences 1 ..: the worker sends each its tokens when the search ends.
        beam_ranks = [sample for _ in encoded.rows for sample in range(samples)] if config.num_beams > 1 else None
        for prompt_index, row in enumerate(encoded.rows):
            max_new = fit_to_context(row.num_tokens, config, context_limit, f"{field_name}[{prompt_index}]")
            first_seed = config.seed if config.seed is not None else random.getrandbits(63)
            for sample in range(samples):  # sample i: seed + i; the prompt's blocks are shared (computed once)
                seed = (first_seed + sample) % 2**64
                index = prompt_index * samples + sample
                rows.append((list(row.input_ids), list(row.attention_mask)))
                params.append(self._sampling_params(config, max_new, seed, bad_words_ids))
                runs[index] = SequenceRun(index, sample, seed, row.num_tokens,
                                          StopStringMatcher(config.stop, config.include_stop_sequence), started)
            metrics.PROMPT_TOKENS.inc(row.num_tokens)  # once a prompt, however many samples
        queue: asyncio.Queue = asyncio.Queue()
        # Picked right before submit, with no await in between, so that concurrent requests see each
        # other's load (submit registers the sequences before its first await).
        first_ids, first_mask = rows[0]
        salt = cache_salt(config, rights, client)
        worker = self.models.pick([i for i, m in zip(first_ids, first_mask) if m], salt, config.adapter)
        with tracing.tracer().start_as_current_span(
                "model.Submit", kind=SpanKind.CLIENT, attributes={"genrpc.worker": worker.address,
                                                                  "genrpc.num_sequences": len(rows)}):
            handles = await worker.submit(rows, params, config.skip_special_tokens, queue, _remaining(deadline),
                                          metadata=_metadata(), tenant=client, priority=config.priority,
                                          cache_salt=salt, beam_ranks=beam_ranks, adapter=config.adapter)
        by_id = {h.sequence_id: runs[i] for i, h in enumerate(handles)}
        time_limit_at = started + config.time_limit_ms / 1000 if config.time_limit_ms else None
        num_unfinished = len(handles)
        try:
            while num_unfinished:
                try:
                    if time_limit_at is None:  # (wait_for costs ~4% of the gateway's time per token)
                        event: SequenceEvent = await queue.get()
                    else:
                        event = await asyncio.wait_for(queue.get(), max(0.0, time_limit_at - time.monotonic()))
                except asyncio.TimeoutError:
                    for run in by_id.values():
                        if not run.finished:
                            run.finished = True
                            yield run.delta(run.matcher.flush(), [], [], gen_pb2.FINISH_REASON_TIME_LIMIT)
                    return
                run = by_id[event.sequence_id]
                if run.finished:
                    continue
                delta = self._on_event(run, event)
                if delta.finish_reason != RUNNING:
                    run.finished = True
                    num_unfinished -= 1
                    if delta.finish_reason == gen_pb2.FINISH_REASON_STOP_SEQUENCE:
                        await worker.abort([h for h in handles if by_id[h.sequence_id] is run])
                yield delta
        finally:
            unfinished = [h for h in handles if not h.done]
            if unfinished:
                await asyncio.shield(worker.abort(unfinished))

    @staticmethod
    def _on_event(run: SequenceRun, event: SequenceEvent) -> Delta:
        if event.error and event.finish_reason in (RUNNING, gen_pb2.FINISH_REASON_ERROR):
            if event.error_code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]:
                if event.finish_reason == RUNNING:  # ended here: its client stopped reading
                    raise ResourceExhausted(event.error)
                raise ResourceExhausted(f"the model worker refused the sequence: {event.error}")
            if event.finish_reason == RUNNING:  # ended here: a worker or tokenizer became unavailable
                raise Unavailable(event.error)
            log.error("the model worker failed sequence %d: %s", event.sequence_id, event.error)
            raise GenrpcError(f"the model worker failed the sequence: {event.error} "
                              f"(request id {request_id.get()}; the details are in the model service's log)")
        token_ids, logprobs = [], []
        if event.token_id is not None:
            token_ids.append(event.token_id)
            run.count_token()
            if event.logprob is not None:
                logprob, text, top = event.logprob
                logprobs.append((event.token_id, logprob, text, top))
        match = run.matcher.feed(event.text)
        if match.stop is not None:
            delta = run.delta(match.text, token_ids, logprobs, gen_pb2.FINISH_REASON_STOP_SEQUENCE, match.stop)
        elif event.finish_reason != RUNNING:
            delta = run.delta(match.text + run.matcher.flush(), token_ids, logprobs, event.finish_reason)
        else:
            delta = run.delta(match.text, token_ids, logprobs)
        delta.prompt_logprobs = event.prompt_logprobs
        delta.sequence_score = event.score
        return delta


def cache_salt(config: ResolvedConfig, rights: Rights, client: str) -> str:
    """The prefix-cache namespace of a request: the salt it names, else its token's team salt, else
    its client's own. Requests share cached prompts only within one namespace: a client cannot time
    another's prompts (as vLLM's cache_salt, CVE-2025-46570)."""
    if config.cache_salt is not None:
        return "salt:" + config.cache_salt
    if rights.cache_salt:
        return "salt:" + rights.cache_salt
    return "client:" + client


async def detect_watermark(generator: "Generator", ids: list[int], settings: dict, z_threshold: float,
                           ignore_repeated_ngrams: bool, timeout: float | None) -> gen_pb2.DetectWatermarkResponse:
    """A model worker's WatermarkDetector verdict on `ids` (any healthy worker: no state involved)."""
    worker = generator.models.pick()
    config = gen_pb2.WatermarkingConfig(**settings)
    request = model_pb2.DetectWatermarkRequest(token_ids=ids, watermarking_config=config,
                                               z_threshold=z_threshold, ignore_repeated_ngrams=ignore_repeated_ngrams)
    return (await worker.stub.DetectWatermark(request, timeout=timeout, metadata=_metadata())).result


def _metadata() -> list[tuple[str, str]]:
    """What a backend call carries: the trace context and the request id."""
    return tracing.outgoing_metadata([(REQUEST_ID_HEADER, request_id.get())] if request_id.get() else [])


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise asyncio.TimeoutError()
    return remaining
