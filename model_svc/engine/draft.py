"""Proposals from a smaller draft model (`--draft-model`), in place of prompt lookup.

The draft proposes greedily, one forward pass a token, each sequence over its own transformers
cache; what it proposes is verified by the served model exactly as prompt lookup's proposals are
(speculation.py), so the output is the served model's whatever the draft says: a good draft only
makes it faster. The draft's cache is kept between steps and cut back to the tokens the sequence
really has (rejected proposals, a preemption's recompute) before it goes on. Its time per proposal
is measured and added to a proposal's price, so a draft that costs more than it saves stops being
asked. The draft must share the served model's vocabulary (checked at start); it runs unquantized
in the served model's dtype, on its device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Hashable

import torch
from transformers import DynamicCache

from model_svc.engine.sequence import Sequence


@dataclass
class _State:
    cache: DynamicCache
    tokens: list[int] = field(default_factory=list)  # what the cache holds the keys and values of


class DraftProposer:
    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.device = next(model.parameters()).device
        self.states: dict[Hashable, _State] = {}
        self.seconds_per_token = 0.0  # a forward pass of one token, measured (faded average)

    @torch.inference_mode()
    def propose(self, seq: Sequence, k: int) -> list[int]:
        """Up to k tokens the draft model would pick greedily after `seq`'s tokens."""
        if k <= 0:
            return []
        tokens = seq.token_ids()
        state = self.states.get(seq.seq_id)
        if state is None:
            state = self.states[seq.seq_id] = _State(DynamicCache())
        keep = 0
        limit = min(len(state.tokens), len(tokens) - 1)  # at least one token is fed, for its logits
        while keep < limit and state.tokens[keep] == tokens[keep]:
            keep += 1
        if keep < len(state.tokens):
            state.cache.crop(keep - len(state.tokens))  # a negative count: the tokens to remove
        feed = tokens[keep:]
        proposals: list[int] = []
        while True:
            started = time.perf_counter()
            ids = torch.tensor([feed], dtype=torch.long, device=self.device)
            logits = self.model(input_ids=ids, past_key_values=state.cache, use_cache=True).logits[0, -1]
            if len(feed) <= 2:  # a pass a proposal costs (catching up on a prompt is a one-off)
                seconds = time.perf_counter() - started
                self.seconds_per_token = seconds if not self.seconds_per_token else (
                    0.9 * self.seconds_per_token + 0.1 * seconds)
            state.tokens = tokens + proposals
            proposals.append(int(logits.argmax()))
            if len(proposals) == k:
                return proposals
            feed = [proposals[-1]]

    def release(self, seq_id: Hashable) -> None:
        """The sequence is over: its draft cache goes."""
        self.states.pop(seq_id, None)
