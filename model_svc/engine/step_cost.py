"""What a step costs, learned from the steps the engine ran: the scheduler sizes prefill by it.

A step's duration is modelled as `fixed + per_token * tokens + per_pair * pairs`, where `tokens` are
the tokens computed (every one goes through every linear layer) and `pairs` the (query, key) pairs
attention scores (a decoded token at position p: p + 1 pairs; a prompt chunk of n tokens after s
computed ones: n*s + n*(n+1)/2). The three coefficients are fitted by exponentially weighted
least squares of relative errors over the recent steps (a 10 ms decode step counts as much as a
250 ms prefill step: fitted on absolute errors, the big steps made a lone stream's step ~1.5x its
real cost, and a chunk beside it made its inter-token latency 2.5x idle instead of 2x), pulled
gently towards a prior, so the model follows the machine (a GPU, a busier CPU) without a
calibration run and stays sane before it has seen varied steps.

Fair steps compare small steps (what a light tenant's rows take alone, what they take beside some
of a heavy tenant's): `measured` reads those from the recent steps of their size where there are
any, not from the line. A CPU's step cost is concave in its rows (an AMD EPYC 7002: 1 or 2 rows
19 ms, 4 rows 26, 16 rows 67, 32 rows 100), so a line fitted on big steps put 4 rows at 38 ms, and
fair steps sized by it let a light tenant's step run 2.6x its own.
"""

from __future__ import annotations

import numpy as np

# The development machine's costs for the default model (a fixed part, per token, per attention
# pair; README, "Measured costs behind the design"). Only a starting point: the fit replaces it.
PRIOR = (0.011, 0.001, 6e-7)
MEASURED_TOKENS = 256  # steps of up to this many tokens are kept by size (`measured`)
MEASURED_STEPS = 2000  # for this many steps after they were last seen
MEASURED_KEPT = 5  # the last steps of a size kept; their lower median is its duration


def chunk_pairs(start: int, num_tokens: int) -> int:
    """Attention pairs of `num_tokens` tokens computed after `start` cached ones."""
    return num_tokens * start + num_tokens * (num_tokens + 1) // 2


class StepCost:
    def __init__(self, prior: tuple[float, float, float] = PRIOR, forget: float = 0.98, prior_weight: float = 0.02):
        """forget: each step's weight decays by this factor per later step (0.98: the last ~50 steps
        count). prior_weight: how many steps' worth of evidence the prior is worth (in relative
        errors: a coefficient off by 2x from its prior costs what a step predicted 2x off does)."""
        self.prior = np.array(prior, dtype=np.float64)
        self.forget = forget
        # Features are scaled to comparable magnitudes so the prior pulls each coefficient equally.
        self.scale = np.array([1.0, 1.0 / max(prior[1], 1e-12), 1.0 / max(prior[2], 1e-15)]) * prior[0]
        self.xtx = np.zeros((3, 3))
        self.xty = np.zeros(3)
        self.prior_weight = prior_weight
        self.coef = self.prior.copy()
        self.num_steps = 0
        # Measured steps by their token count: (their last durations less the model's attention part,
        # oldest first; their lower median, the size's duration: one slow step, the first one's
        # warm-up at 329 ms for a 19 ms size, does not count; the step number of the last).
        self.by_tokens: dict[int, tuple[tuple[float, ...], float, int]] = {}

    def observe(self, tokens: int, pairs: int, seconds: float) -> None:
        if tokens <= 0 or not (seconds > 0):
            return
        # Relative errors: a 10 ms decode step counts as much as a 250 ms prefill step, so that both
        # the fixed part (what a decoding stream's step costs) and the marginal cost of a chunk are right.
        if tokens <= MEASURED_TOKENS:
            linear = seconds - self.coef[2] * pairs
            last = self.by_tokens.get(tokens)
            kept = last[0] if last is not None and self.num_steps - last[2] < MEASURED_STEPS else ()
            kept = (*kept, linear)[-MEASURED_KEPT:]
            self.by_tokens[tokens] = (kept, sorted(kept)[(len(kept) - 1) // 2], self.num_steps)
        weight = 1.0 / (max(seconds, 1e-3) / self.prior[0]) ** 2
        x = np.array([1.0, tokens, pairs], dtype=np.float64) / self.scale
        self.xtx = self.forget * self.xtx + weight * np.outer(x, x)
        self.xty = self.forget * self.xty + weight * x * seconds
        self.num_steps += 1
        ridge = self.prior_weight * np.eye(3)
        theta_prior = self.prior * self.scale
        try:
            theta = np.linalg.solve(self.xtx + ridge, self.xty + ridge @ theta_prior)
        except np.linalg.LinAlgError:
            return
        coef = theta / self.scale
        # A cost is never negative; collinear steps can push one coefficient below zero.
        self.coef = np.maximum(coef, self.prior * 0.05)

    def seconds(self, tokens: int, pairs: int) -> float:
        """Predicted duration of a step computing `tokens` tokens over `pairs` attention pairs."""
        fixed, per_token, per_pair = self.coef
        return fixed + per_token * tokens + per_pair * pairs

    def measured(self, tokens: int, pairs: int, side: str = "") -> float:
        """What a step of this work takes by the recent measured steps of as many tokens, the
        model's attention part added. Where that size was not measured: the line, or with `side`
        ("high" or "low") the larger or smaller of the line and the chord between the nearest sizes
        measured below and above (on a concave cost the line overestimates small steps and the chord
        underestimates: fair steps take the side that protects the light tenant)."""
        seen = tuple(self.by_tokens.items())  # one copy under the GIL: fair steps ask from any thread
        fresh = {n: median for n, (_, median, at) in seen if self.num_steps - at < MEASURED_STEPS}
        if tokens in fresh:
            return fresh[tokens] + self.coef[2] * pairs
        line = self.seconds(tokens, pairs)
        below = max((n for n in fresh if n < tokens), default=None)
        above = min((n for n in fresh if n > tokens), default=None)
        if not side or below is None or above is None:
            return line
        chord = fresh[below] + (fresh[above] - fresh[below]) * (tokens - below) / (above - below)
        chord += self.coef[2] * pairs
        return max(line, chord) if side == "high" else min(line, chord)

    def marginal(self, tokens: int, pairs: int) -> float:
        """What adding this work to a step costs (the fixed part is already paid)."""
        _, per_token, per_pair = self.coef
        return per_token * tokens + per_pair * pairs

    def chunk_for(self, seconds: float, start: int, most: int) -> int:
        """The most tokens (up to `most`) of a prompt with `start` tokens computed that add at most
        `seconds` to a step."""
        _, per_token, per_pair = self.coef
        if most <= 0 or seconds <= 0:
            return 0
        # per_token*n + per_pair*(n*start + n*(n+1)/2) <= seconds: the positive root of a quadratic.
        a = per_pair / 2
        b = per_token + per_pair * (start + 0.5)
        n = seconds / b if a == 0 else (-b + (b * b + 4 * a * seconds) ** 0.5) / (2 * a)
        return max(0, min(most, int(n)))
