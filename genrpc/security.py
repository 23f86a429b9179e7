"""Who may call a genrpc server, over what, and how the gateway proves itself to the internal ones.

Every server (gateway, tokenizer, model) takes the same flags (`add_server_flags`): TLS from PEM
files, optionally requiring client certificates (mutual TLS), and bearer tokens from a list or a
file. `AuthInterceptor` refuses a call without a valid token with UNAUTHENTICATED and tells the
handler who called (`caller`), so a model service can bind a stream to the caller that opened it.
Health checks and reflection stay open, so probes and grpcurl's discovery work; with TLS on, a
plaintext `--health-port` serves them to probes that cannot speak TLS (Kubernetes' gRPC probe), and
nothing else.

The gateway calls the tokenizer and model services through `ClientSecurity`: TLS against an
internal CA, its client certificate, and the shared secret as a bearer token.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import ipaddress
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass

import grpc

from genrpc.errors import ConfigError
from genrpc.rights import DEFAULT as DEFAULT_RIGHTS
from genrpc.rights import Rights, parse_line

log = logging.getLogger("genrpc.security")

OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
ANONYMOUS = "anonymous"
RECHECK_S = 1.0  # a token file is looked at (stat) at most this often

# Who made the call being handled: "token:<hash>" for a bearer token, or ANONYMOUS without auth.
caller: contextvars.ContextVar[str] = contextvars.ContextVar("genrpc_caller", default=ANONYMOUS)
# And what its token may do (the tokens file's settings; DEFAULT_RIGHTS without auth).
caller_rights: contextvars.ContextVar[Rights] = contextvars.ContextVar("genrpc_caller_rights", default=DEFAULT_RIGHTS)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def server_credentials(cert_file: str, key_file: str, client_ca_file: str = "") -> grpc.ServerCredentials:
    client_ca = read_file(client_ca_file) if client_ca_file else None
    return grpc.ssl_server_credentials(
        [(read_file(key_file), read_file(cert_file))], root_certificates=client_ca,
        require_client_auth=client_ca is not None)


class TokenSet:
    """Bearer tokens from a comma-separated list and/or a file: one a line, each maybe followed by
    its rights (genrpc/rights.py), `#` starts a comment.

    The file is re-read when it changes (looked at no more than once a second) and on SIGHUP, so a
    rotated Kubernetes Secret takes effect without a restart; a file that does not parse, or holds
    no token, is refused whole and the tokens read before stay (logged). A token is never logged;
    a caller is known by a hash of its token.
    """

    def __init__(self, tokens: str = "", path: str = ""):
        self._inline = [(t.strip(), DEFAULT_RIGHTS) for t in tokens.split(",") if t.strip()]
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._checked = 0.0
        self._tokens: list[tuple[bytes, Rights]] = []
        try:
            self.reload()
        except OSError as exc:
            raise ConfigError(f"token file {path!r}: {exc.strerror or exc}") from exc
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        if not self._tokens:
            raise ConfigError(f"no token in {'--auth-tokens-file ' + path if path else 'the token list'}")

    def reload(self) -> None:
        """Re-reads the file. Raises ValueError (naming the line) when it does not parse, keeping the
        tokens read before; a file with no token (a Secret caught half-written) is not taken either."""
        tokens, stamp, problem = list(self._inline), None, ""
        if self.path:
            stat = os.stat(self.path)
            stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            with open(self.path) as f:
                for number, line in enumerate(f, 1):
                    try:
                        parsed = parse_line(line)
                    except ValueError as exc:
                        problem = f"{self.path} line {number}: {exc}"
                        break
                    if parsed is not None:
                        tokens.append(parsed)
        tokens = [(t.encode(), rights) for t, rights in tokens]
        with self._lock:
            self._stamp, self._checked = stamp, time.monotonic()  # this version is read, taken or not
            if problem:
                raise ValueError(problem)
            if not tokens and self._tokens:
                log.warning("%s holds no token: keeping the %d accepted before", self.path, len(self._tokens))
                return
            changed = bool(self._tokens) and tokens != self._tokens
            self._tokens = tokens
        if changed:
            log.info("tokens re-read from %s: %d accepted", self.path, len(tokens))

    def request_reload(self) -> None:
        """Makes the next use re-read the file (safe in a signal handler: takes no lock, reads nothing)."""
        self._checked = float("-inf")
        self._stamp = None

    def _fresh(self) -> list[tuple[bytes, Rights]]:
        if self.path and time.monotonic() - self._checked > RECHECK_S:
            self._checked = time.monotonic()
            try:
                stat = os.stat(self.path)
                if (stat.st_mtime_ns, stat.st_size, stat.st_ino) != self._stamp:
                    self.reload()
            except OSError as exc:  # a Secret being swapped: keep the tokens we have
                log.warning("cannot re-read %s: %s", self.path, exc)
            except ValueError as exc:  # refused whole: keep the tokens we have
                log.error("%s; keeping the %d tokens read before", exc, len(self._tokens))
        return self._tokens

    def lookup(self, token: str) -> tuple[str, Rights] | None:
        """The caller's identity and rights for a token that is accepted, else None (compared in
        constant time). The identity is a hash of the token: fair shares and caps count by it."""
        given = token.encode()
        for accepted, rights in self._fresh():
            if hmac.compare_digest(given, accepted):
                return "token:" + hashlib.sha256(accepted).hexdigest()[:12], rights
        return None

    def identity(self, token: str) -> str | None:
        """The caller's name for a token that is accepted, else None."""
        found = self.lookup(token)
        return found[0] if found else None

    def first(self) -> str:
        """The token a client sends (the first one: a file being rotated lists the new one first)."""
        return self._fresh()[0][0].decode()


