"""Every bad field gets INVALID_ARGUMENT naming the field, and the server keeps serving."""

from __future__ import annotations

import grpc
import pytest

from genrpc.v1 import generation_pb2 as pb

BAD_CONFIGS = [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=-5), "max_new_tokens"),
    (dict(max_new_tokens=10**9), "max_new_tokens"),
    (dict(min_new_tokens=30, max_new_tokens=10), "min_new_tokens"),
    (dict(min_new_tokens=-1), "min_new_tokens"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(min_p=-0.1), "min_p"),
    (dict(min_p=2.0), "min_p"),
    (dict(typical_p=0.0), "typical_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=float("-inf")), "repetition_penalty"),
    (dict(stop=[""]), "stop[0]"),
    (dict(stop=["x" * 300]), "stop[0]"),
    (dict(stop=[str(i) for i in range(1000)]), "stop"),
    (dict(stop_token_ids=[-1]), "stop_token_ids[0]"),
    (dict(stop_token_ids=[10**6]), "stop_token_ids[0]"),
    (dict(truncate_input_tokens=0), "truncate_input_tokens"),
    (dict(truncate_input_tokens=-3), "truncate_input_tokens"),
    (dict(time_limit_ms=0), "time_limit_ms"),
    (dict(time_limit_ms=-1), "time_limit_ms"),
    (dict(top_logprobs=50), "top_logprobs"),
    (dict(top_logprobs=-1), "top_logprobs"),
    (dict(no_repeat_ngram_size=100), "no_repeat_ngram_size"),
    (dict(epsilon_cutoff=1.0), "epsilon_cutoff"),
    (dict(eta_cutoff=float("nan")), "eta_cutoff"),
    (dict(suppress_tokens=[10**6]), "suppress_tokens[0]"),
    (dict(begin_suppress_tokens=[-2]), "begin_suppress_tokens[0]"),
    (dict(forced_eos_token_id=[1] * 17), "forced_eos_token_id"),
    (dict(exponential_decay_length_penalty=pb.ExponentialDecayLengthPenalty(start_index=2, decay_factor=0)),
     "exponential_decay_length_penalty.decay_factor"),
    (dict(sequence_bias=[pb.SequenceBias(token_ids=[5], bias=500)]), "sequence_bias[0].bias"),
    (dict(sequence_bias=[pb.SequenceBias(bias=1)]), "sequence_bias[0].token_ids"),
    (dict(frequency_penalty=2.5), "frequency_penalty"),
    (dict(presence_penalty=float("inf")), "presence_penalty"),
    (dict(watermarking_config=pb.WatermarkingConfig(greenlist_ratio=1.0)), "watermarking_config.greenlist_ratio"),
    (dict(watermarking_config=pb.WatermarkingConfig(seeding_scheme="minhash")), "watermarking_config.seeding_scheme"),
    (dict(watermarking_config=pb.WatermarkingConfig(context_width=0)), "watermarking_config.context_width"),
    (dict(max_matching_ngram_size=0), "max_matching_ngram_size"),
    (dict(num_beams=17), "num_beams"),
    (dict(num_beams=4, do_sample=True), "do_sample"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(num_beams=2, logprobs=True), "logprobs"),
    (dict(length_penalty=float("inf")), "length_penalty"),
    (dict(num_beam_groups=2), "num_beam_groups"),
    (dict(diversity_penalty=0.5), "diversity_penalty"),
]


def assert_invalid(call, *names: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    for name in names:
        assert name in info.value.details()
    return info.value.details()


@pytest.mark.parametrize("config,field", BAD_CONFIGS, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD_CONFIGS)])
def test_bad_config_field(stub, config, field):
    request = pb.GenerateRequest(prompts=["Hello"], config=pb.GenerationConfig(**config))
    message = assert_invalid(lambda: stub.Generate(request, timeout=30), field)
    stream_request = pb.GenerateStreamRequest(prompt="Hello", config=pb.GenerationConfig(**config))
    assert_invalid(lambda: list(stub.GenerateStream(stream_request, timeout=30)), field)
    assert "must" in message or "at most" in message  # says what is allowed


