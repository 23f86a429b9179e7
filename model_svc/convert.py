"""protobuf <-> engine types; the only module of the model service below the servicer that sees `_pb2`."""

from __future__ import annotations

import dataclasses
import time

import grpc
import numpy

from genrpc import limits
from genrpc.internal.v1 import model_pb2
from genrpc.v1 import generation_pb2
from model_svc.engine.engine import TokenOutput
from model_svc.engine.sequence import FinishReason, SamplingParams, Sequence
from model_svc.loader import LoadedModel

MAX_CACHE_SALT = 2 * limits.MAX_CACHE_SALT  # the gateway's salts: a request's (or a token's), and a prefix

FINISH_REASONS = {
    None: generation_pb2.FINISH_REASON_UNSPECIFIED,
    FinishReason.LENGTH: generation_pb2.FINISH_REASON_LENGTH,
    FinishReason.EOS_TOKEN: generation_pb2.FINISH_REASON_EOS_TOKEN,
    FinishReason.CANCELLED: generation_pb2.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: generation_pb2.FINISH_REASON_ERROR,
}


EARLY_STOPPING = {generation_pb2.EARLY_STOPPING_UNSPECIFIED: False, generation_pb2.EARLY_STOPPING_FALSE: False,
                  generation_pb2.EARLY_STOPPING_TRUE: True, generation_pb2.EARLY_STOPPING_NEVER: "never"}
SAMPLING_FIELDS = [f.name for f in dataclasses.fields(SamplingParams)]  # the .proto message has the same names


def sampling_params(pb: model_pb2.SamplingParams, default_prompt_lookup: int = 0) -> SamplingParams:
    values = {name: getattr(pb, name) for name in SAMPLING_FIELDS}
    values["stop_token_ids"] = frozenset(values["stop_token_ids"])
    values["logit_bias"] = tuple(sorted(pb.logit_bias.items()))
    values["bad_words_ids"] = tuple(tuple(words.ids) for words in pb.bad_words_ids)
    values["prompt_logprobs"] = pb.prompt_logprobs if pb.HasField("prompt_logprobs") else None
    for name in ("suppress_tokens", "begin_suppress_tokens", "forced_eos_token_id"):
        values[name] = tuple(values[name])
    decay = pb.exponential_decay_length_penalty
    values["exponential_decay_length_penalty"] = ((decay.start_index, decay.decay_factor)
                                                  if pb.HasField("exponential_decay_length_penalty") else None)
    values["sequence_bias"] = tuple((tuple(b.token_ids), b.bias) for b in pb.sequence_bias)
    values["watermarking_config"] = None
    if pb.HasField("watermarking_config"):
        w = pb.watermarking_config
        values["watermarking_config"] = (w.greenlist_ratio, w.bias, w.hashing_key, w.seeding_scheme, w.context_width)
    values["num_beams"] = pb.num_beams or 1
    values["length_penalty"] = as_written(pb.length_penalty) if pb.HasField("length_penalty") else 1.0
    values["early_stopping"] = EARLY_STOPPING[pb.early_stopping]
    values["num_return_sequences"] = pb.num_return_sequences or 1
    values["stop_strings"] = tuple(pb.stop_strings)
    if not pb.HasField("prompt_lookup_num_tokens"):
        values["prompt_lookup_num_tokens"] = default_prompt_lookup
    return SamplingParams(**values)


def as_written(value: float) -> float:
    """A float32 off the wire as the decimal its sender most likely wrote (0.8, not 0.800000011920929):
    a beam's score is divided by its length to this power, and generate() is given the decimal."""
    return float(numpy.format_float_positional(numpy.float32(value), unique=True))


def sequence(client_id: str, pb: model_pb2.SequenceInput, vocab_size: int,
             default_prompt_lookup: int = 0) -> Sequence:
    """A SequenceInput as an engine Sequence keyed by (client, id); padding dropped by the mask."""
    ids = list(pb.input_ids)
    if pb.attention_mask:
        if len(pb.attention_mask) != len(ids):
            raise ValueError(
                f"sequence {pb.sequence_id}: attention_mask has {len(pb.attention_mask)} entries "
                f"for {len(ids)} input_ids"
            )
        ids = [i for i, m in zip(ids, pb.attention_mask) if m]
    if not ids:
        raise ValueError(f"sequence {pb.sequence_id}: the prompt has no tokens")
    bad = next((i for i in ids if i >= vocab_size), None)
    if bad is not None:
        raise ValueError(f"sequence {pb.sequence_id}: token id {bad} is not below the vocabulary size {vocab_size}")
    p = pb.params
    listed = [*p.logit_bias, *(t for words in p.bad_words_ids for t in words.ids), *p.suppress_tokens,
              *p.begin_suppress_tokens, *p.forced_eos_token_id, *(t for b in p.sequence_bias for t in b.token_ids)]
    bad = next((i for i in listed if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise ValueError(f"sequence {pb.sequence_id}: token id {bad} in its sampling parameters is not below the "
                         f"vocabulary size {vocab_size}")
    if not -limits.MAX_PRIORITY <= pb.priority <= limits.MAX_PRIORITY:
        raise ValueError(f"sequence {pb.sequence_id}: priority {pb.priority} is not in "
                         f"[-{limits.MAX_PRIORITY}, {limits.MAX_PRIORITY}]")
    deadline = time.monotonic() + pb.timeout_ms / 1000 if pb.timeout_ms else None
    params = sampling_params(pb.params, default_prompt_lookup)
    if len(pb.cache_salt) > MAX_CACHE_SALT:
        raise ValueError(f"sequence {pb.sequence_id}: cache_salt has {len(pb.cache_salt)} characters, at most "
                         f"{MAX_CACHE_SALT}")
    return Sequence((client_id, pb.sequence_id), ids, params, tenant=pb.tenant[:256],
                    priority=pb.priority, deadline=deadline, cache_salt=pb.cache_salt.encode() or None,
                    beam_of=(client_id, pb.beam_of) if pb.beam_of else None, beam_rank=pb.beam_rank,
                    adapter=pb.adapter)


def token_event(out: TokenOutput) -> model_pb2.TokenEvent:
    event = model_pb2.TokenEvent(
        sequence_id=out.seq_id[1], has_token=out.token_id is not None, token_id=out.token_id or 0,
        finish_reason=FINISH_REASONS[out.finish_reason], error=out.error,
        error_code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] if out.retryable else 0,
    )
    if out.logprob is not None:
        event.logprob = out.logprob
        event.top_logprobs.extend(
            generation_pb2.TokenLogprob(token_id=t, logprob=lp) for t, lp in out.top_logprobs
        )
    if out.score is not None:
        event.sequence_score = out.score
    if out.prompt_logprobs is not None:
        event.prompt_logprobs.extend(
            model_pb2.PromptTokenLogprob(token_id=t, logprob=lp, top=[
                generation_pb2.TokenLogprob(token_id=a, logprob=alp) for a, alp in top])
            for t, lp, top in out.prompt_logprobs)
    return event


def default_config(loaded: LoadedModel) -> generation_pb2.GenerationConfig:
    d = loaded.defaults
    return generation_pb2.GenerationConfig(
        max_new_tokens=d.max_new_tokens, min_new_tokens=0, do_sample=d.do_sample, temperature=d.temperature,
        top_k=d.top_k, top_p=d.top_p, min_p=d.min_p, typical_p=d.typical_p,
        repetition_penalty=d.repetition_penalty, include_stop_sequence=False, ignore_eos=False,
        skip_special_tokens=True, logprobs=False, top_logprobs=0, priority=0,
    )
