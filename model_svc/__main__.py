"""`python -m model_svc`: load the model and serve the engine (default :50053)."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import threading
import time
from dataclasses import replace

import torch
from prometheus_client import REGISTRY, Gauge
from prometheus_client.core import GaugeMetricFamily

from genrpc.errors import exits_on_config_error
from genrpc.flags import server_parser
from genrpc.internal.v1 import model_pb2, model_pb2_grpc
from genrpc.launch import available_memory
from genrpc.limits import MAX_PROMPT_LOOKUP
from genrpc.logs import setup_logging
from genrpc.model_path import DEFAULT_MODEL, ModelSource
from genrpc.security import ServerSecurity, server_security
from genrpc.serving import run_until_signal, start_server
from genrpc.tracing import setup_tracing
from model_svc.engine import fused, gemm, kernel_choice, lora
from model_svc.engine.adapter_store import DEFAULT_MAX_LORAS, AdapterStore
from model_svc.engine.block_manager import BLOCK_SIZE, BlockManager
from model_svc.engine.constraints import Grammars
from model_svc.engine.draft import DraftProposer
from model_svc.engine.engine import Engine
from model_svc.engine.kv_cache import GIB, KVCache, arena_tokens
from model_svc.engine.loop import EngineLoop
from model_svc.engine.runner import (
    AMX,
    DECODE_ATTENTION,
    LAYER_LOOP,
    MATMUL,
    NATIVE_MAX_PROMPT,
    PREFILL_ATTENTION,
    ModelRunner,
)
from model_svc.engine.sampler import Sampler
from model_svc.engine.schedule_types import SchedulerConfig
from model_svc.engine.scheduler import Scheduler
from model_svc.loader import DTYPES, OUTPUT_LAYERS, QUANTIZATIONS, load_model
from model_svc.server import ModelWorkerServicer, Subscriptions
from model_svc.threads import LoadMonitor, ThreadPolicy, machine_policy

log = logging.getLogger("genrpc.model")

DEFAULT_PROMPT_LOOKUP = 8  # proposals a step may verify per sequence (the adaptive budget usually asks fewer)


def parse_args(argv=None):
    parser = server_parser("genrpc model service", default_port=50053, default_metrics_port=9053)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model folder, hub id or GGUF file")
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES), help="weights and compute dtype")
    parser.add_argument("--quantize", default="4bit", choices=list(QUANTIZATIONS), help="bitsandbytes quantization")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=0,
                        help="compute threads, fixed (0: adaptive: the CPUs the affinity mask and cgroup quota "
                             "allow, one fewer per core other processes keep busy; see model_svc/threads.py)")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="sequences running at once")
    parser.add_argument("--max-batch-tokens", type=int, default=512, help="tokens computed per step (prefill chunks)")
    parser.add_argument("--max-prefill-tokens", type=int, default=64,
                        help="prompt tokens a step admits whole beside running streams: a prompt up to this "
                             "long is never split; longer ones are chunked by time (--prefill-slowdown)")
    parser.add_argument("--prefill-slowdown", type=float, default=2.0,
                        help="a long prompt's chunk may make a step up to this many times as long as its other "
                             "work: running streams' inter-token latency while a long prompt is prefilled "
                             "(>= 1; higher: faster long prompts, jerkier streams)")
    parser.add_argument("--tenant-slowdown", type=float, default=2.0,
                        help="fair steps: while clients of unequal loads share the worker, a step may take up "
                             "to this many times what the lightest client's rows would alone (by measured step "
                             "times); a flooding client's other sequences skip it (never below the lightest "
                             "one's count), so a light client's tokens come at most about this much slower than "
                             "alone (>= 1; 0: off, every step carries every sequence: throughput first)")
    parser.add_argument("--idle-step-ms", type=float, default=250.0,
                        help="with nothing else running, a long prompt's chunk fills a step of about this long: "
                             "longer prefills faster, but a request arriving meanwhile waits for the step")
    parser.add_argument("--kv-cache-tokens", type=int, default=None,
                        help="KV-cache capacity in tokens; sequences hold what they have computed, in blocks "
                             "(default: what --kv-cache-memory holds at the model's bytes per token)")
    parser.add_argument("--kv-cache-memory", type=float, default=None, metavar="GIB",
                        help="KV-cache memory in GiB, committed at start (default: 1/8 of the memory available "
                             "at start, at most 2 GiB); excludes --kv-cache-tokens")
    parser.add_argument("--block-size", type=int, default=BLOCK_SIZE,
                        help="tokens per KV-cache block: the unit of allocation and of prefix caching")
    parser.add_argument("--match-generate", action="store_true",
                        help="prompts and decoded tokens attend exactly as batch-1 generate() does (bit-identical "
                             "greedy tokens, slower, no prefix caching); excludes the two flags below")
    parser.add_argument("--decode-attention", default=None, choices=list(DECODE_ATTENTION),
                        help="native (default for bfloat16 on the CPU): all decoded tokens of a step in one call "
                             "of a C kernel compiled on first use (falls back to sdpa without a C compiler); "
                             "sdpa: one SDPA call per sequence")
    parser.add_argument("--prefill-attention", default=None, choices=list(PREFILL_ATTENTION),
                        help="native (default with native decode; needs it): prompts attend through the decode "
                             "kernel (chunking-invariant, so prefixes are cached exactly), those over 1024 tokens "
                             "through the long-prompt kernel; sdpa: through the call generate() makes "
                             "(generate()'s very numbers for a prompt, no prefix caching)")
    parser.add_argument("--matmul", default="native", choices=list(MATMUL),
                        help="native (default): bfloat16 models' matrix products on the CPU through a C kernel "
                             "(AVX-512 BF16, or AVX2; 4-bit layers give bitsandbytes' own bits; the output "
                             "embedding, with native attention, rounds in its own order); falls back to library "
                             "where it cannot build or run; library: bitsandbytes' and PyTorch's kernels")
    parser.add_argument("--output-layer", default="auto", choices=["auto", *OUTPUT_LAYERS],
                        help="the output embedding's weights, read every step: auto (default): int8 where the native "
                             "kernel runs (AVX-512 BF16 or AVX2; 4-bit layers, native numerics), else none; "
                             "none: in --dtype, as transformers loads a 4-bit model; int8: a scale per column and 64 "
                             "inputs (half the bytes, as accurate on held-out prompts); nf4: like the 4-bit layers (a "
                             "quarter of the bytes, less accurate; needs --quantize 4bit). See docs/measurements.md")
    parser.add_argument("--layer-loop", default=None, choices=list(LAYER_LOOP),
                        help="native (default with native prefill attention and matmul): a step whose tokens all "
                             "attend through the native kernel, with no LoRA rows, runs its layers in one C call "
                             "(the same kernels, the same bits as the Python loop, less overhead a layer); python: "
                             "always loop over the layers in Python")
    parser.add_argument("--matmul-direct-rows", default="auto",
                        help="auto (default): where the native kernel has the choice (AVX2), time on this CPU up to "
                             "how many rows its products read the weights directly rather than through a decoded "
                             "panel, for this model's shapes, once (cached on disk); N: force N rows (0: always "
                             "the panel). The same bits either way")
    parser.add_argument("--matmul-amx", default="auto", choices=list(AMX),
                        help="auto (default): where the CPU has AMX tiles, time the native 4-bit and int8 products "
                             "on tiles against AVX-512 for this model's shapes at 1-128 rows, once (cached on "
                             "disk), and use tiles if their mean time per row is lower; on/off: force. Tiles "
                             "round their sums differently (their own bits, the same at every row count); see "
                             "docs/engine.md")
    parser.add_argument("--no-prefix-caching", action="store_true",
                        help="compute every prompt in full, instead of reusing the cached blocks of earlier "
                             "sequences with the same leading tokens (only native prefill caches; refused otherwise)")
    parser.add_argument("--prompt-lookup-num-tokens", type=int, default=None,
                        help="speculative decoding by prompt lookup: a request that does not set "
                             "prompt_lookup_num_tokens may propose up to this many tokens a step, copied from "
                             "earlier in its prompt or output and verified in one pass (the output is bit for bit "
                             f"the same; 0: off; at most {MAX_PROMPT_LOOKUP}). Default {DEFAULT_PROMPT_LOOKUP} with "
                             "native decode attention, else 0 (only native decode verifies exactly); with "
                             "--draft-model the most draft tokens a step")
    parser.add_argument("--draft-model", default=None,
                        help="a smaller model with the same vocabulary whose greedy guesses are proposed instead of "
                             "prompt lookup's (loaded unquantized in --dtype); verified exactly like them")
    parser.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                        help="a LoRA adapter in PEFT's format that requests may name (GenerationConfig.adapter); "
                             "repeatable")
    parser.add_argument("--max-lora-rank", type=int, default=lora.DEFAULT_MAX_RANK,
                        help="the largest adapter rank accepted (1 .. 256)")
    parser.add_argument("--max-loras", type=int, default=DEFAULT_MAX_LORAS,
                        help="LoRA adapters held in memory at once (>= 1); past it the least recently used one "
                             "not in use goes back to disk, and a request for an adapter on disk waits while it "
                             "is read"),
    parser.add_argument("--no-vllm-engine", action="store_true",
                        help="do not serve vLLM's engine protocol (vllm.grpc.engine.VllmEngine, for routers such as "
                             "SMG) beside genrpc's own on this port")
    parser.add_argument("--max-waiting", type=int, default=256,
                        help="sequences allowed to wait; past it RESOURCE_EXHAUSTED")
    return parser.parse_args(argv)


def scheduler_config(args) -> SchedulerConfig:
    """The scheduler's settings from the flags, checked (the runner's facts are added later)."""
    try:
        return SchedulerConfig(
            max_num_seqs=args.max_num_seqs, max_batch_tokens=args.max_batch_tokens, max_waiting=args.max_waiting,
            max_prefill_tokens=args.max_prefill_tokens, prefill_slowdown=args.prefill_slowdown,
            idle_step_seconds=args.idle_step_ms / 1000, tenant_slowdown=args.tenant_slowdown)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def check_adapters(args) -> list[tuple[str, str]]:
    """--lora's (name, path) pairs, checked before the weights load: well formed, names distinct."""
    if not 1 <= args.max_lora_rank <= 256:
        raise SystemExit(f"--max-lora-rank={args.max_lora_rank} is invalid: must be in [1, 256]")
    if args.max_loras < 1:
        raise SystemExit(f"--max-loras={args.max_loras} is invalid: must be >= 1")
    try:
        pairs = [lora.parse_flag(value) for value in args.lora]
    except lora.AdapterError as exc:
        raise SystemExit(str(exc)) from None
    names = [name for name, _ in pairs]
    repeated = next((n for n in names if names.count(n) > 1), None)
    if repeated:
        raise SystemExit(f"--lora: the name {repeated!r} is given twice")
    return pairs


