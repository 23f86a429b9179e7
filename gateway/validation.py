"""Checks every request field and resolves unset ones to the model's defaults.

Pure logic: no protobuf, no I/O. Every refusal is an InvalidArgument whose
message names the field, the value and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from gateway.structured import grammar_for
from genrpc.errors import InvalidArgument
from genrpc.limits import (
    MAX_CACHE_SALT,
    MAX_LOGIT_BIAS,
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_PRIORITY,
    MAX_PROMPT_LOOKUP,
    MAX_RETURN_SEQUENCES,
    MAX_TIME_LIMIT_MS,
    MAX_TOP_LOGPROBS,
)

MAX_PROMPTS = 64
MAX_STOP_STRINGS = 32
MAX_STOP_LENGTH = 256
MAX_STOP_TOKEN_IDS = 64
MAX_BAD_WORDS = 64
MAX_BAD_WORD_LENGTH = 256
MAX_PROMPT_CHARS = 1_000_000
MAX_TOKENIZE_CHARS = 1_000_000  # a whole Tokenize request: ~1 s of tokenizing, an answer under 16 MiB for prose
MAX_ANSWER_BYTES = 16 * 1024 * 1024  # one gRPC message (genrpc.serving.MAX_MESSAGE_BYTES)
# A generated token's share of a Generate answer: its id and text; with logprobs, a TokenLogprob
# (id, logprob, text) for it and for each of its top alternatives.
TOKEN_BYTES = 12
LOGPROB_BYTES = 18
MAX_MESSAGES = 1024
MAX_TEMPERATURE = 100.0
MAX_REPETITION_PENALTY = 100.0
CHAT_ROLES = ("system", "user", "assistant", "tool")
INT32_MAX = 2**31 - 1


@dataclass
class RequestedConfig:
    """A GenerationConfig as the client sent it: None means unset."""

    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    include_stop_sequence: bool | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    truncate_input_tokens: int | None = None
    time_limit_ms: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    priority: int | None = None
    prompt_lookup_num_tokens: int | None = None
    structured_output: tuple[str, object] | None = None  # (the oneof's field, its value)
    logit_bias: dict[int, float] = field(default_factory=dict)
    bad_words: list[str] = field(default_factory=list)
    num_return_sequences: int | None = None
    prompt_logprobs: int | None = None
    cache_salt: str | None = None


@dataclass
class ModelLimits:
    """What the served model allows and what it does by default."""

    max_context: int
    vocab_size: int
    defaults: RequestedConfig  # every sampling field set


@dataclass
class ResolvedConfig:
    """Every field decided; what the gateway and the model service act on."""

    max_new_tokens: int
    max_new_tokens_explicit: bool
    min_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    typical_p: float
    repetition_penalty: float
    seed: int | None
    stop: list[str]
    include_stop_sequence: bool
    stop_token_ids: list[int]
    ignore_eos: bool
    skip_special_tokens: bool
    truncate_input_tokens: int | None
    time_limit_ms: int | None
    logprobs: bool
    top_logprobs: int
    priority: int
    prompt_lookup_num_tokens: int | None  # None: the model worker's default
    grammar: str = ""  # structured output as llguidance's grammar text (gateway/structured.py); "": none
    logit_bias: dict[int, float] = field(default_factory=dict)
    bad_words: list[str] = field(default_factory=list)
    num_return_sequences: int = 1
    prompt_logprobs: int | None = None  # None: not asked
    cache_salt: str | None = None  # None: the client's own prefix-cache namespace


def _check(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise InvalidArgument.field(f"config.{name}", value, allowed)


def _check_strings(name: str, values: list[str], most: int, longest: int, noun: str) -> None:
    """At most `most` strings, each of 1 .. `longest` characters."""
    _check(len(values) <= most, name, f"{len(values)} strings", f"at most {most} {noun}s")
    for i, value in enumerate(values):
        _check(1 <= len(value) <= longest, f"{name}[{i}]", value, f"a {noun} must have 1 to {longest} characters")


def _finite_in(value: float, low: float, high: float, low_open: bool) -> bool:
    if not math.isfinite(value):
        return False
    return (low < value if low_open else low <= value) and value <= high


def check_truncate(value: int, max_context: int, name: str) -> int:
    if not 1 <= value <= max_context - 1:
        raise InvalidArgument.field(name, value, f"must be in [1, {max_context - 1}]")
    return value


def resolve_config(req: RequestedConfig, limits: ModelLimits) -> ResolvedConfig:
    d = limits.defaults
    ctx = limits.max_context
    if req.max_new_tokens is not None:
        _check(1 <= req.max_new_tokens <= ctx - 1, "max_new_tokens", req.max_new_tokens,
               f"must be in [1, {ctx - 1}] (the model's context is {ctx} tokens)")
    max_new = req.max_new_tokens if req.max_new_tokens is not None else d.max_new_tokens
    min_new = req.min_new_tokens if req.min_new_tokens is not None else 0
    _check(0 <= min_new <= max_new, "min_new_tokens", min_new, f"must be in [0, max_new_tokens={max_new}]")
    temperature = req.temperature if req.temperature is not None else d.temperature
    do_sample = req.do_sample if req.do_sample is not None else bool(d.do_sample)
    _check(_finite_in(temperature, 0.0, MAX_TEMPERATURE, True), "temperature", temperature,
           f"must be a number in (0, {MAX_TEMPERATURE:g}]; "
           + ("for greedy decoding set do_sample=false" if do_sample
              else "it is unused without do_sample=true: leave it unset"))
    top_k = req.top_k if req.top_k is not None else d.top_k
    _check(0 <= top_k <= INT32_MAX, "top_k", top_k, "must be >= 0 (0 turns it off)")
    top_p = req.top_p if req.top_p is not None else d.top_p
    _check(_finite_in(top_p, 0.0, 1.0, True), "top_p", top_p, "must be in (0, 1]")
    min_p = req.min_p if req.min_p is not None else d.min_p
    _check(_finite_in(min_p, 0.0, 1.0, False), "min_p", min_p, "must be in [0, 1]")
    typical_p = req.typical_p if req.typical_p is not None else d.typical_p
    _check(_finite_in(typical_p, 0.0, 1.0, True), "typical_p", typical_p, "must be in (0, 1]")
    penalty = req.repetition_penalty if req.repetition_penalty is not None else d.repetition_penalty
    _check(_finite_in(penalty, 0.0, MAX_REPETITION_PENALTY, True), "repetition_penalty", penalty,
           f"must be in (0, {MAX_REPETITION_PENALTY:g}] (1 turns it off)")
    _check_strings("stop", req.stop, MAX_STOP_STRINGS, MAX_STOP_LENGTH, "stop string")
    _check(len(req.stop_token_ids) <= MAX_STOP_TOKEN_IDS, "stop_token_ids",
           f"{len(req.stop_token_ids)} ids", f"at most {MAX_STOP_TOKEN_IDS} ids")
    for i, token_id in enumerate(req.stop_token_ids):
        _check(0 <= token_id < limits.vocab_size, f"stop_token_ids[{i}]", token_id,
               f"must be in [0, {limits.vocab_size - 1}]")
    if req.truncate_input_tokens is not None:
        check_truncate(req.truncate_input_tokens, ctx, "config.truncate_input_tokens")
    if req.time_limit_ms is not None:
        _check(1 <= req.time_limit_ms <= MAX_TIME_LIMIT_MS, "time_limit_ms", req.time_limit_ms,
               f"must be in [1, {MAX_TIME_LIMIT_MS}]")
    top_logprobs = req.top_logprobs if req.top_logprobs is not None else 0
    _check(0 <= top_logprobs <= MAX_TOP_LOGPROBS, "top_logprobs", top_logprobs, f"must be in [0, {MAX_TOP_LOGPROBS}]")
    priority = req.priority if req.priority is not None else 0
    _check(-MAX_PRIORITY <= priority <= MAX_PRIORITY, "priority", priority,
           f"must be in [-{MAX_PRIORITY}, {MAX_PRIORITY}] (higher is more urgent; default 0)")
    lookup = req.prompt_lookup_num_tokens
    if lookup is not None:
        _check(0 <= lookup <= MAX_PROMPT_LOOKUP, "prompt_lookup_num_tokens", lookup,
               f"must be in [0, {MAX_PROMPT_LOOKUP}] (0 turns speculation off)")
    _check(len(req.logit_bias) <= MAX_LOGIT_BIAS_ENTRIES, "logit_bias", f"{len(req.logit_bias)} entries",
           f"at most {MAX_LOGIT_BIAS_ENTRIES} entries")
    for token_id, bias in sorted(req.logit_bias.items()):
        _check(0 <= token_id < limits.vocab_size, f"logit_bias[{token_id}]", token_id,
               f"a token id must be in [0, {limits.vocab_size - 1}]")
        _check(_finite_in(bias, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS, False), f"logit_bias[{token_id}]", bias,
               f"a bias must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
    _check_strings("bad_words", req.bad_words, MAX_BAD_WORDS, MAX_BAD_WORD_LENGTH, "banned string")
    samples = req.num_return_sequences if req.num_return_sequences is not None else 1
    _check(1 <= samples <= MAX_RETURN_SEQUENCES, "num_return_sequences", samples,
           f"must be in [1, {MAX_RETURN_SEQUENCES}]")
    _check(samples == 1 or do_sample, "num_return_sequences", samples,
           "more than 1 needs do_sample=true (greedy samples would all be the same)")
    if req.prompt_logprobs is not None:
        _check(0 <= req.prompt_logprobs <= MAX_TOP_LOGPROBS, "prompt_logprobs", req.prompt_logprobs,
               f"must be in [0, {MAX_TOP_LOGPROBS}] (the alternatives returned at each prompt position)")
    if req.cache_salt is not None:
        _check(1 <= len(req.cache_salt) <= MAX_CACHE_SALT, "cache_salt", req.cache_salt,
               f"must have 1 to {MAX_CACHE_SALT} characters (unset: this client's own prefix cache)")
    grammar = ""
    if req.structured_output is not None:
        kind, value = req.structured_output
        _check(not req.ignore_eos, "ignore_eos", True,
               f"must be false with config.{kind}: structured output ends with EOS where the output is complete")
        grammar = grammar_for(kind, value)
    return ResolvedConfig(
        max_new_tokens=max_new,
        max_new_tokens_explicit=req.max_new_tokens is not None,
        min_new_tokens=min_new,
        do_sample=do_sample,
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p,
        repetition_penalty=penalty,
        seed=req.seed,
        stop=list(req.stop),
        include_stop_sequence=bool(req.include_stop_sequence),
        stop_token_ids=list(req.stop_token_ids),
        ignore_eos=bool(req.ignore_eos),
        skip_special_tokens=req.skip_special_tokens if req.skip_special_tokens is not None else True,
        truncate_input_tokens=req.truncate_input_tokens,
        time_limit_ms=req.time_limit_ms,
        logprobs=bool(req.logprobs) or top_logprobs > 0,
        top_logprobs=top_logprobs,
        priority=priority,
        prompt_lookup_num_tokens=lookup,
        grammar=grammar,
        logit_bias=dict(req.logit_bias),
        bad_words=list(req.bad_words),
        num_return_sequences=samples,
        prompt_logprobs=req.prompt_logprobs,
        cache_salt=req.cache_salt,
    )


def validate_prompts(prompts: list[str], chats: list[list[tuple[str, str]]], single: bool) -> None:
    """Exactly one of prompts and chats; sizes bounded; chat roles known; no empty plain prompt."""
    prompt_field, chat_field = ("prompt", "chat") if single else ("prompts", "chats")
    if bool(prompts) == bool(chats):
        raise InvalidArgument(f"exactly one of {prompt_field} and {chat_field} must be set")
    if len(prompts) > MAX_PROMPTS or len(chats) > MAX_PROMPTS:
        raise InvalidArgument(f"{prompt_field if prompts else chat_field}: at most {MAX_PROMPTS} per request")
    for i, prompt in enumerate(prompts):
        name = prompt_field if single else f"prompts[{i}]"
        if not prompt:
            raise InvalidArgument(f"{name} is empty: a prompt needs at least one character")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InvalidArgument(f"{name} has {len(prompt)} characters: at most {MAX_PROMPT_CHARS}")
    for i, chat in enumerate(chats):
        name = chat_field if single else f"chats[{i}]"
        if not chat:
            raise InvalidArgument(f"{name}.messages is empty: a chat needs at least one message")
        if len(chat) > MAX_MESSAGES:
            raise InvalidArgument(f"{name}.messages has {len(chat)} messages: at most {MAX_MESSAGES}")
        total = 0
        for j, (role, content) in enumerate(chat):
            if role not in CHAT_ROLES:
                raise InvalidArgument.field(f"{name}.messages[{j}].role", role, f"must be one of {', '.join(CHAT_ROLES)}")
            total += len(content)
        if total > MAX_PROMPT_CHARS:
            raise InvalidArgument(f"{name} has {total} characters of content: at most {MAX_PROMPT_CHARS}")


def check_tokenize_size(prompts: list[str], chats: list[list[tuple[str, str]]]) -> None:
    """A Tokenize answer carries every token's string: bound the input before any is tokenized."""
    total = sum(map(len, prompts)) + sum(len(content) for chat in chats for _, content in chat)
    if total > MAX_TOKENIZE_CHARS:
        raise InvalidArgument(f"the prompts have {total} characters in all: Tokenize takes at most "
                              f"{MAX_TOKENIZE_CHARS} a request")


