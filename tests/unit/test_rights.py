"""Per-token rights: the tokens file's settings, the gateway's checks and rates (pure logic)."""

from __future__ import annotations

import dataclasses

import grpc
import pytest

from gateway.generation import cache_salt
from gateway.quotas import Quotas, apply_rights
from gateway.validation import ModelLimits, RequestedConfig, resolve_config
from genrpc.errors import ConfigError, PermissionDenied, ResourceExhausted
from genrpc.rights import DEFAULT, Rights, parse_line
from genrpc.security import TokenSet

LIMITS = ModelLimits(8192, 49152, RequestedConfig(max_new_tokens=20, do_sample=False, temperature=1.0, top_k=50,
                                                   top_p=1.0, min_p=0.0, typical_p=1.0, repetition_penalty=1.0))


def test_lines_parse_into_rights():
    assert parse_line("  # a comment") is None and parse_line("") is None
    assert parse_line("alpha  # the old one") == ("alpha", DEFAULT)
    token, rights = parse_line("s3 name=team-a max_priority=-5 max_new_tokens=512 max_samples=4 max_inflight=8 "
                               "requests_per_s=2.5 tokens_per_s=200 raw_markup=yes cache_salt=team")
    assert token == "s3" and rights == Rights("team-a", -5, 512, 4, 8, 2.5, 200.0, True, "team")
    assert rights.label == "team-a" and DEFAULT.label == "unnamed"


@pytest.mark.parametrize("line, message", [
    ("t max_new_tokens=lots", "max_new_tokens='lots': must be a whole number >= 0"),
    ("t requests_per_s=0", "requests_per_s='0': must be a number > 0"),
    ("t raw_markup=maybe", "raw_markup='maybe': must be yes or no"),
    ("t colour=blue", "'colour=blue' is not a setting"),
    ("t name=a name=b", "name is given twice"),
])
def test_a_wrong_setting_is_named(line, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_line(line)


def test_a_malformed_file_is_refused_whole_at_start_and_while_serving(tmp_path, caplog, monkeypatch):
    path = tmp_path / "tokens"
    path.write_text("alpha name=a\nbeta max_priority=high\n")
    with pytest.raises(ConfigError, match="line 2: max_priority='high'"):
        TokenSet(path=str(path))
    path.write_text("alpha name=a max_priority=3\n")
    tokens = TokenSet(path=str(path))
    path.write_text("alpha\ngamma max_samples=x\n")
    monkeypatch.setattr("genrpc.security.RECHECK_S", 0.0)
    assert tokens.lookup("gamma") is None  # refused whole: the old file still holds
    assert tokens.lookup("alpha")[1] == Rights("a", max_priority=3)
    assert "line 2: max_samples='x'" in caplog.text and "keeping the 1 tokens" in caplog.text


def resolved(**fields):
    return resolve_config(RequestedConfig(**fields), LIMITS)


def test_rights_refuse_what_a_token_lacks_and_lower_an_unset_length():
    rights = Rights("a", max_priority=5, max_new_tokens=8, max_samples=2)
    assert apply_rights(resolved(priority=5), rights).priority == 5
    with pytest.raises(PermissionDenied, match="config.priority=6 is above this token's max_priority=5") as info:
        apply_rights(resolved(priority=6), rights)
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(PermissionDenied, match="max_new_tokens=9 is above this token's max_new_tokens=8"):
        apply_rights(resolved(max_new_tokens=9), rights)
    assert apply_rights(resolved(), rights).max_new_tokens == 8  # unset (the model's 20): lowered
    with pytest.raises(PermissionDenied, match="num_return_sequences=3"):
        apply_rights(resolved(num_return_sequences=3, do_sample=True), rights)
    config = resolved(priority=100, max_new_tokens=4000)
    assert apply_rights(config, DEFAULT) == config


def test_rates_refuse_with_the_seconds_to_wait():
    now = [0.0]
    quotas = Quotas(clock=lambda: now[0])
    rights = Rights(requests_per_s=2, tokens_per_s=10)
    quotas.admit("t", rights)
    quotas.admit("t", rights)  # one second's worth: 2 requests
    with pytest.raises(ResourceExhausted, match="requests_per_s=2") as info:
        quotas.admit("t", rights)
    assert info.value.retry_after == pytest.approx(0.5)
    quotas.admit("other", rights)  # every token has its own buckets
    now[0] = 0.5
    quotas.admit("t", rights)
    quotas.charge("t", rights, 25)  # generated after the fact: 10 - 25 = -15
    now[0] = 1.0  # +5
    with pytest.raises(ResourceExhausted, match="tokens_per_s=10") as info:
        quotas.admit("t", rights)
    assert info.value.retry_after == pytest.approx(1.0)
    now[0] = 2.1
    quotas.admit("t", rights)


def test_a_retry_hint_is_never_early():
    now = [0.0]
    quotas = Quotas(clock=lambda: now[0])
    rights = Rights(requests_per_s=1)
    quotas.admit("t", rights)
    now[0] = 0.06  # 0.94 s to go: rounding to the nearest tenth would say 0.9
    with pytest.raises(ResourceExhausted, match=r"retry in 1\.0 s") as info:
        quotas.admit("t", rights)
    assert info.value.retry_after == 1.0
    now[0] += info.value.retry_after
    quotas.admit("t", rights)  # waiting what it was told is enough


def test_the_cache_salt_is_the_request_s_then_the_team_s_then_the_client_s():
    team = Rights(cache_salt="team-a")
    assert cache_salt(resolved(cache_salt="doc-7"), team, "token:x") == "salt:doc-7"
    assert cache_salt(resolved(), team, "token:x") == "salt:team-a"
    assert cache_salt(resolved(), DEFAULT, "token:x") == "client:token:x"
    assert cache_salt(resolved(), DEFAULT, "token:y") != cache_salt(resolved(), DEFAULT, "token:x")


def test_rights_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT.max_priority = 1
