"""Token selection, each row with its own parameters and its own seeded generator.

Three paths, each row on exactly one:
- plain greedy rows: one argmax for all of them;
- sampled rows with top-k set (transformers' default is 50) and no repetition penalty, typical-p
  or min-new-tokens suppression: one vectorized pass for all of them. Temperature, top-k, top-p
  and min-p are applied as transformers' warpers define them, but on each row's top-k candidates
  only (every other token has probability zero anyway), then each row draws from its candidates
  with its own generator;
- everything else: transformers' own processors in `generate()`'s order, row by row: sequence
  bias, repetition penalty (then OpenAI's frequency and presence penalties, ours), no-repeat
  n-grams, forced EOS, the exponential length penalty, suppressed tokens, then the warpers
  (temperature, top-k, top-p, min-p, typical-p, epsilon, eta), a watermark and renormalization.
Every operation is row-wise, so a seed gives the same tokens whatever else shares the batch.
Before any of them, a row's scores get its logit bias, its banned words (-inf for a banned sequence's
last token after the rest of it) and its grammar's mask (constraints.py); other rows are untouched,
and logprobs stay the model's own, from the unadjusted logits.
A sampled row draws with the random number of its output position (Sequence.uniform), so a row
that samples a later position of a sequence (speculation.py: `SampleRow.offset`) draws exactly what
ordinary decoding would draw there; the caller spends the numbers of the positions it keeps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    ExponentialDecayLengthPenalty,
    ForcedEOSTokenLogitsProcessor,
    LogitNormalization,
    LogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    SuppressTokensAtBeginLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
    WatermarkLogitsProcessor,
)

from model_svc.engine.sequence import SamplingParams, Sequence


@dataclass
class SampledToken:
    token_id: int
    logprob: float | None = None  # log-probability under the model's own distribution
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


class OccurrencePenalty(LogitsProcessor):
    """OpenAI's frequency and presence penalties, over the generated tokens only: a token's score
    minus `frequency` times its count so far, minus `presence` if it occurred at all."""

    def __init__(self, prompt_length: int, frequency: float, presence: float):
        self.prompt_length, self.frequency, self.presence = prompt_length, frequency, presence

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[0, self.prompt_length:]
        if not generated.numel():
            return scores
        vocab = scores.shape[-1]
        counts = torch.bincount(generated[generated < vocab], minlength=vocab).to(scores.dtype)
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def build_processors(params: SamplingParams, prompt_length: int = 0, eos_token_ids: list[int] = (),
                     vocab_size: int | None = None) -> LogitsProcessorList | None:
    """transformers' processors for these parameters in generate()'s order (its
    _get_logits_processor; logit_bias, bad words and min_new_tokens are applied before, where
    they commute with these), None when the row is plain greedy. `prompt_length` and
    `eos_token_ids`: what generate() takes from its input and the model; `vocab_size`: the model
    config's (a watermark's green list is drawn from it)."""
    processors = LogitsProcessorList()
    if params.sequence_bias:
        processors.append(SequenceBiasLogitsProcessor([[list(ids), bias] for ids, bias in params.sequence_bias]))
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.frequency_penalty or params.presence_penalty:
        processors.append(OccurrencePenalty(prompt_length, params.frequency_penalty, params.presence_penalty))
    if params.no_repeat_ngram_size:
        processors.append(NoRepeatNGramLogitsProcessor(params.no_repeat_ngram_size))
    if params.forced_eos_token_id:
        processors.append(ForcedEOSTokenLogitsProcessor(prompt_length + params.max_new_tokens,
                                                        list(params.forced_eos_token_id)))
    if params.exponential_decay_length_penalty is not None:
        eos = torch.tensor(list(eos_token_ids), dtype=torch.long)
        processors.append(ExponentialDecayLengthPenalty(params.exponential_decay_length_penalty, eos, prompt_length))
    if params.suppress_tokens:
        processors.append(SuppressTokensLogitsProcessor(list(params.suppress_tokens)))
    if params.begin_suppress_tokens:
        processors.append(SuppressTokensAtBeginLogitsProcessor(list(params.begin_suppress_tokens), prompt_length))
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
        if params.epsilon_cutoff:
            processors.append(EpsilonLogitsWarper(params.epsilon_cutoff))
        if params.eta_cutoff:
            processors.append(EtaLogitsWarper(params.eta_cutoff))
    if params.watermarking_config is not None:
        if vocab_size is None:
            raise ValueError("watermarking needs the model's vocabulary size")
        ratio, bias, key, scheme, width = params.watermarking_config
        processors.append(WatermarkLogitsProcessor(vocab_size, "cpu", greenlist_ratio=ratio, bias=bias,
                                                   hashing_key=key, seeding_scheme=scheme, context_width=width))
    if params.renormalize_logits:
        processors.append(LogitNormalization())
    return processors or None


@dataclass
class SampleRow:
    """One row of logits to select a token from: position seq.num_output_tokens + offset of `seq`'s
    output, after the tokens `before` (proposals not yet in the sequence; len(before) == offset)."""

    seq: Sequence
    offset: int = 0
    before: tuple[int, ...] = ()


def draw(probs: torch.Tensor, uniforms: list[float]) -> list[int]:
    """One index per row of probs [B, n], row i drawn with uniforms[i] in [0, 1): the number is
    looked up in the row's cumulative distribution: torch.multinomial draws an exponential number per
    vocabulary entry instead, twenty times the cost for this vocabulary."""
    uniform = torch.tensor(uniforms, dtype=torch.float32)  # [B]
    cumulative = probs.cumsum(dim=-1)
    # right=True: the first index whose cumulative mass exceeds the draw, so a token of probability 0
    # (an empty interval) is never chosen.
    chosen = torch.searchsorted(cumulative, (uniform * cumulative[:, -1])[:, None], right=True)
    return chosen.clamp_(max=probs.shape[-1] - 1)[:, 0].tolist()


class Sampler:
    def __init__(self, eos_token_ids: list[int], argmax=None, vocab_size: int | None = None):
        """`argmax`: rows [N, V] -> their argmax indices as a list, torch.argmax's very answer (the
        fused kernels' faster one); PyTorch's by default. `vocab_size`: the model config's."""
        self.eos_token_ids = list(eos_token_ids)
        self.vocab_size = vocab_size
        self.argmax = argmax or (lambda rows: rows.argmax(dim=-1).tolist())

    def prepare(self, seq: Sequence) -> None:
        """Sets up a sequence's processors and generator once, when it is admitted."""
        seq.processors = build_processors(seq.params, seq.num_prompt_tokens, self.eos_token_ids, self.vocab_size)
        if seq.params.do_sample:
            seq.generator = torch.Generator(device="cpu").manual_seed(seq.params.seed)

    def _needs_row_work(self, row: SampleRow) -> bool:
        return row.seq.params.do_sample or row.seq.processors is not None or self._suppresses_eos(row)

    def _vectorizable(self, row: SampleRow) -> bool:
        p = row.seq.params
        return (p.do_sample and p.top_k > 0 and p.repetition_penalty == 1.0 and p.typical_p == 1.0
                and not p.other_processors and not self._suppresses_eos(row))

    def _suppresses_eos(self, row: SampleRow) -> bool:
        """min_new_tokens holds EOS back (not under a grammar: it decides when the output may end)."""
        return row.seq.constraint is None and row.seq.num_output_tokens + row.offset < row.seq.params.min_new_tokens

    def adjusted(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        """The scores token selection uses: `logits` with each row's bias, banned words and grammar
        mask applied (a copy, when any row has one; `logits` itself otherwise)."""
        touched = [i for i, row in enumerate(rows) if row.seq.params.logit_bias or row.seq.params.bad_words_ids
                   or row.seq.constraint is not None]
        if not touched:
            return logits
        scores = logits.clone()
        vocab = scores.shape[-1]
        taken: dict[Sequence, int] = {}  # proposals each sequence's grammar took for its later rows
        for i in touched:
            seq, params = rows[i].seq, rows[i].seq.params
            if params.logit_bias:
                ids = [t for t, _ in params.logit_bias]
                scores[i, ids] += torch.tensor([b for _, b in params.logit_bias], dtype=scores.dtype)
            if params.bad_words_ids:
                context = seq.token_ids() + list(rows[i].before)
                banned = [words[-1] for words in params.bad_words_ids
                          if words[-1] < vocab and (len(words) == 1 or context[-(len(words) - 1):] == list(words[:-1]))]
                if banned:
                    scores[i, banned] = -float("inf")
            if seq.constraint is not None:
                # A later position's mask is the grammar's after the proposals before it (the rows
                # of one sequence come in order): taken tentatively here, undone below.
                count = taken.get(seq, 0)
                while count < rows[i].offset and seq.constraint.try_advance(rows[i].before[count]):
                    count += 1
                taken[seq] = count
                if count == rows[i].offset:
                    seq.constraint.mask(scores[i:i + 1])
                else:  # a proposal before it breaks the grammar: verification stops there, this row is unused
                    scores[i] = -float("inf")
            if not bool(torch.isfinite(scores[i]).any()):  # nothing allowed is left: the output ends
                scores[i, [t for t in self.eos_token_ids if t < vocab][:1] or [0]] = 0.0
        for seq, count in taken.items():
            seq.constraint.rollback(count)
        return scores

    def sample(self, logits: torch.Tensor, rows: list[Sequence | SampleRow]) -> list[SampledToken]:
        """logits: float32 [N, vocab], row i for rows[i] (a Sequence: its next position). Returns one
        token per row; spends no random number (the caller spends those of the positions it keeps)."""
        rows = [row if isinstance(row, SampleRow) else SampleRow(row) for row in rows]
        scores = self.adjusted(logits, rows)
        tokens: list[SampledToken | None] = [None] * len(rows)
        plain = [i for i, row in enumerate(rows) if not self._needs_row_work(row)]
        if plain:
            chosen_rows = scores if len(plain) == len(rows) else scores[plain]  # no copy when all rows are plain
            chosen = self.argmax(chosen_rows)
            for i, token_id in zip(plain, chosen):
                tokens[i] = SampledToken(token_id)
        batched = [i for i, row in enumerate(rows) if tokens[i] is None and self._vectorizable(row)]
        if batched:
            chosen = self._sample_top_k_rows(scores[batched], [rows[i] for i in batched])
            for i, token_id in zip(batched, chosen):
                tokens[i] = SampledToken(token_id)
        for i, row in enumerate(rows):
            if tokens[i] is None:
                tokens[i] = SampledToken(self._select_row(scores[i:i + 1], row))
        for i, row in enumerate(rows):
            if row.seq.params.logprobs or row.seq.params.top_logprobs:
                self._add_logprobs(tokens[i], logits[i], row.seq.params.top_logprobs)
        return tokens  # type: ignore[return-value]

    def _select_row(self, scores: torch.Tensor, row: SampleRow) -> int:
        """scores: [1, vocab]."""
        seq = row.seq
        scores = scores.clone()
        if self._suppresses_eos(row):
            banned = [t for t in (*self.eos_token_ids, *seq.params.stop_token_ids) if t < scores.shape[-1]]
            scores[:, banned] = -float("inf")
        if seq.processors is not None:
            ids = torch.tensor([seq.token_ids() + list(row.before)], dtype=torch.long)
            scores = seq.processors(ids, scores)
        if not seq.params.do_sample:
            return int(scores.argmax(dim=-1))
        return draw(torch.softmax(scores, dim=-1), [seq.uniform(row.offset)])[0]

    @staticmethod
    def _sample_top_k_rows(logits: torch.Tensor, rows: list[SampleRow]) -> list[int]:
        """logits: [B, vocab] of sampled rows that all have top_k > 0. One pass for all rows."""
        params = [row.seq.params for row in rows]
        vocab = logits.shape[-1]
        top_k = torch.tensor([min(p.top_k, vocab) for p in params])  # [B]
        scores = logits / torch.tensor([p.temperature for p in params])[:, None]  # [B, V]
        # Each row's candidates, best first: [B, K]. Past a row's own k they are removed, as
        # TopKLogitsWarper removes every score below the k-th.
        candidates, candidate_ids = scores.topk(int(top_k.max()), dim=-1)
        kth = candidates.gather(1, (top_k - 1)[:, None])  # [B, 1]
        candidates = candidates.masked_fill(candidates < kth, -float("inf"))
        top_p = torch.tensor([p.top_p for p in params])[:, None]
        if bool((top_p < 1.0).any()):
            # TopPLogitsWarper removes a token when the tokens no more likely than it (itself
            # included) add up to at most 1 - top_p; best first, that is when the mass of the
            # tokens ranked above it has reached top_p. The best token always stays.
            probs = candidates.softmax(dim=-1)
            mass_above = probs.cumsum(dim=-1) - probs
            remove = mass_above >= top_p
            remove[:, 0] = False
            candidates = candidates.masked_fill(remove, -float("inf"))
        min_p = torch.tensor([p.min_p for p in params])[:, None]
        if bool((min_p > 0.0).any()):
            # MinPLogitsWarper: below min_p times the best token's probability; the best stays.
            probs = candidates.softmax(dim=-1)
            remove = probs < min_p * probs[:, :1]
            remove[:, 0] = False
            candidates = candidates.masked_fill(remove, -float("inf"))
        chosen = draw(candidates.softmax(dim=-1), [row.seq.uniform(row.offset) for row in rows])  # [B, K] probabilities
        return candidate_ids[torch.arange(len(rows)), torch.tensor(chosen)].tolist()

    @staticmethod
    def _add_logprobs(token: SampledToken, logits: torch.Tensor, top: int) -> None:
        logprobs = torch.log_softmax(logits, dim=-1)  # [vocab]
        token.logprob = float(logprobs[token.token_id])
        if top:
            values, ids = logprobs.topk(top)
            token.top_logprobs = list(zip(ids.tolist(), values.tolist()))
