"""Request ids, structured logs, metrics, traces across the three services, DNS scale-out, and
the Kubernetes manifests."""

from __future__ import annotations

import glob
import json
import os
import uuid

import grpc
import pytest
import yaml

from genrpc.v1 import generation_pb2 as pb
from genrpc.v1 import generation_pb2_grpc
from tests.helpers import MODEL, ROOT, metric, start_service, wait_for, wait_serving


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """A stack whose three services export spans to one JSON-lines file; JSON logs at the gateway."""
    spans = str(tmp_path_factory.mktemp("trace") / "spans.jsonl")
    exporter = f"jsonl:{spans}"
    tokenizer = start_service("tokenizer_svc", "--model", MODEL, "--trace-exporter", exporter)
    model = start_service("model_svc", "--model", MODEL, "--trace-exporter", exporter)
    gateway = start_service("gateway", "--tokenizer-addrs", tokenizer.address,
                            "--model-addrs", f"dns:///localhost:{model.port}", "--trace-exporter", exporter,
                            "--log-format", "json")
    wait_serving(gateway.address)
    yield gateway, spans
    for service in (gateway, model, tokenizer):
        service.stop()


def test_request_id_echoed_or_generated(stub):
    _, call = stub.Generate.with_call(pb.GenerateRequest(prompts=["Hi"], config=pb.GenerationConfig(max_new_tokens=1)),
                                      timeout=30, metadata=[("x-request-id", "abc-123")])
    assert ("x-request-id", "abc-123") in call.initial_metadata()
    _, call = stub.Generate.with_call(pb.GenerateRequest(prompts=["Hi"], config=pb.GenerationConfig(max_new_tokens=1)),
                                      timeout=30)
    generated = dict(call.initial_metadata())["x-request-id"]
    assert len(generated) == 32 and int(generated, 16) >= 0
    stream = stub.GenerateStream(pb.GenerateStreamRequest(prompt="Hi", config=pb.GenerationConfig(max_new_tokens=2)),
                                 timeout=30, metadata=[("x-request-id", "stream-7")])
    assert ("x-request-id", "stream-7") in stream.initial_metadata()
    list(stream)


def test_metrics_cover_latency_tokens_queue_and_batches(stack, stub):
    stub.Generate(pb.GenerateRequest(prompts=["Hello", "Hi there"], config=pb.GenerationConfig(max_new_tokens=4)),
                  timeout=60)
    g, m = stack.gateway.metrics_port, stack.model.metrics_port
    assert metric(g, "genrpc_gateway_time_to_first_token_seconds_count") >= 2
    assert metric(g, "genrpc_gateway_inter_token_latency_seconds_count") >= 6
    assert metric(g, "genrpc_gateway_prompt_tokens_total") > 0
    assert metric(g, "genrpc_gateway_generated_tokens_total") >= 8
    assert metric(g, "genrpc_gateway_finished_sequences_total", {"reason": "FINISH_REASON_LENGTH"}) >= 2
    assert metric(g, "genrpc_requests_total", {"method": "Generate", "code": "OK"}) >= 1
    assert metric(g, "genrpc_request_duration_seconds_count", {"method": "Generate"}) >= 1
    assert metric(m, "genrpc_model_step_seconds_count") > 0
    assert metric(m, "genrpc_model_batch_sequences_count") > 0
    assert metric(m, "genrpc_model_batch_tokens_sum") > 0
    assert metric(m, "genrpc_model_kv_cache_tokens") > 0
    assert metric(m, "genrpc_model_waiting_sequences") == 0
    assert metric(stack.tokenizer.metrics_port, "genrpc_requests_total", {"method": "Encode"}) >= 1


def test_the_model_service_reports_its_load_under_vllms_names(stack, stub):
    """What llm-d's endpoint picker scrapes: vLLM's metric names, each the genrpc figure it mirrors."""
    m = stack.model.metrics_port
    labels = {"model_name": "SmolLM2-135M-Instruct"}
    assert metric(m, "vllm:cache_config_info", {"block_size": "16"}) == 1
    stream = stub.GenerateStream(pb.GenerateStreamRequest(
        prompt="Count to a thousand:", config=pb.GenerationConfig(max_new_tokens=400, ignore_eos=True)), timeout=120)
    next(stream)  # running now
    try:
        assert metric(m, "vllm:num_requests_running", labels) == metric(m, "genrpc_model_running_sequences") >= 1
        usage = metric(m, "vllm:kv_cache_usage_perc", labels)
        used, free = metric(m, "genrpc_model_kv_blocks_used"), metric(m, "genrpc_model_kv_blocks_free")
        assert 0 < usage <= 1 and usage == pytest.approx(used / (used + free), rel=0.5)
        assert metric(m, "vllm:num_requests_waiting", labels) == 0
    finally:
        stream.cancel()
    wait_for(lambda: metric(m, "vllm:num_requests_running", labels) == 0)


