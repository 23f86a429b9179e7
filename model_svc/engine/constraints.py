"""Structured output: a sequence's grammar as a mask over the vocabulary, through llguidance.

The gateway turns a JSON schema, a regular expression, a Lark grammar or a list of choices into
llguidance's grammar text (and refuses what does not compile); the model service compiles it
against its tokenizer into a matcher per sequence. Each step the matcher says which tokens keep
the output a valid prefix (a bitmask, ~40 us a row for a JSON schema here), the sampler sets every
other token's score to -inf, and the sampled token is fed back. Only EOS is allowed once the output
is complete, so the sequence ends there.

llguidance is the library: its mask is computed lazily from the grammar (measured here; no index
over the vocabulary to build per schema), it installs as one wheel without dependencies, and vLLM
and SGLang offer it too. The others were not measured end to end: outlines-core's
`Vocabulary.from_pretrained` wants the hub, and xgrammar pulls triton into the install. The first mask of a new grammar
builds its lexer (up to ~1.5 s for a large schema, measured); llguidance keeps that per grammar, and
it is paid when the sequence is submitted, on the server's thread pool, never on the engine thread.
"""

from __future__ import annotations

import threading

import llguidance
import llguidance.hf
import llguidance.torch
import numpy as np
import torch

from genrpc import faults


class GrammarError(ValueError):
    """A grammar the tokenizer cannot be constrained by."""


class Grammars:
    """Compiles grammars against the served model's tokenizer (loaded on first use)."""

    def __init__(self, tokenizer_loader):
        """tokenizer_loader: () -> a transformers tokenizer of the served model."""
        self._loader = tokenizer_loader
        self._tokenizer = None
        self._lock = threading.Lock()

    def _llg_tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.hf.from_tokenizer(self._loader())
            return self._tokenizer

    def constraint(self, grammar: str) -> Constraint:
        """A new sequence's matcher for `grammar` (llguidance's grammar text), its first mask already
        computed (that builds the grammar's lexer: seconds for a large schema, the first time)."""
        faults.check("grammar.compile")
        tokenizer = self._llg_tokenizer()
        matcher = llguidance.LLMatcher(tokenizer, grammar)
        if matcher.is_error():
            raise GrammarError(f"the grammar does not compile: {matcher.get_error()}")
        constraint = Constraint(matcher, tokenizer.vocab_size)
        constraint.compute()
        return constraint


class Constraint:
    """One sequence's grammar state, and the bitmask of the tokens it allows next."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher = matcher
        self.bitmask = torch.empty(llguidance.torch.get_bitmask_shape(1, vocab_size), dtype=torch.int32)

    def compute(self) -> None:
        llguidance.torch.fill_next_token_bitmask(self.matcher, self.bitmask, 0)

    def mask(self, scores: torch.Tensor) -> None:
        """Sets the scores [1, vocab] of the tokens the grammar does not allow next to -inf, in place
        (ids past the tokenizer's vocabulary, padding rows of the model's, too). The bits are
        unpacked with numpy: llguidance's own helper is a torch.compile kernel (a compile on the
        first call, and a C compiler needed)."""
        self.compute()
        bits = np.unpackbits(self.bitmask.numpy().view(np.uint8), bitorder="little")  # token i: bit i
        vocab = scores.shape[-1]
        allowed = torch.zeros(vocab, dtype=torch.bool)
        n = min(vocab, len(bits))
        allowed[:n] = torch.from_numpy(bits[:n].astype(np.bool_))
        scores.masked_fill_(~allowed, -float("inf"))

    def advance(self, token_id: int) -> None:
        """The sampled token joins the output (one the mask allowed)."""
        self.matcher.consume_token(token_id)

    def try_advance(self, token_id: int) -> bool:
        """Takes a proposed token tentatively (speculation: the mask of the next position); False,
        and no change, when the grammar does not allow it."""
        return self.matcher.try_consume_tokens([token_id]) == 1

    def rollback(self, count: int) -> None:
        """Undoes the last `count` tokens taken."""
        if count:
            self.matcher.rollback(count)
