"""LoRA adapters through the three services: listed in ModelInfo, chosen per request, the in-process
engine's very tokens, the same batched with other adapters and the base model; unknown names are
NOT_FOUND."""

from __future__ import annotations

import concurrent.futures

import grpc
import pytest

from genrpc.v1 import generation_pb2 as pb
from genrpc.v1 import generation_pb2_grpc
from tests.helpers import MODEL, metric, start_stack, wait_for
from tests.lora_adapters import make_adapter

PROMPTS = ["The capital of France is", "Write a haiku about the sea and the wind in the autumn evening:"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora")
    return {"a": make_adapter(str(folder / "a"), seed=1),
            "b": make_adapter(str(folder / "b"), seed=2, rank=16, targets=["q_proj", "v_proj", "down_proj"])}


@pytest.fixture(scope="module")
def lora_stack(adapters):
    flags = tuple(arg for name, path in adapters.items() for arg in ("--lora", f"{name}={path}"))
    stack = start_stack(MODEL, model_args=flags)
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def lora_stub(lora_stack):
    with grpc.insecure_channel(lora_stack.gateway.address) as channel:
        yield generation_pb2_grpc.GenerationStub(channel)


def generate(stub, prompt, **config) -> pb.Completion:
    request = pb.GenerateRequest(prompts=[prompt], config=pb.GenerationConfig(**{"max_new_tokens": 16, **config}))
    return stub.Generate(request, timeout=120).completions[0]


def test_adapters_through_the_services(lora_stub, reference_model, hf_tokenizer, adapters):
    from model_svc.__main__ import engine_for, parse_args
    from model_svc.engine.sequence import SamplingParams, Sequence

    info = lora_stub.ModelInfo(pb.ModelInfoRequest(), timeout=30)
    assert [(a.name, a.rank, list(a.modules)) for a in info.adapters] == [
        ("a", 8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        ("b", 16, ["q_proj", "v_proj", "down_proj"])]
    flags = [arg for name, path in adapters.items() for arg in ("--lora", f"{name}={path}")]
    engine = engine_for(reference_model, parse_args(flags))  # as the model service builds it
    alone = {}
    for name in ("a", "b", ""):
        got = generate(lora_stub, PROMPTS[0], adapter=name)
        engine.add(Sequence("p", hf_tokenizer(PROMPTS[0]).input_ids, SamplingParams(max_new_tokens=16), adapter=name))
        expected = []
        while engine.scheduler.has_work:
            expected += [out.token_id for out in engine.step() if out.token_id is not None]
        assert list(got.token_ids) == expected, name
        alone[name] = list(got.token_ids)
    assert alone["a"] != alone[""] and alone["b"] != alone[""]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:  # batched: adapters and the base model together
        futures = [(name, pool.submit(generate, lora_stub, PROMPTS[0], adapter=name)) for name in ("a", "b", "") * 2]
        others = [pool.submit(generate, lora_stub, PROMPTS[1], adapter=name) for name in ("b", "a")]
        for name, future in futures:
            assert list(future.result().token_ids) == alone[name], name
        assert all(f.result().generated_tokens for f in others)
    streamed = list(lora_stub.GenerateStream(pb.GenerateStreamRequest(
        prompt=PROMPTS[0], config=pb.GenerationConfig(max_new_tokens=16, adapter="a")), timeout=120))
    assert [t for m in streamed for t in m.token_ids] == alone["a"]


def test_adapter_metrics_for_routers(lora_stack, lora_stub):
    """vLLM's vllm:lora_requests_info (llm-d's LoRA affinity reads its labels) and our count per adapter."""
    port = lora_stack.model.metrics_port
    before = metric(port, "genrpc_model_adapter_sequences_total", {"adapter": "b"})
    labels = {}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(generate, lora_stub, PROMPTS[1], adapter="b", max_new_tokens=200, ignore_eos=True)
        wait_for(lambda: "b" in _lora_info(port).get("running_lora_adapters", ""), timeout=60)
        labels = _lora_info(port)
        running.result()
    assert labels["max_lora"] == "2" and labels["waiting_lora_adapters"] == ""
    assert metric(port, "genrpc_model_adapter_sequences_total", {"adapter": "b"}) == before + 1
    wait_for(lambda: _lora_info(port).get("running_lora_adapters") == "", timeout=30)


def _lora_info(port: int) -> dict:
    """The labels of the model service's vllm:lora_requests_info sample."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    line = next((line for line in text.splitlines() if line.startswith("vllm:lora_requests_info{")), "")
    inside = line[line.index("{") + 1:line.index("}")] if line else ""
    return dict(part.split("=", 1) for part in inside.replace('"', "").split(",") if "=" in part) if inside else {}


def test_an_unknown_adapter_is_not_found(lora_stub):
    with pytest.raises(grpc.RpcError) as info:
        generate(lora_stub, PROMPTS[0], adapter="nope")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "config.adapter='nope'" in info.value.details() and "served: a, b" in info.value.details()
