"""Beam search as generate() does it, inside continuous batching.

A request with num_beams = B > 1 enters as one sequence, its group's leader: the scheduler admits,
prefills, ranks and preempts it like any other. Its prompt is computed once; from its last row the
search starts B beams, each a Sequence of its own that shares the prompt's full blocks by reference
and has a copy of the partial last one (scheduler.fork_beams). Each step computes the B beams
together (one token each, beside other traffic) and `BeamSearch.step` picks the B continuations
to keep out of their B x vocabulary candidates: a beam chosen by several becomes several (full
blocks shared, the partial block copied), a beam chosen by none gives its blocks back.

The search itself is transformers' own: `BeamSearch` keeps generate()'s state tensors (batch of
one) and moves them with GenerationMixin's beam helpers (top-k continuations, the next running
beams, the finished beams, the early-stop heuristic), with generate()'s stopping criteria (max
length, EOS, stop strings), so length_penalty, early_stopping (True, False, "never") and their
corner cases are generate()'s by construction. The scores a step adds are the log-softmax of each
beam's logits after the row's processors, as generate() computes them.

A preempted group starts over from its prompt: nothing of a search has been sent (the returned
sequences go out when it ends), and with the default numerics a beam's logits do not depend on its
neighbours, so the search takes the same path again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers.generation.utils import GenerationMixin

from model_svc.engine.sequence import SamplingParams, Sequence

NEG = -1.0e9  # generate()'s "impossible" score
# The helpers are methods of GenerationMixin that use nothing of the model but the class's own static
# helpers: called with the class in place of a model.
_helpers = GenerationMixin


@dataclass
class Result:
    """One returned sequence: its generated tokens and its score (log-probability sum over the
    length to the power length_penalty, as generate()'s sequences_scores)."""

    token_ids: list[int]
    score: float


class BeamSearch:
    """generate()'s beam-search state for one prompt, advanced one step at a time."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], num_eos: int,
                 stopping: Callable[[torch.Tensor], torch.Tensor]):
        """num_eos: the EOS ids the search ends beams on (generate() keeps (1 + num_eos) x B
        candidates a step, at least 2 x B); stopping: candidates [K, length] -> bool [K]."""
        self.num_beams = B = params.num_beams
        self.length_penalty = params.length_penalty
        self.early_stopping = params.early_stopping
        self.prompt_len = L = len(prompt_ids)
        self.max_length = L + params.max_new_tokens
        self.beams_to_keep = max(2, 1 + num_eos) * B
        self.stopping = stopping
        self.top_num_beam_mask = torch.arange(self.beams_to_keep) < B
        self.running = torch.zeros((1, B, self.max_length), dtype=torch.int64)
        self.running[:, :, :L] = torch.tensor(prompt_ids, dtype=torch.int64)
        self.sequences = self.running.clone()
        self.running_scores = torch.zeros((1, B), dtype=torch.float32)
        self.running_scores[:, 1:] = NEG  # only the first beam's candidates count at the first step
        self.beam_scores = torch.full((1, B), NEG, dtype=torch.float32)
        self.is_sent_finished = torch.zeros((1, B), dtype=torch.bool)
        self.improvable = torch.ones((1, 1), dtype=torch.bool)
        self.running_indices = torch.full((1, B, params.max_new_tokens), -1, dtype=torch.int32)
        self.beam_indices = self.running_indices.clone()
        self.cur_len = L
        self.done = False

    def step(self, log_probs: torch.Tensor) -> tuple[list[int], list[int]]:
        """log_probs: [B, vocab] float32, each beam's processed log-probabilities (at the first step,
        the prompt's row repeated). Returns the next running beams as (parent beam, token) lists."""
        B, L, cur = self.num_beams, self.prompt_len, self.cur_len
        scores = (log_probs[None] + self.running_scores[:, :, None]).reshape(1, -1)
        topk_scores, topk_seqs, topk_indices = _helpers._get_top_k_continuations(
            _helpers, accumulated_log_probs=scores, running_sequences=self.running,
            running_beam_indices=self.running_indices, cur_len=cur, decoder_prompt_len=L, do_sample=False,
            beams_to_keep=self.beams_to_keep, num_beams=B, batch_size=1)
        hits = self.stopping(topk_seqs[0, :, :cur + 1]).reshape(1, -1)
        self.running, self.running_scores, self.running_indices = _helpers._get_running_beams_for_next_iteration(
            _helpers, topk_log_probs=topk_scores, topk_running_sequences=topk_seqs,
            topk_running_beam_indices=topk_indices, next_token_hits_stopping_criteria=hits, num_beams=B)
        self.sequences, self.beam_scores, self.beam_indices, self.is_sent_finished = _helpers._update_finished_beams(
            _helpers, sequences=self.sequences, topk_running_sequences=topk_seqs, beam_scores=self.beam_scores,
            topk_log_probs=topk_scores, beam_indices=self.beam_indices, topk_running_beam_indices=topk_indices,
            is_early_stop_heuristic_unsatisfied=self.improvable, is_sent_finished=self.is_sent_finished,
            next_token_hits_stopping_criteria=hits, top_num_beam_mask=self.top_num_beam_mask, num_beams=B,
            cur_len=cur, decoder_prompt_len=L, length_penalty=self.length_penalty,
            early_stopping=self.early_stopping)
        parents = self.running_indices[0, :, cur - L].tolist()
        tokens = self.running[0, :, cur].tolist()
        self.cur_len = cur + 1
        self.improvable = _helpers._check_early_stop_heuristic(
            is_early_stop_heuristic_unsatisfied=self.improvable, running_beam_scores=self.running_scores,
            beam_scores=self.beam_scores, is_sent_finished=self.is_sent_finished, cur_len=self.cur_len,
            max_length=self.max_length, decoder_prompt_len=L, early_stopping=self.early_stopping,
            length_penalty=self.length_penalty)
        self.done = not bool(_helpers._beam_search_has_unfinished_sequences(
            self.improvable, self.is_sent_finished, hits, self.early_stopping))
        return parents, tokens

    def results(self, count: int) -> list[Result]:
        """The best `count` finished sequences, best first (generate()'s first num_return_sequences)."""
        out = []
        for r in range(count):
            length = int((self.beam_indices[0, r] + 1).bool().sum())  # the steps it took (-1: none)
            out.append(Result(self.sequences[0, r, self.prompt_len:self.prompt_len + length].tolist(),
                              float(self.beam_scores[0, r])))
        return out


@dataclass(eq=False)
class BeamGroup:
    """A beam-search request in the engine: its leader (the sequence the scheduler sees), its running
    beams once the prompt is computed, its members (the returned sequences' placeholders, by rank)."""

    leader: Sequence
    stopping: Callable[[torch.Tensor], torch.Tensor] | None = None  # BeamSearch's
    search: BeamSearch | None = None
    beams: list[Sequence] = field(default_factory=list)
    members: dict[int, Sequence] = field(default_factory=dict)

    @property
    def params(self) -> SamplingParams:
        return self.leader.params

    @property
    def started(self) -> bool:
        """The prompt is computed and the beams run."""
        return bool(self.beams)

    def restart(self) -> None:
        """Back to the prompt (the leader was preempted): the beams' blocks are the caller's to free."""
        self.search, self.beams = None, []
