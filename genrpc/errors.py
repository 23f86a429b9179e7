"""Domain errors and the one place where exceptions become gRPC status codes.

Code below the servicers raises these (or returns stops as values); the
`grpc_errors` decorator on each servicer method turns them into a status with
the error's message. Anything unexpected becomes INTERNAL and is logged with
its traceback, without taking the server down; the client gets a generic message
with the request id to find it by.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
import uuid

import grpc

from genrpc.logs import request_id

log = logging.getLogger("genrpc.errors")


def retry_hint(seconds: float) -> float:
    """`seconds` rounded up to the tenth the trailer carries: a client that waits the hint it is
    sent must not come back early (rounding to nearest told it 0.9 for 0.94)."""
    return math.ceil(round(seconds * 10, 6)) / 10


class GenrpcError(Exception):
    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str = "", retry_after: float | None = None):
        """retry_after: seconds after which a retry may succeed (sent as the `retry-after` trailer)."""
        super().__init__(message)
        self.retry_after = None if retry_after is None else retry_hint(retry_after)


class InvalidArgument(GenrpcError, ValueError):
    """A request field is wrong; the message names the field, the value and what is allowed."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    @classmethod
    def field(cls, name: str, value, allowed: str) -> "InvalidArgument":
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        return cls(f"{name}={shown} is invalid: {allowed}")


class NotFound(GenrpcError):
    """A named thing the request asks for does not exist here (an adapter)."""

    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(GenrpcError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(GenrpcError):
    code = grpc.StatusCode.UNAVAILABLE


class AlreadyExists(GenrpcError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(GenrpcError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(GenrpcError):
    code = grpc.StatusCode.PERMISSION_DENIED


class DeadlineExceeded(GenrpcError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ConfigError(ValueError):
    """A flag, variable or file given at start-up is wrong. Library code raises it; an entry point
    (`exits_on_config_error`) exits with its message, so the library never ends the process itself."""


def exits_on_config_error(main):
    """Wraps a service's `main`: a ConfigError ends the process with its message (exit status 1)."""
    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except ConfigError as exc:
            raise SystemExit(str(exc)) from None
    return run


def _trailers(exc: BaseException) -> tuple:
    retry_after = getattr(exc, "retry_after", None)
    return (("retry-after", f"{retry_after:.1f}"),) if retry_after is not None else ()


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message for an exception raised below a servicer."""
    if isinstance(exc, GenrpcError):
        return exc.code, str(exc)
    if isinstance(exc, asyncio.TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the backend answered"
    if isinstance(exc, grpc.aio.AioRpcError):
        # A call to another genrpc service failed: pass on what the client can act on.
        code = exc.code()
        if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                    grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
            return code, exc.details() or code.name
        if code == grpc.StatusCode.INTERNAL:  # a fault in that service, not a way to it: a retry may not help
            return code, f"a backend failed: {exc.details()}"
        return grpc.StatusCode.UNAVAILABLE, f"a backend call failed ({code.name}): {exc.details()}"
    # The details stay in the log: an exception's text can carry paths, addresses or other callers' data.
    rid = request_id.get() or uuid.uuid4().hex[:16]
    log.error("unexpected error (request id %s)", rid, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (request id {rid}); the details are in the server's log"


def grpc_errors(method):
    """Wraps a unary or server-streaming aio servicer method: exceptions become statuses."""
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self, request, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:
                code, message = status_of(exc)
                await context.abort(code, message, _trailers(exc))
        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            code, message = status_of(exc)
            await context.abort(code, message, _trailers(exc))
    return unary
