"""Encoding and decoding with a Hugging Face tokenizer, as the tutorial does it:
chat template for messages, truncation on the left, left padding with an
attention mask for decoder-only batches."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from transformers import AutoTokenizer

from genrpc.model_path import ModelSource
from tokenizer_svc.detokenize import DecodeStep, decode_incremental

CHAT_ROLES = ("system", "user", "assistant", "tool")


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


class TokenizerError(ValueError):
    """Input the tokenizer cannot encode (e.g. a chat with a role the template refuses)."""


class Tokenizer:
    """A loaded tokenizer and the operations the service offers."""

    def __init__(self, model: str):
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

    def encode(
        self,
        texts: Sequence[str] = (),
        chats: Sequence[Sequence[dict]] = (),
        truncate_input_tokens: int | None = None,
        pad: bool = False,
        return_tokens: bool = False,
    ) -> list[EncodedRow]:
        """Encodes texts or chats; keeps the last `truncate_input_tokens` ids of each; left-pads when `pad`."""
        if chats:
            id_lists = [self._encode_chat(messages) for messages in chats]
        else:
            id_lists = [list(ids) for ids in self.hf(list(texts), add_special_tokens=True)["input_ids"]]
        rows = []
        for ids in id_lists:
            original = len(ids)
            if truncate_input_tokens is not None and original > truncate_input_tokens:
                ids = ids[original - truncate_input_tokens:]
            tokens = self.hf.convert_ids_to_tokens(ids) if return_tokens else []
            rows.append(EncodedRow(ids, [1] * len(ids), len(ids), original, tokens))
        if pad and rows:
            longest = max(row.num_tokens for row in rows)
            for row in rows:
                missing = longest - row.num_tokens
                row.input_ids = [self.pad_token_id] * missing + row.input_ids
                row.attention_mask = [0] * missing + row.attention_mask
        return rows

    def _encode_chat(self, messages: Sequence[dict]) -> list[int]:
        if not self.has_chat_template:
            raise TokenizerError(f"chats: the tokenizer of {self.name} has no chat template; send prompts instead")
        try:
            text = self.hf.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # the template raises for conversations it refuses
            raise TokenizerError(f"chats: the chat template refused the conversation: {exc}") from exc
        return list(self.hf(text, add_special_tokens=False)["input_ids"])

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, sequences: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        return self.hf.batch_decode([list(s) for s in sequences], skip_special_tokens=skip_special_tokens)

    def decode_stream(self, items: Sequence[DecodeStreamItem]) -> list[DecodeStep]:
        return [
            decode_incremental(self.decode, item.token_ids, item.read_offset, item.skip_special_tokens, item.final)
            for item in items
        ]