def load_adapters(args, loaded) -> list:
    """The --lora adapters, read and checked against the loaded model (a bad one stops start-up)."""
    adapters = []
    for name, path in check_adapters(args):
        try:
            adapters.append(lora.load(name, path, loaded.model.config, args.max_lora_rank))
        except lora.AdapterError as exc:
            raise SystemExit(f"--lora: {exc}") from None
        log.info("LoRA adapter %s from %s", adapters[-1].describe(), path)
    return adapters


def check_kv_cache(args) -> None:
    """--kv-cache-tokens and --kv-cache-memory: each in range, and not both (two sizes of one arena)."""
    if args.block_size < 1:
        raise SystemExit(f"--block-size={args.block_size} is invalid: must be >= 1")
    if args.kv_cache_tokens is not None and args.kv_cache_memory is not None:
        raise SystemExit(f"--kv-cache-tokens={args.kv_cache_tokens} and --kv-cache-memory={args.kv_cache_memory:g} "
                         "both size the KV cache: give one")
    if args.kv_cache_tokens is not None and args.kv_cache_tokens < args.block_size:
        raise SystemExit(f"--kv-cache-tokens={args.kv_cache_tokens} is invalid: must be >= --block-size "
                         f"({args.block_size})")
    if args.kv_cache_memory is not None and not 0 < args.kv_cache_memory <= 1 << 20:
        raise SystemExit(f"--kv-cache-memory={args.kv_cache_memory:g} is invalid: GiB in (0, 1048576]")


