"""vLLM's engine protocol, `vllm.grpc.engine.VllmEngine` (the pinned smg-grpc-proto's .proto, stubs in
genrpc/vllm), served by the model worker beside genrpc.internal.v1.ModelWorker, on the same port and
behind the same TLS and bearer tokens: routers that speak it (SMG; llm-d's endpoint picker parses its
calls) tokenize and detokenize themselves and send token ids.

Generate maps the request's sampling parameters onto the engine's (unset ones take the model's
generation_config defaults, as the public API's do), finds its stop strings in the detokenized output
here (the engine sees ids only), and streams ids back: a chunk per step's new tokens when asked, then
the final message with its counts, finish reason and matched stop. What does not map is refused with
INVALID_ARGUMENT naming the field and the value (n > 1, images, KV transfer, structural tags); Embed,
the profiler and KV events answer UNIMPLEMENTED. A request's sequence runs under the client id
`vllm-engine/<request id>`, owned by the caller that sent it, so Abort reaches only its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import itertools
import json
import logging
import math
import os
import tempfile
import time
import zipfile
from datetime import datetime, timezone

import grpc

from genrpc import limits
from genrpc.errors import GenrpcError, InvalidArgument, PermissionDenied, ResourceExhausted, grpc_errors
from genrpc.internal.v1 import model_pb2
from genrpc.security import caller
from genrpc.v1 import generation_pb2
from genrpc.vllm import common_pb2, vllm_engine_pb2_grpc
from genrpc.vllm import vllm_engine_pb2 as pb
from model_svc import convert
from model_svc.engine.loop import EngineLoop
from model_svc.engine.schedule_types import SchedulerFull
from model_svc.kv_events import KvEventPublisher
from tokenizer_svc.detokenize import decode_incremental

log = logging.getLogger("genrpc.model.vllm")

SERVICE = pb.DESCRIPTOR.services_by_name["VllmEngine"].full_name
CLIENT_PREFIX = "vllm-engine/"
MAX_REQUEST_ID = 256
MAX_STOP_STRINGS = 32
MAX_STOP_LENGTH = 256
MAX_TEMPERATURE = 100.0
TOKENIZER_CHUNK = 1 << 20  # GetTokenizer's zip, this many bytes a message
FINISH = {generation_pb2.FINISH_REASON_LENGTH: "length", generation_pb2.FINISH_REASON_EOS_TOKEN: "stop",
          generation_pb2.FINISH_REASON_CANCELLED: "abort"}


class VllmEngineServicer(vllm_engine_pb2_grpc.VllmEngineServicer):
    def __init__(self, loaded, engine_loop: EngineLoop, subscriptions, tokenizer, max_num_seqs: int,
                 kv_events: KvEventPublisher | None = None):
        """tokenizer: () -> the served model's transformers tokenizer (stop strings, text prompts and
        GetTokenizer need it; loaded on first use). kv_events: the prefix cache's events (None: prefix
        caching is off, SubscribeKvEvents is UNIMPLEMENTED)."""
        self.kv_events = kv_events
        self.loaded = loaded
        self.engine_loop = engine_loop
        self.subs = subscriptions
        self.tokenizer = tokenizer
        self.max_num_seqs = max_num_seqs
        self.started = time.time()
        self.last_receive = 0.0
        self._tokenizer_zip: tuple[bytes, str] | None = None
        self._numbers = itertools.count(1)

    # Generate ------------------------------------------------------------------------------------

    @grpc_errors
    async def Generate(self, request, context):
        self.last_receive = time.time()
        rid = request.request_id
        if not 1 <= len(rid) <= MAX_REQUEST_ID:
            raise InvalidArgument(f"request_id has {len(rid)} characters: give 1 to {MAX_REQUEST_ID}")
        refuse_unmapped(request)
        params = request.sampling_params
        ids = await self._prompt(request)
        sampling, stops = self._sampling(params, len(ids))
        client_id = CLIENT_PREFIX + rid
        if client_id in self.subs.queues:
            raise InvalidArgument(f"request_id {rid!r} is already running")
        number = next(self._numbers)  # a request id used again may meet its last sequence's events
        seq_input = model_pb2.SequenceInput(sequence_id=number, input_ids=ids, params=sampling,
                                            tenant=caller.get() or "")
        remaining = context.time_remaining()
        if remaining is not None:
            seq_input.timeout_ms = max(1, int(remaining * 1000))
        try:
            seq = convert.sequence(client_id, seq_input, self.loaded.vocab_size,
                                   self.engine_loop.engine.default_prompt_lookup)
            if sampling.grammar:
                seq.constraint = await asyncio.to_thread(self.engine_loop.engine.grammars.constraint, sampling.grammar)
        except ValueError as exc:
            raise InvalidArgument(str(exc).replace(f"sequence {number}: ", "")) from exc
        queue: asyncio.Queue = asyncio.Queue()
        if client_id in self.subs.queues:  # the same id arrived while the grammar compiled
            raise InvalidArgument(f"request_id {rid!r} is already running")
        self.subs.queues[client_id] = queue
        self.subs.owners[client_id] = caller.get()
        self.subs.owned[client_id] = {number}
        output = Output(self, ids, params, stops, number)
        try:
            try:
                self.engine_loop.add([seq])
            except SchedulerFull as exc:
                raise ResourceExhausted(str(exc)) from exc
            while output.finish is None:
                response = await queue.get()
                if response is None:
                    break
                new = output.take(response.events)
                if output.finish is not None and number in self.subs.owned.get(client_id, ()):
                    self.engine_loop.abort([(client_id, number)])  # stopped here (a stop string or token)
                if request.stream and new:
                    yield pb.GenerateResponse(chunk=output.chunk(new))
            yield pb.GenerateResponse(complete=output.complete(request.stream))
        finally:
            if self.subs.queues.get(client_id) is queue:
                del self.subs.queues[client_id]
                self.subs.owners.pop(client_id, None)
                if self.subs.owned.pop(client_id, set()):
                    self.engine_loop.abort([(client_id, number)])  # the caller went away, or we failed

    async def _prompt(self, request) -> list[int]:
        which = request.WhichOneof("input")
        if which == "tokenized":
            ids = list(request.tokenized.input_ids)
        elif which == "text":
            tokenizer = await asyncio.to_thread(self.tokenizer)
            ids = tokenizer(request.text).input_ids
        else:
            raise InvalidArgument("the request has no input: set tokenized.input_ids or text")
        if not ids:
            raise InvalidArgument("the prompt has no tokens")
        params = request.sampling_params
        if params.HasField("truncate_prompt_tokens"):
            keep = params.truncate_prompt_tokens
            if keep == -1:
                keep = self.loaded.max_context - 1
            if keep < 1:
                raise InvalidArgument.field("sampling_params.truncate_prompt_tokens", keep,
                                            "-1 (the model's context) or a positive count")
            ids = ids[-keep:]
        if len(ids) >= self.loaded.max_context:
            raise InvalidArgument(f"the prompt has {len(ids)} tokens: the model's context is "
                                  f"{self.loaded.max_context}, and at least one must be left to generate")
        return ids

    def _sampling(self, p, prompt_tokens: int) -> tuple[model_pb2.SamplingParams, list[str]]:
        """The engine's sampling parameters for vLLM's, checked; and the stop strings (found here)."""
        d = self.loaded.defaults
        out = model_pb2.SamplingParams()
        room = self.loaded.max_context - prompt_tokens
        if p.HasField("max_tokens"):
            if not 1 <= p.max_tokens <= room:
                raise InvalidArgument.field("sampling_params.max_tokens", p.max_tokens,
                                            f"1 to {room} (the context left after the prompt's {prompt_tokens} tokens)")
            out.max_new_tokens = p.max_tokens
        else:
            out.max_new_tokens = room  # vLLM's default: as far as the context goes
        if p.min_tokens > out.max_new_tokens:
            raise InvalidArgument.field("sampling_params.min_tokens", p.min_tokens,
                                        f"at most max_tokens ({out.max_new_tokens})")
        out.min_new_tokens = p.min_tokens
        # Unset (0 on the wire): temperature as the model's generation_config says (greedy where it does not
        # sample), top_p 1, top_k and min_p off, repetition_penalty 1: vLLM's meanings of its zeros.
        temperature = p.temperature if p.HasField("temperature") else (d.temperature if d.do_sample else 0.0)
        _range("sampling_params.temperature", temperature, 0.0, MAX_TEMPERATURE)
        out.do_sample = temperature > 0
        out.temperature = temperature if temperature > 0 else 1.0
        top_p = p.top_p or 1.0
        _range("sampling_params.top_p", top_p, 0.0, 1.0, low_open=True)
        out.top_p = top_p
        out.top_k = p.top_k
        _range("sampling_params.min_p", p.min_p, 0.0, 1.0)
        out.min_p = p.min_p
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(p, name)
            _range(f"sampling_params.{name}", value, -limits.MAX_OCCURRENCE_PENALTY, limits.MAX_OCCURRENCE_PENALTY)
            setattr(out, name, value)
        repetition = p.repetition_penalty or 1.0
        _range("sampling_params.repetition_penalty", repetition, 0.0, MAX_TEMPERATURE, low_open=True)
        out.repetition_penalty = repetition
        out.typical_p = 1.0
        if p.n > 1:
            raise InvalidArgument.field("sampling_params.n", p.n, "1: this worker returns one output a request "
                                        "(send n requests)")
        out.stop_token_ids.extend(p.stop_token_ids)
        out.ignore_eos = p.ignore_eos
        if p.HasField("logprobs"):
            if not 0 <= p.logprobs <= limits.MAX_TOP_LOGPROBS:
                raise InvalidArgument.field("sampling_params.logprobs", p.logprobs,
                                            f"0 to {limits.MAX_TOP_LOGPROBS} alternatives a token")
            out.logprobs, out.top_logprobs = True, p.logprobs
        if p.HasField("prompt_logprobs"):
            if not 0 <= p.prompt_logprobs <= limits.MAX_TOP_LOGPROBS:
                raise InvalidArgument.field("sampling_params.prompt_logprobs", p.prompt_logprobs,
                                            f"0 to {limits.MAX_TOP_LOGPROBS} alternatives a token")
            out.prompt_logprobs = p.prompt_logprobs
        if p.HasField("seed"):
            if p.seed < 0:
                raise InvalidArgument.field("sampling_params.seed", p.seed, "a seed >= 0")
            out.seed = p.seed
        elif out.do_sample:
            out.seed = int.from_bytes(os.urandom(8), "little") >> 1
        if len(p.logit_bias) > limits.MAX_LOGIT_BIAS_ENTRIES:
            raise InvalidArgument(f"sampling_params.logit_bias has {len(p.logit_bias)} entries: at most "
                                  f"{limits.MAX_LOGIT_BIAS_ENTRIES}")
        for token, bias in p.logit_bias.items():
            if not 0 <= token < self.loaded.vocab_size:
                raise InvalidArgument.field("sampling_params.logit_bias", token,
                                            f"token ids below the vocabulary size {self.loaded.vocab_size}")
            _range(f"sampling_params.logit_bias[{token}]", bias, -limits.MAX_LOGIT_BIAS, limits.MAX_LOGIT_BIAS)
            out.logit_bias[token] = bias
        stops = list(p.stop)
        if len(stops) > MAX_STOP_STRINGS:
            raise InvalidArgument(f"sampling_params.stop has {len(stops)} strings: at most {MAX_STOP_STRINGS}")
        for i, stop in enumerate(stops):
            if not 1 <= len(stop) <= MAX_STOP_LENGTH:
                raise InvalidArgument.field(f"sampling_params.stop[{i}]", stop,
                                            f"1 to {MAX_STOP_LENGTH} characters")
        which = p.WhichOneof("constraint")
        if which == "structural_tag":
            raise InvalidArgument("sampling_params.structural_tag is not supported by this worker: use json_schema, "
                                  "regex, grammar (Lark) or choice")
        if which is not None:
            from gateway.structured import grammar_for  # pure: the public API's conversion, named fields

            value = getattr(p, which)
            if which == "choice":
                value = list(value.choices)
            try:
                out.grammar = grammar_for(which, value)
            except InvalidArgument as exc:
                raise InvalidArgument(str(exc).replace("config.", "sampling_params.").replace(
                    "choice.options", "choice.choices")) from None
        return out, stops

    # The rest of the service ------------------------------------------------------------------------

    @grpc_errors
    async def Abort(self, request, context):
        who = caller.get()
        for rid in request.request_ids:
            client_id = CLIENT_PREFIX + rid
            owner = self.subs.owners.get(client_id)
            if owner is None:
                continue  # not running (any more): as vLLM, nothing to do
            if owner != who:
                raise PermissionDenied(f"request {rid!r} belongs to another caller")
            self.engine_loop.abort([(client_id, n) for n in self.subs.owned.get(client_id, ())])
        return pb.AbortResponse()

    @grpc_errors
    async def HealthCheck(self, request, context):
        stopped = self.engine_loop.stopped
        return pb.HealthCheckResponse(healthy=not stopped, message="shutting down" if stopped else "serving")

    @grpc_errors
    async def GetModelInfo(self, request, context):
        m = self.loaded
        config = m.model.config
        tokenizer = await asyncio.to_thread(self.tokenizer)
        d = m.defaults
        defaults = {"temperature": d.temperature if d.do_sample else 0.0, "top_p": d.top_p, "top_k": d.top_k,
                    "min_p": d.min_p, "repetition_penalty": d.repetition_penalty, "max_tokens": d.max_new_tokens}
        return pb.GetModelInfoResponse(
            model_path=m.name, is_generation=True, max_context_length=m.max_context, vocab_size=m.vocab_size,
            supports_vision=False, served_model_name=m.name, tokenizer_path=m.name, model_type=config.model_type,
            architectures=list(getattr(config, "architectures", None) or []), eos_token_ids=m.eos_token_ids,
            pad_token_id=_id(tokenizer.pad_token_id), bos_token_id=_id(tokenizer.bos_token_id),
            max_req_input_len=m.max_context - 1, default_sampling_params_json=json.dumps(defaults))

    @grpc_errors
    async def GetServerInfo(self, request, context):
        blocks = self.engine_loop.engine.scheduler.blocks
        return pb.GetServerInfoResponse(
            active_requests=self.engine_loop.num_running + self.engine_loop.num_waiting, is_paused=False,
            last_receive_timestamp=self.last_receive, uptime_seconds=time.time() - self.started,
            server_type="vllm-grpc", data_parallel_size=1, kv_cache_dtype="auto", block_size=blocks.block_size,
            model_dtype=f"torch.{self.loaded.dtype}", max_num_seqs=self.max_num_seqs)

    @grpc_errors
    async def GetLoads(self, request, context):
        if request.HasField("dp_rank") and request.dp_rank != 0:
            raise InvalidArgument.field("dp_rank", request.dp_rank, "0 (this worker is one data-parallel rank)")
        scheduler = self.engine_loop.engine.scheduler
        blocks = scheduler.blocks
        used = blocks.num_used_blocks * blocks.block_size
        running, waiting = self.engine_loop.num_running, self.engine_loop.num_waiting
        load = pb.SchedulerLoad(
            dp_rank=0, num_running_reqs=running, num_waiting_reqs=waiting, num_total_reqs=running + waiting,
            num_used_tokens=used, max_total_num_tokens=scheduler.capacity_tokens,
            token_usage=used / scheduler.capacity_tokens if scheduler.capacity_tokens else 0.0,
            max_running_requests=self.max_num_seqs)
        return pb.GetLoadsResponse(timestamp=datetime.now(timezone.utc).isoformat(), version=_version(),
                                   dp_rank_count=1, loads=[load])

    @grpc_errors
    async def GetTokenizer(self, request, context):
        """The tokenizer's files (as save_pretrained writes them) in a zip, in chunks; the last carries
        the zip's SHA-256."""
        if self._tokenizer_zip is None:
            self._tokenizer_zip = await asyncio.to_thread(self._zip_tokenizer)
        data, digest = self._tokenizer_zip
        for start in range(0, len(data), TOKENIZER_CHUNK):
            last = start + TOKENIZER_CHUNK >= len(data)
            yield common_pb2.GetTokenizerChunk(data=data[start:start + TOKENIZER_CHUNK], sha256=digest if last else "")

    def _zip_tokenizer(self) -> tuple[bytes, str]:
        tokenizer = self.tokenizer()
        buffer = io.BytesIO()
        with tempfile.TemporaryDirectory() as folder:
            tokenizer.save_pretrained(folder)
            with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
                for name in sorted(os.listdir(folder)):
                    archive.write(os.path.join(folder, name), name)
        data = buffer.getvalue()
        return data, hashlib.sha256(data).hexdigest()

    async def Embed(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Embed: this worker serves generation only")

    async def FlushCache(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "FlushCache is not supported by this worker")

    async def StartProfile(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "profiling is not supported by this worker")

    async def StopProfile(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "profiling is not supported by this worker")

    async def SubscribeKvEvents(self, request, context):
        """The prefix cache's stored and removed blocks, a batch per engine step (model_svc/kv_events.py)."""
        if self.kv_events is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "prefix caching is off on this worker: no KV-cache "
                                                               "events (--no-prefix-caching)")
        batches = self.kv_events.subscribe(request.start_sequence_number)
        try:
            async for batch in batches:
                yield batch
        except LookupError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))


