"""Health, reflection, metrics and graceful shutdown on all three services; the CLI; an
outside client that knows only server reflection."""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from genrpc.v1 import generation_pb2 as pb
from tests.helpers import MODEL, ROOT, metric, start_service, wait_serving

SERVICES = {
    "tokenizer": "genrpc.internal.v1.Tokenizer",
    "model": "genrpc.internal.v1.ModelWorker",
    "gateway": "genrpc.v1.Generation",
}


@pytest.mark.parametrize("name", list(SERVICES))
def test_health_and_reflection(stack, name):
    service = getattr(stack, name)
    with stack.channel(service) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service_name in ("", SERVICES[name]):
            status = health.Check(health_pb2.HealthCheckRequest(service=service_name), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        db = ProtoReflectionDescriptorDatabase(channel)
        names = set(db.get_services())
        assert SERVICES[name] in names
        assert "grpc.health.v1.Health" in names


def test_the_gateway_says_when_a_request_can_succeed(stack):
    with open(stack.gateway.log_path) as f:
        log = f.read()
    assert f"gateway READY on 127.0.0.1:{stack.gateway.port}" in log
    assert log.index("gateway serving on") < log.index("gateway READY")  # serving is not ready


@pytest.mark.parametrize("name", list(SERVICES))
def test_objects_alive_at_start_up_are_out_of_the_collectors_reach(stack, name):
    """A full collection would scan the model's and the modules' objects every time (~250 ms in the
    model service): each service freezes what it holds when it starts serving."""
    with open(getattr(stack, name).log_path) as f:
        frozen = re.search(r": (\d+) objects alive at start-up frozen", f.read())
    assert frozen and int(frozen.group(1)) > 10_000  # grpc, protobuf and the rest: tens of thousands at least


@pytest.mark.parametrize("name", list(SERVICES))
def test_metrics_endpoint(stack, name):
    service = getattr(stack, name)
    body = urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=5).read().decode()
    assert "genrpc_requests_total" in body
    if name == "model":
        assert "genrpc_model_running_sequences" in body
        assert "genrpc_model_generated_tokens_total" in body


def test_client_that_knows_only_reflection(stack):
    """Build the request from descriptors fetched over reflection, as grpcurl and ghz do."""
    with grpc.insecure_channel(stack.gateway.address) as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        method = pool.FindServiceByName("genrpc.v1.Generation").FindMethodByName("Generate")
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        request = request_cls()
        request.prompts.append("The capital of France is")
        request.config.max_new_tokens = 8
        call = channel.unary_unary("/genrpc.v1.Generation/Generate", request_serializer=request_cls.SerializeToString,
                                   response_deserializer=response_cls.FromString)
        reply = call(request, timeout=60)
        completion = reply.completions[0]
        assert "Paris" in completion.text
        assert completion.generated_tokens == 8
        finish = method.output_type.fields_by_name["completions"].message_type.fields_by_name["finish_reason"]
        assert finish.enum_type.values_by_number[completion.finish_reason].name == "FINISH_REASON_LENGTH"


