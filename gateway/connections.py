"""How the gateway reaches its backends: channels (a dns:/// address balances over every address
its name resolves to), name resolution, and what counts as a retryable failure."""

from __future__ import annotations

import asyncio
import logging
import socket

import grpc

from genrpc.security import ClientSecurity
from genrpc.serving import CHANNEL_OPTIONS

log = logging.getLogger("genrpc.gateway.connections")

RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)
DNS_PREFIX = "dns:///"
RESOLVE_EVERY_S = 5.0


def channel(address: str, security: ClientSecurity, server_name: str = "") -> grpc.aio.Channel:
    """A channel; a dns:/// address balances calls over every address the name resolves to.
    `server_name`: the name a resolved IP's certificate carries (the dns:/// name's host)."""
    options = list(CHANNEL_OPTIONS)
    if address.startswith(DNS_PREFIX):
        options.append(("grpc.lb_policy_name", "round_robin"))
    return security.channel(address, options, server_name)


def dns_host(address: str) -> str:
    """The host of a dns:///host:port address ("" for any other)."""
    return address[len(DNS_PREFIX):].rpartition(":")[0] if address.startswith(DNS_PREFIX) else ""


async def resolve(address: str) -> list[str]:
    """host:port for every address a dns:/// name resolves to (the address itself otherwise)."""
    if not address.startswith(DNS_PREFIX):
        return [address]
    host, _, port = address[len(DNS_PREFIX):].rpartition(":")
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except OSError as exc:
        log.warning("cannot resolve %s: %s", address, exc)
        return []
    found = []
    for family, _, _, _, sockaddr in infos:
        ip = sockaddr[0]
        target = f"[{ip}]:{sockaddr[1]}" if family == socket.AF_INET6 else f"{ip}:{sockaddr[1]}"
        if target not in found:
            found.append(target)
    return found


def describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"