def bearer(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            value = value if isinstance(value, str) else value.decode(errors="replace")
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return None


def _refusing(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    async def unary(request, context):
        await context.abort(code, message)

    async def stream(request, context):
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream, handler.request_deserializer, handler.response_serializer)
    return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)


def _is_tls(context) -> bool:
    kind = (context.auth_context() or {}).get("transport_security_type") or [b""]
    return kind[0] == b"ssl"


def _as_caller(handler: grpc.RpcMethodHandler, identity: str, rights: Rights,
               require_tls: bool) -> grpc.RpcMethodHandler:
    """The handler, run with `caller` and `caller_rights` set; refused unless the call came over TLS
    when `require_tls` (a bearer token sent to the plaintext health port must not be honoured)."""
    plaintext = "this port serves health checks only: call the TLS port"
    if handler.unary_stream:
        inner_stream = handler.unary_stream

        async def stream(request, context):
            if require_tls and not _is_tls(context):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, plaintext)
            caller.set(identity)
            caller_rights.set(rights)
            async for item in inner_stream(request, context):
                yield item

        return grpc.unary_stream_rpc_method_handler(stream, handler.request_deserializer, handler.response_serializer)
    inner_unary = handler.unary_unary

    async def unary(request, context):
        if require_tls and not _is_tls(context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, plaintext)
        caller.set(identity)
        caller_rights.set(rights)
        return await inner_unary(request, context)

    return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Bearer tokens (when `tokens` is set) and TLS (when `require_tls`) on every method but health
    and reflection; UNAUTHENTICATED otherwise. The handler sees the caller in `caller`."""

    def __init__(self, tokens: TokenSet | None, require_tls: bool):
        self.tokens = tokens
        self.require_tls = require_tls

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_SERVICES):
            return handler
        identity, rights = ANONYMOUS, DEFAULT_RIGHTS
        if self.tokens is not None:
            token = bearer(handler_call_details.invocation_metadata)
            found = self.tokens.lookup(token) if token else None
            if found is None:
                return _refusing(handler, grpc.StatusCode.UNAUTHENTICATED,
                                 "missing or invalid bearer token: send metadata 'authorization: Bearer <token>'")
            identity, rights = found
        return _as_caller(handler, identity, rights, self.require_tls)


def add_server_flags(parser) -> None:
    parser.add_argument("--tls-cert", default="", help="PEM certificate: serve TLS")
    parser.add_argument("--tls-key", default="", help="PEM private key for --tls-cert")
    parser.add_argument("--tls-client-ca", default="",
                        help="PEM CA: require client certificates it signed (mutual TLS)")
    parser.add_argument("--auth-tokens", default="",
                        help="accepted bearer tokens, comma-separated (visible in `ps`: prefer --auth-tokens-file)")
    parser.add_argument("--auth-tokens-file", default="",
                        help="file of accepted bearer tokens, one a line; re-read when it changes and on SIGHUP")
    parser.add_argument("--health-port", type=int, default=-1,
                        help="with TLS: also serve health checks (only) in plaintext on this port, for probes "
                             "that cannot speak TLS (-1: off, 0: a free port)")
    parser.add_argument("--allow-insecure", action="store_true",
                        help="let an internal service listen beyond loopback without TLS and tokens")
    parser.add_argument("--metrics-auth-tokens-file", default="",
                        help="file of bearer tokens /metrics requires (one a line; re-read like "
                             "--auth-tokens-file); without it /metrics is open to whoever reaches the port")
    parser.add_argument("--metrics-tls-cert", default="", help="PEM certificate: serve /metrics over HTTPS")
    parser.add_argument("--metrics-tls-key", default="", help="PEM private key for --metrics-tls-cert")


@dataclass
class ServerSecurity:
    """What a server's flags ask for: its credentials and its interceptor (both None when open)."""

    credentials: grpc.ServerCredentials | None
    tokens: TokenSet | None
    interceptors: list
    health_port: int
    metrics_tokens: TokenSet | None = None  # what /metrics requires (None: open)
    metrics_tls: tuple[str, str] | None = None  # (certificate, key) files: /metrics over HTTPS

    @property
    def describe(self) -> str:
        tls = "plaintext" if self.credentials is None else "TLS"
        return f"{tls}, {'bearer tokens' if self.tokens is not None else 'no authentication'}"