class Output:
    """One Generate's output so far: ids, logprobs, the text for stop strings, and how it ended."""

    def __init__(self, servicer: VllmEngineServicer, prompt: list[int], params, stops: list[str], number: int):
        self.servicer = servicer
        self.number = number  # its sequence's id: events of an earlier one under the same request id are not its
        self.prompt_tokens = len(prompt)
        self.ids: list[int] = []
        self.logprobs: list[tuple[float, list]] = []
        self.prompt_logprobs = None
        self.stops = stops
        self.skip_special = params.skip_special_tokens
        self.want_logprobs = params.HasField("logprobs")
        self.stop_token_ids = set(params.stop_token_ids)
        self.min_tokens = params.min_tokens
        self.prompt = prompt
        self.text = ""  # decoded so far (stop strings only)
        self.read_offset = 0
        self.prefix_offset = 0
        self.finish: str | None = None
        self.matched_token: int | None = None
        self.stopped_at: str | None = None
        self.error: tuple[grpc.StatusCode, str] | None = None
        self.sent = 0  # ids already streamed

    def take(self, events) -> list[int]:
        """A step's events for this request: its new ids (cut at a stop string, should one complete)."""
        new = []
        for event in events:
            if self.finish is not None:
                break
            if event.sequence_id != self.number:
                continue
            if event.prompt_logprobs:
                self.prompt_logprobs = list(event.prompt_logprobs)
            if event.has_token:
                self.ids.append(event.token_id)
                new.append(event.token_id)
                if event.HasField("logprob"):
                    self.logprobs.append((event.logprob, list(event.top_logprobs)))
                # The engine's ignore_eos ignores stop tokens too; vLLM's only the model's EOS.
                stop_token = event.token_id in self.stop_token_ids and len(self.ids) > self.min_tokens
                if stop_token and not event.finish_reason:
                    self.finish, self.matched_token = "stop", event.token_id
                    break
                if self.stops and self._stop_string_completed():
                    self.finish = "stop"
                    break
            if event.finish_reason == generation_pb2.FINISH_REASON_ERROR:
                code = grpc.StatusCode.RESOURCE_EXHAUSTED if event.error_code == \
                    grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] else grpc.StatusCode.INTERNAL
                self.error = (code, event.error or "the sequence failed")
                self.finish = "error"
            elif event.finish_reason:
                self.finish = FINISH[event.finish_reason]
                if event.has_token and event.token_id in self.stop_token_ids:
                    self.matched_token = event.token_id  # (vLLM names a stop token, not the model's EOS)
        if self.error is not None:
            raise _Failed(*self.error)
        return new

    def _stop_string_completed(self) -> bool:
        """Decodes the new id into the text (incrementally, as the tokenizer service streams) and
        says whether a stop string now appears in it."""
        tokenizer = self.servicer.tokenizer()
        step = decode_incremental(lambda t, skip: tokenizer.decode(t, skip_special_tokens=skip),
                                  self.ids[self.prefix_offset:], self.read_offset - self.prefix_offset,
                                  self.skip_special)
        self.prefix_offset, self.read_offset = (self.prefix_offset + step.prefix_offset,
                                                self.prefix_offset + step.read_offset)
        if not step.text:
            return False
        search_from = max(0, len(self.text) - MAX_STOP_LENGTH)
        self.text += step.text
        for stop in self.stops:
            if self.text.find(stop, search_from) >= 0:
                self.stopped_at = stop
                return True
        return False

    def chunk(self, new: list[int]) -> pb.GenerateStreamChunk:
        first = self.sent == 0
        start = self.sent
        self.sent += len(new)
        out = pb.GenerateStreamChunk(token_ids=new, prompt_tokens=self.prompt_tokens,
                                     completion_tokens=len(self.ids))
        if self.want_logprobs:
            out.output_logprobs.CopyFrom(_output_logprobs(self.ids[start:self.sent], self.logprobs[start:self.sent]))
        if first and self.prompt_logprobs is not None:
            out.input_logprobs.CopyFrom(_input_logprobs(self.prompt, self.prompt_logprobs))
        return out

    def complete(self, streamed: bool) -> pb.GenerateComplete:
        finish = self.finish or "abort"
        out = pb.GenerateComplete(output_ids=self.ids, finish_reason=finish, prompt_tokens=self.prompt_tokens,
                                  completion_tokens=len(self.ids))
        if self.stopped_at is not None:
            out.matched_stop_str = self.stopped_at
        elif self.matched_token is not None:
            out.matched_token_id = self.matched_token
        if self.want_logprobs:
            out.output_logprobs.CopyFrom(_output_logprobs(self.ids, self.logprobs))
        if self.prompt_logprobs is not None:
            out.input_logprobs.CopyFrom(_input_logprobs(self.prompt, self.prompt_logprobs))
        return out


