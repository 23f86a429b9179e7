"""The tokenizer replicas: round-robin, an idempotent call that fails (UNAVAILABLE) retried on the
next replica, and concurrent requests' Encodes merged while an earlier one is in flight
(coalesce.py)."""

from __future__ import annotations

import asyncio
import itertools
import logging

import grpc

from gateway.coalesce import Coalescer
from gateway.connections import DNS_PREFIX, RETRYABLE, channel
from genrpc import faults
from genrpc.errors import Unavailable
from genrpc.internal.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from genrpc.security import ClientSecurity

log = logging.getLogger("genrpc.gateway.tokenizers")

ENCODES_IN_FLIGHT = 1  # per tokenizer replica; more concurrent requests share the next Encode


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
                faults.check("gateway.tokenizer_call")
                return await getattr(stub, method)(request, timeout=timeout, wait_for_ready=False, metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE:
                    raise
                last_error = exc
        raise Unavailable(f"no tokenizer replica answered ({', '.join(self.addresses)}): {last_error.details()}")
