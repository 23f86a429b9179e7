"""A sequence's state and its token-selection parameters."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Hashable

import torch

from genrpc import limits
from genrpc.limits import MAX_LOGIT_BIAS, MAX_PROMPT_LOOKUP

if TYPE_CHECKING:
    from model_svc.engine.block_manager import BlockTable


class FinishReason(enum.Enum):
    """Token-level reasons the engine ends a sequence (text-level ones live in the gateway)."""

    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    CANCELLED = "cancelled"
    ERROR = "error"


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence picks its tokens; checked on construction."""

    max_new_tokens: int = 20
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_lookup_num_tokens: int = 0  # most tokens a step may propose by prompt lookup (speculation.py); 0: off
    max_matching_ngram_size: int = 0  # the longest n-gram prompt lookup matches; 0: the engine's (speculation.py)
    grammar: str = ""  # structured output: llguidance's grammar text (constraints.py); "": none
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    bad_words_ids: tuple[tuple[int, ...], ...] = ()  # banned token sequences (generate()'s bad_words_ids)
    prompt_logprobs: int | None = None  # set: the prompt tokens' logprobs, with this many alternatives
    # generate()'s other processors (sampler.build_processors applies them in generate()'s order)
    no_repeat_ngram_size: int = 0
    epsilon_cutoff: float = 0.0
    eta_cutoff: float = 0.0
    suppress_tokens: tuple[int, ...] = ()
    begin_suppress_tokens: tuple[int, ...] = ()
    forced_eos_token_id: tuple[int, ...] = ()
    exponential_decay_length_penalty: tuple[int, float] | None = None  # (start_index, decay_factor)
    sequence_bias: tuple[tuple[tuple[int, ...], float], ...] = ()  # (token ids, bias)
    renormalize_logits: bool = False
    frequency_penalty: float = 0.0  # OpenAI's, over the generated tokens
    presence_penalty: float = 0.0
    # (greenlist_ratio, bias, hashing_key, seeding_scheme, context_width): transformers' watermark
    watermarking_config: tuple[float, float, int, str, int] | None = None
    # Beam search (beam.py): generate()'s names; early_stopping is False, True or "never"
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1  # of the beams, how many come back (the group's members)
    stop_strings: tuple[str, ...] = ()  # end a beam inside the search (the gateway cuts the text as ever)

    def __post_init__(self) -> None:
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
            ("min_new_tokens", 0 <= self.min_new_tokens <= self.max_new_tokens, "in [0, max_new_tokens]"),
            ("temperature", math.isfinite(self.temperature) and self.temperature > 0, "> 0"),
            ("top_k", self.top_k >= 0, ">= 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("min_p", 0 <= self.min_p <= 1, "in [0, 1]"),
            ("typical_p", 0 < self.typical_p <= 1, "in (0, 1]"),
            ("repetition_penalty",
             math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0, "> 0"),
            ("seed", 0 <= self.seed < 2**64, "in [0, 2^64)"),
            ("top_logprobs", 0 <= self.top_logprobs <= 20, "in [0, 20]"),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "in [0, 20]"),
            ("prompt_lookup_num_tokens", 0 <= self.prompt_lookup_num_tokens <= MAX_PROMPT_LOOKUP,
             f"in [0, {MAX_PROMPT_LOOKUP}]"),
            ("max_matching_ngram_size", 0 <= self.max_matching_ngram_size <= limits.MAX_MATCHING_NGRAM,
             f"in [0, {limits.MAX_MATCHING_NGRAM}]"),
        ]
        checks += [
            ("logit_bias", all(math.isfinite(b) and abs(b) <= MAX_LOGIT_BIAS for _, b in self.logit_bias),
             f"biases in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}]"),
            ("bad_words_ids", all(self.bad_words_ids), "non-empty token sequences"),
            ("no_repeat_ngram_size", 0 <= self.no_repeat_ngram_size <= limits.MAX_NO_REPEAT_NGRAM,
             f"in [0, {limits.MAX_NO_REPEAT_NGRAM}]"),
            ("epsilon_cutoff", 0 <= self.epsilon_cutoff < 1, "in [0, 1)"),
            ("eta_cutoff", 0 <= self.eta_cutoff < 1, "in [0, 1)"),
            ("suppress_tokens", len(self.suppress_tokens) <= limits.MAX_SUPPRESS_TOKENS,
             f"at most {limits.MAX_SUPPRESS_TOKENS} ids"),
            ("begin_suppress_tokens", len(self.begin_suppress_tokens) <= limits.MAX_SUPPRESS_TOKENS,
             f"at most {limits.MAX_SUPPRESS_TOKENS} ids"),
            ("forced_eos_token_id", len(self.forced_eos_token_id) <= limits.MAX_FORCED_EOS,
             f"at most {limits.MAX_FORCED_EOS} ids"),
            ("exponential_decay_length_penalty", self.exponential_decay_length_penalty is None or (
                0 <= self.exponential_decay_length_penalty[0] <= limits.MAX_DECAY_START
                and 0 < self.exponential_decay_length_penalty[1] <= limits.MAX_DECAY_FACTOR),
             f"start_index in [0, {limits.MAX_DECAY_START}], decay_factor in (0, {limits.MAX_DECAY_FACTOR:g}]"),
            ("sequence_bias", len(self.sequence_bias) <= limits.MAX_SEQUENCE_BIAS and all(
                1 <= len(ids) <= limits.MAX_SEQUENCE_BIAS_LENGTH and math.isfinite(b) and abs(b) <= MAX_LOGIT_BIAS
                for ids, b in self.sequence_bias),
             f"at most {limits.MAX_SEQUENCE_BIAS} sequences of 1 .. {limits.MAX_SEQUENCE_BIAS_LENGTH} ids, biases in "
             f"[-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}]"),
            ("frequency_penalty", abs(self.frequency_penalty) <= limits.MAX_OCCURRENCE_PENALTY,
             f"in [-{limits.MAX_OCCURRENCE_PENALTY:g}, {limits.MAX_OCCURRENCE_PENALTY:g}]"),
            ("presence_penalty", abs(self.presence_penalty) <= limits.MAX_OCCURRENCE_PENALTY,
             f"in [-{limits.MAX_OCCURRENCE_PENALTY:g}, {limits.MAX_OCCURRENCE_PENALTY:g}]"),
            ("watermarking_config", self.watermarking_config is None or (
                0 < self.watermarking_config[0] < 1 and 0 <= self.watermarking_config[1] <= limits.MAX_WATERMARK_BIAS
                and 1 <= self.watermarking_config[2] <= limits.MAX_WATERMARK_KEY
                and self.watermarking_config[3] in limits.WATERMARK_SCHEMES
                and 1 <= self.watermarking_config[4] <= limits.MAX_WATERMARK_CONTEXT),
             "greenlist_ratio in (0, 1), bias in [0, 100], hashing_key in [1, 2^31), seeding_scheme lefthash or "
             "selfhash, context_width in [1, 16]"),
            ("num_beams", 1 <= self.num_beams <= limits.MAX_BEAMS, f"in [1, {limits.MAX_BEAMS}]"),
            ("length_penalty", math.isfinite(self.length_penalty), "finite"),
            ("early_stopping", self.early_stopping in (False, True, "never"), 'False, True or "never"'),
            ("num_return_sequences", 1 <= self.num_return_sequences <= self.num_beams, "in [1, num_beams]"),
            ("stop_strings", len(self.stop_strings) <= limits.MAX_STOP_STRINGS and all(self.stop_strings),
             f"at most {limits.MAX_STOP_STRINGS} non-empty strings"),
        ]
        if self.num_beams > 1:  # what beam search does not combine with, as generate() or as served here
            checks += [
                ("do_sample", not self.do_sample, "False with num_beams > 1 (beam sampling is not served)"),
                ("grammar", not self.grammar, "empty with num_beams > 1 (no structured output in beam search)"),
                ("prompt_logprobs", self.prompt_logprobs is None, "unset with num_beams > 1"),
                ("logprobs", not (self.logprobs or self.top_logprobs),
                 "off with num_beams > 1 (each sequence's score comes back instead)"),
            ]
        for name, ok, allowed in checks:  # (NaN fails every comparison above: refused)
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be {allowed}")

    @property
    def other_processors(self) -> bool:
        """Whether any of generate()'s other processors is on (the sampler runs such a row alone)."""
        return bool(self.no_repeat_ngram_size or self.epsilon_cutoff or self.eta_cutoff or self.suppress_tokens
                    or self.begin_suppress_tokens or self.forced_eos_token_id or self.sequence_bias
                    or self.exponential_decay_length_penalty or self.renormalize_logits
                    or self.frequency_penalty or self.presence_penalty or self.watermarking_config is not None)


