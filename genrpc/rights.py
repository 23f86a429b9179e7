"""What a bearer token may do: the settings after it on its line of the tokens file (pure logic).

    # token     settings (all optional)
    s3cret-a    name=team-a max_priority=10 max_new_tokens=512 max_samples=4 max_inflight=32
    s3cret-b    name=batch requests_per_s=2 tokens_per_s=200 raw_markup=no cache_salt=team-b
    s3cret-ops  name=ops manage_adapters=yes

A token alone on its line keeps the gateway's own limits: no rate, `--parse-special-tokens`, and a
prefix-cache namespace of its own. The gateway enforces them (gateway/quotas.py): PERMISSION_DENIED
for a right the token lacks, RESOURCE_EXHAUSTED with a `retry-after` trailer past a rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

MAX_NAME = 64
MAX_SALT = 256


@dataclass(frozen=True)
class Rights:
    name: str = ""  # the operator's name for the token: metrics and logs show it, never the token
    max_priority: int | None = None  # highest config.priority it may ask for
    max_new_tokens: int | None = None  # largest config.max_new_tokens (an unset one is lowered to it)
    max_samples: int | None = None  # largest config.num_return_sequences
    max_inflight: int | None = None  # sequences in flight at once (instead of --max-inflight-per-client)
    requests_per_s: float | None = None  # a token bucket of requests, one second's worth deep
    tokens_per_s: float | None = None  # a token bucket of generated tokens, one second's worth deep
    raw_markup: bool | None = None  # special-token markup in its text becomes special tokens (None: the flag)
    cache_salt: str = ""  # a salt its requests share the prefix cache under ("": its own namespace)
    manage_adapters: bool | None = None  # may call LoadAdapter / UnloadAdapter (None: no)

    @property
    def label(self) -> str:
        """How metrics name it: the operator's name, never anything derived from the token."""
        return self.name or "unnamed"


DEFAULT = Rights()
_KINDS = {f.name: f.type for f in fields(Rights)}


def _value(key: str, text: str):
    kind = _KINDS[key]
    if "bool" in kind:
        if text not in ("yes", "no"):
            raise ValueError("must be yes or no")
        return text == "yes"
    if "int" in kind:
        if not text.isdigit() and not (key == "max_priority" and text.lstrip("-").isdigit()):
            raise ValueError("must be a whole number" + ("" if key == "max_priority" else " >= 0"))
        return int(text)
    if "float" in kind:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise ValueError("must be a number > 0")
        return value
    longest = MAX_NAME if key == "name" else MAX_SALT
    if not 1 <= len(text) <= longest:
        raise ValueError(f"must have 1 to {longest} characters")
    return text


def parse_line(line: str) -> tuple[str, Rights] | None:
    """One line of a tokens file: (token, its rights), or None for a blank or comment line. Raises
    ValueError naming the setting that is wrong."""
    words = line.split("#", 1)[0].split()
    if not words:
        return None
    token, settings = words[0], {}
    for word in words[1:]:
        key, sep, text = word.partition("=")
        if not sep or key not in _KINDS:
            raise ValueError(f"{word!r} is not a setting: key=value with a key among {', '.join(_KINDS)}")
        if key in settings:
            raise ValueError(f"{key} is given twice")
        try:
            settings[key] = _value(key, text)
        except ValueError as exc:
            raise ValueError(f"{key}={text!r}: {exc}") from None
    return token, Rights(**settings)
