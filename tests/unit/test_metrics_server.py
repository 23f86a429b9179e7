"""/metrics behind its own door: bearer tokens and HTTPS (genrpc/metrics_server.py), on loopback."""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request

import pytest

from genrpc.metrics_server import serve_metrics
from genrpc.pki import make_credentials
from genrpc.security import TokenSet


def get(url: str, token: str = "", context=None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5, context=context) as r:
            assert b"# HELP" in r.read()
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_metrics_need_an_accepted_token(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("scraper\n")
    port = serve_metrics("127.0.0.1", 0, TokenSet(path=str(path)))
    url = f"http://127.0.0.1:{port}/metrics"
    assert get(url) == 401 and get(url, "wrong") == 401
    assert get(url, "scraper") == 200


def test_metrics_over_https(tmp_path):
    credentials = make_credentials(str(tmp_path))
    port = serve_metrics("127.0.0.1", 0, tls_cert=credentials.server_cert, tls_key=credentials.server_key)
    trusting = ssl.create_default_context(cafile=credentials.ca)
    assert get(f"https://127.0.0.1:{port}/metrics", context=trusting) == 200
    with pytest.raises(OSError):  # plaintext HTTP is not answered
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    assert get(f"https://127.0.0.1:{port}/metrics", context=trusting) == 200  # and the server goes on
