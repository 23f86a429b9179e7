"""Speculative decoding through the three services: the same answers, streamed the same way, with
and without it; its metrics; its field's validation."""

from __future__ import annotations

import grpc
import pytest

from genrpc.v1 import generation_pb2 as pb
from tests.helpers import metric, wait_for

PARAGRAPH = ("The quick brown fox jumpd over the lazy dog. It was a sunny day in the valey, and the farmer was "
             "working in his feild. Grüße aus Köln! He had three cows, two horses and a dog named Rex.")
CHATS = [
    "Repeat this paragraph with the typos fixed:\n\n" + PARAGRAPH,
    "Extract every sentence that mentions an animal:\n\n" + PARAGRAPH,
    "Write a short story about a robot.",
]


def stream(stub, content, **config):
    request = pb.GenerateStreamRequest(chat=pb.Chat(messages=[pb.Message(role="user", content=content)]),
                                       config=pb.GenerationConfig(max_new_tokens=80, logprobs=True, **config))
    messages = list(stub.GenerateStream(request, timeout=120))
    return [(m.text, list(m.token_ids), [(lp.token_id, lp.logprob, lp.token) for lp in m.logprobs], m.finish_reason)
            for m in messages]


@pytest.mark.parametrize("config", [dict(), dict(do_sample=True, seed=7, temperature=0.7)], ids=["greedy", "seeded"])
def test_the_same_stream_with_and_without_speculation(stack, stub, config):
    """Message for message: text pieces, token ids, logprobs and their token texts, finish reason."""
    m = stack.model.metrics_port
    accepted_before = metric(m, "genrpc_model_spec_accepted_tokens_total")
    for content in CHATS:
        plain = stream(stub, content, prompt_lookup_num_tokens=0, **config)
        fast = stream(stub, content, **config)  # the server's default: speculation on
        assert fast == plain
    assert metric(m, "genrpc_model_spec_accepted_tokens_total") > accepted_before
    assert metric(m, "genrpc_model_spec_proposed_tokens_total") >= metric(m, "genrpc_model_spec_accepted_tokens_total")
    # Some steps gave a sequence several tokens.
    assert metric(m, "genrpc_model_sequence_step_tokens_sum") > metric(m, "genrpc_model_sequence_step_tokens_count")
    # Rejected proposals hold nothing once the requests are over.
    wait_for(lambda: metric(m, "genrpc_model_kv_blocks_used") == 0)


def test_generate_with_several_prompts_and_stop_strings(stub):
    prompts = ["Copy exactly: one two three four five six seven eight nine ten, one two three four five six",
               "Say hello."]
    results = {}
    for lookup in (0, 8):
        config = pb.GenerationConfig(max_new_tokens=40, stop=["seven"], prompt_lookup_num_tokens=lookup)
        response = stub.Generate(pb.GenerateRequest(prompts=prompts, config=config), timeout=120)
        results[lookup] = [(c.text, list(c.token_ids), c.finish_reason, c.stop_sequence) for c in response.completions]
    assert results[8] == results[0]


@pytest.mark.parametrize("value", [-1, 33])
def test_out_of_range_is_refused_naming_the_field(stub, value):
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(prompts=["Hi"], config=pb.GenerationConfig(prompt_lookup_num_tokens=value)),
                      timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "config.prompt_lookup_num_tokens" in err.value.details() and "[0, 32]" in err.value.details()


def test_the_cli_turns_it_off(stack):
    """`genrpc generate --prompt-lookup-num-tokens 0` prints what the default does."""
    import subprocess
    import sys

    from genrpc.launch import ROOT

    def cli(*flags):
        out = subprocess.run([sys.executable, "-m", "genrpc.cli", "--addr", stack.gateway.address, "generate",
                              "Repeat exactly: the cat sat on the mat, the cat sat on the mat, the cat sat",
                              "--max-new-tokens", "24", *flags], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert cli("--prompt-lookup-num-tokens", "0") == cli()