def check_answer_size(num_prompts: int, config: ResolvedConfig) -> None:
    """Refuses a Generate whose one answer could pass the message limit (many prompts, many tokens,
    many logprobs each) before any work is done; GenerateStream sends a message a token."""
    per_token = TOKEN_BYTES + (LOGPROB_BYTES * (1 + config.top_logprobs) if config.logprobs else 0)
    size = num_prompts * config.num_return_sequences * config.max_new_tokens * per_token
    if size > MAX_ANSWER_BYTES:
        raise InvalidArgument(
            f"config.max_new_tokens={config.max_new_tokens} with {num_prompts} prompts"
            + (f" x {config.num_return_sequences} samples" if config.num_return_sequences > 1 else "")
            + (f" and config.top_logprobs={config.top_logprobs}" if config.logprobs else "")
            + f" could make an answer of ~{size / 2**20:.0f} MiB, over the {MAX_ANSWER_BYTES // 2**20} MiB one "
            "message may carry: lower them, send fewer prompts, or use GenerateStream")


def fit_to_context(num_prompt_tokens: int, config: ResolvedConfig, max_context: int, where: str) -> int:
    """The max_new_tokens this prompt gets; refuses a prompt that does not fit."""
    if num_prompt_tokens >= max_context:
        raise InvalidArgument(
            f"{where} has {num_prompt_tokens} tokens but the model's context is {max_context} tokens; "
            f"shorten it or set config.truncate_input_tokens (at most {max_context - 1})"
        )
    room = max_context - num_prompt_tokens
    if config.max_new_tokens <= room:
        return config.max_new_tokens
    if config.max_new_tokens_explicit:
        raise InvalidArgument(
            f"config.max_new_tokens={config.max_new_tokens} is invalid: {where} has {num_prompt_tokens} tokens, "
            f"so at most {room} new tokens fit the model's context of {max_context}"
        )
    return room


FIELD_NAMES = [f.name for f in fields(RequestedConfig)]  # GenerationConfig's names, but structured_output: a oneof
