"""One engine step: schedule -> copy -> execute -> sample -> accept -> update -> outputs."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Hashable

import torch

from genrpc import faults
from model_svc.engine import beam as beams
from model_svc.engine import layers
from model_svc.engine.adapter_store import AdapterStore
from model_svc.engine.kv_cache import KVCache
from model_svc.engine.runner import ModelRunner, StepInterrupted
from model_svc.engine.sampler import SampledToken, Sampler, SampleRow
from model_svc.engine.schedule_types import ItemKind, SchedulerFull, SchedulerOutput
from model_svc.engine.scheduler import Scheduler
from model_svc.engine.sequence import FinishReason, SamplingParams, Sequence
from model_svc.engine.speculation import accepted_count

log = logging.getLogger("genrpc.engine")


@dataclass
class TokenOutput:
    """What one sequence got from one step (or from an abort between steps)."""

    seq_id: Hashable
    token_id: int | None  # None when the sequence ended without a new token
    finish_reason: FinishReason | None = None  # None while it runs
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    error: str = ""
    retryable: bool = False  # the error refused the sequence (capacity, deadline): it may be retried later
    prompt_logprobs: list | None = None  # on the first token, when asked: Sequence.prompt_logprobs
    score: float | None = None  # a beam search's returned sequence's score (on each of its tokens)


@dataclass
class StepStats:
    num_sequences: int = 0  # sequences computed in the step
    num_tokens: int = 0  # tokens computed in the step (prefill chunks and decodes)
    num_cached_tokens: int = 0  # tokens admitted sequences found in the prefix cache instead
    num_preempted: int = 0  # sequences preempted this step
    num_pairs: int = 0  # attention pairs computed (the step-time model's input)
    num_capped: int = 0  # sequences that skipped the step for fair shares (Policy.tenant_cap)
    num_proposed: int = 0  # proposals verified (speculation.py)
    num_accepted: int = 0  # of which kept and emitted
    verified: list[tuple[int, int]] = field(default_factory=list)  # (proposed, kept) of each verified sequence
    emitted: list[int] = field(default_factory=list)  # tokens each sequence that got any got


@dataclass(frozen=True)
class RunningStep:
    """What `interrupt_for` (any thread) knows of the step being computed: swapped whole, so that it
    never reads one step's priorities beside another's rows."""

    priorities: tuple[int, ...]  # of its sequences
    only_long: bool  # it computes long prompts' chunks and nothing else
    rows: Counter  # its sequences per tenant
    seconds: float  # its duration as fair steps estimate it (Policy.step_at_most)
    after_stop: bool  # the step before it was stopped


class Engine:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, sampler: Sampler, kv_cache: KVCache,
                 default_prompt_lookup: int = 0, grammars=None, tokenizer=None, adapters: AdapterStore | None = None):
        """default_prompt_lookup: the prompt_lookup_num_tokens of a request that does not say.
        grammars: compiles a sequence's grammar when it comes without its constraint (constraints.py;
        the server compiles them before, off the engine thread). tokenizer: () -> the served model's
        tokenizer (beam search's stop strings are found in token ids through it). adapters: the LoRA
        adapters served (adapter_store.py; None: none)."""
        self.default_prompt_lookup = default_prompt_lookup
        self.grammars = grammars
        self.tokenizer = tokenizer
        self.groups: dict[Hashable, beams.BeamGroup] = {}  # beam searches by their leader's id
        self.member_of: dict[Hashable, beams.BeamGroup] = {}  # and by their members' ids
        self.runner = runner
        self.adapters = adapters or AdapterStore(None)
        self.scheduler = scheduler
        self.sampler = sampler
        self.kv_cache = kv_cache
        self.last_step = StepStats()
        # Set (from any thread) to stop the running step between layers: `interrupt_for`.
        self.interrupt = layers.Interrupt()  # an Event the native layer loop polls too
        self.num_interrupted = 0  # steps stopped so, since start
        self.num_failures = 0  # failures that failed sequences (`_failed`), since start
        self._running: RunningStep | None = None  # the step being computed, if any
        self._after_stop = False  # the last step was stopped (engine thread only)

    def describe_speculation(self) -> str:
        """What a request that does not set prompt_lookup_num_tokens gets (ModelInfo.speculation)."""
        n = self.default_prompt_lookup
        if not n or not self.scheduler.config.speculation:
            return "off"
        how = "a draft model" if self.scheduler.draft is not None else "prompt lookup"
        return f"{how}, up to {n} tokens a step"

    def interrupt_for(self, seqs: list[Sequence]) -> None:
        """Stops the running step (any thread) so that a new request does not wait for it to end:
        when one of `seqs` would make the step after an urgent one (Scheduler.urgent_priority), when
        the step only prefills long prompts (up to --idle-step-ms) and one of `seqs` is a prompt the
        scheduler admits whole, or when `seqs` are a new tenant's and the step is longer than fair
        steps allow beside them (Policy.caps: a flooding neighbour's 64-sequence step). The
        stopped step's work is done again; the step after carries the new prompt and decodes, so a
        long prompt still advances every other step at worst (a step right after a stopped one is
        not stopped for fair steps, so new tenants arriving faster than steps end cannot stall it)."""
        scheduler, step = self.scheduler, self._running
        if step is None:
            return
        if scheduler.policy.outranks_step(seqs, step.priorities) or (
                step.only_long and any(seq.num_prompt_tokens <= scheduler.config.prefill_tokens for seq in seqs)
        ) or (not step.after_stop and scheduler.policy.caps(seqs, step.rows, step.seconds)):
            self.interrupt.set()

    def warm_up(self, prompt_tokens: int = 8, new_tokens: int = 3) -> None:
        """Runs one short greedy sequence through the model before serving: the layers' first calls
        (bitsandbytes packing its weights, each native product's binding checked against the library's
        on that call's rows) and the first decoding steps' set-up then happen at start, not in the first
        request's time to first token (~0.2-0.35 s on 2 cores). It leaves nothing behind: the prefix
        cache stays out of it (no block of its is kept for a later prompt to match), its blocks are
        freed, and the counters a server reports start from zero. Not for an engine already serving."""
        if self.scheduler.has_work:
            raise RuntimeError("warm_up: the engine already has sequences")
        blocks = self.scheduler.blocks
        caching, blocks.enable_prefix_caching = blocks.enable_prefix_caching, False
        vocab = self.sampler.vocab_size or 1
        try:
            try:
                self.add(Sequence(("warm-up",), [(100 + i) % vocab for i in range(prompt_tokens)],
                                  SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)))
            except (ValueError, SchedulerFull) as exc:  # e.g. a KV cache smaller than its few tokens
                log.warning("warm-up skipped (%s); the first request pays the first calls", exc)
                return
            for _ in range(4 * (prompt_tokens + new_tokens)):  # far more steps than it takes
                if not self.scheduler.has_work:
                    break
                self.step()
            else:  # never admitted (a cache too small for it): serve cold rather than wait for it
                self.abort(("warm-up",))
                log.warning("warm-up: the sequence did not finish; the first request pays the first calls")
        finally:
            blocks.enable_prefix_caching = caching
        blocks.num_queried_tokens = blocks.num_hit_tokens = 0
        self.scheduler.num_steps = self.scheduler.num_preemptions = 0
        self.last_step = StepStats()

    def add(self, seq: Sequence) -> None:
        """Queues a sequence; a beam search's members come after their leader (beam.py). One whose
        LoRA adapter is on disk waits for it, parked (adapter_store.py)."""
        if self.adapters.parks(seq):
            if self.adapters.defer is None:  # read inline (no engine loop): it may start now
                for ready in self.adapters.install(self._adapters_in_use()):
                    self.add(ready)
            return
        if seq.beam_of is not None:
            self._add_member(seq)
            return
        if seq.params.grammar and seq.constraint is None:
            if self.grammars is None:
                raise ValueError("structured output is not available here")
            seq.constraint = self.grammars.constraint(seq.params.grammar)
        self.sampler.prepare(seq)
        if seq.params.num_beams > 1:
            seq.group = beams.BeamGroup(seq, stopping=self._stopping(seq))
        self.scheduler.add(seq)
        if seq.group is not None:
            self.groups[seq.seq_id] = seq.group

    def _add_member(self, seq: Sequence) -> None:
        group = self.groups.get(seq.beam_of)
        if group is None or group.started:
            raise ValueError(f"sequence {seq.seq_id[-1]} is a beam search's returned sequence, but its leader "
                             f"{seq.beam_of[-1]} is not a beam search waiting to start")
        if not 1 <= seq.beam_rank < group.params.num_return_sequences or seq.beam_rank in group.members:
            raise ValueError(f"sequence {seq.seq_id[-1]}: beam_rank {seq.beam_rank} is not a free rank in "
                             f"[1, {group.params.num_return_sequences})")
        group.members[seq.beam_rank] = seq
        self.member_of[seq.seq_id] = group

    def _stopping(self, seq: Sequence):
        """generate()'s stopping criteria for a beam search: its length, its EOS ids, its stop strings."""
        from transformers.generation.stopping_criteria import (
            EosTokenCriteria,
            MaxLengthCriteria,
            StoppingCriteriaList,
            StopStringCriteria,
        )

        params = seq.params
        criteria = StoppingCriteriaList([MaxLengthCriteria(seq.num_prompt_tokens + params.max_new_tokens)])
        eos = self._beam_eos(params)
        if eos:
            criteria.append(EosTokenCriteria(eos))
        if params.stop_strings:
            if self.tokenizer is None:
                raise ValueError("stop strings with num_beams > 1 need the model's tokenizer, not available here")
            criteria.append(StopStringCriteria(self.tokenizer(), list(params.stop_strings)))
        return lambda candidates: criteria(candidates, None)

    def _beam_eos(self, params) -> list[int]:
        return [] if params.ignore_eos else sorted({*self.scheduler.eos_token_ids, *params.stop_token_ids})

    def abort(self, seq_id: Hashable) -> list[TokenOutput]:
        """Ends a sequence between steps; a beam search's leader ends its members too."""
        parked = self.adapters.abort(seq_id)
        if parked:
            return [TokenOutput(seq.seq_id, None, FinishReason.CANCELLED) for seq in parked]
        group = self.member_of.pop(seq_id, None)
        if group is not None:  # it will not be returned
            group.members.pop(next(r for r, m in group.members.items() if m.seq_id == seq_id))
            return [TokenOutput(seq_id, None, FinishReason.CANCELLED)]
        seq = self.scheduler.abort(seq_id)
        return [] if seq is None else self._ended(seq, FinishReason.CANCELLED)

    def _ended(self, seq: Sequence, reason: FinishReason, error: str = "") -> list[TokenOutput]:
        """The outputs of a sequence that ended without a token: a beam search's members end with it."""
        ended = [seq]
        group = self.groups.pop(seq.seq_id, None)
        if group is not None:
            ended += list(group.members.values())
            for member in group.members.values():
                self.member_of.pop(member.seq_id, None)
        return [TokenOutput(s.seq_id, None, reason, error=error) for s in ended]

    def step(self) -> list[TokenOutput]:
        """`_step`, with the sequences parked for their adapter admitted before and after it (an
        adapter read meanwhile, or a resident one no longer in use)."""
        outputs = self._admit_parked()
        outputs += self._step()
        if self.adapters.parked:
            outputs += self._admit_parked()
        return outputs

    def _adapters_in_use(self) -> set[str]:
        return {seq.adapter for seq in (*self.scheduler.running, *self.scheduler.waiting) if seq.adapter}

    def _admit_parked(self) -> list[TokenOutput]:
        """Adds the parked sequences whose adapter is now resident; ends those whose adapter could not
        be read."""
        failed, self.adapters.failed = self.adapters.failed, []
        outputs = [TokenOutput(seq.seq_id, None, FinishReason.ERROR, error=error) for seq, error in failed]
        if not self.adapters.parked and not self.adapters.pending:
            return outputs
        for seq in self.adapters.install(self._adapters_in_use()):
            try:
                self.add(seq)
            except (ValueError, SchedulerFull) as exc:
                outputs.append(TokenOutput(seq.seq_id, None, FinishReason.ERROR, error=str(exc),
                                           retryable=isinstance(exc, SchedulerFull)))
        return outputs

    def _step(self) -> list[TokenOutput]:
        """Runs one step (schedule -> copy -> execute -> sample -> accept -> update -> outputs);
        returns one output per sequence that got a token or finished. A failure fails the sequences
        it touched and is returned as their outputs, never raised: the step's sequences when
        computing or recording it fails, every sequence when scheduling does (the queues may be
        half-moved)."""
        try:
            faults.check("scheduler.schedule")
            out = self.scheduler.schedule()
        except Exception as exc:
            return self._failed(self.scheduler.fail_all(), exc, "scheduling")
        self.last_step = StepStats(len(out.scheduled), out.num_batched_tokens, out.num_cached_tokens,
                                   out.num_preempted, out.num_pairs, out.num_capped)
        if out.is_empty:
            return []
        try:
            for copy in out.copies:
                self.kv_cache.copy(copy.src_slots, copy.dst_slots)
            logits = self._execute(out)
            rows, counts, sampled, beam_positions = self._sample_rows(out, logits)
            beam_rows = self._beam_scores(beam_positions, logits)
            faults.check("sampler.sample")
            tokens = self.sampler.sample(sampled, rows)
        except StepInterrupted:  # nothing was computed: the next schedule takes them up again
            self.scheduler.rewind(out)
            self.num_interrupted += 1
            self.last_step = StepStats(num_capped=out.num_capped)
            self._after_stop = True
            return []
        except Exception as exc:  # a failed step fails its sequences, never the server
            return self._failed(self.scheduler.fail([item.seq for item in out.scheduled]), exc, "the step")
        emitted = self._accept(out, counts, tokens)
        lengths = {item.seq.seq_id: item.seq.num_output_tokens for item in out.scheduled}
        try:
            faults.check("scheduler.update")
            self.scheduler.update(out, {seq_id: [t.token_id for t in ts] for seq_id, ts in emitted.items()})
        except Exception as exc:  # those it finished before failing end ERROR too: their last token is lost
            seqs = list(dict.fromkeys(item.seq.group.leader if item.seq.group else item.seq
                                      for item in out.scheduled))  # a beam stands for its search
            self.scheduler.fail(seqs)
            return self._failed(seqs, exc, "recording the step")
        outputs = self._outputs(out, emitted, lengths)
        for group, scores in beam_rows.items():
            try:
                outputs += self._advance_search(group, scores)
            except Exception as exc:  # that search fails, the others go on
                outputs += self._failed(self.scheduler.fail([group.leader]), exc, "a beam search step")
        return outputs

    def _execute(self, out: SchedulerOutput) -> torch.Tensor:
        """The step's logits (runner.execute), with what `interrupt_for` needs published meanwhile."""
        # A step verifying proposals runs to its end: only `update` gives back their extra blocks.
        interrupt = None if out.num_proposed_tokens else self.interrupt
        self._running = RunningStep(
            tuple({item.seq.priority for item in out.scheduled}),
            all(item.kind is ItemKind.LONG for item in out.scheduled),
            Counter(item.seq.tenant for item in out.scheduled),
            self.scheduler.policy.step_at_most(out.num_batched_tokens, out.num_pairs), self._after_stop)
        try:
            faults.check("runner.execute")
            logits = self.runner.execute(out.scheduled, self.kv_cache, interrupt)
            self._after_stop = False
            return logits
        finally:
            self._running = None

    def _beam_scores(self, found: dict[beams.BeamGroup, list[int]],
                     logits: torch.Tensor) -> dict[beams.BeamGroup, torch.Tensor]:
        """Each beam search's processed log-probabilities this step ([num_beams, vocab]: its beams' in
        order, or its prompt's last row repeated at the first step), as generate() scores them: the
        log-softmax of the logits, then the row's bias, banned words, min_new_tokens and processors.
        found: each search's rows of `logits` (`_sample_rows`)."""
        scored = {}
        for group, positions in found.items():
            seqs = group.beams or [group.leader]
            log_probs = torch.log_softmax(logits[positions].float(), dim=-1)
            log_probs = self.sampler.adjusted(log_probs, [SampleRow(seq) for seq in seqs])
            for i, seq in enumerate(seqs):
                if seq.num_output_tokens < seq.params.min_new_tokens:  # generate()'s MinNewTokensLength
                    log_probs[i, [t for t in self._beam_eos(seq.params) if t < log_probs.shape[-1]]] = -float("inf")
                if seq.processors is not None:
                    ids = torch.tensor([seq.token_ids()], dtype=torch.long)
                    log_probs[i:i + 1] = seq.processors(ids, log_probs[i:i + 1])
            scored[group] = log_probs.expand(group.params.num_beams, -1) if not group.beams else log_probs
        return scored

    def _advance_search(self, group: beams.BeamGroup, log_probs: torch.Tensor) -> list[TokenOutput]:
        """One step of a beam search (its leader's prompt done, or its beams computed): the next beams
        and their block tables; when the search is over, its returned sequences as outputs."""
        leader = group.leader
        if leader.is_finished or leader.group is not group:  # aborted or restarted meanwhile
            return []
        if group.search is None:
            group.search = beams.BeamSearch(leader.params, leader.prompt_ids, len(self._beam_eos(leader.params)),
                                            group.stopping)
        parents, tokens = group.search.step(log_probs)
        if not group.beams:
            parents = [0] * len(parents)  # the B rows were one: the prompt's
        if group.search.done:
            return self._finish_search(group)
        for copy in self.scheduler.fork_beams(group, parents, tokens):
            self.kv_cache.copy(copy.src_slots, copy.dst_slots)
        return []

    def _finish_search(self, group: beams.BeamGroup) -> list[TokenOutput]:
        """A finished search's returned sequences, each as its tokens' outputs under its member's id
        (rank 0: the leader's), each with the sequence's score, the last with its finish reason."""
        params, eos = group.params, set(self._beam_eos(group.params))
        members = {0: group.leader, **group.members}
        outputs = []
        for rank, result in enumerate(group.search.results(params.num_return_sequences)):
            seq = members.get(rank)
            if seq is None:  # aborted on its own
                continue
            tokens = result.token_ids
            reason = FinishReason.EOS_TOKEN if tokens and tokens[-1] in eos else FinishReason.LENGTH
            if not tokens:
                outputs.append(TokenOutput(seq.seq_id, None, reason, score=result.score))
            for i, token in enumerate(tokens):  # the score on each: the gateway may end it at a stop string
                outputs.append(TokenOutput(seq.seq_id, token, reason if i == len(tokens) - 1 else None,
                                           score=result.score))
        for member in group.members.values():
            self.member_of.pop(member.seq_id, None)
        self.groups.pop(group.leader.seq_id, None)
        self.scheduler.finish(group.leader, FinishReason.LENGTH)
        return outputs

    def _sample_rows(self, out: SchedulerOutput, logits: torch.Tensor
                     ) -> tuple[list[SampleRow], list[int], torch.Tensor, dict[beams.BeamGroup, list[int]]]:
        """What to sample: a row per sampled position (a completed prompt's last token, a decode's
        token and one per proposal), each item's count of them, and their logits. Records the
        prompt chunks' logprobs on the way (their rows are computed only when asked). A beam
        search's rows are not sampled: they come back apart, by search (`_beam_scores`)."""
        rows, sampled_rows, counts, position = [], [], [], 0
        searches: dict[beams.BeamGroup, list[int]] = {}
        for item in out.scheduled:
            if item.seq.group is not None and not item.prompt_rows and item.completes_prompt:
                searches.setdefault(item.seq.group, []).append(position)  # (a beam never speculates)
                counts.append(0)
                position += 1
            elif item.prompt_rows:  # the chunk's rows: its prompt logprobs, the last maybe sampled
                self._prompt_logprobs(item, logits[position:position + item.num_new_tokens])
                position += item.num_new_tokens
                counts.append(int(item.completes_prompt))
                sampled_rows += [position - 1] * counts[-1]
                rows += [SampleRow(item.seq)] * counts[-1]
            elif item.proposals or item.completes_prompt:  # the last token's row, then one per proposal
                counts.append(len(item.proposals) + 1)
                rows.extend(SampleRow(item.seq, j, tuple(item.proposals[:j])) for j in range(counts[-1]))
                sampled_rows.extend(range(position, position + counts[-1]))
                position += counts[-1]
            else:
                counts.append(0)
        if len(sampled_rows) != len(logits):
            logits = logits[sampled_rows]
        return rows, counts, logits, searches

    @staticmethod
    def _accept(out: SchedulerOutput, counts: list[int],
                tokens: list[SampledToken]) -> dict[Hashable, list[SampledToken]]:
        """Each sampled sequence's tokens, in order: with proposals, those up to the first the model
        disagreed with, and the model's own token there."""
        emitted, position = {}, 0
        for item, count in zip(out.scheduled, counts):
            if count:
                sampled = tokens[position:position + count]
                position += count
                emitted[item.seq.seq_id] = sampled[:accepted_count(item.proposals, [t.token_id for t in sampled]) + 1]
        return emitted

    def _outputs(self, out: SchedulerOutput, emitted: dict[Hashable, list[SampledToken]],
                 lengths: dict[Hashable, int]) -> list[TokenOutput]:
        """The tokens `update` appended (a stop may have cut them short; `lengths`: the output
        lengths before), as outputs, the last carrying the finish reason; and the step's statistics."""
        self.last_step.num_proposed = out.num_proposed_tokens
        outputs = []
        for item in out.scheduled:
            seq = item.seq
            if seq.seq_id not in emitted:
                continue
            appended = emitted[seq.seq_id][:seq.num_output_tokens - lengths[seq.seq_id]]
            if item.proposals:
                self.last_step.num_accepted += len(emitted[seq.seq_id]) - 1
                self.last_step.verified.append((len(item.proposals), len(emitted[seq.seq_id]) - 1))
            self.last_step.emitted.append(len(appended))
            for i, t in enumerate(appended):
                last = i == len(appended) - 1
                outputs.append(TokenOutput(seq.seq_id, t.token_id, seq.finish_reason if last else None,
                                           t.logprob, t.top_logprobs))
                if lengths[seq.seq_id] == 0 and i == 0 and seq.prompt_logprobs is not None:
                    outputs[-1].prompt_logprobs = seq.prompt_logprobs
        return outputs

    def fail_all(self, exc: BaseException) -> list[TokenOutput]:
        """Fails every sequence the engine holds (a failure outside `step`'s own guards)."""
        error = f"the engine loop failed ({type(exc).__name__})"
        parked = [TokenOutput(seq.seq_id, None, FinishReason.ERROR, error=error) for seq in self.adapters.take_all()]
        return self._failed(self.scheduler.fail_all(), exc, "the engine loop") + parked

    def _failed(self, seqs: list[Sequence], exc: BaseException, where: str) -> list[TokenOutput]:
        """The outputs of sequences failed by `exc`: the traceback goes to the log, the type to them."""
        self.num_failures += 1
        self.last_step = StepStats()  # nothing computed to learn step costs from
        log.error("%s failed; failing its %d sequences", where, len(seqs), exc_info=exc)
        message = f"{where} failed ({type(exc).__name__})"
        return [out for seq in seqs for out in self._ended(seq, FinishReason.ERROR, message)]

    @staticmethod
    def _prompt_logprobs(item, logits: torch.Tensor) -> None:
        """Records the logprobs of the prompt tokens this chunk's rows predict: row r (position p)
        gives prompt token p + 1's, as the model's own log-softmax (float32)."""
        seq = item.seq
        if seq.prompt_logprobs is None:
            seq.prompt_logprobs = [None] * (seq.num_prompt_tokens - 1)
        start = seq.num_computed_tokens
        count = min(len(logits), seq.num_prompt_tokens - 1 - start)  # the last prompt row predicts no prompt token
        if count <= 0:
            return
        logprobs = torch.log_softmax(logits[:count], dim=-1)
        targets = torch.tensor(seq.tokens[start + 1:start + 1 + count])
        chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
        top = seq.params.prompt_logprobs
        alternatives = [[]] * count
        if top:
            values, ids = logprobs.topk(top, dim=-1)
            alternatives = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
        for r in range(count):
            seq.prompt_logprobs[start + r] = (seq.tokens[start + 1 + r], chosen[r], alternatives[r])