def test_one_trace_across_gateway_tokenizer_and_model(traced):
    gateway, spans_file = traced
    with grpc.insecure_channel(gateway.address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        stub.Generate(pb.GenerateRequest(prompts=["Hi"], config=pb.GenerationConfig(max_new_tokens=2)),
                      timeout=60, metadata=[("x-request-id", "traced-1")])

    def spans():
        if not os.path.exists(spans_file):
            return []
        with open(spans_file) as f:
            return [json.loads(line) for line in f]

    wait_for(lambda: any(s["name"] == "genrpc.internal.v1.ModelWorker/Submit" for s in spans()), timeout=10)
    by_name = {s["name"]: s for s in spans() if s["name"] != "grpc.health.v1.Health/Check"}
    root = by_name["genrpc.v1.Generation/Generate"]
    encode_client, submit_client = by_name["tokenizer.Encode"], by_name["model.Submit"]
    encode_server = by_name["genrpc.internal.v1.Tokenizer/Encode"]
    submit_server = by_name["genrpc.internal.v1.ModelWorker/Submit"]
    spans = (root, encode_client, submit_client, encode_server, submit_server)
    assert {s["trace_id"] for s in spans} == {root["trace_id"]}
    assert root["service"] == "genrpc-gateway" and root["kind"] == "SERVER" and root["parent_id"] is None
    assert encode_client["parent_id"] == root["span_id"] and submit_client["parent_id"] == root["span_id"]
    assert encode_server["parent_id"] == encode_client["span_id"] and encode_server["service"] == "genrpc-tokenizer"
    assert submit_server["parent_id"] == submit_client["span_id"] and submit_server["service"] == "genrpc-model"
    assert root["attributes"]["rpc.grpc.status_code"] == "OK"


def test_structured_logs_carry_the_request_id(traced):
    gateway, _ = traced
    with grpc.insecure_channel(gateway.address) as channel:
        generation_pb2_grpc.GenerationStub(channel).Generate(
            pb.GenerateRequest(prompts=["Hi"], config=pb.GenerationConfig(max_new_tokens=2)),
            timeout=60, metadata=[("x-request-id", "log-me-42")])

    def entries():
        with open(gateway.log_path) as f:
            return [json.loads(line) for line in f if line.startswith("{")]

    wait_for(lambda: any(e.get("request_id") == "log-me-42" for e in entries()), timeout=5)
    entry = next(e for e in entries() if e.get("request_id") == "log-me-42")
    assert entry["method"] == "Generate" and entry["generated_tokens"] == 2
    assert entry["finish_reasons"] == ["FINISH_REASON_LENGTH"]


def test_dns_address_finds_the_workers(traced):
    gateway, _ = traced  # its --model-addrs is dns:///localhost:PORT
    with grpc.insecure_channel(gateway.address) as channel:
        info = generation_pb2_grpc.GenerationStub(channel).ModelInfo(pb.ModelInfoRequest(), timeout=10)
    assert info.num_model_workers >= 1


@pytest.fixture(scope="module")
def two_workers(stack):
    """A gateway in front of the stack's model worker and a second one."""
    second = start_service("model_svc", "--model", MODEL, *stack.credentials.server_flags())
    gateway = start_service("gateway", "--tokenizer-addrs", stack.tokenizer.address,
                            "--model-addrs", f"{stack.model.address},{second.address}",
                            *stack.credentials.client_flags())
    try:
        wait_serving(gateway.address)
        with grpc.insecure_channel(gateway.address) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            wait_for(lambda: stub.ModelInfo(pb.ModelInfoRequest(), timeout=5).num_model_workers == 2)
            yield stub, (stack.model, second)
    finally:
        gateway.stop()
        second.stop()


def test_two_workers_share_the_load(two_workers):
    stub, workers = two_workers
    before = [metric(w.metrics_port, "genrpc_model_generated_tokens_total") for w in workers]
    futures = [stub.Generate.future(pb.GenerateRequest(prompts=[f"Story {i}"], config=pb.GenerationConfig(
        max_new_tokens=16, ignore_eos=True)), timeout=120) for i in range(8)]
    assert all(f.result().completions[0].generated_tokens == 16 for f in futures)
    after = [metric(w.metrics_port, "genrpc_model_generated_tokens_total") for w in workers]
    shares = [a - b for a, b in zip(after, before)]
    assert sum(shares) == 8 * 16
    assert min(shares) >= 16 * 2  # both worked: prompts with no full block to share go to the least loaded


def test_requests_sharing_a_prefix_go_to_the_worker_that_caches_it(two_workers):
    """While the worker holding a system prompt's blocks runs a stream (so the other one is less
    loaded), further requests with that system prompt still go to it, and hit its cache."""
    stub, workers = two_workers
    system = (f"[{uuid.uuid4().hex}] You are the support assistant of a small bakery. You answer questions "
              "about opening hours, bread, cakes and orders politely and in at most two sentences. ")
    generated = lambda: [metric(w.metrics_port, "genrpc_model_generated_tokens_total") for w in workers]  # noqa: E731
    hits = lambda: [metric(w.metrics_port, "genrpc_model_prefix_cache_hit_tokens") for w in workers]  # noqa: E731
    config = pb.GenerationConfig(max_new_tokens=4, ignore_eos=True)
    before = generated()
    stub.Generate(pb.GenerateRequest(prompts=[system + "When do you open?"], config=config), timeout=60)
    holder = max(range(2), key=lambda i: generated()[i] - before[i])
    running = stub.GenerateStream(pb.GenerateStreamRequest(prompt=system + "Tell me about rye bread.",
                                  config=pb.GenerationConfig(max_new_tokens=400, ignore_eos=True)), timeout=120)
    next(running)
    before_generated, before_hits = generated(), hits()
    for question in ("Do you bake on Sundays?", "Can I order a cake?", "Is the sourdough vegan?"):
        stub.Generate(pb.GenerateRequest(prompts=[system + question], config=config), timeout=60)
    other = 1 - holder
    assert generated()[other] == before_generated[other]  # least-loaded alone would have sent them there
    assert hits()[holder] - before_hits[holder] >= 3 * 32
    running.cancel()


def test_kubernetes_manifests_are_valid():
    import kubernetes_validate

    documents = []
    for path in sorted(glob.glob(os.path.join(ROOT, "deploy", "k8s", "*.yaml"))):
        with open(path) as f:
            documents += [(path, d) for d in yaml.safe_load_all(f) if d]
    kinds = {(d["kind"], d["metadata"]["name"]) for _, d in documents}
    assert {("Deployment", "tokenizer"), ("Deployment", "model"), ("Deployment", "gateway"),
            ("Service", "tokenizer"), ("Service", "model"), ("Service", "gateway")} <= kinds
    for path, document in documents:
        kubernetes_validate.validate(document, "1.30", strict=True)
    by_kind = {(d["kind"], d["metadata"]["name"]): d for _, d in documents}
    for name in ("tokenizer", "model"):
        assert by_kind[("Service", name)]["spec"]["clusterIP"] == "None"  # headless: per-request balancing
    model_container = by_kind[("Deployment", "model")]["spec"]["template"]["spec"]["containers"][0]
    assert model_container["resources"]["limits"]["nvidia.com/gpu"] == 1
    # Whole cores, limit = request: the thread pool is the quota's floor (model_svc/threads.py).
    assert model_container["resources"]["limits"]["cpu"] == model_container["resources"]["requests"]["cpu"] == "2"
    for name in ("tokenizer", "model", "gateway"):
        pod = by_kind[("Deployment", name)]["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert "grpc" in container["readinessProbe"] and "grpc" in container["livenessProbe"]
        assert container["resources"]["requests"] and container["resources"]["limits"]["cpu"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        # TLS and tokens from files: no secret on a command line or in an environment variable.
        assert "GENRPC_AUTH_TOKENS" not in env and not any("secretKeyRef" in str(e) for e in container["env"])
        assert env["GENRPC_TLS_CERT"] and env["GENRPC_TLS_KEY"] and env["GENRPC_AUTH_TOKENS_FILE"]
        assert env["GENRPC_METRICS_AUTH_TOKENS_FILE"]  # queue depths and cache figures are for the operator only
        # Probes reach the plaintext health-only port; the service port speaks TLS.
        assert container["readinessProbe"]["grpc"]["port"] == int(env["GENRPC_HEALTH_PORT"])
        secrets = [v["secret"] for v in pod["volumes"] if "secret" in v]
        assert secrets and not any(v.get("optional") for v in secrets)  # a missing Secret stops the pod
        mounted = {m["mountPath"] for m in container["volumeMounts"]}
        assert {os.path.dirname(env[f"GENRPC_{v}"]) for v in ("TLS_CERT", "AUTH_TOKENS_FILE",
                                                               "METRICS_AUTH_TOKENS_FILE")} <= mounted
        if name != "gateway":  # internal: client certificates required
            assert env["GENRPC_TLS_CLIENT_CA"]
        else:
            assert env["GENRPC_INTERNAL_TLS_CA"] and env["GENRPC_INTERNAL_TOKEN_FILE"]
    # Only the gateway reaches the internal services; only monitoring reaches metrics; the rest is denied.
    policies = {d["metadata"]["name"]: d["spec"] for _, d in documents if d["kind"] == "NetworkPolicy"}
    assert policies["default-deny-ingress"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    for name, port, metrics_port in (("tokenizer", 50052, 9052), ("model", 50053, 9053)):
        (spec,) = [p for p in policies.values()
                   if p["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/component") == name]
        rules = {r["ports"][0]["port"]: r["from"] for r in spec["ingress"]}
        assert set(rules) == {port, metrics_port}
        assert rules[port] == [{"podSelector": {"matchLabels": {
            "app.kubernetes.io/name": "genrpc", "app.kubernetes.io/component": "gateway"}}}]
        assert rules[metrics_port] == [{"namespaceSelector": {"matchLabels": {
            "kubernetes.io/metadata.name": "monitoring"}}}]


def test_the_smg_manifests_are_valid_and_only_smg_reaches_the_workers():
    """deploy/smg/: model workers behind SMG, found by Kubernetes service discovery. Valid against the
    Kubernetes 1.30 schemas; SMG discovers exactly the worker pods (labels, namespace, port) with a
    Role that reads pods of its namespace only; the workers serve plaintext (SMG 1.13 can present no
    credentials to a gRPC worker), so only SMG's pods reach their port."""
    import kubernetes_validate

    with open(os.path.join(ROOT, "deploy", "smg", "smg.yaml")) as f:
        documents = [d for d in yaml.safe_load_all(f) if d]
    for document in documents:
        kubernetes_validate.validate(document, "1.30", strict=True)
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in documents}
    namespace = "genrpc-smg"
    assert all(d["metadata"].get("namespace", namespace) == namespace for d in documents if d["kind"] != "Namespace")
    model = by_kind[("Deployment", "model")]["spec"]["template"]
    smg = by_kind[("Deployment", "smg")]["spec"]["template"]
    worker = model["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in worker["env"]}
    assert env["GENRPC_ALLOW_INSECURE"] == "true" and "GENRPC_TLS_CERT" not in env
    args = smg["spec"]["containers"][0]["args"]

    def values(flag):  # the values after a flag, up to the next flag
        start = args.index(flag) + 1
        end = next((i for i in range(start, len(args)) if args[i].startswith("--")), len(args))
        return args[start:end]

    assert values("--backend") == ["vllm"] and "--service-discovery" in args
    assert dict(v.split("=") for v in values("--selector")) == model["metadata"]["labels"]
    assert values("--service-discovery-namespace") == [namespace]
    assert values("--service-discovery-port") == [env["GENRPC_PORT"]]
    assert values("--api-key") == ["$(SMG_API_KEY)"]  # from a Secret, not written in the manifest
    (rule,) = by_kind[("Role", "smg-discovery")]["rules"]
    assert rule["resources"] == ["pods"] and set(rule["verbs"]) == {"get", "list", "watch"}
    binding = by_kind[("RoleBinding", "smg-discovery")]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": smg["spec"]["serviceAccountName"],
                                    "namespace": namespace}]
    policies = {d["metadata"]["name"]: d["spec"] for d in documents if d["kind"] == "NetworkPolicy"}
    assert policies["default-deny-ingress"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    (workers,) = [p for p in policies.values() if p["podSelector"].get("matchLabels") == model["metadata"]["labels"]]
    rules = {r["ports"][0]["port"]: r["from"] for r in workers["ingress"]}
    assert rules[int(env["GENRPC_PORT"])] == [{"podSelector": {"matchLabels": smg["metadata"]["labels"]}}]
    assert set(rules) == {int(env["GENRPC_PORT"]), int(env["GENRPC_METRICS_PORT"])}

def test_cancels_and_deadlines_count_as_cancelled_sequences(stack, stub):
    g = stack.gateway.metrics_port
    before = metric(g, "genrpc_gateway_finished_sequences_total", {"reason": "FINISH_REASON_CANCELLED"})
    long = pb.GenerationConfig(max_new_tokens=2000, ignore_eos=True)
    call = stub.GenerateStream(pb.GenerateStreamRequest(prompt="Go on.", config=long), timeout=60)
    next(call)
    call.cancel()
    with pytest.raises(grpc.RpcError):
        stub.Generate(pb.GenerateRequest(prompts=["Go on.", "And on."], config=long), timeout=1.0)
    wait_for(lambda: metric(g, "genrpc_gateway_finished_sequences_total",
                            {"reason": "FINISH_REASON_CANCELLED"}) - before == 3, timeout=10)
