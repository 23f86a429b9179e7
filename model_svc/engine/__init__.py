"""The engine: schedule -> execute -> update, joined by dataclass contracts.

- `sequence.py`: a request's state and its sampling parameters
- `kv_cache.py`: per-sequence KV storage under a token budget
- `scheduler.py`: who runs this step and how many tokens each (never touches tensors)
- `runner.py`: builds the packed batch and runs the model (never decides who is in it)
- `sampler.py`: selects each row's token with that row's own parameters
- `engine.py`: one step, start to end; `loop.py`: the thread that steps it
"""