def check_output_layer(args) -> str:
    """The output layer the flags ask for, resolved ("auto": int8 where the kernel's int8 product runs with
    native numerics, else none). A quantized one is refused with --match-generate (whose promise is
    generate()'s tokens on the model as transformers loads it), nf4 without 4-bit layers."""
    if args.output_layer == "auto":
        return "int8" if _int8_output_layer_runs(args) else "none"
    if args.output_layer == "none":
        return "none"
    if args.output_layer == "nf4" and args.quantize != "4bit":
        raise SystemExit(f"--output-layer {args.output_layer} quantizes like the 4-bit layers: it needs "
                         f"--quantize 4bit, not {args.quantize}")
    if args.match_generate:
        raise SystemExit(f"--output-layer {args.output_layer}: --match-generate promises generate()'s tokens on the "
                         "model as transformers loads it (output layer unquantized); drop one of them")
    return args.output_layer


def _native_numerics(args) -> bool:
    """Whether the flags give native numerics: bfloat16 on the CPU, native matrix products and attention,
    not --match-generate (elsewhere the 4-bit layers keep bitsandbytes' bits)."""
    return (args.matmul == "native" and not args.match_generate and _native_possible(args)
            and resolve_attention(args, True) == ("native", "native"))


def _int8_output_layer_runs(args) -> bool:
    """Whether an int8 output layer would run through the kernel's int8 product: 4-bit layers, native
    numerics, and a kernel build that has it."""
    if args.quantize != "4bit" or not _native_numerics(args):
        return False
    kernel = gemm.load()
    return kernel is not None and kernel.has_int8


