"""The Prometheus /metrics endpoint, behind the same door as the service when asked: bearer tokens
(--metrics-auth-tokens-file) and TLS (--metrics-tls-cert/--metrics-tls-key). Queue depths and cache
hits are themselves a side channel between tenants, so a port reachable by callers should not be
open."""

from __future__ import annotations

import ssl
import threading
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from genrpc.security import TokenSet, bearer


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass  # a scrape every few seconds is not worth a log line


def _guarded(app, tokens: TokenSet):
    """`app` for requests with an accepted bearer token; 401 for the others."""
    def guarded(environ, start_response):
        token = bearer([("authorization", environ.get("HTTP_AUTHORIZATION", ""))])
        if token and tokens.identity(token) is not None:
            return app(environ, start_response)
        start_response("401 Unauthorized", [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")])
        return [b"metrics need 'Authorization: Bearer <token>' (--metrics-auth-tokens-file)\n"]
    return guarded


def serve_metrics(host: str, port: int, tokens: TokenSet | None = None, tls_cert: str = "",
                  tls_key: str = "") -> int:
    """Serves /metrics on a daemon thread; returns the bound port."""
    app = make_wsgi_app()
    if tokens is not None:
        app = _guarded(app, tokens)
    server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
    if tls_cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls_cert, tls_key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server.server_port


