"""The gateway's call coalescing (pure logic; the send function is a fake that records its calls)."""

import asyncio

import pytest

from gateway.coalesce import Coalescer


class Backend:
    """Records each merged call; answers each item with (call number, item) once released."""

    def __init__(self):
        self.calls: list[list] = []
        self.release: list[asyncio.Event] = []
        self.fail_items: set = set()
        self.fail_all: Exception | None = None

    async def send(self, items, timeout):
        self.calls.append(list(items))
        gate = asyncio.Event()
        self.release.append(gate)
        await gate.wait()
        if self.fail_all is not None:
            raise self.fail_all
        number = len(self.calls) - 1
        return [ValueError(f"bad {item}") if item in self.fail_items else (number, item) for item in items]

    def open_all(self):
        for gate in self.release:
            gate.set()


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


async def merged_behind_one(c: Coalescer, backend: Backend, items: str) -> list:
    """Sends "a" alone, queues `items` behind it and lets "a" answer: the queued callers' tasks,
    whose merged call is in flight when this returns."""
    first = asyncio.create_task(c.call("k", "a"))
    await settle()
    tasks = [asyncio.create_task(c.call("k", x)) for x in items]
    await settle()
    backend.open_all()
    await first
    await settle()
    return tasks


def test_a_lone_call_goes_at_once_and_calls_behind_it_share_the_next():
    async def scenario():
        backend = Backend()
        c = Coalescer("test", backend.send, max_in_flight=1)
        first = asyncio.create_task(c.call("k", "a"))
        await settle()
        assert backend.calls == [["a"]]  # sent without waiting for company
        rest = [asyncio.create_task(c.call("k", x)) for x in "bcd"]
        await settle()
        assert backend.calls == [["a"]]  # queued behind the call in flight
        backend.open_all()
        assert await first == (0, "a")
        await settle()
        assert backend.calls == [["a"], ["b", "c", "d"]]
        backend.open_all()
        return [await t for t in rest], c.num_calls, c.num_items

    results, calls, items = asyncio.run(scenario())
    assert results == [(1, "b"), (1, "c"), (1, "d")]  # each caller gets its own answer
    assert (calls, items) == (2, 4)


def test_calls_with_different_keys_never_merge_and_the_oldest_key_goes_first():
    async def scenario():
        backend = Backend()
        c = Coalescer("test", backend.send, max_in_flight=1)
        tasks = [asyncio.create_task(c.call(k, x)) for k, x in
                 [("k1", "a"), ("k2", "b"), ("k1", "c"), ("k2", "d"), ("k1", "e")]]
        for _ in range(3):
            await settle()
            backend.open_all()
        await asyncio.gather(*tasks)
        return backend.calls

    assert asyncio.run(scenario()) == [["a"], ["b", "d"], ["c", "e"]]


def test_in_flight_limit_and_batch_size_limit():
    async def scenario():
        backend = Backend()
        c = Coalescer("test", backend.send, max_in_flight=2, max_batch=2)
        tasks = [asyncio.create_task(c.call("k", x)) for x in "abcdefg"]
        await settle()
        assert backend.calls == [["a"], ["b"]]
        backend.open_all()
        await settle()
        assert backend.calls == [["a"], ["b"], ["c", "d"], ["e", "f"]]
        backend.open_all()
        await settle()
        backend.open_all()
        await asyncio.gather(*tasks)
        return backend.calls

    assert asyncio.run(scenario())[-1] == ["g"]


def test_an_item_error_reaches_its_caller_only():
    async def scenario():
        backend = Backend()
        backend.fail_items = {"c"}
        c = Coalescer("test", backend.send, max_in_flight=1)
        tasks = await merged_behind_one(c, backend, "bcd")
        backend.open_all()
        return await asyncio.gather(*tasks, return_exceptions=True)

    b, c_result, d = asyncio.run(scenario())
    assert b == (1, "b") and d == (1, "d")
    assert isinstance(c_result, ValueError) and str(c_result) == "bad c"


def test_a_failed_call_fails_everyone_in_it_and_the_next_call_still_goes():
    async def scenario():
        backend = Backend()
        c = Coalescer("test", backend.send, max_in_flight=1)
        tasks = await merged_behind_one(c, backend, "bc")
        backend.fail_all = ConnectionError("backend down")
        backend.open_all()
        failed = await asyncio.gather(*tasks, return_exceptions=True)
        backend.fail_all = None
        later = asyncio.create_task(c.call("k", "z"))
        await settle()
        backend.open_all()
        return backend.calls, failed, await later

    calls, failed, later = asyncio.run(scenario())
    assert calls[1] == ["b", "c"]
    assert all(isinstance(f, ConnectionError) for f in failed)
    assert later == (2, "z")


def test_a_caller_that_times_out_gets_timeout_and_its_answer_goes_to_on_orphan():
    async def scenario():
        backend = Backend()
        orphans = []
        c = Coalescer("test", backend.send, max_in_flight=1, on_orphan=lambda item, result: orphans.append(result))
        first = asyncio.create_task(c.call("k", "a"))
        await settle()
        patient = asyncio.create_task(c.call("k", "b", timeout=10))
        hasty = asyncio.create_task(c.call("k", "c", timeout=0.05))
        await settle()
        backend.open_all()
        await first
        await settle()
        with pytest.raises(asyncio.TimeoutError):
            await hasty  # its merged call is still in flight
        backend.open_all()
        return await patient, orphans

    patient, orphans = asyncio.run(scenario())
    assert patient == (1, "b")
    assert orphans == [(1, "c")]


def test_a_caller_cancelled_while_queued_is_not_sent():
    async def scenario():
        backend = Backend()
        c = Coalescer("test", backend.send, max_in_flight=1)
        first = asyncio.create_task(c.call("k", "a"))
        await settle()
        gone = asyncio.create_task(c.call("k", "b"))
        stays = asyncio.create_task(c.call("k", "c"))
        await settle()
        gone.cancel()
        backend.open_all()
        await first
        await settle()
        backend.open_all()
        await stays
        return backend.calls

    assert asyncio.run(scenario()) == [["a"], ["c"]]
