"""Checks every request field and resolves unset ones to the model's defaults.

Pure logic: no protobuf, no I/O. Every refusal is an InvalidArgument whose
message names the field, the value and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from gateway.structured import grammar_for
from genrpc.errors import InvalidArgument, NotFound
from genrpc.limits import (
    MAX_BEAMS,
    MAX_CACHE_SALT,
    MAX_DECAY_FACTOR,
    MAX_DECAY_START,
    MAX_FORCED_EOS,
    MAX_LOGIT_BIAS,
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_MATCHING_NGRAM,
    MAX_NO_REPEAT_NGRAM,
    MAX_OCCURRENCE_PENALTY,
    MAX_PRIORITY,
    MAX_PROMPT_LOOKUP,
    MAX_RETURN_SEQUENCES,
    MAX_SEQUENCE_BIAS,
    MAX_SEQUENCE_BIAS_LENGTH,
    MAX_SUPPRESS_TOKENS,
    MAX_TIME_LIMIT_MS,
    MAX_TOP_LOGPROBS,
    MAX_WATERMARK_BIAS,
    MAX_WATERMARK_CONTEXT,
    MAX_WATERMARK_KEY,
    WATERMARK_DEFAULTS,
    WATERMARK_SCHEMES,
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
    no_repeat_ngram_size: int | None = None
    epsilon_cutoff: float | None = None
    eta_cutoff: float | None = None
    suppress_tokens: list[int] = field(default_factory=list)
    begin_suppress_tokens: list[int] = field(default_factory=list)
    forced_eos_token_id: list[int] = field(default_factory=list)
    exponential_decay_length_penalty: tuple[int, float] | None = None  # (start_index, decay_factor)
    sequence_bias: list[tuple[list[int], float]] = field(default_factory=list)
    renormalize_logits: bool | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    watermarking_config: dict | None = None  # the fields of WatermarkingConfig that are set
    max_matching_ngram_size: int | None = None
    # beam search's
    num_beams: int | None = None
    length_penalty: float | None = None
    early_stopping: int = 0  # EarlyStopping; 0: unset
    num_beam_groups: int | None = None
    diversity_penalty: float | None = None
    adapter: str | None = None


@dataclass
class ModelLimits:
    """What the served model allows and what it does by default."""

    max_context: int
    vocab_size: int
    defaults: RequestedConfig  # every sampling field set
    adapters: tuple[str, ...] = ()  # the LoRA adapters requests may name


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
    # generate()'s other processors; neutral values: off
    no_repeat_ngram_size: int = 0
    epsilon_cutoff: float = 0.0
    eta_cutoff: float = 0.0
    suppress_tokens: list[int] = field(default_factory=list)
    begin_suppress_tokens: list[int] = field(default_factory=list)
    forced_eos_token_id: list[int] = field(default_factory=list)
    exponential_decay_length_penalty: tuple[int, float] | None = None
    sequence_bias: list[tuple[list[int], float]] = field(default_factory=list)
    renormalize_logits: bool = False
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    watermarking_config: dict | None = None  # every field, transformers' defaults filled in
    max_matching_ngram_size: int | None = None  # None: the model worker's
    num_beams: int = 1  # beam search (generate()'s names); 1: off
    length_penalty: float = 1.0
    early_stopping: int = 0  # genrpc.v1.EarlyStopping; 0 (unset): false
    adapter: str = ""  # a LoRA adapter; "": the base model

    @property
    def stop_strings(self) -> list[str]:
        """What the model worker ends beams on inside a beam search (its text is cut here as ever)."""
        return list(self.stop) if self.num_beams > 1 else []


def _check(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise InvalidArgument.field(f"config.{name}", value, allowed)


def _id_checks(name: str, ids: list[int], most: int, vocab: int) -> list:
    """At most `most` token ids, each in the vocabulary."""
    return [(name, f"{len(ids)} ids", len(ids) <= most, f"at most {most} ids"),
            *((f"{name}[{i}]", t, 0 <= t < vocab, f"must be in [0, {vocab - 1}]") for i, t in enumerate(ids))]


def _decay_checks(decay: tuple[int, float] | None) -> list:
    if decay is None:
        return []
    start, factor = decay
    return [("exponential_decay_length_penalty.start_index", start, 0 <= start <= MAX_DECAY_START,
             f"must be in [0, {MAX_DECAY_START}]"),
            ("exponential_decay_length_penalty.decay_factor", factor,
             _finite_in(factor, 0.0, MAX_DECAY_FACTOR, True), f"must be in (0, {MAX_DECAY_FACTOR:g}]")]


def _beam_checks(req: RequestedConfig, v: dict) -> list:
    """Beam search's fields, and what it does not combine with (generate() samples beams with
    do_sample; not served here)."""
    beams, samples = v["num_beams"], v["num_return_sequences"]
    groups = "group beam search is not served (transformers 5 moved it out of generate())"
    checks = [("num_beams", beams, 1 <= beams <= MAX_BEAMS, f"must be in [1, {MAX_BEAMS}] (1: no beam search)"),
              ("length_penalty", v["length_penalty"], math.isfinite(v["length_penalty"]), "must be a finite number"),
              ("early_stopping", req.early_stopping, req.early_stopping in (0, 1, 2, 3),
               "must be EARLY_STOPPING_TRUE, _FALSE or _NEVER"),
              ("num_beam_groups", req.num_beam_groups, req.num_beam_groups in (None, 1), f"must be 1: {groups}"),
              ("diversity_penalty", req.diversity_penalty, not req.diversity_penalty,
               f"must be unset or 0: {groups}")]
    if beams > 1:
        why = "with num_beams > 1"
        checks += [
            ("do_sample", True, not v["do_sample"], f"must be false {why}: beam sampling is not served"),
            ("num_return_sequences", samples, samples <= beams, f"must be at most num_beams={beams}"),
            ("logprobs", True, not (req.logprobs or req.top_logprobs),
             f"must be off {why}: each sequence's sequence_score comes back instead"),
            ("prompt_logprobs", req.prompt_logprobs, req.prompt_logprobs is None, f"must be unset {why}"),
            (str(req.structured_output and req.structured_output[0]), "set", req.structured_output is None,
             f"structured output is not served {why}")]
    return checks


def _watermark_checks(given: dict | None) -> list:
    if given is None:
        return []
    w = {**WATERMARK_DEFAULTS, **given}
    name = "watermarking_config."
    return [(name + "greenlist_ratio", w["greenlist_ratio"], _finite_in(w["greenlist_ratio"], 0.0, 1.0, True)
             and w["greenlist_ratio"] < 1.0, "must be in (0, 1)"),
            (name + "bias", w["bias"], _finite_in(w["bias"], 0.0, MAX_WATERMARK_BIAS, False),
             f"must be in [0, {MAX_WATERMARK_BIAS:g}]"),
            (name + "hashing_key", w["hashing_key"], 1 <= w["hashing_key"] <= MAX_WATERMARK_KEY,
             f"must be in [1, {MAX_WATERMARK_KEY}]"),
            (name + "seeding_scheme", w["seeding_scheme"], w["seeding_scheme"] in WATERMARK_SCHEMES,
             f"must be one of {', '.join(WATERMARK_SCHEMES)}"),
            (name + "context_width", w["context_width"], 1 <= w["context_width"] <= MAX_WATERMARK_CONTEXT,
             f"must be in [1, {MAX_WATERMARK_CONTEXT}]")]


def _string_checks(name: str, values: list[str], most: int, longest: int, noun: str) -> list:
    """At most `most` strings, each of 1 .. `longest` characters."""
    return [(name, f"{len(values)} strings", len(values) <= most, f"at most {most} {noun}s"),
            *((f"{name}[{i}]", value, 1 <= len(value) <= longest, f"a {noun} must have 1 to {longest} characters")
              for i, value in enumerate(values))]


def _finite_in(value: float, low: float, high: float, low_open: bool) -> bool:
    if not math.isfinite(value):
        return False
    return (low < value if low_open else low <= value) and value <= high


def check_truncate(value: int, max_context: int, name: str) -> int:
    if not 1 <= value <= max_context - 1:
        raise InvalidArgument.field(name, value, f"must be in [1, {max_context - 1}]")
    return value


def _given(value, default):
    return default if value is None else value


def resolve_config(req: RequestedConfig, limits: ModelLimits) -> ResolvedConfig:
    """The request's config with unset fields resolved to the model's defaults, after every check
    in `_checks` (in order: the first that fails is the error)."""
    d = limits.defaults
    max_new = _given(req.max_new_tokens, d.max_new_tokens)
    do_sample = _given(req.do_sample, bool(d.do_sample))
    values = dict(
        max_new_tokens=max_new, min_new_tokens=_given(req.min_new_tokens, 0), do_sample=do_sample,
        temperature=_given(req.temperature, d.temperature), top_k=_given(req.top_k, d.top_k),
        top_p=_given(req.top_p, d.top_p), min_p=_given(req.min_p, d.min_p),
        typical_p=_given(req.typical_p, d.typical_p),
        repetition_penalty=_given(req.repetition_penalty, d.repetition_penalty),
        top_logprobs=_given(req.top_logprobs, 0), priority=_given(req.priority, 0),
        num_return_sequences=_given(req.num_return_sequences, 1),
        no_repeat_ngram_size=_given(req.no_repeat_ngram_size, 0), epsilon_cutoff=_given(req.epsilon_cutoff, 0.0),
        eta_cutoff=_given(req.eta_cutoff, 0.0), renormalize_logits=bool(req.renormalize_logits),
        frequency_penalty=_given(req.frequency_penalty, 0.0), presence_penalty=_given(req.presence_penalty, 0.0),
        num_beams=_given(req.num_beams, 1), length_penalty=_given(req.length_penalty, 1.0))
    for name, value, ok, allowed in _checks(req, limits, values):
        _check(ok, name, value, allowed)
    if req.adapter and req.adapter not in limits.adapters:
        served = ", ".join(limits.adapters) or "none"
        raise NotFound(f"config.adapter={req.adapter!r}: no such LoRA adapter (served: {served}; ModelInfo.adapters)")
    grammar = grammar_for(*req.structured_output) if req.structured_output is not None else ""
    return ResolvedConfig(
        **{k: v for k, v in values.items() if k != "top_logprobs"},
        max_new_tokens_explicit=req.max_new_tokens is not None,
        seed=req.seed,
        stop=list(req.stop),
        include_stop_sequence=bool(req.include_stop_sequence),
        stop_token_ids=list(req.stop_token_ids),
        ignore_eos=bool(req.ignore_eos),
        skip_special_tokens=req.skip_special_tokens if req.skip_special_tokens is not None else True,
        truncate_input_tokens=req.truncate_input_tokens,
        time_limit_ms=req.time_limit_ms,
        logprobs=bool(req.logprobs) or values["top_logprobs"] > 0,
        top_logprobs=values["top_logprobs"],
        prompt_lookup_num_tokens=req.prompt_lookup_num_tokens,
        grammar=grammar,
        logit_bias=dict(req.logit_bias),
        bad_words=list(req.bad_words),
        prompt_logprobs=req.prompt_logprobs,
        cache_salt=req.cache_salt,
        suppress_tokens=list(req.suppress_tokens),
        begin_suppress_tokens=list(req.begin_suppress_tokens),
        forced_eos_token_id=list(req.forced_eos_token_id),
        exponential_decay_length_penalty=req.exponential_decay_length_penalty,
        sequence_bias=[(list(ids), bias) for ids, bias in req.sequence_bias],
        max_matching_ngram_size=req.max_matching_ngram_size,
        early_stopping=req.early_stopping,
        adapter=req.adapter or "",
        watermarking_config=(None if req.watermarking_config is None
                             else {**WATERMARK_DEFAULTS, **req.watermarking_config}),
    )


def _checks(req: RequestedConfig, limits: ModelLimits, v: dict) -> list[tuple[str, object, bool, str]]:
    """Every check of a config, as (field, value, holds, what is allowed); `v`: the resolved values."""
    ctx, vocab = limits.max_context, limits.vocab_size
    max_new, min_new, samples = v["max_new_tokens"], v["min_new_tokens"], v["num_return_sequences"]
    lookup, salt = req.prompt_lookup_num_tokens, req.cache_salt
    greedy_hint = ("for greedy decoding set do_sample=false" if v["do_sample"]
                   else "it is unused without do_sample=true: leave it unset")
    return [
        ("max_new_tokens", req.max_new_tokens, req.max_new_tokens is None or 1 <= max_new <= ctx - 1,
         f"must be in [1, {ctx - 1}] (the model's context is {ctx} tokens)"),
        ("min_new_tokens", min_new, 0 <= min_new <= max_new, f"must be in [0, max_new_tokens={max_new}]"),
        ("temperature", v["temperature"], _finite_in(v["temperature"], 0.0, MAX_TEMPERATURE, True),
         f"must be a number in (0, {MAX_TEMPERATURE:g}]; {greedy_hint}"),
        ("top_k", v["top_k"], 0 <= v["top_k"] <= INT32_MAX, "must be >= 0 (0 turns it off)"),
        ("top_p", v["top_p"], _finite_in(v["top_p"], 0.0, 1.0, True), "must be in (0, 1]"),
        ("min_p", v["min_p"], _finite_in(v["min_p"], 0.0, 1.0, False), "must be in [0, 1]"),
        ("typical_p", v["typical_p"], _finite_in(v["typical_p"], 0.0, 1.0, True), "must be in (0, 1]"),
        ("repetition_penalty", v["repetition_penalty"],
         _finite_in(v["repetition_penalty"], 0.0, MAX_REPETITION_PENALTY, True),
         f"must be in (0, {MAX_REPETITION_PENALTY:g}] (1 turns it off)"),
        *_string_checks("stop", req.stop, MAX_STOP_STRINGS, MAX_STOP_LENGTH, "stop string"),
        ("stop_token_ids", f"{len(req.stop_token_ids)} ids", len(req.stop_token_ids) <= MAX_STOP_TOKEN_IDS,
         f"at most {MAX_STOP_TOKEN_IDS} ids"),
        *((f"stop_token_ids[{i}]", t, 0 <= t < vocab, f"must be in [0, {vocab - 1}]")
          for i, t in enumerate(req.stop_token_ids)),
        ("truncate_input_tokens", req.truncate_input_tokens,
         req.truncate_input_tokens is None or 1 <= req.truncate_input_tokens <= ctx - 1, f"must be in [1, {ctx - 1}]"),
        ("time_limit_ms", req.time_limit_ms,
         req.time_limit_ms is None or 1 <= req.time_limit_ms <= MAX_TIME_LIMIT_MS,
         f"must be in [1, {MAX_TIME_LIMIT_MS}]"),
        ("top_logprobs", v["top_logprobs"], 0 <= v["top_logprobs"] <= MAX_TOP_LOGPROBS,
         f"must be in [0, {MAX_TOP_LOGPROBS}]"),
        ("priority", v["priority"], -MAX_PRIORITY <= v["priority"] <= MAX_PRIORITY,
         f"must be in [-{MAX_PRIORITY}, {MAX_PRIORITY}] (higher is more urgent; default 0)"),
        ("prompt_lookup_num_tokens", lookup, lookup is None or 0 <= lookup <= MAX_PROMPT_LOOKUP,
         f"must be in [0, {MAX_PROMPT_LOOKUP}] (0 turns speculation off)"),
        ("logit_bias", f"{len(req.logit_bias)} entries", len(req.logit_bias) <= MAX_LOGIT_BIAS_ENTRIES,
         f"at most {MAX_LOGIT_BIAS_ENTRIES} entries"),
        *(check for token_id, bias in sorted(req.logit_bias.items()) for check in (
            (f"logit_bias[{token_id}]", token_id, 0 <= token_id < vocab, f"a token id must be in [0, {vocab - 1}]"),
            (f"logit_bias[{token_id}]", bias, _finite_in(bias, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS, False),
             f"a bias must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]"))),
        *_string_checks("bad_words", req.bad_words, MAX_BAD_WORDS, MAX_BAD_WORD_LENGTH, "banned string"),
        ("num_return_sequences", samples, 1 <= samples <= MAX_RETURN_SEQUENCES,
         f"must be in [1, {MAX_RETURN_SEQUENCES}]"),
        ("num_return_sequences", samples, samples == 1 or v["do_sample"] or v["num_beams"] > 1,
         "more than 1 needs do_sample=true or num_beams > 1 (greedy samples would all be the same)"),
        ("prompt_logprobs", req.prompt_logprobs,
         req.prompt_logprobs is None or 0 <= req.prompt_logprobs <= MAX_TOP_LOGPROBS,
         f"must be in [0, {MAX_TOP_LOGPROBS}] (the alternatives returned at each prompt position)"),
        ("cache_salt", salt, salt is None or 1 <= len(salt) <= MAX_CACHE_SALT,
         f"must have 1 to {MAX_CACHE_SALT} characters (unset: this client's own prefix cache)"),
        ("no_repeat_ngram_size", v["no_repeat_ngram_size"], 0 <= v["no_repeat_ngram_size"] <= MAX_NO_REPEAT_NGRAM,
         f"must be in [0, {MAX_NO_REPEAT_NGRAM}] (0 turns it off)"),
        *((name, v[name], _finite_in(v[name], 0.0, 1.0, False) and v[name] < 1.0,
           "must be in [0, 1) (0 turns it off)") for name in ("epsilon_cutoff", "eta_cutoff")),
        *(check for name, most in (("suppress_tokens", MAX_SUPPRESS_TOKENS),
                                   ("begin_suppress_tokens", MAX_SUPPRESS_TOKENS),
                                   ("forced_eos_token_id", MAX_FORCED_EOS))
          for check in _id_checks(name, getattr(req, name), most, vocab)),
        *_decay_checks(req.exponential_decay_length_penalty),
        ("sequence_bias", f"{len(req.sequence_bias)} sequences", len(req.sequence_bias) <= MAX_SEQUENCE_BIAS,
         f"at most {MAX_SEQUENCE_BIAS} sequences"),
        *(check for i, (ids, bias) in enumerate(req.sequence_bias) for check in (
            *_id_checks(f"sequence_bias[{i}].token_ids", ids, MAX_SEQUENCE_BIAS_LENGTH, vocab),
            (f"sequence_bias[{i}].token_ids", "no ids", bool(ids), f"must have 1 .. {MAX_SEQUENCE_BIAS_LENGTH} ids"),
            (f"sequence_bias[{i}].bias", bias, _finite_in(bias, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS, False),
             f"must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]"))),
        *((name, v[name], _finite_in(v[name], -MAX_OCCURRENCE_PENALTY, MAX_OCCURRENCE_PENALTY, False),
           f"must be in [-{MAX_OCCURRENCE_PENALTY:g}, {MAX_OCCURRENCE_PENALTY:g}] (0 turns it off)")
          for name in ("frequency_penalty", "presence_penalty")),
        *_watermark_checks(req.watermarking_config),
        *_beam_checks(req, v),
        ("max_matching_ngram_size", req.max_matching_ngram_size,
         req.max_matching_ngram_size is None or 1 <= req.max_matching_ngram_size <= MAX_MATCHING_NGRAM,
         f"must be in [1, {MAX_MATCHING_NGRAM}]"),
        *([("ignore_eos", True, not req.ignore_eos, f"must be false with config.{req.structured_output[0]}: "
            "structured output ends with EOS where the output is complete")] if req.structured_output else []),
    ]


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
                raise InvalidArgument.field(f"{name}.messages[{j}].role", role,
                                            f"must be one of {', '.join(CHAT_ROLES)}")
            total += len(content)
        if total > MAX_PROMPT_CHARS:
            raise InvalidArgument(f"{name} has {total} characters of content: at most {MAX_PROMPT_CHARS}")


MAX_WATERMARK_IDS = 65_536  # token ids a DetectWatermark request may score


def check_detect_watermark(text: str, token_ids: list[int], watermarking_config: dict | None,
                           z_threshold: float | None, vocab_size: int) -> tuple[dict, float]:
    """A DetectWatermark request's checks: its settings with transformers' defaults filled in, and
    its z threshold."""
    if bool(text) == bool(token_ids):
        raise InvalidArgument("exactly one of text and token_ids must be set")
    if len(text) > MAX_PROMPT_CHARS:
        raise InvalidArgument(f"text has {len(text)} characters: at most {MAX_PROMPT_CHARS}")
    if len(token_ids) > MAX_WATERMARK_IDS:
        raise InvalidArgument(f"token_ids has {len(token_ids)} ids: at most {MAX_WATERMARK_IDS}")
    for i, t in enumerate(token_ids):
        if not 0 <= t < vocab_size:
            raise InvalidArgument.field(f"token_ids[{i}]", t, f"must be in [0, {vocab_size - 1}]")
    for name, value, ok, allowed in _watermark_checks(watermarking_config or {}):
        if not ok:
            raise InvalidArgument.field(name, value, allowed)
    z = 3.0 if z_threshold is None else z_threshold
    if not _finite_in(z, 0.0, 100.0, True):
        raise InvalidArgument.field("z_threshold", z, "must be in (0, 100]; default 3.0")
    return {**WATERMARK_DEFAULTS, **(watermarking_config or {})}, z


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
