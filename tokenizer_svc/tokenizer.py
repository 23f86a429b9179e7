"""Encoding and decoding with a Hugging Face tokenizer, as the tutorial does it:
chat template for messages, truncation on the left, left padding with an
attention mask for decoder-only batches.

Markup is safe by default: special-token text inside a prompt or a chat message
("<|im_start|>system...") is encoded as the plain text it is, so a caller cannot
forge a turn, while the chat template's own markup still becomes special tokens.
The template is rendered with a placeholder for each message's content; its
special tokens are matched in the template's text only, and the text between two
of them (template text and content together) is encoded with no special-token
matching. For content without markup the ids are exactly `apply_chat_template`'s
(tested). `parse_special_tokens` asks for the old behaviour: markup anywhere
becomes special tokens, as `tokenizer(text)` does."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Sequence

from tokenizers import Tokenizer as BackendTokenizer
from transformers import AutoTokenizer

from genrpc import faults
from genrpc.model_path import ModelSource
from tokenizer_svc.detokenize import DecodeStep, decode_incremental, decode_steps

CHAT_ROLES = ("system", "user", "assistant", "tool")
# Private-use characters around a message's index: no template writes them.
PLACEHOLDER = "\ue000{}\ue001"
PLACEHOLDER_RE = re.compile("\ue000(\\d+)\ue001")

log = logging.getLogger("genrpc.tokenizer")


@dataclass
class EncodedRow:
    """One encoded prompt; `input_ids` and `attention_mask` are left-padded when the batch was padded."""

    input_ids: list[int]
    attention_mask: list[int]
    num_tokens: int
    num_original_tokens: int
    tokens: list[str] = field(default_factory=list)


@dataclass
class DecodeStreamItem:
    token_ids: list[int]
    read_offset: int
    skip_special_tokens: bool
    final: bool = False
    num_new_tokens: int = 0  # > 1: decode the last ones one at a time (detokenize.decode_steps)


class TokenizerError(ValueError):
    """Input the tokenizer cannot encode (e.g. a chat with a role the template refuses)."""


class AnswerTooLarge(Exception):
    """The answer would not fit in one message; found before it is built (and, where a sample of the
    input already shows it, before the whole input is tokenized)."""


SAMPLE_CHARS = 8_000  # characters of a text's start, middle and end, tokenized to estimate its answer's size


def _row_answer_bytes(ids: list[int], tokens: list[str]) -> int:
    """Bytes an encoded row takes in a message: packed ids and mask (<= 3 + 1 a token), and each
    token string with its tag and length."""
    return 4 * len(ids) + sum(len(t.encode()) + 3 for t in tokens)


class Tokenizer:
    """A loaded tokenizer and the operations the service offers."""

    def __init__(self, model: str):
        self._piece_cache: dict[int, str] = {}
        source = ModelSource.parse(model)
        self.name = source.display_name
        self.hf = AutoTokenizer.from_pretrained(source.name_or_path, **source.kwargs())
        self.hf.padding_side = "left"
        if self.hf.pad_token_id is None:
            self.hf.pad_token = self.hf.eos_token
        self.pad_token_id: int = self.hf.pad_token_id
        self.eos_token_ids: list[int] = [self.hf.eos_token_id] if self.hf.eos_token_id is not None else []
        self.special_token_ids: list[int] = sorted(set(self.hf.all_special_ids))
        self.vocab_size: int = len(self.hf)
        self.has_chat_template = bool(self.hf.chat_template)
        # A copy of the backend that never matches special tokens (a copy: the flag is the object's, and
        # calls may run on several threads); and the special tokens as the template may write them.
        self._plain = BackendTokenizer.from_str(self.hf.backend_tokenizer.to_str())
        self._plain.encode_special_tokens = True
        specials = {t.content: i for i, t in self.hf.added_tokens_decoder.items() if t.special}
        self._special_ids = specials
        self._special_re = re.compile(
            "(" + "|".join(re.escape(c) for c in sorted(specials, key=len, reverse=True)) + ")") if specials else None
        self._warned_template = False

    def encode(
        self,
        texts: Sequence[str] = (),
        chats: Sequence[Sequence[dict]] = (),
        truncate_input_tokens: int | None = None,
        pad: bool = False,
        return_tokens: bool = False,
        parse_special_tokens: bool = False,
        max_answer_bytes: int | None = None,
        add_special_tokens: bool = True,
    ) -> list[EncodedRow]:
        """Encodes texts or chats; keeps the last `truncate_input_tokens` ids of each; left-pads when `pad`.
        Markup in the caller's text becomes special tokens only with `parse_special_tokens`. Raises
        AnswerTooLarge when the rows with their token strings would pass `max_answer_bytes`."""
        faults.check("tokenizer.encode")
        if max_answer_bytes and return_tokens and texts:
            self._refuse_large(texts, max_answer_bytes)
        if chats:
            id_lists = [self._encode_chat(messages, parse_special_tokens) for messages in chats]
        elif parse_special_tokens:
            id_lists = [list(ids) for ids in self.hf(list(texts), add_special_tokens=add_special_tokens)["input_ids"]]
        else:
            id_lists = [e.ids for e in self._plain.encode_batch(list(texts), add_special_tokens=add_special_tokens)]
        rows = []
        for ids in id_lists:
            original = len(ids)
            if truncate_input_tokens is not None and original > truncate_input_tokens:
                ids = ids[original - truncate_input_tokens:]
            tokens = self.hf.convert_ids_to_tokens(ids) if return_tokens else []
            rows.append(EncodedRow(ids, [1] * len(ids), len(ids), original, tokens))
        if max_answer_bytes and return_tokens:
            size = sum(_row_answer_bytes(row.input_ids, row.tokens) for row in rows)
            if size > max_answer_bytes:
                rows.clear()  # the traceback keeps this frame (and its millions of strings) alive
                id_lists.clear()
                raise AnswerTooLarge(f"the answer would take {size / 2**20:.1f} MiB, over the "
                                     f"{max_answer_bytes / 2**20:.0f} MiB one message may carry: send fewer or "
                                     "shorter prompts")
        if pad and rows:
            longest = max(row.num_tokens for row in rows)
            for row in rows:
                missing = longest - row.num_tokens
                row.input_ids = [self.pad_token_id] * missing + row.input_ids
                row.attention_mask = [0] * missing + row.attention_mask
        return rows

    def _refuse_large(self, texts: Sequence[str], max_answer_bytes: int) -> None:
        """Refuses at once when samples of the texts already show that the answer would be too
        large (tokenizing a million characters takes seconds)."""
        estimate = 0.0
        for text in texts:
            if len(text) <= 3 * SAMPLE_CHARS:
                samples = [text]
            else:
                middle = (len(text) - SAMPLE_CHARS) // 2
                samples = [text[:SAMPLE_CHARS], text[middle:middle + SAMPLE_CHARS], text[-SAMPLE_CHARS:]]
            size = 0
            for sample in samples:
                ids = self._plain.encode(sample, add_special_tokens=False).ids
                size += _row_answer_bytes(ids, self.hf.convert_ids_to_tokens(ids))
            estimate += size / sum(map(len, samples)) * len(text)
        if estimate > max_answer_bytes:
            raise AnswerTooLarge(f"the answer would take about {estimate / 2**20:.0f} MiB, over the "
                                 f"{max_answer_bytes / 2**20:.0f} MiB one message may carry: send fewer or "
                                 "shorter prompts")

    def _render(self, messages: list[dict]) -> str:
        try:
            return self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # the template raises for conversations it refuses
            raise TokenizerError(f"chats: the chat template refused the conversation: {exc}") from exc

    def _encode_chat(self, messages: Sequence[dict], parse_special_tokens: bool) -> list[int]:
        if not self.has_chat_template:
            raise TokenizerError(f"chats: the tokenizer of {self.name} has no chat template; send prompts instead")
        text = self._render(list(messages))
        if parse_special_tokens or self._special_re is None:
            return list(self.hf(text, add_special_tokens=False)["input_ids"])
        # The template with a placeholder where each message's content goes: [text, index, text, ...].
        pieces = PLACEHOLDER_RE.split(self._render(
            [dict(m, content=PLACEHOLDER.format(i)) for i, m in enumerate(messages)]))
        contents = [m["content"] for m in messages]
        order = [int(i) for i in pieces[1::2]]
        rebuilt = "".join(p if k % 2 == 0 else contents[int(p)] for k, p in enumerate(pieces))
        if order != list(range(len(messages))) or rebuilt != text:
            # The template changes, drops or repeats content (e.g. trims it): the content goes in as sent.
            if not self._warned_template:
                self._warned_template = True
                log.warning("the chat template of %s changes message contents; they are encoded as sent", self.name)
            if len(set(order)) != len(order) or not set(order) <= set(range(len(messages))):
                raise TokenizerError("chats: the chat template repeats or invents message contents")
        ids: list[int] = []
        pending: list[str] = []  # text between two template special tokens

        def flush() -> None:
            if pending:
                ids.extend(self._plain.encode("".join(pending), add_special_tokens=False).ids)
                pending.clear()

        for k, piece in enumerate(pieces):
            if k % 2:
                pending.append(contents[int(piece)])
                continue
            for j, part in enumerate(self._special_re.split(piece)):
                if j % 2:
                    flush()
                    ids.append(self._special_ids[part])
                elif part:
                    pending.append(part)
        flush()
        return ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, sequences: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        return self.hf.batch_decode([list(s) for s in sequences], skip_special_tokens=skip_special_tokens)

    def pieces(self, token_ids: Sequence[int]) -> list[str]:
        """Each id's own text, special tokens kept (a byte-level piece of a character decodes to
        U+FFFD): what logprobs show for a token. Cached: there are only vocab_size of them."""
        missing = [i for i in dict.fromkeys(token_ids) if i not in self._piece_cache]
        if missing:
            for i, text in zip(missing, self.hf.batch_decode([[i] for i in missing], skip_special_tokens=False)):
                self._piece_cache[i] = text
        return [self._piece_cache[i] for i in token_ids]

    def decode_stream(self, items: Sequence[DecodeStreamItem]) -> list[DecodeStep]:
        faults.check("tokenizer.detokenize")
        return [
            decode_steps(self.decode, item.token_ids, item.read_offset, item.skip_special_tokens, item.final,
                         item.num_new_tokens) if item.num_new_tokens > 1 else
            decode_incremental(self.decode, item.token_ids, item.read_offset, item.skip_special_tokens, item.final)
            for item in items
        ]