def direct_rows(args) -> int | None:
    """--matmul-direct-rows as the runner takes it (None: measure); refuses a bad value or one that
    cannot apply, at start."""
    value = args.matmul_direct_rows
    if value == "auto":
        return None
    try:
        rows = int(value)
    except ValueError:
        rows = -1
    if not 0 <= rows <= 4096:
        raise SystemExit(f"--matmul-direct-rows={value} is invalid: auto, or a row count in [0, 4096]")
    if args.matmul != "native":
        raise SystemExit("--matmul-direct-rows chooses between the native kernel's paths: drop it with "
                         f"--matmul {args.matmul}")
    return rows


def resolve_attention(args, native_possible: bool) -> tuple[str, str]:
    """The (decode, prefill) attention the flags ask for, each "native" or "sdpa" (decode "generate"
    with --match-generate); refuses contradictory flags at start, naming them. `native_possible`:
    bfloat16 on the CPU, the only place the native kernel runs. The kernel's build can still fail
    later (no C compiler): the runner then uses sdpa, logs it, and ModelInfo reports what runs."""
    decode, prefill = args.decode_attention, args.prefill_attention
    if args.match_generate:
        if decode or prefill:
            raise SystemExit("--match-generate makes prompts and decoded tokens attend as generate() does: "
                             "drop --decode-attention/--prefill-attention")
        if args.no_prefix_caching:
            raise SystemExit("--no-prefix-caching: prefix caching is already off with --match-generate")
        if args.prompt_lookup_num_tokens or args.draft_model:
            raise SystemExit("--prompt-lookup-num-tokens/--draft-model: speculation verifies proposals exactly only "
                             "with native decode attention, not with --match-generate; drop them")
        return "generate", "sdpa"
    if not native_possible and "native" in (decode, prefill):
        raise SystemExit("native attention runs bfloat16 models on the CPU only: for this --dtype/--device (or "
                         "model) use --decode-attention sdpa --prefill-attention sdpa, or drop them")
    decode = decode or ("native" if native_possible else "sdpa")
    if decode == "sdpa" and prefill == "native":
        raise SystemExit("--prefill-attention native needs --decode-attention native (prompts attend through "
                         "the decode kernel)")
    prefill = prefill or decode
    lookup = args.prompt_lookup_num_tokens
    if lookup is not None and not 0 <= lookup <= MAX_PROMPT_LOOKUP:
        raise SystemExit(f"--prompt-lookup-num-tokens={lookup} is invalid: must be in [0, {MAX_PROMPT_LOOKUP}]")
    if args.draft_model and lookup == 0:
        raise SystemExit("--draft-model proposes nothing with --prompt-lookup-num-tokens 0: drop one of them")
    if (lookup or args.draft_model) and decode != "native":
        raise SystemExit("--prompt-lookup-num-tokens/--draft-model: speculation verifies proposals exactly only with "
                         "native decode attention; drop them with --decode-attention sdpa")
    if prefill != "native" and args.no_prefix_caching:
        raise SystemExit(f"--no-prefix-caching: prefix caching is already off with {prefill} prefill attention "
                         "(only native prefill attention caches prefixes)")
    return decode, prefill


