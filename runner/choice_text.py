"""One answer's text as its user sees it, for every engine: stop strings cut (`StopScanner`), and
each token's log-probability sent with the text it made, none past a stop string.

An engine feeds each piece of text with the log-probabilities of the tokens that made it; the
text that can be sent now comes back with the log-probabilities of the pieces it completes, so
the tokens a client receives join to the text it receives (a piece cut by a stop string keeps its
tokens: they made the text before the cut).
"""

from __future__ import annotations

from collections import deque

from exojet.bus.logprobs import Logprobs, TokenLogprob
from exojet.runner.engine_protocol import Token
from exojet.runner.stop_scanner import StopScanner


class ChoiceText:
    """Answer `choice` of a generation (0, or 0 to n-1 for `n` answers)."""

    def __init__(self, stops: list[str], choice: int = 0) -> None:
        self.scanner = StopScanner(stops)
        self.choice = choice
        # Pieces fed and not sent yet: (start, end) in the text, the tokens that made them.
        self.pending: deque[tuple[int, int, Logprobs]] = deque()

    @property
    def text(self) -> str:
        return self.scanner.text

    def feed(self, text: str, logprobs: Logprobs = ()) -> tuple[str, Logprobs, bool]:
        """What can be sent now (text and its tokens) and whether a stop string was reached."""
        start = len(self.scanner.text)
        self.pending.append((start, start + len(text), logprobs))
        out, stopped = self.scanner.feed(text)
        return out, self._release(stopped), stopped

    def flush(self) -> tuple[str, Logprobs]:
        """The held-back text and its tokens, once the answer ended without a stop string."""
        return self.scanner.flush(), self._release(True)

    def _release(self, final: bool) -> Logprobs:
        sent = self.scanner.sent
        out: list[TokenLogprob] = []
        while self.pending and (self.pending[0][1] <= sent or (final and self.pending[0][0] < sent)):
            out.extend(self.pending.popleft()[2])
        if final:
            self.pending.clear()
        return tuple(out)

    def piece(self, text: str, logprobs: Logprobs) -> str | Token:
        """What an engine emits for them: the text alone for a plain answer."""
        if self.choice == 0 and not logprobs:
            return text
        return Token(text=text, choice=self.choice, logprobs=logprobs)
