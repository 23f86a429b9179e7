"""The engine: schedule -> execute -> update, joined by dataclass contracts.

- `sequence.py`: a request's state and its sampling parameters
- `block_manager.py`: the paged KV cache's bookkeeping: blocks, reference counts, prefix hashes (no tensors)
- `kv_cache.py`: the paged KV cache's tensors (the arena the runner reads and writes through block tables)
- `scheduler.py`: who runs this step and how many tokens each (never touches tensors)
- `runner.py`: builds the packed batch and runs the model (never decides who is in it)
- `sampler.py`: selects each row's token with that row's own parameters
- `engine.py`: one step, start to end; `loop.py`: the thread that steps it
"""