def _native_possible(args) -> bool:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return args.dtype == "bfloat16" and device == "cpu"


def build_engine(args) -> tuple:
    """The loaded model, its engine (warmed up), and the thread policy's monitor (sized before the weights
    load, on the thread that will step the engine: OpenMP keeps a pool per thread)."""
    if args.threads < 0:
        raise SystemExit(f"--threads={args.threads} is invalid: 0 (adaptive) or a positive count")
    resolve_attention(args, _native_possible(args))  # contradictory flags stop start-up before the weights load
    check_layer_loop(args)
    direct_rows(args)
    check_amx(args)
    check_kv_cache(args)
    output_layer = check_output_layer(args)
    check_adapters(args)
    scheduler_config(args)
    policy, cpus = machine_policy(args.threads)
    monitor = LoadMonitor(policy, cpus, torch.set_num_threads)
    log.info("compute threads: %s", policy.describe)
    loaded = load_model(args.model, args.dtype, args.quantize, args.device, output_layer=output_layer)
    engine = engine_for(loaded, args)
    start = time.perf_counter()
    engine.warm_up()  # the layers' first calls now, not in the first request's time to first token
    log.info("warm-up: %.2f s", time.perf_counter() - start)
    return loaded, engine, monitor


def check_layer_loop(args) -> None:
    """An explicit --layer-loop native needs the native kernels (it is the default where they run)."""
    if args.layer_loop == "native":
        _, prefill = resolve_attention(args, _native_possible(args))
        if prefill != "native" or args.matmul != "native":
            raise SystemExit("--layer-loop native runs the native kernels' layers: it needs native prefill "
                             f"attention (here {prefill}) and --matmul native (here {args.matmul}); drop it")


def check_amx(args) -> None:
    """--matmul-amx on/off chooses the native kernel's path: refused where that kernel does not run, and
    "on" where it has no AMX tiles (this CPU, or the compiler, has none)."""
    if args.matmul_amx == "auto":
        return
    if not _native_numerics(args):
        raise SystemExit(f"--matmul-amx {args.matmul_amx} chooses the native kernel's path with native numerics, "
                         "which do not run with --matmul library, --match-generate, SDPA attention or outside "
                         "bfloat16 on the CPU (the 4-bit layers keep bitsandbytes' bits there): drop it")
    if args.matmul_amx == "on":
        kernel = gemm.load()
        if kernel is None or not kernel.has_amx:
            raise SystemExit(f"--matmul-amx on: no AMX tiles here ({kernel_choice.cpu_info().describe()}); "
                             "use auto or off")


