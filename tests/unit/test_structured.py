"""Structured output, logit bias and bad words at the gateway: what is refused, naming it, and the
conversions' cache (the engine with the real model: tests/model/test_structured.py)."""


import json
import re

import pytest

from gateway.structured import grammar_for
from gateway.validation import ModelLimits, RequestedConfig, resolve_config
from genrpc.errors import InvalidArgument

LIMITS = ModelLimits(2048, 49152, RequestedConfig(max_new_tokens=20, do_sample=False, temperature=1.0, top_k=50,
                                                  top_p=1.0, min_p=0.0, typical_p=1.0, repetition_penalty=1.0))

# Schemas of the kinds people send: nested objects, arrays, enums, required fields, number ranges,
# string patterns and lengths, optional fields, anyOf, a tool call.
# (A number's decimals are bounded by multipleOf, binary fractions: jsonschema checks 1.4 against 0.1
# in floating point and finds it no multiple.)
SCHEMAS = [  # as structured-output users write them: closed objects, bounded strings and arrays
    {'type': 'object',
     'properties': {'name': {'type': 'string', 'maxLength': 30},
                    'age': {'type': 'integer', 'minimum': 0, 'maximum': 120}},
     'required': ['name', 'age'],
     'additionalProperties': False},
    {'type': 'object',
     'properties': {'sentiment': {'enum': ['positive', 'negative', 'neutral']},
                    'confidence': {'type': 'number', 'minimum': 0, 'maximum': 1, 'multipleOf': 0.125}},
     'required': ['sentiment', 'confidence'],
     'additionalProperties': False},
    {'type': 'object',
     'properties': {'title': {'type': 'string', 'maxLength': 40},
                    'tags': {'type': 'array',
                             'items': {'type': 'string', 'maxLength': 12},
                             'minItems': 1,
                             'maxItems': 3}},
     'required': ['title', 'tags'],
     'additionalProperties': False},
    {'type': 'object',
     'properties': {'user': {'type': 'object',
                             'properties': {'id': {'type': 'integer', 'minimum': 1, 'maximum': 999999},
                                            'email': {'type': 'string',
                                                      'pattern': '^[a-z]{1,12}@[a-z]{1,12}\\.com$'}},
                             'required': ['id', 'email'],
                             'additionalProperties': False},
                    'active': {'type': 'boolean'}},
     'required': ['user', 'active'],
     'additionalProperties': False},
    {'type': 'object',
     'properties': {'tool': {'const': 'get_weather'},
                    'arguments': {'type': 'object',
                                  'properties': {'city': {'type': 'string', 'maxLength': 24},
                                                 'unit': {'enum': ['celsius', 'fahrenheit']}},
                                  'required': ['city', 'unit'],
                                  'additionalProperties': False}},
     'required': ['tool', 'arguments'],
     'additionalProperties': False},
    {'type': 'object',
     'properties': {'items': {'type': 'array',
                              'maxItems': 3,
                              'items': {'type': 'object',
                                        'properties': {'sku': {'type': 'string', 'pattern': '^[A-Z]{3}-[0-9]{3}$'},
                                                       'qty': {'type': 'integer', 'minimum': 1, 'maximum': 9}},
                                        'required': ['sku', 'qty'],
                                        'additionalProperties': False}}},
     'required': ['items'],
     'additionalProperties': False},
    {'type': 'object',
     'properties': {'answer': {'anyOf': [{'type': 'integer'}, {'type': 'string', 'maxLength': 20}]},
                    'explanation': {'type': 'string', 'maxLength': 60}},
     'required': ['answer'],
     'additionalProperties': False},
    {'type': 'object',
     'properties': {'date': {'type': 'string', 'pattern': '^20[0-9]{2}-[01][0-9]-[0-3][0-9]$'},
                    'event': {'type': 'string', 'maxLength': 30},
                    'attendees': {'type': 'integer', 'minimum': 0, 'maximum': 500}},
     'required': ['date', 'event'],
     'additionalProperties': False},
    {'type': 'object',
     'properties': {'label': {'enum': ['bug', 'feature', 'question']},
                    'priority': {'type': 'integer', 'enum': [1, 2, 3]},
                    'summary': {'type': 'string', 'maxLength': 50}},
     'required': ['label', 'priority', 'summary'],
     'additionalProperties': False},
    {'type': 'object',
     'properties': {'point': {'type': 'object',
                              'properties': {'x': {'type': 'number', 'minimum': -10, 'maximum': 10,
                                                   'multipleOf': 0.25},
                                             'y': {'type': 'number', 'minimum': -10, 'maximum': 10,
                                                   'multipleOf': 0.25}},
                              'required': ['x', 'y'],
                              'additionalProperties': False},
                    'color': {'type': 'string', 'pattern': '^#[0-9a-f]{6}$'}},
     'required': ['point', 'color'],
     'additionalProperties': False},
]
ASKS = ["a person", "the review 'great phone, poor battery'", "a blog post about tea", "a user account",
        "a weather lookup for Lisbon", "an order of two items", "the question 6 times 7",
        "a meeting next spring", "the issue 'app crashes on start'", "a point on a plane"]


# -- the gateway's checks ----------------------------------------------------------------------


@pytest.mark.parametrize("kind, value, says", [
    ("json_schema", "{not json", "is not JSON"),
    ("json_schema", '{"type": "string", "format": "phone"}', "Unknown format: phone"),
    ("json_schema", '{"not": {"type": "string"}}', "Unimplemented keys"),
    ("json_schema", '{"type": "integer", "minimum": 5, "maximum": 1}', "Unsatisfiable"),
    ("json_schema", '{"$ref": "#/nowhere"}', "does not exist"),
    ("regex", "(unclosed", "unclosed group"),
    ("grammar", "start: missing_rule", "unknown name"),
    ("choice", [], "give 1 to 256"),
    ("choice", ["ok", ""], "config.choice.options[1]"),
    ("json_object", False, "set it to true"),
    ("regex", "", "is empty"),
])
def test_bad_structured_output_is_refused_naming_what_is_wrong(kind, value, says):
    with pytest.raises(InvalidArgument) as err:
        resolve_config(RequestedConfig(structured_output=(kind, value)), LIMITS)
    assert f"config.{kind}" in str(err.value) and says in str(err.value)


def test_structured_output_refuses_ignore_eos():
    with pytest.raises(InvalidArgument, match="config.ignore_eos"):
        resolve_config(RequestedConfig(structured_output=("json_object", True), ignore_eos=True), LIMITS)


def test_conversions_are_cached_by_text():
    from gateway import structured

    structured._compile.cache_clear()
    schema = json.dumps(SCHEMAS[0])
    first = grammar_for("json_schema", schema)
    assert grammar_for("json_schema", schema) is first
    assert structured._compile.cache_info().hits == 1


@pytest.mark.parametrize("bias, says", [({49152: 1.0}, "logit_bias[49152]"), ({5: 101.0}, "logit_bias[5]"),
                                        ({5: float("nan")}, "logit_bias[5]"), ({i: 1.0 for i in range(301)}, "300")])
def test_bad_logit_bias_is_refused(bias, says):
    with pytest.raises(InvalidArgument, match=re.escape(says)):
        resolve_config(RequestedConfig(logit_bias=bias), LIMITS)


def test_bad_words_are_bounded():
    with pytest.raises(InvalidArgument, match=re.escape("config.bad_words[1]")):
        resolve_config(RequestedConfig(bad_words=["fine", ""]), LIMITS)
    with pytest.raises(InvalidArgument, match="at most 64"):
        resolve_config(RequestedConfig(bad_words=["w"] * 65), LIMITS)

