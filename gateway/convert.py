"""protobuf <-> gateway domain types."""

from __future__ import annotations

from gateway.generation import Delta, Prompts
from gateway.validation import FIELD_NAMES, ModelLimits, RequestedConfig
from genrpc.internal.v1 import model_pb2
from genrpc.v1 import generation_pb2 as pb

REPEATED = ("stop", "stop_token_ids", "bad_words", "suppress_tokens", "begin_suppress_tokens", "forced_eos_token_id")


def requested_config(config: pb.GenerationConfig) -> RequestedConfig:
    values = {}
    for name in FIELD_NAMES:
        if name in REPEATED:
            values[name] = list(getattr(config, name))
        elif name == "logit_bias":
            values[name] = dict(config.logit_bias)
        elif name == "sequence_bias":
            values[name] = [(list(b.token_ids), b.bias) for b in config.sequence_bias]
        elif name == "watermarking_config":
            values[name] = watermark_settings(config)
        elif name == "exponential_decay_length_penalty":
            if config.HasField(name):
                decay = config.exponential_decay_length_penalty
                values[name] = (decay.start_index, decay.decay_factor)
        elif name == "structured_output":
            which = config.WhichOneof("structured_output")
            if which is not None:
                value = getattr(config, which)
                values[name] = (which, list(value.options) if which == "choice" else value)
        elif name == "early_stopping":  # an enum, not optional: 0 is unset
            values[name] = config.early_stopping
        elif config.HasField(name):
            values[name] = getattr(config, name)
    return RequestedConfig(**values)


def watermark_settings(message) -> dict | None:
    """The WatermarkingConfig fields a message (a GenerationConfig or a DetectWatermarkRequest) sets;
    None when it sets none of it."""
    if not message.HasField("watermarking_config"):
        return None
    w = message.watermarking_config
    return {f.name: getattr(w, f.name) for f in w.DESCRIPTOR.fields if w.HasField(f.name)}


def model_limits(info: model_pb2.WorkerInfoResponse) -> ModelLimits:
    return ModelLimits(info.max_context_tokens, info.vocab_size, requested_config(info.default_config),
                       tuple(a.name for a in info.adapters))


def chats(chat_list) -> list[list[tuple[str, str]]]:
    return [[(m.role, m.content) for m in chat.messages] for chat in chat_list]


def prompts(request: pb.GenerateRequest) -> Prompts:
    return Prompts(list(request.prompts), chats(request.chats))


def stream_prompts(request: pb.GenerateStreamRequest) -> Prompts:
    """The request's one input; neither set leaves both empty (validation names them). A prompt set
    to "" is a prompt, so validation calls it empty."""
    which = request.WhichOneof("input")
    if which == "chat":
        return Prompts([], chats([request.chat]))
    if which == "prompt":
        return Prompts([request.prompt] if request.prompt else [""], [])
    return Prompts([], [])


def _prompt_logprobs(deltas) -> list[pb.GeneratedTokenLogprob]:
    return logprobs(next((d.prompt_logprobs for d in deltas if d.prompt_logprobs), []))


def logprobs(items) -> list[pb.GeneratedTokenLogprob]:
    return [
        pb.GeneratedTokenLogprob(
            token_id=token_id, logprob=logprob, token=text,
            top=[pb.TokenLogprob(token_id=t, logprob=lp, token=t_text) for t, lp, t_text in top],
        )
        for token_id, logprob, text, top in items
    ]


def stream_response(delta: Delta) -> pb.GenerateStreamResponse:
    response = pb.GenerateStreamResponse(
        text=delta.text, token_ids=delta.token_ids, finish_reason=delta.finish_reason, seed=delta.seed,
        logprobs=logprobs(delta.logprobs), sample_index=delta.sample_index,
        prompt_logprobs=logprobs(delta.prompt_logprobs or []),
    )
    if delta.finish_reason:
        response.prompt_tokens = delta.prompt_tokens
        response.generated_tokens = delta.generated_tokens
        response.stop_sequence = delta.stop_sequence
        if delta.sequence_score is not None:
            response.sequence_score = delta.sequence_score
    return response


def completions(deltas_by_index: list[list[Delta]], samples: int = 1) -> pb.GenerateResponse:
    """One Completion per sequence, prompt-major (a prompt's samples follow each other)."""
    out = []
    for i, deltas in enumerate(deltas_by_index):
        last = deltas[-1]
        out.append(pb.Completion(
            text="".join(d.text for d in deltas),
            token_ids=[t for d in deltas for t in d.token_ids],
            finish_reason=last.finish_reason, prompt_tokens=last.prompt_tokens,
            generated_tokens=last.generated_tokens, seed=last.seed, stop_sequence=last.stop_sequence,
            logprobs=logprobs([lp for d in deltas for lp in d.logprobs]),
            index=i // samples, sample_index=i % samples, prompt_logprobs=_prompt_logprobs(deltas),
            sequence_score=last.sequence_score,
        ))
    return pb.GenerateResponse(completions=out)
