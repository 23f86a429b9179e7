"""A sequence's state and its token-selection parameters."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Hashable

import torch

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
    grammar: str = ""  # structured output: llguidance's grammar text (constraints.py); "": none
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    bad_words_ids: tuple[tuple[int, ...], ...] = ()  # banned token sequences (generate()'s bad_words_ids)
    prompt_logprobs: int | None = None  # set: the prompt tokens' logprobs, with this many alternatives

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
        ]
        checks += [
            ("logit_bias", all(math.isfinite(b) and abs(b) <= MAX_LOGIT_BIAS for _, b in self.logit_bias),
             f"biases in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}]"),
            ("bad_words_ids", all(self.bad_words_ids), "non-empty token sequences"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be {allowed}")


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
