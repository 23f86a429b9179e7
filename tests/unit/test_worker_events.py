"""The gateway's handling of one engine step's events (pure logic: a fake tokenizer pool)."""

import asyncio

from gateway.model_worker import DetokState, ModelWorkerClient, SequenceHandle
from genrpc.internal.v1 import model_pb2, tokenizer_pb2
from genrpc.v1 import generation_pb2


class Tokenizers:
    """Answers DecodeStream: each item's ids as text, and each piece id as "<id>"."""

    async def call(self, method, request, timeout=30.0, metadata=None):
        assert method == "DecodeStream"
        return tokenizer_pb2.DecodeStreamResponse(
            results=[tokenizer_pb2.DecodeStreamResult(text="t", prefix_offset=0, read_offset=len(item.token_ids))
                     for item in request.items],
            pieces=[f"<{i}>" for i in request.piece_ids])


def test_a_logprob_of_exactly_zero_is_kept_and_tokens_carry_their_text():
    async def go():
        client = ModelWorkerClient("127.0.0.1:1", Tokenizers(), lambda: None)
        queue: asyncio.Queue = asyncio.Queue()
        for sequence_id in (1, 2, 3):
            client.sequences[sequence_id] = SequenceHandle(sequence_id, DetokState([], 0, True), queue, 1024)
        step = model_pb2.EventsResponse(events=[
            # A certain token: its logprob is 0.0, which proto3 without presence would have dropped.
            model_pb2.TokenEvent(sequence_id=1, has_token=True, token_id=5, logprob=0.0),
            model_pb2.TokenEvent(sequence_id=2, has_token=True, token_id=6, logprob=-0.5, top_logprobs=[
                generation_pb2.TokenLogprob(token_id=6, logprob=-0.5),
                generation_pb2.TokenLogprob(token_id=9, logprob=-1.0)]),
            model_pb2.TokenEvent(sequence_id=3, has_token=True, token_id=7),  # logprobs not asked
        ])
        await client._on_step(step)
        events = {e.sequence_id: e for e in (queue.get_nowait() for _ in range(3))}
        await client.close()
        return events

    events = asyncio.run(go())
    assert events[1].logprob == (0.0, "<5>", [])
    assert events[2].logprob == (-0.5, "<6>", [(6, -0.5, "<6>"), (9, -1.0, "<9>")])
    assert events[3].logprob is None
