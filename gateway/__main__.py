"""`python -m gateway`: serve the public API (default 127.0.0.1:50051)."""

from __future__ import annotations

import asyncio
import logging

from gateway import metrics
from gateway.generation import Generator
from gateway.model_pool import ModelPool
from gateway.model_worker import DEFAULT_MAX_STREAM_BUFFER
from gateway.server import GenerationServicer
from gateway.tokenizers import TokenizerPool
from genrpc.errors import exits_on_config_error
from genrpc.flags import server_parser
from genrpc.logs import setup_logging
from genrpc.security import ClientSecurity, ServerSecurity, add_client_flags, server_security
from genrpc.serving import run_until_signal, start_server
from genrpc.tracing import setup_tracing
from genrpc.v1 import generation_pb2, generation_pb2_grpc

log = logging.getLogger("genrpc.gateway")


def parse_args(argv=None):
    parser = server_parser("genrpc gateway", default_port=50051, default_metrics_port=9051)
    parser.add_argument("--tokenizer-addrs", default="127.0.0.1:50052", help="tokenizer replicas, comma-separated")
    parser.add_argument("--model-addrs", default="127.0.0.1:50053", help="model workers, comma-separated")
    add_client_flags(parser)
    parser.add_argument("--parse-special-tokens", action="store_true",
                        help="special-token markup in prompts and chat messages (e.g. <|im_start|>) becomes special "
                             "tokens, as tokenizer(text) does: only for callers trusted to write raw markup. Off: "
                             "it is plain text, and only the chat template's own markup is special")
    parser.add_argument("--max-inflight-sequences", type=int, default=512,
                        help="sequences in flight at once; past it RESOURCE_EXHAUSTED")
    parser.add_argument("--max-inflight-per-client", type=int, default=0,
                        help="one client's sequences in flight at most (0: half of --max-inflight-sequences); past "
                             "it RESOURCE_EXHAUSTED to that client only. A client is its bearer token when auth is "
                             "on, else its x-genrpc-client metadata value, else its IP address")
    parser.add_argument("--max-stream-buffer", type=int, default=DEFAULT_MAX_STREAM_BUFFER,
                        help="tokens a sequence's stream may hold that its client has not read; past it the "
                             "sequence ends (RESOURCE_EXHAUSTED) and stops on the model worker")
    args = parser.parse_args(argv)
    if args.max_stream_buffer < 1:
        parser.error(f"--max-stream-buffer={args.max_stream_buffer} must be >= 1")
    if args.max_inflight_sequences < 1 or not 0 <= args.max_inflight_per_client <= args.max_inflight_sequences:
        parser.error(f"--max-inflight-sequences={args.max_inflight_sequences} must be >= 1 and "
                     f"--max-inflight-per-client={args.max_inflight_per_client} in [0, --max-inflight-sequences]")
    return args


def _addresses(value: str) -> list[str]:
    return [a.strip() for a in value.split(",") if a.strip()]


async def serve(args, security: ServerSecurity) -> None:
    internal = ClientSecurity.from_args(args)
    tokenizers = TokenizerPool(_addresses(args.tokenizer_addrs), internal)
    handle_box: list = []

    def on_health_change(healthy: bool) -> None:
        if handle_box:
            asyncio.get_running_loop().create_task(handle_box[0].set_ready(healthy))
        if healthy:  # the line to wait for: from now on a request can succeed
            log.info("gateway READY on %s:%d: a model worker is connected (health SERVING)", args.host,
                     handle_box[0].port if handle_box else args.port)
        else:
            log.warning("gateway NOT READY: no model worker is connected (health NOT_SERVING)")

    models = ModelPool(_addresses(args.model_addrs), tokenizers, on_health_change, internal, args.max_stream_buffer)
    metrics.TRACKED_SEQUENCES.set_function(lambda: sum(len(w.sequences) for w in models.workers))
    generator = Generator(tokenizers, models, args.max_inflight_sequences, args.parse_special_tokens,
                          args.max_inflight_per_client)
    service_name = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name

    def register(server):
        generation_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(generator), server)
        return [service_name]

    handle = await start_server("gateway", register, args.host, args.port, args.metrics_port, security)
    handle_box.append(handle)
    await handle.set_ready(models.any_healthy)  # NOT_SERVING until a model worker is connected
    models.start()
    await run_until_signal(handle, args.grace, args.port_file, on_stop=models.close)


@exits_on_config_error
def main(argv=None) -> None:
    args = parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    setup_tracing("genrpc-gateway", args.trace_exporter)
    asyncio.run(serve(args, server_security(args, internal=False)))


if __name__ == "__main__":
    main()
