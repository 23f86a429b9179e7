import math

import pytest

from gateway.validation import ModelLimits, RequestedConfig, fit_to_context, resolve_config, validate_prompts
from genrpc.errors import InvalidArgument

DEFAULTS = RequestedConfig(max_new_tokens=20, do_sample=False, temperature=1.0, top_k=50, top_p=1.0, min_p=0.0,
                           typical_p=1.0, repetition_penalty=1.0)
LIMITS = ModelLimits(max_context=100, vocab_size=1000, defaults=DEFAULTS)


def test_unset_means_model_default():
    c = resolve_config(RequestedConfig(), LIMITS)
    assert (c.max_new_tokens, c.do_sample, c.top_k, c.skip_special_tokens, c.seed) == (20, False, 50, True, None)
    assert not c.max_new_tokens_explicit


def test_top_logprobs_implies_logprobs():
    assert resolve_config(RequestedConfig(top_logprobs=2), LIMITS).logprobs


@pytest.mark.parametrize("field,value", [
    ("max_new_tokens", 0), ("max_new_tokens", 100), ("temperature", 0.0), ("temperature", math.nan),
    ("top_p", 0.0), ("top_p", math.inf), ("min_p", 1.5), ("typical_p", -1.0), ("repetition_penalty", 0.0),
    ("top_k", -2), ("time_limit_ms", 0), ("truncate_input_tokens", 100), ("top_logprobs", 21),
])
def test_refusals_name_field_and_value(field, value):
    with pytest.raises(InvalidArgument) as info:
        resolve_config(RequestedConfig(**{field: value}), LIMITS)
    assert f"config.{field}=" in str(info.value)
    assert repr(value) in str(info.value)


def test_stop_limits():
    with pytest.raises(InvalidArgument, match="stop"):
        resolve_config(RequestedConfig(stop=["a"] * 33), LIMITS)
    with pytest.raises(InvalidArgument, match=r"stop_token_ids\[1\]"):
        resolve_config(RequestedConfig(stop_token_ids=[1, 1000]), LIMITS)


def test_prompts():
    validate_prompts(["a"], [], single=False)
    with pytest.raises(InvalidArgument, match="exactly one"):
        validate_prompts([], [], single=False)
    with pytest.raises(InvalidArgument, match=r"prompts\[1\] is empty"):
        validate_prompts(["a", ""], [], single=False)
    with pytest.raises(InvalidArgument, match=r"chats\[0\].messages\[1\].role"):
        validate_prompts([], [[("user", "a"), ("robot", "b")]], single=False)


def test_fit_to_context():
    default = resolve_config(RequestedConfig(), LIMITS)
    assert fit_to_context(10, default, 100, "prompts[0]") == 20
    assert fit_to_context(90, default, 100, "prompts[0]") == 10  # the default shrinks to fit
    with pytest.raises(InvalidArgument, match="truncate_input_tokens"):
        fit_to_context(100, default, 100, "prompts[0]")
    explicit = resolve_config(RequestedConfig(max_new_tokens=50), LIMITS)
    with pytest.raises(InvalidArgument, match="at most 10 new tokens"):
        fit_to_context(90, explicit, 100, "prompts[0]")


def test_a_bad_temperature_says_what_to_do_whether_sampling_or_not():
    with pytest.raises(InvalidArgument, match="unused without do_sample=true"):
        resolve_config(RequestedConfig(temperature=-1.0), LIMITS)
    with pytest.raises(InvalidArgument, match="for greedy decoding set do_sample=false"):
        resolve_config(RequestedConfig(temperature=-1.0, do_sample=True), LIMITS)


def test_sampling_fields_have_one_definition():
    """The gateway passes, and the model service reads, SamplingParams by its .proto field names:
    the engine's dataclass and the gateway's resolved config must carry each of them."""
    import dataclasses

    from gateway.validation import ResolvedConfig
    from genrpc.internal.v1 import model_pb2
    from model_svc.engine.sequence import SamplingParams

    wire = {f.name for f in model_pb2.SamplingParams.DESCRIPTOR.fields}
    assert wire == {f.name for f in dataclasses.fields(SamplingParams)}
    # bad_words_ids are made per request from config.bad_words by the tokenizer service.
    derived = {name for name, value in vars(ResolvedConfig).items() if isinstance(value, property)}  # stop_strings
    assert wire - {"bad_words_ids"} <= {f.name for f in dataclasses.fields(ResolvedConfig)} | derived
    assert "bad_words" in {f.name for f in dataclasses.fields(ResolvedConfig)}


