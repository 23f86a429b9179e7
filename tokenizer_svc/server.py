"""The tokenizer service's gRPC edge: protobuf in, one call, protobuf out."""

from __future__ import annotations

import asyncio
import ctypes

from genrpc.errors import InvalidArgument, ResourceExhausted, grpc_errors
from genrpc.internal.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from genrpc.serving import MAX_MESSAGE_BYTES
from tokenizer_svc.tokenizer import AnswerTooLarge, DecodeStreamItem, Tokenizer, TokenizerError

ANSWER_HEADROOM = 64 * 1024  # the message's other fields
TRIM_AFTER_CHARS = 100_000  # a request this large gives its memory back to the system afterwards
TRIM_DELAY_S = 0.5


def release_memory() -> None:
    """Hands freed heap pages back to the system (glibc keeps them otherwise: after a request of
    millions of characters the service's RSS stayed ~360 MiB higher)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServicer):
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def _check_ids(self, ids, where: str) -> list[int]:
        ids = list(ids)
        vocab = self.tokenizer.vocab_size
        bad = next((i for i in ids if i >= vocab), None)
        if bad is not None:
            raise InvalidArgument.field(where, bad, f"token ids must be below the vocabulary size {vocab}")
        return ids

    @grpc_errors
    async def Encode(self, request, context):
        if bool(request.texts) == bool(request.chats):
            raise InvalidArgument("exactly one of texts and chats must be non-empty")
        chats = [[{"role": m.role, "content": m.content} for m in chat.messages] for chat in request.chats]
        truncate = request.truncate_input_tokens if request.HasField("truncate_input_tokens") else None
        num_chars = sum(map(len, request.texts)) + sum(len(m.content) for c in request.chats for m in c.messages)
        try:
            rows = await asyncio.to_thread(
                self.tokenizer.encode, list(request.texts), chats, truncate, request.pad, request.return_tokens,
                request.parse_special_tokens, MAX_MESSAGE_BYTES - ANSWER_HEADROOM, not request.fragments,
            )
        except TokenizerError as exc:
            raise InvalidArgument(str(exc)) from exc
        except AnswerTooLarge as exc:
            raise ResourceExhausted(str(exc)) from exc
        finally:
            if num_chars > TRIM_AFTER_CHARS:  # once the answer has been sent and freed
                loop = asyncio.get_running_loop()
                loop.call_later(TRIM_DELAY_S, loop.run_in_executor, None, release_memory)
        return tokenizer_pb2.EncodeResponse(
            rows=[
                tokenizer_pb2.EncodedRow(
                    input_ids=row.input_ids, attention_mask=row.attention_mask, num_tokens=row.num_tokens,
                    num_original_tokens=row.num_original_tokens, tokens=row.tokens,
                )
                for row in rows
            ],
            pad_token_id=self.tokenizer.pad_token_id,
        )

    @grpc_errors
    async def Decode(self, request, context):
        sequences = [self._check_ids(s.ids, f"sequences[{i}]") for i, s in enumerate(request.sequences)]
        texts = self.tokenizer.decode_batch(sequences, request.skip_special_tokens)
        return tokenizer_pb2.DecodeResponse(texts=texts)

    @grpc_errors
    async def DecodeStream(self, request, context):
        items = [
            DecodeStreamItem(self._check_ids(it.token_ids, f"items[{i}]"), it.read_offset,
                             it.skip_special_tokens, it.final, it.num_new_tokens)
            for i, it in enumerate(request.items)
        ]
        pieces = self._check_ids(request.piece_ids, "piece_ids")
        try:
            steps = self.tokenizer.decode_stream(items)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from exc
        return tokenizer_pb2.DecodeStreamResponse(
            results=[
                tokenizer_pb2.DecodeStreamResult(text=s.text, prefix_offset=s.prefix_offset, read_offset=s.read_offset,
                                                 texts=s.texts)
                for s in steps
            ],
            pieces=self.tokenizer.pieces(pieces) if pieces else [],
        )

    @grpc_errors
    async def TokenizerInfo(self, request, context):
        t = self.tokenizer
        return tokenizer_pb2.TokenizerInfoResponse(
            name=t.name, vocab_size=t.vocab_size, eos_token_ids=t.eos_token_ids, pad_token_id=t.pad_token_id,
            has_chat_template=t.has_chat_template, special_token_ids=t.special_token_ids,
        )
