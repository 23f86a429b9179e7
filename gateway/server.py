"""The public genrpc.v1.Generation servicer: translate, make one call, translate back."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid

import grpc

from gateway import convert
from gateway.generation import Generator, Prompts, detect_watermark
from gateway.quotas import apply_rights, refuse
from gateway.validation import (
    check_answer_size,
    check_detect_watermark,
    check_tokenize_size,
    check_truncate,
    resolve_config,
    validate_prompts,
)
from genrpc.errors import (
    AlreadyExists,
    FailedPrecondition,
    GenrpcError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
    grpc_errors,
)
from genrpc.internal.v1 import model_pb2
from genrpc.limits import ADAPTER_NAME
from genrpc.logs import REQUEST_ID_HEADER, request_id
from genrpc.security import ANONYMOUS, caller, caller_rights
from genrpc.v1 import generation_pb2 as pb
from genrpc.v1 import generation_pb2_grpc

log = logging.getLogger("genrpc.gateway")


def _metadata_value(context, key: str) -> str:
    """The caller's metadata value for `key` as text, at most 128 characters ("" when absent)."""
    value = next((v for k, v in context.invocation_metadata() or () if k == key), "")
    return (value if isinstance(value, str) else value.decode(errors="replace"))[:128]


async def _begin(context) -> str:
    """Takes the caller's x-request-id (or makes one), echoes it in the response metadata and
    tags this call's logs with it."""
    rid = _metadata_value(context, REQUEST_ID_HEADER) or uuid.uuid4().hex
    request_id.set(rid)
    await context.send_initial_metadata(((REQUEST_ID_HEADER, rid),))
    return rid


def _log_done(method: str, started: float, finish_reasons: list[int], num_tokens: int) -> None:
    log.info("%s done", method, extra={"fields": {
        "method": method, "duration_ms": round((time.monotonic() - started) * 1000, 1),
        "num_sequences": len(finish_reasons), "generated_tokens": num_tokens,
        "finish_reasons": [pb.FinishReason.Name(r) for r in finish_reasons]}})


CLIENT_HEADER = "x-genrpc-client"


def client_identity(context) -> str:
    """Who a request counts against for fair shares and caps: its bearer token when auth is on,
    else the x-genrpc-client metadata value, else its IP address (all connections from one host
    are one client)."""
    who = caller.get()
    if who != ANONYMOUS:
        return who
    named = _metadata_value(context, CLIENT_HEADER)
    if named:
        return "client:" + named
    peer = context.peer() or ""
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        address = address.rsplit(":", 1)[0]  # without the port
    return "peer:" + address


