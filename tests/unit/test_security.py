"""Token files, caller identities, flag checks and generic internal errors (pure logic)."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time

import grpc
import pytest

from genrpc import security
from genrpc.errors import ConfigError, status_of
from genrpc.flags import server_parser
from genrpc.security import TokenSet, bearer, is_loopback, server_security


def test_token_file_is_reread_when_it_changes(tmp_path, monkeypatch):
    path = tmp_path / "tokens"
    path.write_text("# rotated monthly\nalpha\n\nbeta  # the old one\n")
    tokens = TokenSet(path=str(path))
    assert tokens.first() == "alpha"
    alpha, beta = tokens.identity("alpha"), tokens.identity("beta")
    assert alpha and beta and alpha != beta and "alpha" not in alpha
    assert tokens.identity("gamma") is None and tokens.identity("") is None
    path.write_text("gamma\n")
    monkeypatch.setattr(security, "RECHECK_S", 0.0)
    time.sleep(0.01)
    assert tokens.identity("gamma") and tokens.identity("alpha") is None


def test_a_token_file_emptied_while_serving_keeps_the_tokens_it_had(tmp_path, caplog):
    path = tmp_path / "tokens"
    path.write_text("alpha\n")
    tokens = TokenSet(path=str(path))
    path.write_text("")  # a Secret caught half-written
    with caplog.at_level(logging.WARNING):
        tokens.reload()
    assert tokens.first() == "alpha" and tokens.identity("alpha")
    assert "holds no token" in caplog.text
    path.write_text("beta\n")
    tokens.reload()
    assert tokens.first() == "beta" and tokens.identity("alpha") is None


def test_sighup_while_the_tokens_lock_is_held_does_not_wait_for_it(tmp_path):
    """The handler runs on the main thread between two bytecodes, maybe inside `reload`'s locked
    part: it must not take the lock (it would wait for itself). It marks the tokens stale; the next
    use re-reads the file."""
    path = tmp_path / "tokens"
    path.write_text("alpha\n")
    previous = signal.getsignal(signal.SIGHUP)
    try:
        tokens = server_security(server_parser("t", 1, 2).parse_args(["--auth-tokens-file", str(path)]),
                                 internal=False).tokens
        handler = signal.getsignal(signal.SIGHUP)
        path.write_text("beta\n")
        with tokens._lock:  # as if the signal came while the main thread re-read the file
            call = threading.Thread(target=handler, args=(signal.SIGHUP, None), daemon=True)
            call.start()
            call.join(timeout=2)
            assert not call.is_alive(), "the SIGHUP handler waits for the tokens' lock"
        assert tokens.first() == "beta"
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_inline_tokens_and_an_empty_file(tmp_path):
    assert TokenSet("a, b").identity("b")
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    with pytest.raises(ConfigError):
        TokenSet(path=str(empty))
    with pytest.raises(ConfigError, match="No such file"):
        TokenSet(path=str(tmp_path / "missing"))


def test_bearer_and_loopback():
    assert bearer((("authorization", "Bearer  xyz "),)) == "xyz"
    assert bearer((("authorization", "Basic xyz"),)) is None
    assert bearer(()) is None
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")


def _args(*argv):
    return server_parser("t", 1, 2).parse_args(list(argv))


def test_security_flags_checked_together(tmp_path):
    with pytest.raises(ConfigError, match="go together"):
        server_security(_args("--tls-cert", "x"), internal=False)
    with pytest.raises(ConfigError, match="needs --tls-cert"):
        server_security(_args("--tls-client-ca", "x"), internal=False)
    with pytest.raises(ConfigError, match="--health-port is for a TLS server"):
        server_security(_args("--health-port", "8080"), internal=False)
    with pytest.raises(ConfigError, match="--allow-insecure"):
        server_security(_args("--host", "0.0.0.0"), internal=True)
    assert server_security(_args("--host", "0.0.0.0", "--allow-insecure"), internal=True).interceptors == []
    assert server_security(_args("--host", "0.0.0.0"), internal=False).credentials is None  # the public API may be open


def test_tokens_without_tls_beyond_loopback_warn(caplog):
    with caplog.at_level(logging.WARNING):
        server_security(_args("--host", "0.0.0.0", "--auth-tokens", "t"), internal=False)
    assert "plaintext" in caplog.text and "--auth-tokens-file" in caplog.text


def test_client_flags_refuse_a_secret_without_tls():
    parser = argparse.ArgumentParser()
    security.add_client_flags(parser)
    with pytest.raises(ConfigError, match="need --internal-tls-ca"):
        security.ClientSecurity.from_args(parser.parse_args(["--internal-token-file", "t"]))
    assert security.ClientSecurity.from_args(parser.parse_args([])).credentials is None


def test_unexpected_errors_reach_clients_as_a_generic_message(caplog):
    with caplog.at_level(logging.ERROR):
        code, message = status_of(RuntimeError("password=hunter2 at /srv/secret"))
    assert code == grpc.StatusCode.INTERNAL
    assert "hunter2" not in message and "request id" in message
    rid = message.split("request id ")[1].split(")")[0]
    assert rid in caplog.text and "hunter2" in caplog.text  # the details go to the log