@dataclass(eq=False)
class Sequence:
    """One prompt being generated. `seq_id` is opaque to the engine (the server uses (client, id)).
    An entity: compared and hashed by identity, so sets hold it and `list.remove` finds it at once.
    Its tokens are one list, the prompt then the outputs, read without a copy every step."""

    seq_id: Hashable
    tokens: list[int]  # given the prompt; the outputs are appended (`append`)
    params: SamplingParams
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    num_computed_tokens: int = 0  # tokens whose keys and values are in the KV cache
    block_table: BlockTable | None = None  # its blocks while running
    num_preemptions: int = 0
    generator: torch.Generator | None = None
    # The random numbers of the next output positions, drawn from `generator` in order (`uniform`):
    # position i of the output always uses the generator's i-th number, however many positions a step
    # samples at once (speculation samples several and keeps some).
    uniforms: list[float] = field(default_factory=list)
    speculator: object | None = None  # its speculation.Speculator when it may speculate
    constraint: object | None = None  # its constraints.Constraint with structured output
    # With params.prompt_logprobs: entry p - 1 is prompt token p's (id, logprob, [(id, logprob)
    # alternatives]), filled as the prompt's chunks are computed.
    prompt_logprobs: list | None = None
    processors: object | None = None  # the sampler's per-sequence logits processors
    # Scheduling: who asked (fair shares are per tenant), how urgent (higher first), when it arrived
    # (the scheduler numbers arrivals), and when its caller stops waiting (time.monotonic(), or None).
    tenant: str = ""
    priority: int = 0
    arrival: int = 0
    deadline: float | None = None
    last_step: int = 0  # the scheduler's step that last computed it (fair steps run the least recent first)
    cache_salt: bytes | None = None  # its prefix-cache namespace (block_manager.salted_root); None: shared
    # Beam search (beam.py): the group a leader (num_beams > 1) searches for, or a beam computes for;
    # a member is a returned sequence's placeholder: `beam_of` its leader's id, `beam_rank` its place.
    group: object | None = None
    beam_of: Hashable | None = None
    beam_rank: int = 0
    adapter: str = ""  # the LoRA adapter its rows go through (lora.py); "": the base model
    adapter_key: str = ""  # that adapter's name and weights' digest (Engine.add): its prefix-cache namespace

    num_prompt_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = list(self.tokens)  # its own: the caller's list is not appended to
        self.num_prompt_tokens = len(self.tokens)

    @property
    def prompt_ids(self) -> list[int]:
        return self.tokens[:self.num_prompt_tokens]

    @property
    def output_ids(self) -> list[int]:
        """A copy: `append` adds to them."""
        return self.tokens[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.tokens) - self.num_prompt_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def token_ids(self) -> list[int]:
        """The prompt then the outputs: the sequence's own list, not to be changed by the caller."""
        return self.tokens

    def append(self, token_id: int) -> None:
        self.tokens.append(token_id)

    def uniform(self, offset: int = 0) -> float:
        """The random number of output position num_output_tokens + offset (float32, in [0, 1))."""
        while len(self.uniforms) <= offset:
            self.uniforms.append(float(torch.rand((), generator=self.generator)))
        return self.uniforms[offset]

    def consume_uniforms(self, count: int) -> None:
        """`count` output positions were filled: their numbers are spent."""
        del self.uniforms[:count]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
