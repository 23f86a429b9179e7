"""Structured output, logit bias and banned words through the three services and the CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import grpc
import jsonschema
import pytest

from genrpc.launch import ROOT
from genrpc.v1 import generation_pb2 as pb

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                           "population": {"type": "integer", "minimum": 0, "maximum": 50000000},
                                           "landmarks": {"type": "array", "maxItems": 3,
                                                         "items": {"type": "string", "maxLength": 30}}},
          "required": ["city", "population", "landmarks"], "additionalProperties": False}


def chat(text: str) -> pb.Chat:
    return pb.Chat(messages=[pb.Message(role="user", content=text)])


def test_json_schema_unary_and_streamed(stub):
    config = pb.GenerationConfig(max_new_tokens=150, json_schema=json.dumps(SCHEMA))
    unary = stub.Generate(pb.GenerateRequest(chats=[chat("Describe Paris as JSON.")], config=config),
                          timeout=120).completions[0]
    jsonschema.validate(json.loads(unary.text), SCHEMA)
    assert unary.finish_reason == pb.FINISH_REASON_EOS_TOKEN
    messages = list(stub.GenerateStream(pb.GenerateStreamRequest(chat=chat("Describe Paris as JSON."), config=config),
                                        timeout=120))
    assert "".join(m.text for m in messages) == unary.text and len(messages) > 3


def test_seeded_samples_validate_and_reproduce(stub):
    config = pb.GenerationConfig(max_new_tokens=150, json_schema=json.dumps(SCHEMA), do_sample=True, seed=11,
                                 temperature=0.9)
    request = pb.GenerateRequest(chats=[chat("Describe Lisbon as JSON."), chat("Describe Tokyo as JSON.")],
                                 config=config)
    first = stub.Generate(request, timeout=120).completions
    again = stub.Generate(request, timeout=120).completions
    assert [c.text for c in first] == [c.text for c in again]
    for completion in first:
        jsonschema.validate(json.loads(completion.text), SCHEMA)


def test_choice_regex_and_json_object(stub):
    choice = stub.Generate(pb.GenerateRequest(
        chats=[chat("Is the sky green? Answer yes or no.")],
        config=pb.GenerationConfig(max_new_tokens=10, choice=pb.Choices(options=["yes", "no", "maybe"]))),
        timeout=60).completions[0]
    assert choice.text in ("yes", "no", "maybe")
    pattern = r"[0-9]{1,3} (apples|pears)"
    regex = stub.Generate(pb.GenerateRequest(chats=[chat("How many apples?")], config=pb.GenerationConfig(
        max_new_tokens=20, regex=pattern)), timeout=60).completions[0]
    assert re.fullmatch(pattern, regex.text), regex.text
    anything = stub.Generate(pb.GenerateRequest(
        chats=[chat("A JSON object about a cat, please.")],
        config=pb.GenerationConfig(max_new_tokens=200, json_object=True)), timeout=120).completions[0]
    if anything.finish_reason == pb.FINISH_REASON_LENGTH:  # an unbounded object may outrun max_new_tokens ...
        assert anything.text.startswith("{")  # ... as a valid prefix
    else:
        assert anything.finish_reason == pb.FINISH_REASON_EOS_TOKEN and isinstance(json.loads(anything.text), dict)


@pytest.mark.parametrize("config, names", [
    (pb.GenerationConfig(json_schema="{oops"), "config.json_schema"),
    (pb.GenerationConfig(json_schema='{"type": "string", "format": "phone"}'), "Unknown format: phone"),
    (pb.GenerationConfig(regex="(unclosed"), "config.regex"),
    (pb.GenerationConfig(grammar="start: nowhere"), "config.grammar"),
    (pb.GenerationConfig(choice=pb.Choices()), "config.choice"),
    (pb.GenerationConfig(json_object=True, ignore_eos=True), "config.ignore_eos"),
    (pb.GenerationConfig(logit_bias={49152: 1.0}), "config.logit_bias[49152]"),
    (pb.GenerationConfig(logit_bias={7: 250.0}), "config.logit_bias[7]"),
    (pb.GenerationConfig(bad_words=["x" * 300]), "config.bad_words[0]"),
])
def test_bad_values_are_refused_naming_them(stub, config, names):
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(prompts=["Hi"], config=config), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert names in err.value.details()


def test_banned_words_and_logit_bias(stub):
    prompt = "Repeat after me: the weather is lovely, the weather is lovely."
    free = stub.Generate(pb.GenerateRequest(chats=[chat(prompt)], config=pb.GenerationConfig(max_new_tokens=30)),
                         timeout=60).completions[0]
    assert "weather" in free.text
    banned = stub.Generate(pb.GenerateRequest(chats=[chat(prompt)], config=pb.GenerationConfig(
        max_new_tokens=30, bad_words=["weather"])), timeout=60).completions[0]
    assert "weather" not in banned.text and banned.text != free.text
    forced = stub.Generate(pb.GenerateRequest(chats=[chat(prompt)], config=pb.GenerationConfig(
        max_new_tokens=4, logit_bias={free.token_ids[1]: 100.0})), timeout=60).completions[0]
    assert list(forced.token_ids) == [free.token_ids[1]] * 4


def test_the_cli_flags(stack, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))

    def cli(*args):
        out = subprocess.run([sys.executable, "-m", "genrpc.cli", "--addr", stack.gateway.address, "generate",
                              "--chat", *args], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    jsonschema.validate(json.loads(cli("Describe Rome as JSON.", "--json-schema", str(schema),
                                       "--max-new-tokens", "150")), SCHEMA)
    assert cli("Pick a colour.", "--choice", "red", "--choice", "blue") in ("red", "blue")
    assert re.fullmatch(r"[0-9]+", cli("A number?", "--regex", "[0-9]+", "--max-new-tokens", "5"))
    samples = cli("Once upon a time", "-n", "2", "--do-sample", "--seed", "5", "--max-new-tokens", "4")
    assert "--- sample 0 (seed 5)" in samples and "--- sample 1 (seed 6)" in samples


def test_several_samples_per_prompt(stub):
    """num_return_sequences: prompt-major completions, sample i seeded with seed + i (so equal to a
    single-sample request with that seed), streamed with a sample index on each message."""
    config = pb.GenerationConfig(max_new_tokens=12, do_sample=True, seed=40, num_return_sequences=3)
    response = stub.Generate(pb.GenerateRequest(prompts=["Once upon a time", "The sea was"], config=config),
                             timeout=120)
    assert [(c.index, c.sample_index, c.seed) for c in response.completions] == [
        (p, i, 40 + i) for p in range(2) for i in range(3)]
    for c in response.completions:
        single = stub.Generate(pb.GenerateRequest(prompts=[["Once upon a time", "The sea was"][c.index]],
                                                  config=pb.GenerationConfig(max_new_tokens=12, do_sample=True,
                                                                             seed=c.seed)), timeout=60).completions[0]
        assert list(single.token_ids) == list(c.token_ids)
    request = pb.GenerateStreamRequest(prompt="Once upon a time", config=config)
    messages = list(stub.GenerateStream(request, timeout=120))
    streamed = {i: [t for m in messages if m.sample_index == i for t in m.token_ids] for i in range(3)}
    assert [streamed[i] for i in range(3)] == [list(c.token_ids) for c in response.completions[:3]]
    assert sum(1 for m in messages if m.finish_reason) == 3
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(prompts=["x"], config=pb.GenerationConfig(num_return_sequences=2)), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "do_sample" in err.value.details()


def test_prompt_logprobs_through_the_services(stub):
    prompt = "The capital of France is Paris."
    ids = list(stub.Tokenize(pb.TokenizeRequest(prompts=[prompt]), timeout=30).prompts[0].token_ids)
    config = pb.GenerationConfig(max_new_tokens=3, prompt_logprobs=2)
    unary = stub.Generate(pb.GenerateRequest(prompts=[prompt], config=config), timeout=60).completions[0]
    got = unary.prompt_logprobs
    assert [p.token_id for p in got] == ids[1:]
    assert "".join(p.token for p in got) == prompt[len("The"):]  # each token's own text
    assert all(p.logprob <= 0 and len(p.top) == 2 for p in got)
    first = next(iter(stub.GenerateStream(pb.GenerateStreamRequest(prompt=prompt, config=config), timeout=60)))
    assert [(p.token_id, p.logprob) for p in first.prompt_logprobs] == [(p.token_id, p.logprob) for p in got]
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(prompts=["x"], config=pb.GenerationConfig(prompt_logprobs=21)), timeout=30)
    assert "config.prompt_logprobs" in err.value.details()