def engine_for(loaded, args) -> Engine:
    """The engine the flags describe, around a loaded model."""
    decode, prefill = resolve_attention(args, loaded.dtype == "bfloat16" and loaded.device == "cpu")
    try:
        runner = ModelRunner(loaded.model, match_generate=args.match_generate,
                             decode_attention_impl="native" if decode == "generate" else decode,
                             prefill_attention_impl=prefill, matmul=args.matmul, direct_rows=direct_rows(args),
                             layer_loop=args.layer_loop or "native", amx=args.matmul_amx)
    except kernel_choice.AmxUnavailable as e:
        raise SystemExit(f"--matmul-amx {args.matmul_amx}: {e}") from e
    log.info("decode attention: %s; prefill attention: %s; matmul: %s; layer loop: %s", runner.decode_attention,
             runner.prefill_attention, runner.matmul_detail, runner.layer_loop)
    log.info("cpu: %s", kernel_choice.cpu_info().describe())
    adapters = AdapterStore(runner, loaded.model.config, args.max_loras, args.max_lora_rank)
    for adapter in load_adapters(args, loaded):
        adapters.register(adapter)
    check_kv_cache(args)
    per_token = runner.kv_spec.bytes_per_token
    tokens, why = arena_tokens(per_token, args.block_size, args.kv_cache_tokens, args.kv_cache_memory,
                               available_memory())
    log.info("KV cache: %d tokens, %.2f GiB at %d bytes a token (%s)", tokens, tokens * per_token / GIB,
             per_token, why)
    if tokens < loaded.max_context:
        log.warning("KV cache: %d tokens hold less than one sequence of the model's context (%d)", tokens,
                    loaded.max_context)
    num_blocks = tokens // args.block_size
    caching = runner.native_prefill and not args.no_prefix_caching
    if not runner.native_prefill and not args.no_prefix_caching:
        log.info("prefix caching is off: %s prefill attention is not chunking-invariant", runner.prefill_attention)
    blocks = BlockManager(num_blocks, args.block_size, enable_prefix_caching=caching)
    speculation = runner.native_decode is not None
    config = replace(scheduler_config(args), max_cached_prompt=NATIVE_MAX_PROMPT if caching else 0,
                     cache_long_prompts=caching and runner.long_prefill is not None, speculation=speculation)
    draft = load_draft(args.draft_model, loaded) if args.draft_model and speculation else None
    scheduler = Scheduler(blocks, config, loaded.max_context, loaded.eos_token_ids, draft=draft)
    kv_cache = KVCache(runner.kv_spec, num_blocks, args.block_size)
    lookup = args.prompt_lookup_num_tokens
    if runner.native_decode is None:
        if lookup:  # the kernel did not build here (no C compiler): decoded rows attend per sequence
            log.warning("--prompt-lookup-num-tokens=%d: speculation is off: native decode attention is unavailable",
                        lookup)
        lookup = 0
    elif lookup is None:
        lookup = DEFAULT_PROMPT_LOOKUP
    # Greedy rows' argmax through the fused kernels where they build (the same indices as torch's).
    ops = runner.fused or (fused.load() if runner.device.type == "cpu" else None)
    sampler = Sampler(loaded.eos_token_ids, argmax=ops.argmax if ops else None,
                      vocab_size=loaded.model.config.get_text_config().vocab_size)
    tokenizer = tokenizer_for(args.model)
    return Engine(runner, scheduler, sampler, kv_cache, default_prompt_lookup=lookup, grammars=Grammars(tokenizer),
                  tokenizer=tokenizer, adapters=adapters)


def load_draft(path: str, loaded) -> DraftProposer:
    """The --draft-model, unquantized in the served model's dtype and on its device; refused unless
    it shares the served model's vocabulary (its proposals are token ids of that vocabulary)."""
    draft = load_model(path, loaded.dtype, "none", loaded.device)
    if draft.vocab_size != loaded.vocab_size:
        raise SystemExit(f"--draft-model {path}: its vocabulary has {draft.vocab_size} tokens, the served model's "
                         f"{loaded.vocab_size}: a draft must share the served model's tokenizer")
    log.info("draft model: %s (%.0f M parameters)", draft.name,
             sum(p.numel() for p in draft.model.parameters()) / 1e6)
    return DraftProposer(draft.model)


def tokenizer_for(model: str):
    """() -> the served model's tokenizer, loaded on the first call (structured output's grammars and
    beam search's stop strings need it; most servers never do)."""
    @functools.cache
    def tokenizer():
        from transformers import AutoTokenizer

        source = ModelSource.parse(model)
        return AutoTokenizer.from_pretrained(source.name_or_path, **source.kwargs())
    return tokenizer


