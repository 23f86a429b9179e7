"""Stateless incremental detokenization (TGI's `decode_token`).

The caller keeps a sequence's ids and two offsets: `prefix_offset`, where the
ids it decodes from start (a few ids before the new ones, so a token that
begins with a space, or a character split over several tokens, decodes as it
would in the full text), and `read_offset`, where the ids already turned into
text end. Each call decodes ids[prefix:read] and ids[prefix:], and the new text
is what the second adds to the first. Text ending in U+FFFD is an incomplete
character: nothing is emitted and the offsets stay until the next id completes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

REPLACEMENT_CHAR = "\ufffd"

Decode = Callable[[Sequence[int], bool], str]


@dataclass(frozen=True)
class DecodeStep:
    """The result of one incremental decode; offsets are relative to the ids passed in."""

    text: str
    prefix_offset: int
    read_offset: int
    texts: tuple[str, ...] = ()  # decode_steps: each new id's text (they add up to `text`)


def decode_incremental(
    decode: Decode, token_ids: Sequence[int], read_offset: int, skip_special_tokens: bool, final: bool = False
) -> DecodeStep:
    """Decodes the ids past `read_offset` given `token_ids` that start at the prefix offset.

    With `final`, whatever is left is emitted, even an incomplete character, so that
    the streamed text adds up to the whole decode.
    """
    if not 0 <= read_offset <= len(token_ids):
        raise ValueError(f"read_offset {read_offset} is outside the {len(token_ids)} ids sent")
    prefix_text = decode(token_ids[:read_offset], skip_special_tokens)
    new_text = decode(token_ids, skip_special_tokens)
    if len(new_text) > len(prefix_text) and (final or not new_text.endswith(REPLACEMENT_CHAR)):
        return DecodeStep(new_text[len(prefix_text):], read_offset, len(token_ids))
    if final:
        return DecodeStep("", read_offset, len(token_ids))
    return DecodeStep("", 0, read_offset)


def decode_steps(
    decode: Decode, token_ids: Sequence[int], read_offset: int, skip_special_tokens: bool, final: bool,
    num_new: int,
) -> DecodeStep:
    """`decode_incremental` for the last `num_new` ids one at a time, as that many successive calls
    would decode them (a step of speculative decoding brings several ids): each id's text, in order,
    and the offsets after the last (`final` applies to the last id only)."""
    if not 1 <= num_new <= len(token_ids) - read_offset:
        raise ValueError(f"num_new_tokens {num_new} is not in [1, {len(token_ids) - read_offset}] "
                         f"(ids past read_offset {read_offset} of the {len(token_ids)} sent)")
    prefix, read = 0, read_offset
    texts = []
    first_new = len(token_ids) - num_new
    for j in range(num_new):
        step = decode_incremental(decode, token_ids[prefix:first_new + j + 1], read - prefix, skip_special_tokens,
                                  final and j == num_new - 1)
        texts.append(step.text)
        prefix, read = prefix + step.prefix_offset, prefix + step.read_offset
    return DecodeStep("".join(texts), prefix, read, tuple(texts))
