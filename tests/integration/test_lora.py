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
    stack = start_stack(MODEL, model_args=(*flags, "--max-loras", "2"))  # a third adapter is read from disk
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


ADMIN = [("authorization", "Bearer ops-secret")]
PLAIN = [("authorization", "Bearer team-secret")]


@pytest.fixture(scope="module")
def admin_gateway(lora_stack, tmp_path_factory):
    """A second gateway in front of the same workers, with bearer tokens: one may manage adapters."""
    from genrpc.launch import start_service

    folder = tmp_path_factory.mktemp("adapter-rights")
    (folder / "tokens").write_text("ops-secret name=ops manage_adapters=yes\nteam-secret name=team\n")
    gateway = start_service("gateway", "--tokenizer-addrs", lora_stack.tokenizer.address, "--model-addrs",
                            lora_stack.model.address, "--auth-tokens-file", str(folder / "tokens"),
                            *lora_stack.credentials.client_flags())
    with grpc.insecure_channel(gateway.address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)

        def serves() -> bool:
            try:
                return bool(stub.ModelInfo(pb.ModelInfoRequest(), timeout=5, metadata=PLAIN).adapters)
            except grpc.RpcError:
                return False
        wait_for(serves, timeout=60)
        yield stub
    gateway.stop()


def in_process(reference_model, hf_tokenizer, paths: dict, requests: list) -> list[list[int]]:
    """The greedy tokens of the engine the model service builds with --lora NAME=PATH for each
    NAME in `paths`, for each (adapter, prompt) of `requests`, one at a time."""
    from model_svc.__main__ import engine_for, parse_args
    from model_svc.engine.sequence import SamplingParams, Sequence

    engine = engine_for(reference_model, parse_args([a for n, p in paths.items() for a in ("--lora", f"{n}={p}")]))
    answers = []
    for name, prompt in requests:
        engine.add(Sequence("p", hf_tokenizer(prompt).input_ids, SamplingParams(max_new_tokens=16), adapter=name))
        answers.append([])
        while engine.scheduler.has_work:
            answers[-1] += [out.token_id for out in engine.step() if out.token_id is not None]
    return answers