def server_security(args, internal: bool) -> ServerSecurity:
    """Checks the security flags together and builds what they ask for. An internal service
    (tokenizer, model) refuses to listen beyond loopback without TLS and tokens unless
    --allow-insecure: it trusts whoever can reach it."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key")
    if args.health_port >= 0 and not args.tls_cert:
        raise ConfigError("--health-port is for a TLS server: without TLS, health is served on --port")
    credentials = server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    tokens = TokenSet(args.auth_tokens, args.auth_tokens_file) if args.auth_tokens or args.auth_tokens_file else None
    exposed = not is_loopback(args.host)
    if internal and exposed and not (credentials and tokens) and not args.allow_insecure:
        raise ConfigError(
            f"--host {args.host} exposes an internal service beyond loopback without TLS and tokens: anyone who "
            "can reach it could run or read generations. Give --tls-cert/--tls-key and --auth-tokens-file (the "
            "gateway's --internal-* flags match them), or --allow-insecure to accept the risk")
    if exposed and tokens is not None and credentials is None:
        log.warning("bearer tokens are accepted in plaintext on %s: anyone on the network path can read them; "
                    "give --tls-cert and --tls-key", args.host)
    if args.auth_tokens:
        log.warning("--auth-tokens puts secrets on the command line or in the environment; prefer --auth-tokens-file")
    if bool(args.metrics_tls_cert) != bool(args.metrics_tls_key):
        raise ConfigError("--metrics-tls-cert and --metrics-tls-key go together")
    metrics_tokens = TokenSet(path=args.metrics_auth_tokens_file) if args.metrics_auth_tokens_file else None
    if exposed and tokens is not None and metrics_tokens is None and args.metrics_port >= 0:
        log.warning("/metrics on %s:%d is open while calls need a token: its queue depths and cache figures "
                    "tell one tenant about the others; give --metrics-auth-tokens-file", args.host, args.metrics_port)
    reloading = [t for t in (tokens if args.auth_tokens_file else None, metrics_tokens) if t is not None]
    if reloading:
        # A handler runs between two bytecodes of the main thread, which may hold the tokens' lock:
        # it only marks them stale, and the next call re-reads the file.
        signal.signal(signal.SIGHUP, lambda signum, frame: [t.request_reload() for t in reloading])
    interceptors = [AuthInterceptor(tokens, require_tls=credentials is not None)] \
        if tokens is not None or credentials is not None else []
    return ServerSecurity(credentials, tokens, interceptors, args.health_port, metrics_tokens,
                          (args.metrics_tls_cert, args.metrics_tls_key) if args.metrics_tls_cert else None)


def add_client_flags(parser) -> None:
    """The gateway's flags for its calls to the tokenizer and model services."""
    parser.add_argument("--internal-tls-ca", default="",
                        help="PEM CA that signed the tokenizer and model services' certificates: call them over TLS")
    parser.add_argument("--internal-tls-cert", default="", help="PEM client certificate for mutual TLS")
    parser.add_argument("--internal-tls-key", default="", help="PEM private key for --internal-tls-cert")
    parser.add_argument("--internal-token-file", default="",
                        help="file whose first line is the bearer token the internal services accept")


