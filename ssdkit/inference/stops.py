"""Stop strings over streamed text: where generation should end, and what text may be shown before it is
known whether a stop string begins.

:class:`StopStrings` takes the text of a generation piece by piece (as a detokenizer yields it) and gives
back the part that is safe to show: text that is not, and cannot become, part of a stop string. Text that
could be the start of one is held back until the next piece decides. The stop string itself is never
shown (OpenAI's ``stop`` semantics).
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStrings:
    """Match stop strings in a stream of text.

    ``push(piece)`` returns ``(text to show, stopped)``; after ``stopped`` is True nothing more should be
    pushed. ``flush()`` returns the text held back at the end of a generation that did not stop.
    """

    def __init__(self, stops: Sequence[str]):
        stops = tuple(stops)
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError("stop strings must be non-empty strings")
        self.stops = stops
        self._held = ""
        self.stopped = False

    def push(self, piece: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        text = self._held + piece
        ends = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if ends:
            self._held = ""
            self.stopped = True
            return text[:min(ends)], True
        keep = 0  # the longest tail of text that is a proper prefix of some stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:n]):
                    keep = n
                    break
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held
