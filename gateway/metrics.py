"""The gateway's Prometheus metrics (request counts by method and code live in genrpc.serving)."""

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10)

TIME_TO_FIRST_TOKEN = Histogram(
    "genrpc_gateway_time_to_first_token_seconds", "from request arrival to a sequence's first token",
    buckets=LATENCY_BUCKETS)
INTER_TOKEN_LATENCY = Histogram(
    "genrpc_gateway_inter_token_latency_seconds", "between a sequence's consecutive tokens",
    buckets=LATENCY_BUCKETS)
PROMPT_TOKENS = Counter("genrpc_gateway_prompt_tokens", "prompt tokens submitted")
GENERATED_TOKENS = Counter("genrpc_gateway_generated_tokens", "tokens generated and returned")
INFLIGHT_SEQUENCES = Gauge("genrpc_gateway_inflight_sequences", "sequences being generated")
TRACKED_SEQUENCES = Gauge("genrpc_gateway_tracked_sequences",
                          "sequences the gateway still expects tokens for from its model workers")
FINISHED_SEQUENCES = Counter("genrpc_gateway_finished_sequences", "sequences finished, by reason", ["reason"])
COALESCED_CALLS = Histogram(
    "genrpc_gateway_coalesced_calls", "requests carried by one backend call (concurrent ones merge), by call",
    ["call"], buckets=(1, 2, 4, 8, 16, 32, 64))
CLIENT_CAP_REFUSALS = Counter(
    "genrpc_gateway_client_cap_refusals", "requests refused because their client had its share in flight "
    "(--max-inflight-per-client); unlabelled: clients are unbounded")
ACTIVE_CLIENTS = Gauge("genrpc_gateway_active_clients", "clients with sequences in flight")