class _TokenPlugin(grpc.AuthMetadataPlugin):
    def __init__(self, tokens: TokenSet):
        self.tokens = tokens

    def __call__(self, context, callback):
        callback((("authorization", f"Bearer {self.tokens.first()}"),), None)


def client_flags_problem(ca: str, cert: str, key: str, token_file: str, prefix: str = "--") -> str:
    """What is wrong with a client's TLS flags ("" when nothing): a certificate without its key, or a
    key or secret to be sent without TLS. `prefix` names the flags (--, or --internal- for the gateway)."""
    if bool(cert) != bool(key):
        return f"{prefix}tls-cert and {prefix}tls-key go together"
    if (cert or token_file) and not ca:
        return f"{prefix}tls-cert and {prefix}token-file need {prefix}tls-ca: a secret or a key is only sent over TLS"
    return ""


def channel_credentials(ca: str, cert: str = "", key: str = "", token_file: str = "") -> grpc.ChannelCredentials:
    """TLS against `ca`, with a client certificate and a bearer token from `token_file` if given."""
    credentials = grpc.ssl_channel_credentials(read_file(ca), read_file(key) if key else None,
                                               read_file(cert) if cert else None)
    if token_file:
        plugin = _TokenPlugin(TokenSet(path=token_file))
        credentials = grpc.composite_channel_credentials(credentials, grpc.metadata_call_credentials(plugin, "genrpc"))
    return credentials


class _Bearer:
    """Adds the bearer token to every call's metadata. Call credentials built on a Python metadata
    plugin make grpc aio start a thread for each call and wait for it on the event loop: with one
    detokenizing call per engine step, that was about a third of the gateway's CPU at 32 streams.
    The channel is TLS (ClientSecurity refuses a token otherwise), so the token travels as it did.
    grpc aio files an interceptor under the first of the four kinds it is, hence one class a kind."""

    def __init__(self, tokens: TokenSet):
        self.tokens = tokens

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), ("authorization", f"Bearer {self.tokens.first()}"))
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                          details.wait_for_ready)

    async def _call(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _BearerUnaryUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    intercept_unary_unary = _Bearer._call


class _BearerUnaryStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    intercept_unary_stream = _Bearer._call


class _BearerStreamUnary(_Bearer, grpc.aio.StreamUnaryClientInterceptor):
    intercept_stream_unary = _Bearer._call


class _BearerStreamStream(_Bearer, grpc.aio.StreamStreamClientInterceptor):
    intercept_stream_stream = _Bearer._call


def bearer_interceptors(tokens: TokenSet) -> list:
    """Client interceptors that send `tokens`' first token with every call of an aio channel."""
    return [kind(tokens) for kind in (_BearerUnaryUnary, _BearerUnaryStream, _BearerStreamUnary, _BearerStreamStream)]


@dataclass
class ClientSecurity:
    """How the gateway reaches the internal services: plaintext, or TLS with an optional client
    certificate and bearer token (re-read from its file when it changes)."""

    credentials: grpc.ChannelCredentials | None = None  # TLS (and client certificate)
    tokens: TokenSet | None = None  # the bearer token, added to each call's metadata

    @classmethod
    def from_args(cls, args) -> "ClientSecurity":
        problem = client_flags_problem(args.internal_tls_ca, args.internal_tls_cert, args.internal_tls_key,
                                       args.internal_token_file, prefix="--internal-")
        if problem:
            raise ConfigError(problem)
        if not args.internal_tls_ca:
            return cls()
        return cls(channel_credentials(args.internal_tls_ca, args.internal_tls_cert, args.internal_tls_key),
                   TokenSet(path=args.internal_token_file) if args.internal_token_file else None)

    def channel(self, address: str, options: list, server_name: str = "") -> grpc.aio.Channel:
        """A channel to `address`; `server_name` is the name its certificate must carry when the
        address is one of the IPs a DNS name resolved to."""
        if self.credentials is None:
            return grpc.aio.insecure_channel(address, options=options)
        if server_name:
            options = [*options, ("grpc.ssl_target_name_override", server_name)]
        interceptors = bearer_interceptors(self.tokens) if self.tokens is not None else None
        return grpc.aio.secure_channel(address, self.credentials, options=options, interceptors=interceptors)
