"""Stop strings in streamed text (a ChatCompletion's `stop`), for the engine child."""

from __future__ import annotations


class StopScanner:
    """Cuts streamed text at the first stop string.

    Text that could be the start of a stop string is held back until the next
    delta shows whether it is one, so nothing past a stop string is ever sent.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.text = ""
        self.sent = 0

    def feed(self, delta: str) -> tuple[str, bool]:
        """The text that can be sent now, and whether a stop string was reached."""
        self.text += delta
        if not self.stops:
            self.sent = len(self.text)
            return delta, False
        # A match cannot start before `sent`: a possible prefix is always held back.
        # The stop that completes first wins (then the longer one): a generation stops
        # there, so a stop that would complete later never appears, whatever the deltas.
        hits = [(i + len(s), i) for s in self.stops if (i := self.text.find(s, self.sent)) >= 0]
        if hits:
            cut = min(hits)[1]
            out = self.text[self.sent : cut]
            self.text = self.text[:cut]
            self.sent = cut
            return out, True
        keep = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.text) - self.sent), keep, -1):
                if self.text.endswith(stop[:k]):
                    keep = k
                    break
        end = len(self.text) - keep
        out = self.text[self.sent : end]
        self.sent = end
        return out, False

    def flush(self) -> str:
        """The held-back text, once generation has ended without a stop string."""
        out = self.text[self.sent :]
        self.sent = len(self.text)
        return out
