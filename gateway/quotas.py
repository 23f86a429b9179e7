"""Per-token rights and rates at the gateway: the tokens file's settings (genrpc/rights.py).

A right the token lacks is PERMISSION_DENIED, naming the field, the value and the token's limit; a
rate passed is RESOURCE_EXHAUSTED with a `retry-after` trailer (seconds). Refusals are counted by
the operator's name for the token, never by anything derived from the token itself.
"""

from __future__ import annotations

import dataclasses
import time

from prometheus_client import Counter

from gateway.validation import ResolvedConfig
from genrpc.errors import PermissionDenied, ResourceExhausted, retry_hint
from genrpc.rights import Rights

REFUSALS = Counter("genrpc_gateway_token_refusals", "requests refused for a token's rights or rates, by the "
                   "token's name in the tokens file ('unnamed' without one) and the setting", ["token", "setting"])


def refuse(rights: Rights, setting: str, error: Exception) -> Exception:
    REFUSALS.labels(rights.label, setting).inc()
    return error


def apply_rights(config: ResolvedConfig, rights: Rights) -> ResolvedConfig:
    """The config within the token's rights: PermissionDenied for what it asks beyond them; an
    unset max_new_tokens above the token's limit is lowered to it."""
    if rights.max_priority is not None and config.priority > rights.max_priority:
        raise refuse(rights, "max_priority", PermissionDenied(
            f"config.priority={config.priority} is above this token's max_priority={rights.max_priority}"))
    if rights.max_samples is not None and config.num_return_sequences > rights.max_samples:
        raise refuse(rights, "max_samples", PermissionDenied(
            f"config.num_return_sequences={config.num_return_sequences} is above this token's "
            f"max_samples={rights.max_samples}"))
    most = rights.max_new_tokens
    if most is not None and config.max_new_tokens > most:
        if config.max_new_tokens_explicit:
            raise refuse(rights, "max_new_tokens", PermissionDenied(
                f"config.max_new_tokens={config.max_new_tokens} is above this token's max_new_tokens={most}"))
        config = dataclasses.replace(config, max_new_tokens=most, min_new_tokens=min(config.min_new_tokens, most))
    return config


@dataclasses.dataclass
class Bucket:
    """A token bucket `rate` a second, one second's worth deep (at least 1); it may go below zero
    when charged after the fact (generated tokens), and then admits nothing until refilled."""

    rate: float
    level: float
    stamp: float

    def refill(self, rate: float, now: float) -> None:
        self.rate = rate
        self.level = min(max(rate, 1.0), self.level + (now - self.stamp) * rate)
        self.stamp = now

    def wait(self, amount: float) -> float:
        """Seconds until `amount` can be taken (0: now)."""
        return max(0.0, (amount - self.level) / self.rate)


class Quotas:
    """Each token's buckets, by its identity."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._buckets: dict[tuple[str, str], Bucket] = {}

    def _bucket(self, identity: str, kind: str, rate: float) -> Bucket:
        now = self.clock()
        bucket = self._buckets.get((identity, kind))
        if bucket is None:
            bucket = self._buckets[identity, kind] = Bucket(rate, max(rate, 1.0), now)
        bucket.refill(rate, now)
        return bucket

    def admit(self, identity: str, rights: Rights) -> None:
        """Takes one request from the token's request bucket; refuses while either bucket is empty."""
        if rights.tokens_per_s is not None:
            wait = retry_hint(self._bucket(identity, "tokens", rights.tokens_per_s).wait(1e-9))
            if wait:
                raise refuse(rights, "tokens_per_s", ResourceExhausted(
                    f"this token generated more than its tokens_per_s={rights.tokens_per_s:g} allows; retry in "
                    f"{wait:.1f} s", retry_after=wait))
        if rights.requests_per_s is not None:
            bucket = self._bucket(identity, "requests", rights.requests_per_s)
            wait = retry_hint(bucket.wait(1.0))
            if wait:
                raise refuse(rights, "requests_per_s", ResourceExhausted(
                    f"this token sent more requests than its requests_per_s={rights.requests_per_s:g} allows; "
                    f"retry in {wait:.1f} s", retry_after=wait))
            bucket.level -= 1.0

    def charge(self, identity: str, rights: Rights, num_tokens: int) -> None:
        """Counts generated tokens against the token's rate (after the fact: a request is never cut)."""
        if rights.tokens_per_s is not None and num_tokens:
            self._bucket(identity, "tokens", rights.tokens_per_s).level -= num_tokens
