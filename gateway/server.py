"""The public genrpc.v1.Generation servicer: translate, make one call, translate back."""

from __future__ import annotations

import time

from genrpc.errors import grpc_errors
from genrpc.v1 import generation_pb2 as pb
from genrpc.v1 import generation_pb2_grpc
from gateway import convert
from gateway.generation import Generator, Prompts
from gateway.validation import resolve_config, validate_prompts


def _deadline(context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, generator: Generator):
        self.generator = generator

    def _resolve(self, prompts: Prompts, config: pb.GenerationConfig, single: bool):
        validate_prompts(prompts.texts, prompts.chats, single)
        limits = convert.model_limits(self.generator.models.info())
        return resolve_config(convert.requested_config(config), limits)

    @grpc_errors
    async def Generate(self, request, context):
        prompts = convert.prompts(request)
        config = self._resolve(prompts, request.config, single=False)
        by_index: list[list] = [[] for _ in range(len(prompts.texts) + len(prompts.chats))]
        async for delta in self.generator.stream(prompts, config, _deadline(context)):
            by_index[delta.index].append(delta)
        return convert.completions(by_index)

    @grpc_errors
    async def GenerateStream(self, request, context):
        prompts = convert.stream_prompts(request)
        config = self._resolve(prompts, request.config, single=True)
        async for delta in self.generator.stream(prompts, config, _deadline(context)):
            yield convert.stream_response(delta)

    @grpc_errors
    async def Tokenize(self, request, context):
        prompts = convert.prompts(request)
        validate_prompts(prompts.texts, prompts.chats, single=False)
        limits = convert.model_limits(self.generator.models.info())
        truncate = None
        if request.HasField("truncate_input_tokens"):
            truncate = resolve_config(
                convert.requested_config(pb.GenerationConfig(truncate_input_tokens=request.truncate_input_tokens)),
                limits).truncate_input_tokens
        encoded = await self.generator.encode(prompts, truncate, False, True, context.time_remaining())
        return pb.TokenizeResponse(prompts=[
            pb.TokenizedPrompt(token_ids=row.input_ids, tokens=row.tokens, num_tokens=row.num_tokens)
            for row in encoded.rows
        ])

    @grpc_errors
    async def ModelInfo(self, request, context):
        info = self.generator.models.info()
        return pb.ModelInfoResponse(
            model_name=info.model_name, max_context_tokens=info.max_context_tokens,
            default_config=info.default_config, quantization=info.quantization, dtype=info.dtype,
            device=info.device, eos_token_ids=info.eos_token_ids, vocab_size=info.vocab_size,
            num_model_workers=len(self.generator.models.healthy_workers),
        )