def test_cli(stack):
    env = dict(os.environ)
    cli = [sys.executable, "-m", "genrpc.cli", "--addr", stack.gateway.address]
    out = subprocess.run([*cli, "generate", "The capital of France is", "--max-new-tokens", "5"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    streamed = subprocess.run([*cli, "generate", "The capital of France is", "--max-new-tokens", "5", "--stream"],
                              capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert streamed.stdout == out.stdout
    chat = subprocess.run([*cli, "generate", "--chat", "What is the capital of France?", "--system",
                           "You answer in one word.", "--max-new-tokens", "16"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert "Paris" in chat.stdout
    tokens = subprocess.run([*cli, "tokenize", "Hello world"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert tokens.stdout.splitlines()[0].split("\t")[1] == "Hello"
    info = subprocess.run([*cli, "info"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert "SmolLM2-135M-Instruct" in info.stdout
    bad = subprocess.run([*cli, "generate", "x", "--top-k", "-1"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert bad.returncode == 2 and "--top-k" in bad.stderr  # refused by the command line itself
    refused = subprocess.run([*cli, "generate", "x", "--max-new-tokens", "5", "--min-new-tokens", "9"],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert refused.returncode == 1 and "INVALID_ARGUMENT" in refused.stderr and "min_new_tokens" in refused.stderr


def test_cli_streams_several_samples_each_whole_as_it_ends(stack):
    """-n 3 --stream: the same samples (same seed) as without --stream, each under its header."""
    def samples(text: str) -> dict[str, str]:
        blocks = text.split("--- sample ")[1:]
        return {block.split("\n", 1)[0]: block.split("\n", 1)[1] for block in blocks}

    flags = ["generate", "Once upon a time", "-n", "3", "--do-sample", "--seed", "7", "--max-new-tokens", "8"]
    whole, streamed = run_cli(stack, *flags), run_cli(stack, *flags, "--stream")
    assert whole.returncode == 0 and streamed.returncode == 0, streamed.stderr
    assert len(samples(whole.stdout)) == 3 and samples(streamed.stdout) == samples(whole.stdout)


def run_cli(stack, *args, timeout=120):
    cli = [sys.executable, "-m", "genrpc.cli", "--addr", stack.gateway.address]
    return subprocess.run([*cli, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize("args, names", [
    (("--seed", "-1"), "--seed"), (("--max-new-tokens", "99999999999"), "--max-new-tokens"),
    (("--temperature", "nan"), "--temperature"), (("--top-logprobs", "21"), "--top-logprobs"),
    (("--priority", "101"), "--priority"), (("--seed", "x"), "--seed"),
    (("--prompt-lookup-num-tokens", "33"), "--prompt-lookup-num-tokens")])
def test_cli_refuses_bad_values_in_one_line(stack, args, names):
    out = run_cli(stack, "generate", "x", *args)
    assert out.returncode == 2 and names in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_cli_generation_flags_and_info(stack, stub):
    tokenized = stub.Tokenize(pb.TokenizeRequest(prompts=["one two three four five six"]), timeout=30)
    ids = list(tokenized.prompts[0].token_ids)
    out = run_cli(stack, "generate", "one two three four five six", "--truncate-input-tokens", "2",
                  "--max-new-tokens", "3", "--logprobs", "--top-logprobs", "2", "--seed", "1", "-v")
    assert out.returncode == 0, out.stderr
    lines = out.stderr.strip().splitlines()
    logprob_lines, summary = lines[:-1], lines[-1]
    assert len(logprob_lines) == 3 and "3 tokens" in summary
    reference = stub.Generate(pb.GenerateRequest(prompts=["one two three four five six"], config=pb.GenerationConfig(
        truncate_input_tokens=2, max_new_tokens=3, logprobs=True, top_logprobs=2)), timeout=60).completions[0]
    assert [int(line.split("\t")[0]) for line in logprob_lines] == list(reference.token_ids)
    assert reference.prompt_tokens == 2 < len(ids)
    stop_id = reference.token_ids[0]
    stopped = run_cli(stack, "generate", "one two three four five six", "--truncate-input-tokens", "2",
                      "--max-new-tokens", "3", "--stop-token-id", str(stop_id), "-v")
    assert stopped.returncode == 0 and "eos_token, 1 tokens" in stopped.stderr
    info = run_cli(stack, "info")
    assert info.returncode == 0 and info.stdout.splitlines()[0].split() == ["model", "SmolLM2-135M-Instruct"]
    assert "{" not in info.stdout  # lines for people, not protobuf text
    as_json = json.loads(run_cli(stack, "info", "--json").stdout)
    assert as_json["model_name"] == "SmolLM2-135M-Instruct" and as_json["max_context_tokens"] > 0


def test_cli_ctrl_c_during_a_stream_exits_quietly(stack):
    cli = [sys.executable, "-m", "genrpc.cli", "--addr", stack.gateway.address]
    proc = subprocess.Popen([*cli, "generate", "Tell me a long story.", "--stream", "--max-new-tokens", "2000",
                             "--ignore-eos"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    proc.stdout.read(8)  # streaming
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:  # say what the process made of the signal, for the next reader
        with open(f"/proc/{proc.pid}/status") as f:
            masks = [line.strip() for line in f if line.startswith(("SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt"))]
        proc.kill()
        raise AssertionError(f"the CLI did not stop within 30 s of SIGINT; {masks}")
    assert proc.returncode == 130 and "Traceback" not in err


def test_env_variables_set_flags(tmp_path):
    env_port_file = tmp_path / "ports.json"
    proc = subprocess.run(
        [sys.executable, "-c", "from tokenizer_svc.__main__ import parse_args; a = parse_args([]); "
         "print(a.port, a.metrics_port, a.model)"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
        env=dict(os.environ, GENRPC_PORT="6123", GENRPC_METRICS_PORT="7123", GENRPC_MODEL=str(env_port_file)),
    )
    assert proc.stdout.split() == ["6123", "7123", str(env_port_file)]


def test_sigterm_lets_an_inflight_stream_finish(stack):
    """A second gateway in front of the same workers: SIGTERM mid-stream, the stream still completes."""
    # 40 tokens take well under a second on a fast CPU, several on a slow one: a grace that covers both.
    gateway = start_service("gateway", "--tokenizer-addrs", stack.tokenizer.address,
                            "--model-addrs", stack.model.address, *stack.credentials.client_flags(), "--grace", "20")
    wait_serving(gateway.address)
    from genrpc.v1 import generation_pb2_grpc

    received = []
    with grpc.insecure_channel(gateway.address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        request = pb.GenerateStreamRequest(prompt="Count:", config=pb.GenerationConfig(
            max_new_tokens=40, ignore_eos=True))
        responses = stub.GenerateStream(request, timeout=60)
        received.append(next(responses))
        gateway.proc.send_signal(signal.SIGTERM)
        received.extend(responses)
    assert received[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert sum(len(m.token_ids) for m in received) == 40
    assert gateway.proc.wait(timeout=30) == 0
    # The workers behind it are unharmed.
    with grpc.insecure_channel(stack.gateway.address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        assert stub.Generate(pb.GenerateRequest(prompts=["Hi"], config=pb.GenerationConfig(max_new_tokens=2)),
                             timeout=60).completions[0].generated_tokens == 2


def test_tokenizer_sigterm_exits_cleanly():
    service = start_service("tokenizer_svc", "--model", MODEL)
    wait_serving(service.address)
    assert service.stop() == 0


def test_loadtest_reports_what_ghz_reports(stack):
    out = subprocess.run(
        [sys.executable, "-m", "bench.loadtest", "--addr", stack.gateway.address, "--call", "GenerateStream",
         "-d", '{"prompt": "Hi", "config": {"max_new_tokens": 4}}', "-c", "4", "-n", "12", "--format", "json"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["count"] == 12 and report["status_code_distribution"] == {"OK": 12}
    assert report["rps"] > 0 and sum(b["count"] for b in report["histogram"]) == 12
    assert report["latency_distribution"]["p50"] <= report["latency_distribution"]["p99"] <= report["slowest_s"]
    bad = subprocess.run(
        [sys.executable, "-m", "bench.loadtest", "--addr", stack.gateway.address, "-d",
         '{"prompts": ["Hi"], "config": {"top_p": 5}}', "-c", "2", "-n", "4", "--format", "json"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert json.loads(bad.stdout)["status_code_distribution"] == {"INVALID_ARGUMENT": 4}
    text = subprocess.run([sys.executable, "-m", "bench.loadtest", "--addr", stack.gateway.address, "-n", "2"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT).stdout
    assert "Requests/sec" in text and "Latency distribution" in text and "[OK]\t2 responses" in text


def test_ghz_configurations_parse_against_the_proto():
    from google.protobuf import json_format

    for path in glob.glob(os.path.join(ROOT, "bench", "ghz", "*.json")):
        with open(path) as f:
            config = json.load(f)
        method = config["call"].rsplit(".", 1)[1]
        request_type = {"Generate": pb.GenerateRequest, "GenerateStream": pb.GenerateStreamRequest}[method]
        text = json.dumps(config["data"]).replace('"{{.RequestNumber}}"', "1").replace("{{.RequestNumber}}", "1")
        data = json.loads(text)
        json_format.ParseDict(data, request_type())
        if "proto" in config:
            assert os.path.exists(os.path.normpath(os.path.join(os.path.dirname(path), config["proto"])))


def test_model_service_serves_with_threads_set_explicitly(stack):
    """--threads fixes the compute pool (no adaptation); the policy shows in ModelInfo and metrics."""
    model = start_service("model_svc", "--model", MODEL, "--threads", "1", *stack.credentials.server_flags())
    gateway = start_service("gateway", "--tokenizer-addrs", stack.tokenizer.address, "--model-addrs", model.address,
                            *stack.credentials.client_flags())
    try:
        wait_serving(gateway.address)
        with grpc.insecure_channel(gateway.address) as channel:
            from genrpc.v1 import generation_pb2_grpc

            stub = generation_pb2_grpc.GenerationStub(channel)
            reply = stub.Generate(pb.GenerateRequest(prompts=["Hi"], config=pb.GenerationConfig(
                max_new_tokens=3, ignore_eos=True)), timeout=60)
            assert reply.completions[0].generated_tokens == 3
            assert stub.ModelInfo(pb.ModelInfoRequest(), timeout=10).thread_policy.startswith("fixed: 1 thread ")
        assert metric(model.metrics_port, "genrpc_model_compute_threads") == 1
        # The default is adaptive, sized from this machine's CPUs.
        assert metric(stack.model.metrics_port, "genrpc_model_compute_threads") >= 1
        assert _worker_policy(stack).startswith("adaptive: up to ")
    finally:
        gateway.stop()
        model.stop()


def _worker_policy(stack) -> str:
    from genrpc.internal.v1 import model_pb2, model_pb2_grpc

    with stack.channel(stack.model) as channel:  # with the gateway's credentials
        info = model_pb2_grpc.ModelWorkerStub(channel).WorkerInfo(model_pb2.WorkerInfoRequest(), timeout=10)
        return info.thread_policy


def test_contradictory_model_flags_stop_start_up_with_a_message():
    out = subprocess.run([sys.executable, "-m", "model_svc", "--model", MODEL, "--port", "0", "--match-generate",
                          "--decode-attention", "sdpa"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode != 0 and "--match-generate" in out.stderr and "Traceback" not in out.stderr


def test_model_info_reports_the_attention_in_use(stub):
    info = stub.ModelInfo(pb.ModelInfoRequest(), timeout=10)
    assert (info.decode_attention, info.prefill_attention) == ("native", "native")


def test_model_info_reports_the_matrix_products_and_the_cpu(stub):
    """The kernel's path and its measured row-count choice, and the CPU it was measured on."""
    from model_svc.engine import gemm, kernel_choice

    info = stub.ModelInfo(pb.ModelInfoRequest(), timeout=10)
    kernel = gemm.load()
    # The default: int8 where the kernel's int8 product runs natively, else as transformers loads a 4-bit model
    assert info.output_layer == ("int8" if kernel is not None and kernel.has_int8 else "none")
    assert info.speculation == "prompt lookup, up to 8 tokens a step"  # the default with native attention
    cpu = kernel_choice.cpu_info()
    assert info.cpu == cpu.describe()
    if kernel is None:
        assert info.matmul == "library"
    elif kernel.set_direct_rows(0, 2) < 0 and not kernel.has_amx:
        assert info.matmul == f"native {kernel.isa}: row tiles fixed by the kernel"
    elif kernel.set_direct_rows(0, 2) < 0:  # AVX-512 with AMX tiles: the tile choice and what it rests on
        assert re.fullmatch(rf"native {kernel.isa}: row tiles fixed by the kernel; AMX (tiles|off) "
                            r"\((measured|cached): [\d.]+x AVX-512's time per row over \d+ row counts, "
                            r"[\d.]+x at \d+ rows?\)", info.matmul), info.matmul
    else:
        assert info.matmul.startswith("native avx2: weights read directly up to ")
        assert info.matmul.endswith(("measured", "cached"))