class _Failed(GenrpcError):
    """The engine ended the sequence with an error: the call ends with its status."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def refuse_unmapped(request) -> None:
    """INVALID_ARGUMENT for what this worker cannot do, naming the field."""
    if request.HasField("mm_inputs") or request.extra_mm_inputs or request.HasField("media_refs"):
        raise InvalidArgument("mm_inputs/media_refs: this worker serves a text-only model")
    if request.HasField("kv_transfer_params") or request.HasField("kv_transfer_params_json"):
        raise InvalidArgument("kv_transfer_params: this worker does not transfer KV caches (no prefill/decode "
                              "disaggregation)")
    if request.HasField("data_parallel_rank") and request.data_parallel_rank != 0:
        raise InvalidArgument.field("data_parallel_rank", request.data_parallel_rank,
                                    "0 (this worker is one data-parallel rank)")


def _range(name: str, value: float, low: float, high: float, low_open: bool = False) -> None:
    if math.isnan(value) or value > high or value < low or (low_open and value == low):
        raise InvalidArgument.field(name, value, f"{'(' if low_open else '['}{low:g}, {high:g}]")


def _id(value) -> int:
    return int(value) if value is not None else -1


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"genrpc {version('genrpc')}"
    except PackageNotFoundError:
        return "genrpc"


def _output_logprobs(ids: list[int], logprobs: list) -> pb.OutputLogProbs:
    out = pb.OutputLogProbs(token_ids=ids, token_logprobs=[lp for lp, _ in logprobs])
    for _, top in logprobs:
        out.top_logprobs.add(values=[t.logprob for t in top], token_ids=[t.token_id for t in top])
    return out


def _input_logprobs(prompt: list[int], entries) -> pb.InputLogProbs:
    """The prompt's logprobs, vLLM's way: the first token has none."""
    out = pb.InputLogProbs(token_ids=prompt)
    out.token_logprobs.add()
    out.top_logprobs.add()
    for entry in entries:
        out.token_logprobs.add(value=entry.logprob)
        out.top_logprobs.add(values=[t.logprob for t in entry.top], token_ids=[t.token_id for t in entry.top])
    return out
