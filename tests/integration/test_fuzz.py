"""Property-based bad input against the live gateway: every call ends OK or INVALID_ARGUMENT
(never INTERNAL or UNKNOWN), and the server keeps serving."""

from __future__ import annotations

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genrpc.v1 import generation_pb2 as pb

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

SPECIAL = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>", "\x00", "\ufffd", "\U0001F600", "\u202e"]
texts = st.one_of(
    st.text(max_size=200),
    st.lists(st.sampled_from(SPECIAL) | st.text(max_size=5), max_size=20).map("".join),
    st.sampled_from(["", " ", "x" * 100_000, "한국어 " * 3000, "\x00" * 50]),
)
int32 = st.integers(-2**31, 2**31 - 1)
float32 = st.floats(allow_nan=True, allow_infinity=True, width=32)
small_new_tokens = st.one_of(st.integers(-10, 6), st.integers(8193, 2**31 - 1), st.integers(-2**31, -1))


@st.composite
def configs(draw) -> pb.GenerationConfig:
    config = pb.GenerationConfig()
    fields = {
        "max_new_tokens": small_new_tokens, "min_new_tokens": st.integers(-5, 10) | int32, "do_sample": st.booleans(),
        "temperature": float32, "top_k": int32, "top_p": float32, "min_p": float32, "typical_p": float32,
        "repetition_penalty": float32, "seed": st.integers(0, 2**64 - 1), "include_stop_sequence": st.booleans(),
        "ignore_eos": st.booleans(), "skip_special_tokens": st.booleans(),
        "truncate_input_tokens": st.integers(-5, 50) | int32, "time_limit_ms": st.integers(-5, 5000) | int32,
        "logprobs": st.booleans(), "top_logprobs": st.integers(-3, 25) | int32,
    }
    for name, strategy in fields.items():
        if draw(st.booleans()):
            setattr(config, name, draw(strategy))
    if draw(st.booleans()):
        config.stop.extend(draw(st.lists(st.text(max_size=300), max_size=40) | st.just(["z"] * 3000)))
    if draw(st.booleans()):
        config.stop_token_ids.extend(draw(st.lists(int32 | st.integers(0, 49151), max_size=70)))
    return config


chats = st.lists(st.builds(pb.Message, role=st.sampled_from(["user", "system", "assistant", "tool", "", "root",
                                                             "USER", "user\x00"]),
                           content=texts), max_size=4).map(lambda m: pb.Chat(messages=m))


def call(fn) -> grpc.StatusCode:
    try:
        fn()
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


@SETTINGS
@given(prompts=st.lists(texts, max_size=3), chats_=st.lists(chats, max_size=2), config=configs())
def test_generate_bad_input(stub, prompts, chats_, config):
    code = call(lambda: stub.Generate(pb.GenerateRequest(prompts=prompts, chats=chats_, config=config), timeout=60))
    assert code in ALLOWED


@SETTINGS
@given(prompt=texts, chat=st.none() | chats, config=configs())
def test_stream_bad_input(stub, prompt, chat, config):
    request = pb.GenerateStreamRequest(prompt=prompt, config=config)
    if chat is not None:
        request.chat.CopyFrom(chat)
    code = call(lambda: list(stub.GenerateStream(request, timeout=60)))
    assert code in ALLOWED


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(prompts=st.lists(texts, max_size=3), truncate=st.none() | int32)
def test_tokenize_bad_input(stub, prompts, truncate):
    request = pb.TokenizeRequest(prompts=prompts)
    if truncate is not None:
        request.truncate_input_tokens = truncate
    assert call(lambda: stub.Tokenize(request, timeout=60)) in ALLOWED


def test_still_serving_after_the_fuzzing(stub):
    reply = stub.Generate(pb.GenerateRequest(prompts=["Hello"], config=pb.GenerationConfig(max_new_tokens=3)),
                          timeout=60)
    assert reply.completions[0].generated_tokens == 3