@pytest.mark.parametrize("config, names, value", [
    (dict(no_repeat_ngram_size=65), "config.no_repeat_ngram_size=", "65"),
    (dict(epsilon_cutoff=1.0), "config.epsilon_cutoff=", "1.0"),
    (dict(eta_cutoff=-0.1), "config.eta_cutoff=", "-0.1"),
    (dict(eta_cutoff=math.nan), "config.eta_cutoff=", "nan"),
    (dict(suppress_tokens=[1, 1000]), "config.suppress_tokens[1]=", "1000"),
    (dict(begin_suppress_tokens=list(range(1025))), "config.begin_suppress_tokens=", "1025 ids"),
    (dict(forced_eos_token_id=[-1]), "config.forced_eos_token_id[0]=", "-1"),
    (dict(exponential_decay_length_penalty=(-1, 1.5)), "config.exponential_decay_length_penalty.start_index=", "-1"),
    (dict(exponential_decay_length_penalty=(3, 0.0)), "config.exponential_decay_length_penalty.decay_factor=", "0.0"),
    (dict(sequence_bias=[([1, 2], 101.0)]), "config.sequence_bias[0].bias=", "101.0"),
    (dict(sequence_bias=[([], 1.0)]), "config.sequence_bias[0].token_ids=", "no ids"),
    (dict(sequence_bias=[([5] * 17, 1.0)]), "config.sequence_bias[0].token_ids=", "17 ids"),
    (dict(sequence_bias=[([5], 1.0)] * 301), "config.sequence_bias=", "301 sequences"),
    (dict(frequency_penalty=2.5), "config.frequency_penalty=", "2.5"),
    (dict(presence_penalty=-3.0), "config.presence_penalty=", "-3.0"),
    (dict(watermarking_config={"bias": -1.0}), "config.watermarking_config.bias=", "-1.0"),
    (dict(watermarking_config={"hashing_key": 0}), "config.watermarking_config.hashing_key=", "0"),
    (dict(watermarking_config={"seeding_scheme": "x"}), "config.watermarking_config.seeding_scheme=", "'x'"),
    (dict(max_matching_ngram_size=9), "config.max_matching_ngram_size=", "9"),
    (dict(max_matching_ngram_size=0), "config.max_matching_ngram_size=", "0"),
    (dict(num_beams=17), "config.num_beams=", "[1, 16]"),
    (dict(num_beams=0), "config.num_beams=", "[1, 16]"),
    (dict(length_penalty=float("nan")), "config.length_penalty=", "finite"),
    (dict(early_stopping=7), "config.early_stopping=", "EARLY_STOPPING_TRUE"),
    (dict(num_beam_groups=2), "config.num_beam_groups=", "group beam search is not served"),
    (dict(diversity_penalty=0.5), "config.diversity_penalty=", "group beam search is not served"),
    (dict(num_beams=4, do_sample=True), "config.do_sample=", "beam sampling is not served"),
    (dict(num_beams=4, num_return_sequences=5), "config.num_return_sequences=", "at most num_beams=4"),
    (dict(num_beams=4, top_logprobs=2), "config.logprobs=", "sequence_score"),
    (dict(num_beams=4, prompt_logprobs=0), "config.prompt_logprobs=", "num_beams > 1"),
    (dict(num_beams=2, structured_output=("regex", "a+")), "config.regex=", "structured output"),
    (dict(num_return_sequences=2), "config.num_return_sequences=", "num_beams > 1"),
])
def test_generate_processors_are_checked(config, names, value):
    with pytest.raises(InvalidArgument) as info:
        resolve_config(RequestedConfig(**config), LIMITS)
    assert names in str(info.value) and value in str(info.value)


def test_beam_search_resolves():
    c = resolve_config(RequestedConfig(num_beams=4, num_return_sequences=2, length_penalty=0.5, early_stopping=3,
                                       stop=["\n"]), LIMITS)
    assert (c.num_beams, c.num_return_sequences, c.length_penalty, c.early_stopping) == (4, 2, 0.5, 3)
    assert c.stop_strings == ["\n"]  # the worker ends beams on them inside the search
    plain = resolve_config(RequestedConfig(stop=["\n"], length_penalty=2.0), LIMITS)  # ignored without beams
    assert plain.num_beams == 1 and plain.stop_strings == [] and plain.stop == ["\n"]


def test_generate_processors_resolve():
    c = resolve_config(RequestedConfig(no_repeat_ngram_size=3, epsilon_cutoff=3e-4, suppress_tokens=[7],
                                       exponential_decay_length_penalty=(4, 1.5), sequence_bias=[([1, 2], -5.0)],
                                       renormalize_logits=True, presence_penalty=0.5), LIMITS)
    assert (c.no_repeat_ngram_size, c.epsilon_cutoff, c.eta_cutoff, c.suppress_tokens) == (3, 3e-4, 0.0, [7])
    assert c.exponential_decay_length_penalty == (4, 1.5) and c.sequence_bias == [([1, 2], -5.0)]
    assert c.renormalize_logits and (c.frequency_penalty, c.presence_penalty) == (0.0, 0.5)
    assert c.watermarking_config is None
    w = resolve_config(RequestedConfig(watermarking_config={"bias": 3.0}), LIMITS).watermarking_config
    assert w == dict(greenlist_ratio=0.25, bias=3.0, hashing_key=15485863, seeding_scheme="lefthash", context_width=1)


def test_detect_watermark_requests_are_checked():
    from gateway.validation import check_detect_watermark

    settings, z = check_detect_watermark("some text", [], {"bias": 3.0}, None, 1000)
    assert settings["bias"] == 3.0 and settings["seeding_scheme"] == "lefthash" and z == 3.0
    for args, message in [(("", [], None, None), "exactly one"), (("a", [1], None, None), "exactly one"),
                          (("", [1, 1000], None, None), "token_ids[1]=1000"),
                          (("a", [], {"context_width": 0}, None), "watermarking_config.context_width=0"),
                          (("a", [], None, 0.0), "z_threshold=0.0")]:
        with pytest.raises(InvalidArgument) as info:
            check_detect_watermark(*args, 1000)
        assert message in str(info.value)
