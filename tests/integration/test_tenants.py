"""Tenants apart, through the real services with bearer tokens: the prefix cache keyed by tenant
(or a shared salt), per-token rights and rates, and /metrics behind its own tokens.

Cache isolation is checked on the model service's own count of prompt tokens served from the cache
(genrpc_model_prefix_cache_hit_tokens): a prompt another tenant just sent is computed in full, as a
cold one is, which is what closes the timing side channel; the time it takes is in the bench."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
import uuid

import grpc
import pytest

from genrpc.launch import start_service
from genrpc.v1 import generation_pb2 as pb
from genrpc.v1 import generation_pb2_grpc
from tests.helpers import metric, wait_for

TOKENS = """\
# token        rights
alpha-secret   name=alpha max_priority=5 max_new_tokens=8 max_samples=2
beta-secret    name=beta
gamma-secret   name=gamma cache_salt=team-c
delta-secret   name=delta cache_salt=team-c raw_markup=yes
tokens-secret  name=metered tokens_per_s=5
calls-secret   name=paced requests_per_s=1
single-secret  name=single max_inflight=1
"""
DOC = ("The quarterly report covers revenue, costs, hiring and the roadmap for the storage product. "
       "Each section lists the figures, the risks and the owners, and closes with the open questions. ") * 6


@pytest.fixture(scope="module")
def tenants(stack, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tenants")
    (folder / "tokens").write_text(TOKENS)
    (folder / "metrics-tokens").write_text("scraper-secret\n")
    gateway = start_service("gateway", "--tokenizer-addrs", stack.tokenizer.address, "--model-addrs",
                            stack.model.address, "--auth-tokens-file", str(folder / "tokens"),
                            "--metrics-auth-tokens-file", str(folder / "metrics-tokens"),
                            *stack.credentials.client_flags())
    gateway.tokens_path = folder / "tokens"
    with grpc.insecure_channel(gateway.address) as channel:
        gateway.stub = generation_pb2_grpc.GenerationStub(channel)
        wait_for(lambda: _serves(gateway.stub), timeout=60)
        yield gateway
    gateway.stop()


def _serves(stub) -> bool:
    try:
        stub.ModelInfo(pb.ModelInfoRequest(), timeout=5, metadata=as_("beta"))
        return True
    except grpc.RpcError:
        return False


def as_(name: str) -> tuple:
    return (("authorization", f"Bearer {name}-secret"),)


def generate(gateway, who: str, prompt: str, **config):
    return gateway.stub.Generate(pb.GenerateRequest(prompts=[prompt], config=pb.GenerationConfig(**config)),
                                 timeout=120, metadata=as_(who))


def cached_tokens(stack, gateway, who: str, prompt: str, **config) -> float:
    """Prompt tokens the model service took from its prefix cache for this one request."""
    before = metric(stack.model.metrics_port, "genrpc_model_prefix_cache_hit_tokens")
    generate(gateway, who, prompt, max_new_tokens=1, **config)
    return metric(stack.model.metrics_port, "genrpc_model_prefix_cache_hit_tokens") - before


def test_the_prefix_cache_is_keyed_by_tenant_unless_a_salt_is_shared(stack, tenants):
    doc = f"[{uuid.uuid4().hex}] {DOC}"  # never sent before
    assert cached_tokens(stack, tenants, "alpha", doc) == 0
    assert cached_tokens(stack, tenants, "beta", doc) == 0  # another tenant's prompt: computed as a cold one
    assert cached_tokens(stack, tenants, "alpha", doc) > 200  # its own: from the cache
    team_doc = f"[{uuid.uuid4().hex}] {DOC}"
    assert cached_tokens(stack, tenants, "gamma", team_doc) == 0
    assert cached_tokens(stack, tenants, "delta", team_doc) > 200  # one team salt in the tokens file
    assert cached_tokens(stack, tenants, "beta", team_doc) == 0
    shared = f"[{uuid.uuid4().hex}] {DOC}"
    assert cached_tokens(stack, tenants, "beta", shared, cache_salt="doc-7") == 0
    assert cached_tokens(stack, tenants, "alpha", shared, cache_salt="doc-7") > 200  # the salt both name
    assert cached_tokens(stack, tenants, "alpha", shared) == 0  # not in its own namespace


def test_a_right_the_token_lacks_is_permission_denied(tenants):
    for config, field in ((dict(priority=6), "max_priority=5"), (dict(max_new_tokens=9), "max_new_tokens=8"),
                          (dict(num_return_sequences=3, do_sample=True), "max_samples=2")):
        with pytest.raises(grpc.RpcError) as info:
            generate(tenants, "alpha", "Hi", **config)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and field in info.value.details()
    assert generate(tenants, "alpha", "Hi", ignore_eos=True).completions[0].generated_tokens == 8  # lowered
    assert generate(tenants, "beta", "Hi", priority=50, max_new_tokens=9, ignore_eos=True
                    ).completions[0].generated_tokens == 9  # a token with no settings: today's rights


def retry_after(error: grpc.RpcError) -> float:
    return float(dict(error.trailing_metadata())["retry-after"])


def test_rates_are_resource_exhausted_with_retry_after(tenants):
    generate(tenants, "tokens", "Hi", max_new_tokens=10, ignore_eos=True)  # 10 tokens against 5 a second
    with pytest.raises(grpc.RpcError) as info:
        generate(tenants, "tokens", "Hi", max_new_tokens=2)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "tokens_per_s=5" in info.value.details()
    assert 0 < retry_after(info.value) <= 2
    generate(tenants, "calls", "Hi", max_new_tokens=1)
    with pytest.raises(grpc.RpcError) as info:
        generate(tenants, "calls", "Hi", max_new_tokens=1)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "requests_per_s=1" in info.value.details()
    time.sleep(retry_after(info.value))
    generate(tenants, "calls", "Hi", max_new_tokens=1)  # the hint was right


def test_in_flight_sequences_per_token(tenants):
    stream = tenants.stub.GenerateStream(pb.GenerateStreamRequest(prompt="Go on.", config=pb.GenerationConfig(
        max_new_tokens=500, ignore_eos=True)), timeout=120, metadata=as_("single"))
    next(stream)
    with pytest.raises(grpc.RpcError) as info:
        generate(tenants, "single", "Hi", max_new_tokens=1)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "at most 1" in info.value.details()
    stream.cancel()


def test_raw_markup_is_a_right(tenants):
    markup = "<|im_start|>"
    tokenize = lambda who: tenants.stub.Tokenize(pb.TokenizeRequest(prompts=[markup]), timeout=30,  # noqa: E731
                                                 metadata=as_(who)).prompts[0].num_tokens
    assert tokenize("delta") == 1 and tokenize("beta") > 1


def test_refusals_are_counted_by_token_name_and_metrics_need_their_own_token(tenants):
    url = f"http://127.0.0.1:{tenants.metrics_port}/metrics"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(url, timeout=5)
    assert info.value.code == 401
    for token in ("beta-secret", "wrong"):
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(request, timeout=5)
    request = urllib.request.Request(url, headers={"Authorization": "Bearer scraper-secret"})
    body = urllib.request.urlopen(request, timeout=5).read().decode()
    assert 'genrpc_gateway_token_refusals_total{setting="max_priority",token="alpha"}' in body
    assert "secret" not in body


def test_the_tokens_file_reloads_and_a_malformed_one_is_refused_whole(tenants):
    tenants.tokens_path.write_text(TOKENS + "epsilon-secret max_priority=high\n")
    time.sleep(1.2)  # looked at once a second
    generate(tenants, "beta", "Hi", max_new_tokens=1)  # the old file still holds
    with pytest.raises(grpc.RpcError) as info:
        generate(tenants, "epsilon", "Hi", max_new_tokens=1)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "max_priority='high'" in tenants.log()
    tenants.tokens_path.write_text(TOKENS + "epsilon-secret name=epsilon max_priority=1\n")
    wait_for(lambda: _accepted(tenants, "epsilon"), timeout=5)
    with pytest.raises(grpc.RpcError) as info:
        generate(tenants, "epsilon", "Hi", max_new_tokens=1, priority=2)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def _accepted(gateway, who: str) -> bool:
    try:
        generate(gateway, who, "Hi", max_new_tokens=1)
        return True
    except grpc.RpcError:
        return False