def _deadline(context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, generator: Generator):
        self.generator = generator

    def _resolve(self, prompts: Prompts, config: pb.GenerationConfig, single: bool):
        """The request's config, checked, with the model's defaults and within the caller's rights."""
        validate_prompts(prompts.texts, prompts.chats, single)
        limits = convert.model_limits(self.generator.models.info())
        return apply_rights(resolve_config(convert.requested_config(config), limits), caller_rights.get())

    @grpc_errors
    async def Generate(self, request, context):
        started = time.monotonic()
        await _begin(context)
        prompts = convert.prompts(request)
        config = self._resolve(prompts, request.config, single=False)
        check_answer_size(len(prompts.texts) + len(prompts.chats), config)
        num_seqs = (len(prompts.texts) + len(prompts.chats)) * config.num_return_sequences
        by_index: list[list] = [[] for _ in range(num_seqs)]
        async for delta in self.generator.stream(prompts, config, _deadline(context), client_identity(context),
                                                 caller_rights.get()):
            by_index[delta.index].append(delta)
        response = convert.completions(by_index, config.num_return_sequences)
        _log_done("Generate", started, [c.finish_reason for c in response.completions],
                  sum(c.generated_tokens for c in response.completions))
        return response

    @grpc_errors
    async def GenerateStream(self, request, context):
        started = time.monotonic()
        await _begin(context)
        prompts = convert.stream_prompts(request)
        config = self._resolve(prompts, request.config, single=True)
        finished: list[tuple[int, int]] = []  # (finish reason, tokens) of each sample that ended
        async for delta in self.generator.stream(prompts, config, _deadline(context), client_identity(context),
                                                 caller_rights.get()):
            if delta.finish_reason:
                finished.append((delta.finish_reason, delta.generated_tokens))
                if len(finished) == config.num_return_sequences:  # one line for the request, as Generate
                    _log_done("GenerateStream", started, [r for r, _ in finished], sum(n for _, n in finished))
            yield convert.stream_response(delta)

    @grpc_errors
    async def Tokenize(self, request, context):
        await _begin(context)
        prompts = convert.prompts(request)
        validate_prompts(prompts.texts, prompts.chats, single=False)
        check_tokenize_size(prompts.texts, prompts.chats)
        limits = convert.model_limits(self.generator.models.info())
        truncate = None
        if request.HasField("truncate_input_tokens"):  # a field of TokenizeRequest itself, not of a config
            truncate = check_truncate(request.truncate_input_tokens, limits.max_context, "truncate_input_tokens")
        encoded = await self.generator.encode(prompts, truncate, False, True, context.time_remaining(),
                                              caller_rights.get())
        return pb.TokenizeResponse(prompts=[
            pb.TokenizedPrompt(token_ids=row.input_ids, tokens=row.tokens, num_tokens=row.num_tokens)
            for row in encoded.rows
        ])

    @grpc_errors
    async def DetectWatermark(self, request, context):
        await _begin(context)
        limits = convert.model_limits(self.generator.models.info())
        z = request.z_threshold if request.HasField("z_threshold") else None
        settings, z = check_detect_watermark(request.text, list(request.token_ids), convert.watermark_settings(request),
                                             z, limits.vocab_size)
        ids = list(request.token_ids)
        if request.text:
            encoded = await self.generator.encode(Prompts([request.text], []), None, False, False,
                                                  context.time_remaining(), caller_rights.get())
            ids = list(encoded.rows[0].input_ids)
        return await detect_watermark(self.generator, ids, settings, z, request.ignore_repeated_ngrams,
                                      context.time_remaining())

    @grpc_errors
    async def ModelInfo(self, request, context):
        await _begin(context)
        info = self.generator.models.info()
        return pb.ModelInfoResponse(
            model_name=info.model_name, max_context_tokens=info.max_context_tokens,
            default_config=info.default_config, quantization=info.quantization, dtype=info.dtype,
            device=info.device, eos_token_ids=info.eos_token_ids, vocab_size=info.vocab_size,
            num_model_workers=len(self.generator.models.healthy_workers), thread_policy=info.thread_policy,
            kv_cache_tokens=info.kv_cache_tokens, kv_block_size=info.kv_block_size,
            prefix_caching=info.prefix_caching, decode_attention=info.decode_attention,
            prefill_attention=info.prefill_attention, matmul=info.matmul, cpu=info.cpu,
            output_layer=info.output_layer, speculation=info.speculation, adapters=info.adapters,
        )

    @grpc_errors
    async def LoadAdapter(self, request, context):
        """On every model worker or none (a worker that fails undoes the others)."""
        await _begin(context)
        workers = self._adapter_workers("LoadAdapter", request.name)
        if not request.path:
            raise InvalidArgument("path is empty: the adapter's folder on the model workers' disk (PEFT's format)")
        load = model_pb2.LoadAdapterRequest(name=request.name, path=request.path)
        results = await asyncio.gather(*(w.stub.LoadAdapter(load, timeout=context.time_remaining() or 120)
                                         for w in workers), return_exceptions=True)
        failed = next(((w, r) for w, r in zip(workers, results) if isinstance(r, BaseException)), None)
        if failed is not None:
            undo = model_pb2.UnloadAdapterRequest(name=request.name)
            await asyncio.gather(*(w.stub.UnloadAdapter(undo, timeout=60) for w, r in zip(workers, results)
                                   if not isinstance(r, BaseException)), return_exceptions=True)
            raise _worker_error(*failed)
        await asyncio.gather(*(w.refresh_info() for w in workers), return_exceptions=True)
        log.info("LoRA adapter %s loaded on %d model workers", request.name, len(workers))
        return pb.LoadAdapterResponse(adapter=results[0].adapter, num_model_workers=len(workers))

    @grpc_errors
    async def UnloadAdapter(self, request, context):
        """From every model worker that has it; NOT_FOUND when none has."""
        await _begin(context)
        workers = self._adapter_workers("UnloadAdapter", request.name)
        unload = model_pb2.UnloadAdapterRequest(name=request.name)
        results = await asyncio.gather(*(w.stub.UnloadAdapter(unload, timeout=context.time_remaining() or 120)
                                         for w in workers), return_exceptions=True)
        await asyncio.gather(*(w.refresh_info() for w in workers), return_exceptions=True)
        done = sum(not isinstance(r, BaseException) for r in results)
        failed = [(w, r) for w, r in zip(workers, results) if isinstance(r, BaseException)
                  and not (isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.NOT_FOUND)]
        if failed:
            raise _worker_error(*failed[0])
        if not done:
            raise NotFound(f"name={request.name!r}: no such LoRA adapter (ModelInfo.adapters)")
        log.info("LoRA adapter %s unloaded from %d model workers", request.name, done)
        return pb.UnloadAdapterResponse(num_model_workers=done)

    def _adapter_workers(self, method: str, name: str) -> list:
        """The healthy model workers, once the caller's right and the name are checked."""
        rights = caller_rights.get()
        if not rights.manage_adapters:
            raise refuse(rights, "manage_adapters", PermissionDenied(
                f"{method} needs a bearer token with manage_adapters=yes (the gateway's --auth-tokens-file)"))
        if not re.fullmatch(ADAPTER_NAME, name):
            raise InvalidArgument(f"name={name[:80]!r} is invalid: 1 to 64 letters, digits, '.', '_' or '-' "
                                  "(not starting with '.', '_' or '-')")
        workers = self.generator.models.healthy_workers
        if not workers:
            raise Unavailable("no model worker is reachable; retry later")
        return workers


_PASSED_ON = {grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument, grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
              grpc.StatusCode.NOT_FOUND: NotFound, grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition}


def _worker_error(worker, exc: BaseException) -> BaseException:
    """A model worker's refusal as the caller's status, naming the worker; any other failure as is."""
    if isinstance(exc, grpc.aio.AioRpcError) and exc.code() in _PASSED_ON:
        return _PASSED_ON[exc.code()](f"model worker {worker.address}: {exc.details()}")
    return exc if isinstance(exc, (GenrpcError, grpc.aio.AioRpcError)) else Unavailable(
        f"model worker {worker.address}: {type(exc).__name__}")