def test_bad_prompts(stub):
    assert_invalid(lambda: stub.Generate(pb.GenerateRequest(), timeout=30), "prompts", "chats")
    assert_invalid(lambda: stub.Generate(pb.GenerateRequest(prompts=[""]), timeout=30), "prompts[0]")
    assert_invalid(lambda: stub.Generate(pb.GenerateRequest(prompts=["a"] * 65), timeout=30), "64")
    both = pb.GenerateRequest(prompts=["a"], chats=[pb.Chat(messages=[pb.Message(role="user", content="b")])])
    assert_invalid(lambda: stub.Generate(both, timeout=30), "exactly one")
    assert_invalid(lambda: list(stub.GenerateStream(pb.GenerateStreamRequest(), timeout=30)), "exactly one", "chat")
    # The stream's input is a oneof: a prompt set to "" is a prompt, and an empty one.
    assert_invalid(lambda: list(stub.GenerateStream(pb.GenerateStreamRequest(prompt=""), timeout=30)),
                   "prompt is empty")
    request = pb.GenerateStreamRequest(prompt="a")
    request.chat.CopyFrom(pb.Chat(messages=[pb.Message(role="user", content="b")]))
    assert request.WhichOneof("input") == "chat"  # the last one set wins, as for any oneof


def test_bad_chat_roles(stub):
    chat = pb.Chat(messages=[pb.Message(role="wizard", content="hi")])
    assert_invalid(lambda: stub.Generate(pb.GenerateRequest(chats=[chat]), timeout=30),
                   "chats[0].messages[0].role", "wizard", "user")
    assert_invalid(lambda: stub.Generate(pb.GenerateRequest(chats=[pb.Chat()]), timeout=30), "chats[0]")


def test_prompt_longer_than_context(stub):
    long_prompt = "hello " * 9000  # ~9000 tokens > 8192
    message = assert_invalid(lambda: stub.Generate(pb.GenerateRequest(prompts=[long_prompt]), timeout=60),
                             "prompts[0]", "8192", "truncate_input_tokens")
    assert "tokens" in message
    ok = stub.Generate(pb.GenerateRequest(
        prompts=[long_prompt], config=pb.GenerationConfig(truncate_input_tokens=100, max_new_tokens=2)), timeout=60)
    assert ok.completions[0].prompt_tokens == 100
    near_full = "hello " * 8150
    assert_invalid(lambda: stub.Generate(pb.GenerateRequest(
        prompts=[near_full], config=pb.GenerationConfig(max_new_tokens=500)), timeout=60), "max_new_tokens")


def test_server_keeps_serving_after_bad_requests(stub):
    for config, _ in BAD_CONFIGS[:5]:
        with pytest.raises(grpc.RpcError):
            stub.Generate(pb.GenerateRequest(prompts=["x"], config=pb.GenerationConfig(**config)), timeout=30)
    good = stub.Generate(pb.GenerateRequest(prompts=["Hello"], config=pb.GenerationConfig(max_new_tokens=3)),
                         timeout=60)
    assert good.completions[0].generated_tokens == 3


def test_special_token_strings_and_control_characters_are_plain_text(stub):
    weird = "<|im_start|>system\x00\x07\u202e<|endoftext|>\ud7ff"
    reply = stub.Generate(pb.GenerateRequest(prompts=[weird], config=pb.GenerationConfig(max_new_tokens=3)),
                          timeout=60)
    assert reply.completions[0].generated_tokens == 3


def test_tokenize_names_its_own_truncate_field(stub):
    with pytest.raises(grpc.RpcError) as info:
        stub.Tokenize(pb.TokenizeRequest(prompts=["Hello"], truncate_input_tokens=0), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("truncate_input_tokens=0 ")  # a top-level field, not config.*
