"""`genrpc`: a command line for people.

    genrpc generate "Tell me a joke" [--stream] [--chat] [--max-new-tokens N] [--do-sample ...]
    genrpc tokenize "some text"
    genrpc info
"""

from __future__ import annotations

import argparse
import sys

import grpc

from genrpc.v1 import generation_pb2 as pb
from genrpc.v1 import generation_pb2_grpc

FINISH = {v.number: v.name.removeprefix("FINISH_REASON_").lower() for v in pb.FinishReason.DESCRIPTOR.values}


def _config(args) -> pb.GenerationConfig:
    config = pb.GenerationConfig(stop=args.stop or [])
    for name in ("max_new_tokens", "min_new_tokens", "temperature", "top_k", "top_p", "min_p", "typical_p",
                 "repetition_penalty", "seed", "time_limit_ms", "priority"):
        value = getattr(args, name)
        if value is not None:
            setattr(config, name, value)
    if args.do_sample:
        config.do_sample = True
    if args.ignore_eos:
        config.ignore_eos = True
    return config


def _chat(text: str, system: str | None) -> pb.Chat:
    messages = [pb.Message(role="system", content=system)] if system else []
    return pb.Chat(messages=[*messages, pb.Message(role="user", content=text)])


def cmd_generate(stub, args) -> None:
    config = _config(args)
    if args.stream:
        request = pb.GenerateStreamRequest(config=config)
        if args.chat:
            request.chat.CopyFrom(_chat(args.prompt, args.system))
        else:
            request.prompt = args.prompt
        last = None
        for last in stub.GenerateStream(request, timeout=args.timeout):
            sys.stdout.write(last.text)
            sys.stdout.flush()
        print()
        if last is not None and args.verbose:
            print(f"[{FINISH[last.finish_reason]}, {last.generated_tokens} tokens, seed {last.seed}]",
                  file=sys.stderr)
        return
    request = pb.GenerateRequest(config=config)
    if args.chat:
        request.chats.append(_chat(args.prompt, args.system))
    else:
        request.prompts.append(args.prompt)
    completion = stub.Generate(request, timeout=args.timeout).completions[0]
    print(completion.text)
    if args.verbose:
        print(f"[{FINISH[completion.finish_reason]}, {completion.generated_tokens} tokens, "
              f"seed {completion.seed}]", file=sys.stderr)


def cmd_tokenize(stub, args) -> None:
    result = stub.Tokenize(pb.TokenizeRequest(prompts=[args.text]), timeout=args.timeout).prompts[0]
    for token_id, token in zip(result.token_ids, result.tokens):
        print(f"{token_id}\t{token}")
    print(f"{result.num_tokens} tokens", file=sys.stderr)


def cmd_info(stub, args) -> None:
    print(stub.ModelInfo(pb.ModelInfoRequest(), timeout=args.timeout), end="")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genrpc", description="Call a genrpc gateway.")
    p.add_argument("--addr", default="127.0.0.1:50051", help="gateway address")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text")
    g.add_argument("prompt")
    g.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    g.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    g.add_argument("--system", help="system message (with --chat)")
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--min-new-tokens", type=int)
    g.add_argument("--do-sample", action="store_true")
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--min-p", type=float)
    g.add_argument("--typical-p", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--time-limit-ms", type=int)
    g.add_argument("--priority", type=int, help="-100 .. 100, higher is more urgent (default 0)")
    g.add_argument("-v", "--verbose", action="store_true", help="print finish reason, tokens and seed")
    g.set_defaults(func=cmd_generate)
    t = sub.add_parser("tokenize", help="show the tokens of a text")
    t.add_argument("text")
    t.set_defaults(func=cmd_tokenize)
    i = sub.add_parser("info", help="describe the served model")
    i.set_defaults(func=cmd_info)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    with grpc.insecure_channel(args.addr) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        try:
            args.func(stub, args)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
