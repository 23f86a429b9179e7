"""Incremental detokenization with the real tokenizer."""

import pytest

from tests.helpers import MODEL
from tokenizer_svc.detokenize import decode_incremental
from tokenizer_svc.tokenizer import DecodeStreamItem, Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(MODEL)


def stream_text(tok, prompt_ids, ids, skip=True):
    window, read, out = list(prompt_ids[-5:]), len(prompt_ids[-5:]), []
    for i, token_id in enumerate(ids):
        window.append(token_id)
        (step,) = tok.decode_stream([DecodeStreamItem(window, read, skip, final=i == len(ids) - 1)])
        out.append(step.text)
        window, read = window[step.prefix_offset:], step.read_offset - step.prefix_offset
    return out


@pytest.mark.parametrize("text", ["Hello world, how are you?", "한국어 텍스트 😀👍 emoji", "日本語と English mixed"])
def test_pieces_concatenate_to_full_decode(tok, text):
    ids = tok.encode([text])[0].input_ids
    pieces = stream_text(tok, tok.encode(["Prompt:"])[0].input_ids, ids)
    assert "".join(pieces) == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_incomplete_character_is_held_back(tok):
    ids = tok.encode(["😀"])[0].input_ids
    assert len(ids) > 1  # an emoji spans several byte-level tokens
    step = decode_incremental(tok.decode, ids[:1], 0, True)
    assert step.text == "" and step.read_offset == 0
    final = decode_incremental(tok.decode, ids, 0, True)
    assert final.text == "😀"


def test_final_flushes_an_incomplete_character(tok):
    ids = tok.encode(["😀"])[0].input_ids
    step = decode_incremental(tok.decode, ids[:1], 0, True, final=True)
    assert step.text == tok.decode(ids[:1])


def test_special_tokens_skipped_or_kept(tok):
    ids = tok.encode(["Hi"])[0].input_ids + tok.eos_token_ids
    assert "".join(stream_text(tok, [], ids, skip=True)) == "Hi"
    assert "".join(stream_text(tok, [], ids, skip=False)) == "Hi<|im_end|>"


def test_left_padding_and_attention_mask(tok):
    rows = tok.encode(["a", "a longer prompt here"], pad=True)
    assert len(rows[0].input_ids) == len(rows[1].input_ids)
    assert rows[0].attention_mask[0] == 0 and rows[0].attention_mask[-1] == 1
    assert rows[0].input_ids[rows[0].attention_mask.index(1):] == tok.encode(["a"])[0].input_ids
    assert rows[0].input_ids[0] == tok.pad_token_id
    assert all(rows[1].attention_mask)


def test_truncation_keeps_the_last_tokens(tok):
    full = tok.encode(["one two three four five"])[0]
    (row,) = tok.encode(["one two three four five"], truncate_input_tokens=2)
    assert row.input_ids == full.input_ids[-2:]
    assert row.num_original_tokens == full.num_tokens


def test_bad_read_offset_is_refused(tok):
    with pytest.raises(ValueError):
        decode_incremental(tok.decode, [1, 2], 5, True)