def register_metrics(engine_loop: EngineLoop, monitor: LoadMonitor, model_name: str = "") -> None:
    scheduler = engine_loop.engine.scheduler
    Gauge("genrpc_model_compute_threads", "threads the engine computes with now (see --threads)").set_function(
        lambda: monitor.policy.threads)
    Gauge("genrpc_model_running_sequences", "sequences in the running batch").set_function(
        lambda: scheduler.num_running)
    Gauge("genrpc_model_waiting_sequences", "sequences waiting for admission").set_function(
        lambda: engine_loop.num_waiting)
    blocks = scheduler.blocks
    Gauge("genrpc_model_kv_cache_used_tokens", "KV-cache tokens in blocks running sequences hold").set_function(
        lambda: blocks.num_used_blocks * blocks.block_size)
    Gauge("genrpc_model_kv_cache_tokens", "KV-cache capacity in tokens").set(scheduler.capacity_tokens)
    Gauge("genrpc_model_kv_blocks_used", "KV-cache blocks held by running sequences").set_function(
        lambda: blocks.num_used_blocks)
    Gauge("genrpc_model_kv_blocks_free", "KV-cache blocks that can be taken (empty or cached)").set_function(
        lambda: blocks.num_free_blocks)
    Gauge("genrpc_model_kv_blocks_cached", "unused KV-cache blocks that keep a prefix for later requests"
          ).set_function(lambda: blocks.num_cached_blocks)
    Gauge("genrpc_model_prefix_cache_queried_tokens", "tokens of admitted sequences looked up in the prefix cache"
          ).set_function(lambda: blocks.num_queried_tokens)
    Gauge("genrpc_model_prefix_cache_hit_tokens", "of those, tokens found there (not computed)").set_function(
        lambda: blocks.num_hit_tokens)
    Gauge("genrpc_model_preemptions", "sequences preempted (freed, to be recomputed) since start").set_function(
        lambda: scheduler.num_preemptions)
    register_router_metrics(engine_loop, model_name)


def register_router_metrics(engine_loop: EngineLoop, model_name: str) -> None:
    """The load a router scores workers by, under vLLM's names (what llm-d's endpoint picker and
    the Gateway API Inference Extension's model-server protocol read): waiting and running
    requests, the KV cache's used fraction, and the cache's block size and blocks as labels."""
    scheduler = engine_loop.engine.scheduler
    blocks = scheduler.blocks
    labels = {"model_name": model_name}
    Gauge("vllm:num_requests_waiting", "requests waiting (genrpc_model_waiting_sequences)",
          list(labels)).labels(**labels).set_function(lambda: engine_loop.num_waiting)
    Gauge("vllm:num_requests_running", "requests running (genrpc_model_running_sequences)",
          list(labels)).labels(**labels).set_function(lambda: scheduler.num_running)
    Gauge("vllm:kv_cache_usage_perc", "KV-cache blocks held by running sequences, a fraction of all (0 .. 1)",
          list(labels)).labels(**labels).set_function(lambda: blocks.num_used_blocks / blocks.num_blocks)
    info = {"block_size": str(blocks.block_size), "num_gpu_blocks": str(blocks.num_blocks),
            "enable_prefix_caching": str(blocks.enable_prefix_caching)}
    Gauge("vllm:cache_config_info", "the KV cache's configuration, as labels (vLLM's name: blocks on any device)",
          list(info)).labels(**info).set(1)
    REGISTRY.register(LoraRequestsInfo(engine_loop))  # adapters may be loaded at run time


