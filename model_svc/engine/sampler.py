"""Token selection, each row with its own parameters and its own seeded generator.

The logits processors are transformers' own (repetition penalty, temperature,
top-k, top-p, min-p, typical-p), built once per sequence in the order
`generate()` applies them. Rows that need none of them (plain greedy) are
decided together by one argmax; the others are processed row by row, and a
sampled row draws from its own `torch.Generator`, so a seed gives the same
tokens whatever else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from model_svc.engine.sequence import SamplingParams, Sequence


@dataclass
class SampledToken:
    token_id: int
    logprob: float | None = None  # log-probability under the model's own distribution
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


def build_processors(params: SamplingParams) -> LogitsProcessorList | None:
    """transformers' processors for these parameters, None when the row is plain greedy."""
    processors = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.do_sample:
        if params.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k > 0:
            processors.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(params.top_p))
        if params.min_p > 0.0:
            processors.append(MinPLogitsWarper(params.min_p))
        if params.typical_p < 1.0:
            processors.append(TypicalLogitsWarper(params.typical_p))
    return processors or None


class Sampler:
    def __init__(self, eos_token_ids: list[int]):
        self.eos_token_ids = list(eos_token_ids)

    def prepare(self, seq: Sequence) -> None:
        """Sets up a sequence's processors and generator once, when it is admitted."""
        seq.processors = build_processors(seq.params)
        if seq.params.do_sample:
            seq.generator = torch.Generator(device="cpu").manual_seed(seq.params.seed)

    def _needs_row_work(self, seq: Sequence) -> bool:
        return seq.params.do_sample or seq.processors is not None or self._suppresses_eos(seq)

    def _suppresses_eos(self, seq: Sequence) -> bool:
        return len(seq.output_ids) < seq.params.min_new_tokens

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[SampledToken]:
        """logits: float32 [N, vocab], row i for seqs[i]. Returns one token per row."""
        tokens: list[SampledToken | None] = [None] * len(seqs)
        plain = [i for i, seq in enumerate(seqs) if not self._needs_row_work(seq)]
        if plain:
            rows = logits if len(plain) == len(seqs) else logits[plain]  # no copy when all rows are plain
            chosen = rows.argmax(dim=-1).tolist()
            for i, token_id in zip(plain, chosen):
                tokens[i] = SampledToken(token_id)
        for i, seq in enumerate(seqs):
            if tokens[i] is None:
                tokens[i] = SampledToken(self._select_row(logits[i:i + 1], seq))
        for i, seq in enumerate(seqs):
            if seq.params.logprobs or seq.params.top_logprobs:
                self._add_logprobs(tokens[i], logits[i], seq.params.top_logprobs)
        return tokens  # type: ignore[return-value]

    def _select_row(self, scores: torch.Tensor, seq: Sequence) -> int:
        """scores: [1, vocab]."""
        scores = scores.clone()
        if self._suppresses_eos(seq):
            banned = [t for t in (*self.eos_token_ids, *seq.params.stop_token_ids) if t < scores.shape[-1]]
            scores[:, banned] = -float("inf")
        if seq.processors is not None:
            ids = torch.tensor([seq.token_ids()], dtype=torch.long)
            scores = seq.processors(ids, scores)
        if not seq.params.do_sample:
            return int(scores.argmax(dim=-1))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, num_samples=1, generator=seq.generator))

    @staticmethod
    def _add_logprobs(token: SampledToken, logits: torch.Tensor, top: int) -> None:
        logprobs = torch.log_softmax(logits, dim=-1)  # [vocab]
        token.logprob = float(logprobs[token.token_id])
        if top:
            values, ids = logprobs.topk(top)
            token.top_logprobs = list(zip(ids.tolist(), values.tolist()))
