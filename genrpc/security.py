"""TLS and bearer-token authentication for the gateway's public port.

`server_credentials` builds TLS (or mutual TLS, when a client CA is given) from PEM files.
`BearerTokenInterceptor` refuses a call without `authorization: Bearer <token>` for one of the
accepted tokens with UNAUTHENTICATED; health checks and reflection stay open so probes and
grpcurl's discovery work.
"""

from __future__ import annotations

import hmac

import grpc

OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def server_credentials(cert_file: str, key_file: str, client_ca_file: str = "") -> grpc.ServerCredentials:
    with open(cert_file, "rb") as f:
        cert = f.read()
    with open(key_file, "rb") as f:
        key = f.read()
    client_ca = None
    if client_ca_file:
        with open(client_ca_file, "rb") as f:
            client_ca = f.read()
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None)


def _denied(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream, handler.request_deserializer,
                                                    handler.response_serializer)
    return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: list[str]):
        self.tokens = [t.encode() for t in tokens if t]

    def _allowed(self, metadata) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                value = value if isinstance(value, str) else value.decode()
                scheme, _, token = value.partition(" ")
                if scheme.lower() == "bearer":
                    return any(hmac.compare_digest(token.strip().encode(), t) for t in self.tokens)
        return False

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_SERVICES):
            return handler
        if self._allowed(handler_call_details.invocation_metadata):
            return handler
        return _denied(handler, "missing or invalid bearer token: send metadata 'authorization: Bearer <token>'")
