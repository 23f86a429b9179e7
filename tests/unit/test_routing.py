"""Cache-aware routing, pure logic: affinity to the worker that holds a prompt's leading blocks,
within a load bound."""

from gateway.routing import SLACK, PrefixRouter, block_hashes

SYSTEM = list(range(100, 164))  # 4 blocks of 16


def test_block_hashes_are_chained_and_whole_blocks_only():
    a = block_hashes(SYSTEM + [1, 2, 3], 16)
    assert len(a) == 4 and a == block_hashes(SYSTEM, 16)
    b = block_hashes([99] + SYSTEM[1:], 16)
    assert all(x != y for x, y in zip(a, b))  # a different first token changes every later hash
    assert block_hashes(SYSTEM, 16, max_blocks=2) == a[:2]
    assert not set(block_hashes(SYSTEM, 16, "client:token:a")) & set(a)  # another cache salt matches nothing


def test_affinity_follows_the_longest_cached_prefix():
    router = PrefixRouter()
    workers, keys = ["w0", "w1"], ["w0", "w1"]
    router.record("w1", block_hashes(SYSTEM + list(range(16)), 16))
    router.record("w0", block_hashes(SYSTEM[:32], 16))
    turn = block_hashes(SYSTEM + list(range(16)) + list(range(50, 66)), 16)
    assert router.choose(workers, [0, 0], keys, turn) == "w1"  # 5 blocks against 2
    assert router.choose(workers, [3, 0], keys, turn) == "w1"  # a little busier: still its cache
    assert router.choose(workers, [0, SLACK + 1], keys, turn) == "w0"  # much busier: the least loaded
    assert router.choose(workers, [1, 0], keys, block_hashes(list(range(500, 564)), 16)) == "w1"  # unknown


def test_memory_is_bounded_and_a_restarted_worker_is_forgotten():
    router = PrefixRouter(capacity=3)
    router.record("w0", block_hashes(SYSTEM, 16))
    assert len(router.seen["w0"]) == 3
    router.forget("w0")
    assert router.choose(["w0", "w1"], [1, 0], ["w0", "w1"], block_hashes(SYSTEM, 16)) == "w1"


def test_an_adapters_requests_go_where_its_last_one_went_within_the_load_bound():
    router = PrefixRouter()
    workers = keys = ["w0", "w1"]
    new_prompt = block_hashes(list(range(700, 764)), 16, "\0adapter:x")
    router.record("w1", block_hashes(SYSTEM, 16, "\0adapter:x"), "x")
    assert router.choose(workers, [0, SLACK], keys, new_prompt, "x") == "w1"  # x is in memory there
    assert router.choose(workers, [0, SLACK], keys, new_prompt, "y") == "w0"  # y was never sent: least loaded
    assert router.choose(workers, [0, SLACK], keys, new_prompt) == "w0"
    assert router.choose(workers, [0, SLACK + 1], keys, new_prompt, "x") == "w0"  # much busier
    router.forget("w1")
    assert router.choose(workers, [0, SLACK], keys, new_prompt, "x") == "w0"


def test_the_pool_routes_an_adapter_to_workers_serving_it_and_lists_every_adapter():
    """ModelPool over stand-in workers (pure logic): a worker that does not serve the adapter gets
    none of its requests, and ModelInfo's adapters are every healthy worker's."""
    from types import SimpleNamespace

    from gateway.model_pool import ModelPool
    from genrpc.internal.v1 import model_pb2
    from genrpc.v1 import generation_pb2

    def worker(address, load, *adapters):
        info = model_pb2.WorkerInfoResponse(model_name="m", kv_block_size=16, adapters=[
            generation_pb2.AdapterInfo(name=a, rank=8) for a in adapters])
        return SimpleNamespace(address=address, load=load, healthy=True, info=info)

    pool = ModelPool(["unused"], tokenizers=None, on_health_change=lambda healthy: None)
    pool.workers = [worker("w0", 0, "a"), worker("w1", 5, "a", "b")]
    assert pool.pick(SYSTEM, "", "b").address == "w1"  # the only one serving b, busier as it is
    assert pool.pick(SYSTEM, "", "a").address == "w0"
    assert pool.pick(SYSTEM, "").address == "w0"
    assert [a.name for a in pool.info().adapters] == ["a", "b"] and pool.info().model_name == "m"
    pool.workers[1].healthy = False
    assert [a.name for a in pool.info().adapters] == ["a"]