def test_adapters_load_and_unload_at_run_time(admin_gateway, lora_stack, reference_model, hf_tokenizer, adapters,
                                              tmp_path):
    """LoadAdapter / UnloadAdapter: a right of the token; the loaded adapter (a third one past
    --max-loras 2: read from disk again when asked for, in place of one not in use) serves the
    in-process engine's tokens, and so do the two it displaced; refusals name what is wrong; in use
    it stays; loaded again under the same name with other weights, it gives the new weights' tokens
    (its prefix-cache blocks are not reused)."""
    first = make_adapter(str(tmp_path / "c1"), seed=3, alpha=64)  # strong: other tokens than the base model
    second = make_adapter(str(tmp_path / "c2"), seed=4, rank=4, alpha=64)
    load = pb.LoadAdapterRequest(name="c", path=first)
    with pytest.raises(grpc.RpcError) as denied:
        admin_gateway.LoadAdapter(load, timeout=60, metadata=PLAIN)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED and "manage_adapters=yes" in denied.value.details()

    loaded = admin_gateway.LoadAdapter(load, timeout=60, metadata=ADMIN)
    assert (loaded.adapter.name, loaded.adapter.rank, loaded.num_model_workers) == ("c", 8, 1)
    assert "c" in [a.name for a in admin_gateway.ModelInfo(pb.ModelInfoRequest(), timeout=30, metadata=PLAIN).adapters]
    long_prompt = " ".join(PROMPTS * 3)  # full KV blocks: the prefix cache keeps them
    got = generate_as(admin_gateway, long_prompt, "c")
    expected = in_process(reference_model, hf_tokenizer, {**adapters, "c": first},
                          [("c", long_prompt), ("a", PROMPTS[0]), ("b", PROMPTS[0]), ("c", PROMPTS[0])])
    assert got == expected[0]
    assert got != generate_as(admin_gateway, long_prompt, "")
    reads = metric(lora_stack.model.metrics_port, "genrpc_model_adapter_reads_total")
    for name, tokens in zip("abc", expected[1:]):  # two resident at most: each read again in turn
        assert generate_as(admin_gateway, PROMPTS[0], name) == tokens, name
    assert metric(lora_stack.model.metrics_port, "genrpc_model_adapter_reads_total") >= reads + 2

    refusals = [(pb.LoadAdapterRequest(name="c", path=second), grpc.StatusCode.ALREADY_EXISTS, "already loaded"),
                (pb.LoadAdapterRequest(name="d", path=str(tmp_path / "nowhere")), grpc.StatusCode.INVALID_ARGUMENT,
                 "adapter_config.json"),
                (pb.LoadAdapterRequest(name="bad name", path=first), grpc.StatusCode.INVALID_ARGUMENT,
                 "name='bad name'"),
                (pb.LoadAdapterRequest(name="d", path=make_adapter(str(tmp_path / "big"), seed=5, rank=128)),
                 grpc.StatusCode.INVALID_ARGUMENT, "r=128")]
    for request, code, words in refusals:
        with pytest.raises(grpc.RpcError) as refused:
            admin_gateway.LoadAdapter(request, timeout=60, metadata=ADMIN)
        assert refused.value.code() == code and words in refused.value.details(), refused.value.details()

    stream = admin_gateway.GenerateStream(pb.GenerateStreamRequest(prompt=PROMPTS[1], config=pb.GenerationConfig(
        max_new_tokens=2000, ignore_eos=True, adapter="c")), timeout=300, metadata=PLAIN)
    next(stream)  # it runs through "c" now
    with pytest.raises(grpc.RpcError) as busy:
        admin_gateway.UnloadAdapter(pb.UnloadAdapterRequest(name="c"), timeout=60, metadata=ADMIN)
    assert busy.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "running or waiting" in busy.value.details()
    stream.cancel()

    def unloaded() -> bool:
        try:
            return admin_gateway.UnloadAdapter(pb.UnloadAdapterRequest(name="c"), timeout=60,
                                               metadata=ADMIN).num_model_workers == 1
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc.details()  # until the abort lands
            return False
    wait_for(unloaded, timeout=30)
    for call in (lambda: generate_as(admin_gateway, PROMPTS[0], "c"),
                 lambda: admin_gateway.UnloadAdapter(pb.UnloadAdapterRequest(name="c"), timeout=60, metadata=ADMIN)):
        with pytest.raises(grpc.RpcError) as gone:
            call()
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND

    admin_gateway.LoadAdapter(pb.LoadAdapterRequest(name="c", path=second), timeout=60, metadata=ADMIN)
    again = generate_as(admin_gateway, long_prompt, "c")
    assert again == in_process(reference_model, hf_tokenizer, {"c": second}, [("c", long_prompt)])[0] and again != got
    admin_gateway.UnloadAdapter(pb.UnloadAdapterRequest(name="c"), timeout=60, metadata=ADMIN)


def generate_as(stub, prompt, adapter) -> list[int]:
    request = pb.GenerateRequest(prompts=[prompt], config=pb.GenerationConfig(max_new_tokens=16, adapter=adapter))
    return list(stub.Generate(request, timeout=120, metadata=PLAIN).completions[0].token_ids)


def test_the_cli_manages_adapters_only_with_the_right(lora_stack, adapters, capsys):
    """`genrpc adapters load/unload`: the gateway's answer, named; without a token: PERMISSION_DENIED
    (the CLI sends a bearer token over TLS only; the right itself is tested above)."""
    from genrpc import cli

    assert cli.main(["--addr", lora_stack.gateway.address, "adapters", "load", "e", adapters["a"]]) == 1
    assert "PERMISSION_DENIED: LoadAdapter needs a bearer token with manage_adapters=yes" in capsys.readouterr().err
    assert cli.main(["--addr", lora_stack.gateway.address, "adapters", "unload", "a"]) == 1
    assert "PERMISSION_DENIED" in capsys.readouterr().err
