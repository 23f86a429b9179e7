"""`genrpc`: a command line for people.

    genrpc [--addr HOST:PORT] [--tls-ca CA] [--token-file FILE] generate "Tell me a joke" [--stream] ...
    genrpc tokenize "some text"
    genrpc info [--json]

Exit status: 0 done; 1 the server refused or failed the call (its status and message on stderr);
2 a bad command line (one line on stderr); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

import grpc
from google.protobuf.json_format import MessageToDict

from genrpc.errors import ConfigError
from genrpc.limits import (
    MAX_BEAMS,
    MAX_PRIORITY,
    MAX_PROMPT_LOOKUP,
    MAX_RETURN_SEQUENCES,
    MAX_TIME_LIMIT_MS,
    MAX_TOP_LOGPROBS,
)
from genrpc.v1 import generation_pb2 as pb
from genrpc.v1 import generation_pb2_grpc

FINISH = {v.number: v.name.removeprefix("FINISH_REASON_").lower() for v in pb.FinishReason.DESCRIPTOR.values}
INT32_MAX = 2**31 - 1


class UsageError(Exception):
    """A bad command line: reported in one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + message
        raise UsageError(message)


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default where it has one worth showing (unset means the server's default)."""

    def _get_help_string(self, action):
        if action.default in (None, False, "", argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def ranged(kind, low, high, low_open: bool = False):
    """An argparse type: `kind` in [low, high] (or (low, high]), else a one-line error naming the range."""
    what = f"{'(' if low_open else '['}{low}, {high}]" if kind is float else f"{low} .. {high}"

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if not (low < value if low_open else low <= value) or not value <= high:
            raise argparse.ArgumentTypeError(f"{text} is out of range: {what}")
        return value
    return convert


# (flag, GenerationConfig field, argparse type, help)
GENERATION_FLAGS = [
    ("--max-new-tokens", "max_new_tokens", ranged(int, 1, INT32_MAX),
     "tokens to generate at most (model default, else 20)"),
    ("--min-new-tokens", "min_new_tokens", ranged(int, 0, INT32_MAX), "tokens before EOS may end it (0)"),
    ("--temperature", "temperature", ranged(float, 0.0, 100.0, low_open=True), "sampling temperature (1.0)"),
    ("--top-k", "top_k", ranged(int, 0, INT32_MAX), "keep the k most likely tokens, 0: off (model default, else 50)"),
    ("--top-p", "top_p", ranged(float, 0.0, 1.0, low_open=True), "nucleus sampling (1.0)"),
    ("--min-p", "min_p", ranged(float, 0.0, 1.0), "min-p sampling, 0 .. 1 (0)"),
    ("--typical-p", "typical_p", ranged(float, 0.0, 1.0, low_open=True), "typical sampling (1.0)"),
    ("--repetition-penalty", "repetition_penalty", ranged(float, 0.0, 100.0, low_open=True), "1.0: off"),
    ("--seed", "seed", ranged(int, 0, 2**64 - 1), "reproduce a sample (random when unset)"),
    ("--time-limit-ms", "time_limit_ms", ranged(int, 1, MAX_TIME_LIMIT_MS),
     "stop after this long; the text so far is kept"),
    ("--truncate-input-tokens", "truncate_input_tokens", ranged(int, 1, INT32_MAX),
     "keep only the prompt's last N tokens"),
    ("--top-logprobs", "top_logprobs", ranged(int, 0, MAX_TOP_LOGPROBS),
     f"also the N most likely tokens at each step, 0 .. {MAX_TOP_LOGPROBS}"),
    ("--priority", "priority", ranged(int, -MAX_PRIORITY, MAX_PRIORITY),
     f"{-MAX_PRIORITY} .. {MAX_PRIORITY}, higher is more urgent (0)"),
    ("--num-return-sequences", "num_return_sequences", ranged(int, 1, MAX_RETURN_SEQUENCES),
     f"samples of the prompt, 1 .. {MAX_RETURN_SEQUENCES} (with --do-sample, sample i uses seed + i; "
     "with --num-beams, the best beams)"),
    ("--num-beams", "num_beams", ranged(int, 1, MAX_BEAMS), f"beam search with N beams, 1 .. {MAX_BEAMS} (1: off)"),
    ("--length-penalty", "length_penalty", ranged(float, -100.0, 100.0),
     "beam search: a sequence's score is its log-probability over its length to this power (1.0)"),
    ("--adapter", "adapter", str, "a LoRA adapter the server holds (genrpc info lists them)"),
    ("--prompt-logprobs", "prompt_logprobs", ranged(int, 0, MAX_TOP_LOGPROBS),
     f"also print each prompt token's logprob and N alternatives, 0 .. {MAX_TOP_LOGPROBS}"),
    ("--prompt-lookup-num-tokens", "prompt_lookup_num_tokens", ranged(int, 0, MAX_PROMPT_LOOKUP),
     f"speculative decoding: proposals a step, 0 .. {MAX_PROMPT_LOOKUP}, 0: off (the server's, 8); "
     "the output is the same"),
    ("--cache-salt", "cache_salt", str,
     "share the prompt in the prefix cache with requests naming the same salt (unset: this client's own)"),
]


def _config(args) -> pb.GenerationConfig:
    config = pb.GenerationConfig(stop=args.stop or [], stop_token_ids=args.stop_token_id or [])
    for _, name, _, _ in GENERATION_FLAGS:
        value = getattr(args, name)
        if value is not None:
            setattr(config, name, value)
    for flag in ("do_sample", "ignore_eos", "logprobs", "include_stop_sequence"):
        if getattr(args, flag):
            setattr(config, flag, True)
    if args.keep_special_tokens:
        config.skip_special_tokens = False
    if args.early_stopping:
        config.early_stopping = pb.EarlyStopping.Value("EARLY_STOPPING_" + args.early_stopping.upper())
    if args.json_schema is not None:
        config.json_schema = args.json_schema
    elif args.grammar is not None:
        config.grammar = args.grammar
    elif args.regex is not None:
        config.regex = args.regex
    elif args.choice:
        config.choice.options.extend(args.choice)
    elif args.json_object:
        config.json_object = True
    for item in args.logit_bias or []:
        token_id, bias = item
        config.logit_bias[token_id] = bias
    config.bad_words.extend(args.bad_word or [])
    return config


def _file_text(path: str) -> str:
    """A file's text, as --json-schema and --grammar take them."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None


def _bias(text: str) -> tuple[int, float]:
    """ID=BIAS, as --logit-bias takes it."""
    token_id, sep, bias = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return int(token_id), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not TOKEN_ID=BIAS (e.g. 30=-100)") from None


def _chat(text: str, system: str | None) -> pb.Chat:
    messages = [pb.Message(role="system", content=system)] if system else []
    return pb.Chat(messages=[*messages, pb.Message(role="user", content=text)])


def _logprob_lines(logprobs) -> list[str]:
    lines = []
    for item in logprobs:
        alternatives = "  ".join(f"{a.token!r} {a.logprob:.3f}" for a in item.top)
        lines.append(f"{item.token_id}\t{item.token!r}\t{item.logprob:.4f}"
                     + (f"\t{alternatives}" if alternatives else ""))
    return lines


def _print_samples_as_they_end(call, args) -> None:
    """-n N --stream: the samples' messages interleave on the stream, so each sample's text is printed
    whole as soon as that sample ends (its last message), under a header, in the order they end."""
    texts: dict[int, list[str]] = {}
    logprobs: dict[int, list] = {}
    try:
        for message in call:
            i = message.sample_index
            texts.setdefault(i, []).append(message.text)
            logprobs.setdefault(i, []).extend(message.logprobs)
            if message.finish_reason:
                print(f"--- sample {i} (seed {message.seed})")
                print("".join(texts.pop(i)), flush=True)
                if logprobs[i]:
                    print("\n".join(_logprob_lines(logprobs.pop(i))), file=sys.stderr)
                if args.verbose:
                    print(f"[{FINISH[message.finish_reason]}, {message.generated_tokens} tokens, seed {message.seed}]",
                          file=sys.stderr)
    except KeyboardInterrupt:
        call.cancel()
        raise


def cmd_generate(stub, args) -> None:
    config = _config(args)
    if args.stream:
        request = pb.GenerateStreamRequest(config=config)
        if args.chat:
            request.chat.CopyFrom(_chat(args.prompt, args.system))
        else:
            request.prompt = args.prompt
        call = stub.GenerateStream(request, timeout=args.timeout, metadata=args.metadata)
        if (args.num_return_sequences or 1) > 1:
            _print_samples_as_they_end(call, args)
            return
        last, logprobs = None, []
        try:
            for last in call:
                sys.stdout.write(last.text)
                sys.stdout.flush()
                logprobs.extend(last.logprobs)
        except KeyboardInterrupt:
            call.cancel()
            raise
        print()
        if logprobs:
            print("\n".join(_logprob_lines(logprobs)), file=sys.stderr)
        if last is not None and args.verbose:
            print(f"[{FINISH[last.finish_reason]}, {last.generated_tokens} tokens, seed {last.seed}]", file=sys.stderr)
        return
    request = pb.GenerateRequest(config=config)
    if args.chat:
        request.chats.append(_chat(args.prompt, args.system))
    else:
        request.prompts.append(args.prompt)
    completions = stub.Generate(request, timeout=args.timeout, metadata=args.metadata).completions
    if completions[0].prompt_logprobs:
        print("prompt:\n" + "\n".join(_logprob_lines(completions[0].prompt_logprobs)), file=sys.stderr)
    for completion in completions:
        if completion.HasField("sequence_score"):
            print(f"--- sequence {completion.sample_index} (score {completion.sequence_score:.4f})")
        elif len(completions) > 1:
            print(f"--- sample {completion.sample_index} (seed {completion.seed})")
        print(completion.text)
        if completion.logprobs:
            print("\n".join(_logprob_lines(completion.logprobs)), file=sys.stderr)
        if args.verbose:
            print(f"[{FINISH[completion.finish_reason]}, {completion.generated_tokens} tokens, "
                  f"seed {completion.seed}]", file=sys.stderr)


def cmd_tokenize(stub, args) -> None:
    result = stub.Tokenize(pb.TokenizeRequest(prompts=[args.text]), timeout=args.timeout,
                           metadata=args.metadata).prompts[0]
    for token_id, token in zip(result.token_ids, result.tokens):
        print(f"{token_id}\t{token}")
    print(f"{result.num_tokens} tokens", file=sys.stderr)


def cmd_info(stub, args) -> None:
    info = stub.ModelInfo(pb.ModelInfoRequest(), timeout=args.timeout, metadata=args.metadata)
    if args.json:
        print(json.dumps(MessageToDict(info, preserving_proto_field_name=True), indent=2))
        return
    defaults = MessageToDict(info.default_config, preserving_proto_field_name=True)
    rows = [
        ("model", info.model_name),
        ("context", f"{info.max_context_tokens} tokens"),
        ("weights", f"{info.dtype}, quantization {info.quantization} (output layer {info.output_layer or 'none'}), "
                    f"on {info.device}"),
        ("vocabulary", f"{info.vocab_size} tokens; EOS {', '.join(map(str, info.eos_token_ids))}"),
        ("model workers", str(info.num_model_workers)),
        ("KV cache", f"{info.kv_cache_tokens} tokens in blocks of {info.kv_block_size}, prefix caching "
                     f"{'on' if info.prefix_caching else 'off'}"),
        ("attention", f"decoded tokens {info.decode_attention}, prompts {info.prefill_attention}"),
        ("speculation", info.speculation),
        ("adapters", ", ".join(f"{a.name} (rank {a.rank}: {', '.join(a.modules)})" for a in info.adapters) or "none"),
        ("matmul", info.matmul),
        ("cpu", info.cpu),
        ("threads", info.thread_policy),
        ("defaults", ", ".join(f"{k}={v}" for k, v in defaults.items())),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def cmd_adapter_load(stub, args) -> None:
    done = stub.LoadAdapter(pb.LoadAdapterRequest(name=args.name, path=args.path), timeout=args.timeout,
                            metadata=args.metadata)
    print(f"loaded {done.adapter.name} (rank {done.adapter.rank}: {', '.join(done.adapter.modules)}) "
          f"on {done.num_model_workers} model workers")


def cmd_adapter_unload(stub, args) -> None:
    done = stub.UnloadAdapter(pb.UnloadAdapterRequest(name=args.name), timeout=args.timeout, metadata=args.metadata)
    print(f"unloaded {args.name} from {done.num_model_workers} model workers")


def parser() -> Parser:
    p = Parser(prog="genrpc", description="Call a genrpc gateway.",
               formatter_class=Help)
    p.add_argument("--addr", default="127.0.0.1:50051", help="gateway address")
    p.add_argument("--timeout", type=ranged(float, 0.0, 86400.0, low_open=True), default=300.0,
                   help="seconds the call may take")
    p.add_argument("--tls-ca", default="", help="PEM CA of the gateway's certificate: connect over TLS")
    p.add_argument("--tls-cert", default="", help="PEM client certificate, for a gateway that asks for one")
    p.add_argument("--tls-key", default="", help="PEM private key of --tls-cert")
    p.add_argument("--tls-server-name", default="", help="the name the gateway's certificate carries, if not --addr's")
    p.add_argument("--token-file", default="", help="file whose first line is a bearer token (sent only over TLS)")
    p.add_argument("--client", default="", help="x-genrpc-client: the name fair shares count you under")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    g = sub.add_parser("generate", help="generate text", formatter_class=Help)
    g.add_argument("prompt")
    g.add_argument("--stream", action="store_true",
                   help="print tokens as they arrive (with -n N: each sample whole as soon as it ends)")
    g.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    g.add_argument("--system", help="system message (with --chat)")
    for flag, name, kind, help_text in GENERATION_FLAGS:
        names = (flag, "-n") if name == "num_return_sequences" else (flag,)
        g.add_argument(*names, dest=name, type=kind, help=help_text)
    g.add_argument("--do-sample", action="store_true", help="sample (greedy without it)")
    g.add_argument("--early-stopping", choices=["true", "false", "never"],
                   help="beam search: when it may stop before --max-new-tokens (generate()'s; false)")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--include-stop-sequence", action="store_true", help="keep the stop string in the text")
    g.add_argument("--stop-token-id", type=ranged(int, 0, INT32_MAX), action="append",
                   help="a token id that ends generation like EOS (repeatable)")
    structured = g.add_mutually_exclusive_group()
    structured.add_argument("--json-schema", metavar="FILE", type=_file_text,
                            help="constrain the output to this JSON schema")
    structured.add_argument("--json-object", action="store_true", help="constrain the output to a JSON object")
    structured.add_argument("--regex", help="constrain the output to match this regular expression")
    structured.add_argument("--grammar", metavar="FILE", type=_file_text,
                            help="constrain the output to this Lark grammar")
    structured.add_argument("--choice", action="append", help="constrain the output to one of these (repeatable)")
    g.add_argument("--logit-bias", type=_bias, action="append", metavar="ID=BIAS",
                   help="add BIAS (-100 .. 100) to a token's logit (repeatable)")
    g.add_argument("--bad-word", action="append", help="a string the output must not contain (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="generate past EOS up to --max-new-tokens")
    g.add_argument("--keep-special-tokens", action="store_true", help="leave special tokens in the text")
    g.add_argument("--logprobs", action="store_true", help="print each token's log-probability on stderr")
    g.add_argument("-v", "--verbose", action="store_true", help="print finish reason, tokens and seed")
    g.set_defaults(func=cmd_generate)
    t = sub.add_parser("tokenize", help="show the tokens of a text")
    t.add_argument("text")
    t.set_defaults(func=cmd_tokenize)
    i = sub.add_parser("info", help="describe the served model")
    i.add_argument("--json", action="store_true", help="the ModelInfo response as JSON, for scripts")
    i.set_defaults(func=cmd_info)
    a = sub.add_parser("adapters", help="load or unload a LoRA adapter on every model worker (a token with "
                                        "manage_adapters=yes)")
    actions = a.add_subparsers(dest="action", required=True, parser_class=Parser)
    load = actions.add_parser("load", help="serve the PEFT adapter in PATH (on the workers' disk) as NAME")
    load.add_argument("name")
    load.add_argument("path")
    load.set_defaults(func=cmd_adapter_load)
    unload = actions.add_parser("unload", help="stop serving adapter NAME")
    unload.add_argument("name")
    unload.set_defaults(func=cmd_adapter_unload)
    return p


def _channel(args) -> grpc.Channel:
    from genrpc.security import channel_credentials, client_flags_problem

    problem = client_flags_problem(args.tls_ca, args.tls_cert, args.tls_key, args.token_file)
    if problem:
        raise UsageError(problem)
    if not args.tls_ca:
        return grpc.insecure_channel(args.addr)

    try:
        credentials = channel_credentials(args.tls_ca, args.tls_cert, args.tls_key, args.token_file)
    except OSError as exc:
        raise UsageError(f"{exc.filename}: {exc.strerror}")
    except ConfigError as exc:  # a token file that cannot be read says so
        raise UsageError(str(exc))
    options = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
    return grpc.secure_channel(args.addr, credentials, options=options)


def main(argv=None) -> int:
    # Ctrl-C stops a stream even when this process was started with SIGINT ignored or blocked (both
    # are inherited from the parent): the default handler raises KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    try:
        args = parser().parse_args(argv)
        args.metadata = (("x-genrpc-client", args.client),) if args.client else None
        channel = _channel(args)
    except UsageError as exc:
        print(f"genrpc: error: {exc}", file=sys.stderr)
        return 2
    with channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        try:
            args.func(stub, args)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
