"""Comparing greedy tokens with transformers' generate(), allowing only near-ties.

The default engine attends a decoded token with the query heads grouped under their key/value
head, which rounds differently in the last bit now and then from the kernel call batch-1
`generate()` makes (`--match-generate` makes it identical, and tests/unit/test_engine.py checks
that bit for bit). So the default path is held to this: the tokens are equal, or they first
differ where generate()'s own two candidates were within two units in the last place of the
dtype, a tie that one rounding step can flip. A real bug (wrong position, wrong mask, wrong
cache) diverges at a clear winner and fails.

The default prefill (native attention) rounds prompt tokens differently from generate(), which
moves the first token's logits by up to ~0.9 (0.86 measured over 16 prompts). Where it is used, a
first difference is allowed where generate()'s margin is within NATIVE_PREFILL_MARGIN, twice that
rounded up: a logit-wise move of d can only swap two candidates within 2d of each other.
"""

from __future__ import annotations

import weakref

import torch

NATIVE_PREFILL_MARGIN = 2.0

# generate()'s greedy runs, kept for the session: several tests compare with the same prompts on the
# same model. Per model object (weakly: a model a module loaded and dropped takes its runs along),
# then per (prompt, kwargs): the longest run so far, whose first n steps are generate()'s for n.
_RUNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def reference_scores(loaded, tokenizer, prompt_ids: list[int], max_new_tokens: int, **kwargs):
    """generate()'s greedy tokens after `prompt_ids` and the scores it chose them by."""
    runs = _RUNS.setdefault(loaded.model, {})
    key = (tuple(prompt_ids), tuple(sorted(kwargs.items())))
    if key not in runs or runs[key][0] < max_new_tokens:
        input_ids = torch.tensor([prompt_ids])
        with torch.inference_mode():
            out = loaded.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                        max_new_tokens=max_new_tokens, do_sample=False, output_scores=True,
                                        output_logits=True, return_dict_in_generate=True, **kwargs)
        runs[key] = (max_new_tokens, out.sequences[0, len(prompt_ids):].tolist(), [s[0] for s in out.scores])
    _, tokens, scores = runs[key]
    return tokens[:max_new_tokens], scores[:max_new_tokens]


def assert_greedy_matches(loaded, tokenizer, prompt, got: list[int], dtype=torch.bfloat16, margin: float = 0.0,
                          **kwargs) -> None:
    """margin: how close generate()'s two candidates may be where the tokens first differ, on top of
    two units in the last place (0: bit-level ties only)."""
    prompt_ids = prompt if isinstance(prompt, list) else tokenizer(prompt).input_ids
    expected, scores = reference_scores(loaded, tokenizer, prompt_ids, len(got), **kwargs)
    if got == expected:
        return
    j = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
    assert j < min(len(got), len(expected)), f"lengths differ: got {got}, expected {expected}"
    step = scores[j]
    top, ours = float(step[expected[j]]), float(step[got[j]])
    ulp = float(torch.finfo(dtype).eps) * max(abs(top), 1.0)
    assert top - ours <= max(2 * ulp, margin), (
        f"token {j}: got {got[j]}, generate() chose {expected[j]} by a clear margin "
        f"({top:.4f} vs {ours:.4f}); got {got}, expected {expected}")
