"""Structured output requests as llguidance grammar text, checked at the gateway.

A JSON schema, "any JSON object", a regular expression, a Lark grammar or a list of choices becomes
the grammar text the model service compiles against its tokenizer (model_svc/engine/constraints.py). JSON is laid out
as json.dumps writes it (JSON_LAYOUT); a schema may set its own layout with llguidance's
"x-guidance" key.
Everything that can be refused without the tokenizer is refused here, naming what is wrong: text
that is not JSON, schema features the constraint would not enforce (an unknown "format", "not"),
unsatisfiable schemas, regex and grammar syntax errors. Conversions are cached by their text
(bounded), so a repeated schema costs a dictionary lookup.
"""

from __future__ import annotations

import functools
import json

import llguidance

from genrpc.errors import InvalidArgument

KINDS = ("json_schema", "json_object", "regex", "grammar", "choice")
MAX_TEXT_CHARS = 100_000  # a schema, regex or grammar
MAX_CHOICES = 256
MAX_CHOICE_CHARS = 1024
# JSON comes out laid out as Python's json.dumps writes it (", " and ": ", no newlines): a small
# model left free to choose whitespace can spend its tokens on newlines and never close the object.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_for(kind: str, value) -> str:
    """llguidance's grammar text for `config.<kind>` = value; InvalidArgument naming the field."""
    name = f"config.{kind}"
    if kind == "json_object":
        if not value:
            raise InvalidArgument(f"{name}=false: set it to true, or leave the structured_output oneof unset")
        kind, text = "json_schema", '{"type": "object"}'
    elif kind == "choice":
        options = list(value)
        if not 1 <= len(options) <= MAX_CHOICES:
            raise InvalidArgument(f"{name}.options has {len(options)} strings: give 1 to {MAX_CHOICES}")
        for i, option in enumerate(options):
            if not 1 <= len(option) <= MAX_CHOICE_CHARS:
                raise InvalidArgument.field(f"{name}.options[{i}]", option,
                                            f"a choice must have 1 to {MAX_CHOICE_CHARS} characters")
        # A Lark rule of string literals (JSON's escapes are Lark's).
        kind, text = "grammar", "start: " + " | ".join(json.dumps(o, ensure_ascii=False) for o in options)
    else:
        text = value
        if not text:
            raise InvalidArgument(f"{name} is empty")
        if len(text) > MAX_TEXT_CHARS:
            raise InvalidArgument(f"{name} has {len(text)} characters: at most {MAX_TEXT_CHARS}")
        if kind == "json_schema":
            try:
                json.loads(text)
            except ValueError as exc:
                raise InvalidArgument(f"{name} is not JSON: {exc}") from None
    try:
        return _compile(kind, text)
    except ValueError as exc:
        raise InvalidArgument(f"{name}: {exc}") from None


@functools.lru_cache(maxsize=256)
def _compile(kind: str, text: str) -> str:
    matcher = llguidance.LLMatcher
    try:
        if kind == "json_schema":
            grammar = matcher.grammar_from_json_schema(text, defaults=JSON_LAYOUT)
        elif kind == "regex":
            grammar = matcher.grammar_from_regex(text)
        else:
            grammar = matcher.grammar_from_lark(text)
    except Exception as exc:  # noqa: BLE001 - the library's own message is what the caller needs
        raise ValueError(str(exc)) from None
    failed, messages = matcher.validate_grammar_with_warnings(grammar)
    if failed or messages:  # a warning is a feature the constraint would not enforce
        raise ValueError("; ".join(m.strip() for m in messages) or "the grammar does not compile")
    return grammar
