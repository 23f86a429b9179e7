"""Stop strings matched across token boundaries.

Text arrives in pieces (one per token or so). The matcher emits only text that
can no longer become part of a stop string: it holds back the longest tail
that is a prefix of some stop string, so a stop string split over several
tokens is found, and a client never sees a prefix of one that later completes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class StopMatch:
    """What feeding a piece of text gave: text safe to emit, and the stop string if one matched."""

    text: str
    stop: str | None = None


class StopStringMatcher:
    def __init__(self, stops: Sequence[str], include_stop: bool = False):
        self.stops = [s for s in stops if s]
        self.include_stop = include_stop
        self.pending = ""  # held back: could be the start of a stop string
        self.stopped: str | None = None

    def feed(self, text: str) -> StopMatch:
        """Adds text; returns what may be emitted now and the stop string if this completed one."""
        if self.stopped is not None:
            return StopMatch("")
        if not self.stops:
            return StopMatch(text)
        buffer = self.pending + text
        best: tuple[int, int, str] | None = None  # (start, -length, stop): earliest, then longest
        for stop in self.stops:
            index = buffer.find(stop)
            if index >= 0 and (best is None or (index, -len(stop)) < best[:2]):
                best = (index, -len(stop), stop)
        if best is not None:
            index, _, stop = best
            self.stopped = stop
            self.pending = ""
            end = index + len(stop) if self.include_stop else index
            return StopMatch(buffer[:end], stop)
        hold = self._held_back_length(buffer)
        self.pending = buffer[len(buffer) - hold:] if hold else ""
        return StopMatch(buffer[: len(buffer) - hold])

    def flush(self) -> str:
        """The sequence ended without a match: the held-back text is plain text after all."""
        text, self.pending = self.pending, ""
        return text

    def _held_back_length(self, buffer: str) -> int:
        longest = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:length]):
                    longest = length
                    break
        return longest