class LoraRequestsInfo:
    """vLLM's `vllm:lora_requests_info`, which llm-d's endpoint picker reads for LoRA affinity: the
    adapters of running and of waiting requests (those waiting for their adapter to be read
    included) as comma-separated labels beside the most adapters held at once (--max-loras),
    valued the scrape's time."""

    def __init__(self, engine_loop: EngineLoop):
        self.engine_loop = engine_loop

    def describe(self):
        return []  # collected at scrape time only (the labels change)

    def collect(self):
        scheduler = self.engine_loop.engine.scheduler
        store = self.engine_loop.engine.adapters
        running = sorted({s.adapter for s in list(scheduler.running) if s.adapter})
        waiting = sorted({s.adapter for s in list(scheduler.waiting) if s.adapter} | store.waiting_names())
        family = GaugeMetricFamily("vllm:lora_requests_info", "running and waiting LoRA adapters (labels)",
                                   labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
        family.add_metric([str(store.max_loras), ",".join(running), ",".join(waiting)], time.time())
        yield family


async def serve(args, loaded, engine_loop: EngineLoop, stop: asyncio.Event, ready: threading.Event,
                security: ServerSecurity, thread_policy: ThreadPolicy) -> None:
    """The gRPC server, on its own thread's asyncio loop."""
    loop = asyncio.get_running_loop()
    subs = Subscriptions(loop, engine_loop)
    engine_loop.publish = subs.publish_threadsafe
    Gauge("genrpc_model_event_streams", "open Events streams (one per gateway)").set_function(lambda: len(subs.queues))
    Gauge("genrpc_model_owned_sequences", "unfinished sequences the open Events streams' clients own").set_function(
        lambda: sum(map(len, list(subs.owned.values()))))

    def register(server):
        model_pb2_grpc.add_ModelWorkerServicer_to_server(
            ModelWorkerServicer(loaded, engine_loop, subs, thread_policy, engine_loop.engine.grammars,
                                args.max_lora_rank), server)
        names = [model_pb2.DESCRIPTOR.services_by_name["ModelWorker"].full_name]
        if not args.no_vllm_engine:
            from genrpc.vllm import vllm_engine_pb2_grpc
            from model_svc import vllm_engine
            from model_svc.kv_events import KvEventPublisher

            blocks = engine_loop.engine.scheduler.blocks
            kv_events = KvEventPublisher(loop, blocks) if blocks.enable_prefix_caching else None
            if kv_events is not None:
                engine_loop.after_step = kv_events.drain
                Gauge("genrpc_model_kv_event_streams", "open SubscribeKvEvents streams (routers following the "
                      "prefix cache)").set_function(lambda: len(kv_events.queues))
            vllm_engine_pb2_grpc.add_VllmEngineServicer_to_server(vllm_engine.VllmEngineServicer(
                loaded, engine_loop, subs, engine_loop.engine.tokenizer, args.max_num_seqs, kv_events), server)
            names.append(vllm_engine.SERVICE)
        return names

    handle = await start_server("model", register, args.host, args.port, args.metrics_port, security)
    ready.set()
    await run_until_signal(handle, args.grace, args.port_file, stop=stop)


@exits_on_config_error
class HubKernelNotice(logging.Filter):
    """bitsandbytes warns at import, on CPUs with AVX-512 BF16, that it could not fetch its CPU 4-bit
    kernel from the Hugging Face hub (the `kernels` package). Nothing here needs it: the native
    matmul (the default) runs our own 4-bit kernels, and with --matmul library bitsandbytes uses its
    built-in CPU kernel. A server should not download code at start either, so the warning becomes
    one INFO line that says so."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "kernels-community" in str(record.msg):
            record.levelno, record.levelname, record.args = logging.INFO, "INFO", ()
            record.msg = ("bitsandbytes' optional CPU kernel from the Hugging Face hub (`kernels`) is not "
                          "installed: not needed (the native matmul runs genrpc's 4-bit kernels; --matmul library "
                          "uses bitsandbytes' built-in one)")
        return True


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(HubKernelNotice())
    setup_tracing("genrpc-model", args.trace_exporter)
    security = server_security(args, internal=True)  # on the main thread: it may install a SIGHUP handler
    loaded, engine, monitor = build_engine(args)
    engine_loop = EngineLoop(engine, between_steps=monitor.tick)
    register_metrics(engine_loop, monitor, loaded.name)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    ready = threading.Event()
    failure: list[BaseException] = []

    def server_thread() -> None:
        try:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(serve(args, loaded, engine_loop, stop, ready, security, monitor.policy))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failure.append(exc)
        finally:
            engine_loop.stop()  # the server is done: so is the engine
            ready.set()

    def on_signal(signum, frame) -> None:
        loop.call_soon_threadsafe(stop.set)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    thread = threading.Thread(target=server_thread, name="grpc", daemon=True)
    thread.start()
    ready.wait()
    engine_loop.run()  # on the main thread, where the weights were loaded (see engine/loop.py)
    thread.join(timeout=args.grace + 10)
    if failure:
        raise SystemExit(f"model service failed: {failure[0]!r}")


if __name__ == "__main__":
    main()
