"""`python -m tokenizer_svc`: serve the tokenizer of a model folder (default :50052)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os

from genrpc.errors import exits_on_config_error
from genrpc.flags import server_parser
from genrpc.internal.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from genrpc.logs import setup_logging
from genrpc.model_path import DEFAULT_MODEL
from genrpc.security import server_security
from genrpc.serving import run_until_signal, start_server
from genrpc.tracing import setup_tracing
from tokenizer_svc.server import TokenizerServicer
from tokenizer_svc.tokenizer import Tokenizer


def parse_args(argv=None):
    parser = server_parser("genrpc tokenizer service", default_port=50052, default_metrics_port=9052)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model folder, hub id or GGUF file")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads that encode and decode (and the tokenizers library's pool): batches are "
                             "cheap per prompt, and more threads would take cores from a model service beside it")
    return parser.parse_args(argv)


async def serve(args, security) -> None:
    asyncio.get_running_loop().set_default_executor(
        concurrent.futures.ThreadPoolExecutor(args.threads, thread_name_prefix="tokenize"))
    tokenizer = Tokenizer(args.model)

    def register(server):
        tokenizer_pb2_grpc.add_TokenizerServicer_to_server(TokenizerServicer(tokenizer), server)
        return [tokenizer_pb2.DESCRIPTOR.services_by_name["Tokenizer"].full_name]

    handle = await start_server("tokenizer", register, args.host, args.port, args.metrics_port, security)
    await run_until_signal(handle, args.grace, args.port_file)


@exits_on_config_error
def main(argv=None) -> None:
    args = parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    if args.threads < 1:
        raise SystemExit(f"--threads={args.threads} is invalid: at least 1")
    # Read by the tokenizers library when its pool starts (on the first batch), not before.
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    setup_tracing("genrpc-tokenizer", args.trace_exporter)
    asyncio.run(serve(args, server_security(args, internal=True)))


if __name__ == "__main__":
    main()
