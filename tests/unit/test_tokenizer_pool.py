"""The gateway's tokenizer pool: a retry reaches another replica, even with other calls in flight."""

import asyncio

import grpc
import pytest

from gateway.tokenizers import TokenizerPool
from genrpc.errors import GenrpcError
from genrpc.internal.v1 import tokenizer_pb2


def unavailable():
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "dead")


class Replica:
    """A fake stub (pure retry logic under test): answers, or fails as a killed replica does."""

    def __init__(self, name, alive, pool=None):
        self.name, self.alive, self.pool, self.calls = name, alive, pool, 0

    async def Encode(self, request, **kwargs):
        self.calls += 1
        if self.pool is not None:
            next(self.pool._next)  # another call takes its round-robin turn meanwhile
        if not self.alive:
            raise unavailable()
        return self.name


def test_retry_reaches_the_other_replica_while_other_calls_take_turns():
    async def scenario():
        pool = TokenizerPool(["dead:1", "alive:2"])  # channels need a running loop
        dead, alive = Replica("dead", False, pool), Replica("alive", True, pool)
        pool.stubs = [dead, alive]
        answers = [await pool.call("Encode", None) for _ in range(6)]
        return answers, alive.calls

    answers, alive_calls = asyncio.run(scenario())
    assert answers == ["alive"] * 6 and alive_calls == 6


def test_no_replica_answering_is_unavailable():
    async def scenario():
        pool = TokenizerPool(["a:1", "b:2"])
        pool.stubs = [Replica("a", False), Replica("b", False)]
        with pytest.raises(GenrpcError, match="no tokenizer replica answered"):
            await pool.call("Encode", None)
        return [s.calls for s in pool.stubs]

    assert asyncio.run(scenario()) == [1, 1]


class Refusing:
    """A fake stub (the fallback logic under test): refuses any Encode that carries the text "bad"."""

    def __init__(self):
        self.requests = []

    async def Encode(self, request, **kwargs):
        self.requests.append(list(request.texts))
        await asyncio.sleep(0.01)
        if "bad" in request.texts:
            raise grpc.aio.AioRpcError(grpc.StatusCode.INVALID_ARGUMENT, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       "refused")
        return tokenizer_pb2.EncodeResponse(rows=[tokenizer_pb2.EncodedRow(num_tokens=len(t)) for t in request.texts])


def test_a_merged_encode_refused_for_one_request_fails_that_request_only():
    async def scenario():
        pool = TokenizerPool(["a:1"])
        stub = pool.stubs[0] = Refusing()
        texts = ["a", "bb", "bad", "dddd"]
        results = await asyncio.gather(*[pool.encode(tokenizer_pb2.EncodeRequest(texts=[t])) for t in texts],
                                       return_exceptions=True)
        return results, stub.requests

    results, requests = asyncio.run(scenario())
    # The first alone; the three behind it merged, refused, then each alone.
    assert requests == [["a"], ["bb", "bad", "dddd"], ["bb"], ["bad"], ["dddd"]]
    assert [r.rows[0].num_tokens for i, r in enumerate(results) if i != 2] == [1, 2, 4]
    assert isinstance(results[2], grpc.aio.AioRpcError) and results[2].code() == grpc.StatusCode.INVALID_ARGUMENT
