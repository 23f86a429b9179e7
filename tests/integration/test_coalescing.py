"""The gateway merges concurrent Encode and Submit calls (gateway/coalesce.py), against the real
tokenizer and model services: each caller gets what it would have got alone, and a merged Submit
that the worker refuses for one caller's sake fails that caller only."""

from __future__ import annotations

import asyncio

import grpc

from gateway.model_worker import ModelWorkerClient
from gateway.tokenizers import TokenizerPool
from genrpc.internal.v1 import model_pb2, tokenizer_pb2
from genrpc.v1 import generation_pb2 as gen_pb2
from tests.helpers import MODEL, start_service

TEXTS = ["Hi", "Write a long story about a lighthouse keeper in great detail.", "2 + 2 =",
         "한국어 문장도 섞어 봅니다", "The quick brown fox jumps over the lazy dog, twice."]


def test_concurrent_encodes_merge_and_each_gets_its_own_rows(stack):
    async def scenario():
        pool = TokenizerPool([stack.tokenizer.address], stack.internal_security())
        requests = [tokenizer_pb2.EncodeRequest(texts=[t, t * 2], pad=True) for t in TEXTS]
        requests.append(tokenizer_pb2.EncodeRequest(
            chats=[gen_pb2.Chat(messages=[gen_pb2.Message(role="user", content="Hello there")])], pad=True))
        alone = [await pool.call("Encode", r) for r in requests]
        # All in one go: the first is sent at once, the texts behind it share one call, the chat
        # (other options) one of its own.
        together = await asyncio.gather(*[pool.encode(r) for r in requests])
        return alone, together, pool.encoder.num_calls

    alone, together, num_calls = asyncio.run(scenario())
    assert num_calls == 3
    for a, t in zip(alone, together):
        assert t == a  # same ids, same left padding (to this request's own longest row), same counts
    # Merged, the rows were padded to the longest text of all; each request's came back trimmed.
    assert len(together[0].rows[0].input_ids) < len(together[1].rows[1].input_ids)


def _inputs(prompt_ids: list[int], max_new_tokens: int):
    return [(prompt_ids, [1] * len(prompt_ids))], [model_pb2.SamplingParams(
        max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, typical_p=1.0,
        repetition_penalty=1.0, ignore_eos=True)]


async def _events(queue: asyncio.Queue, count: int) -> list:
    out = []
    while len(out) < count:
        event = await asyncio.wait_for(queue.get(), 60)
        out.append(event)
        if event.finish_reason or event.error:
            break
    return out


def test_concurrent_submits_merge_and_each_sequence_runs_as_alone(stack):
    async def scenario():
        security = stack.internal_security()
        client = ModelWorkerClient(stack.model.address, TokenizerPool([stack.tokenizer.address], security),
                                   lambda: None, security)
        client.start()
        try:
            while not client.healthy:
                await asyncio.sleep(0.05)
            prompts = [[1, 2, 3, 4, 5], [9, 8, 7], [100, 200, 300, 400], [42]]

            async def run(ids):
                queue: asyncio.Queue = asyncio.Queue()
                rows, params = _inputs(ids, 6)
                await client.submit(rows, params, True, queue, 30)
                return [e.token_id for e in await _events(queue, 6)]

            alone = [await run(ids) for ids in prompts]
            calls_before = client.submitter.num_calls
            together = await asyncio.gather(*[run(ids) for ids in prompts])
            return alone, together, client.submitter.num_calls - calls_before
        finally:
            await client.close()

    alone, together, num_calls = asyncio.run(scenario())
    assert num_calls == 2  # the first alone, the other three in one Submit
    assert together == alone
    assert all(len(tokens) == 6 for tokens in alone)


def test_a_merged_submit_refused_for_room_fails_only_the_requests_that_do_not_fit(stack):
    model = start_service("model_svc", "--model", MODEL, "--max-num-seqs", "1", "--max-waiting", "2",
                          *stack.credentials.server_flags())

    async def scenario():
        security = stack.internal_security()
        client = ModelWorkerClient(model.address, TokenizerPool([stack.tokenizer.address], security),
                                   lambda: None, security)
        client.start()
        try:
            while not client.healthy:
                await asyncio.sleep(0.05)
            running: asyncio.Queue = asyncio.Queue()
            rows, params = _inputs([1, 2, 3], 2000)
            handles = await client.submit(rows, params, True, running, 30)
            await _events(running, 1)  # it runs: the one running slot is taken, nothing waits

            async def submit(ids):
                rows, params = _inputs(ids, 4)
                # No deadline: one would be weighed against the 2,000 tokens ahead, and a sequence
                # refused for it (after Submit, on the engine thread) would leave room to another.
                return await client.submit(rows, params, True, asyncio.Queue(), None)

            first = asyncio.ensure_future(submit([7]))  # sent alone
            behind = [asyncio.ensure_future(submit(ids)) for ids in ([8], [9], [10])]  # merged: 3 > room for 2
            results = await asyncio.gather(first, *behind, return_exceptions=True)
            await client.abort(handles + [h for r in results if isinstance(r, list) for h in r])
            return results, client.submitter.num_calls
        finally:
            await client.close()

    try:
        results, num_calls = asyncio.run(scenario())
    finally:
        model.stop()
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(refused) == 2, results  # room for two waiting sequences: [7] and one of the three
    for exc in refused:
        assert isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert num_calls >= 3  # the merged call, then the three alone
