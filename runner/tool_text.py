"""A model's own tool syntax in its streamed text: the words apart from the calls' texts.

mlx-lm knows each model family's tool syntax (its tokenizer wrapper's `tool_call_start`,
`tool_call_end` and `tool_parser`, inferred from the chat template as mlx-lm's server does): a
call is the text between the two markers, which the parser reads. This scanner splits streamed
text so: words are sent as they come, except what could be the start of a call's marker (held
back until the next delta shows), and each call's text is handed over when its end marker comes.
Pure, no I/O.
"""

from __future__ import annotations


class ToolTextScanner:
    """Splits streamed text into words and the texts of tool calls between `start` and `end`."""

    def __init__(self, start: str, end: str) -> None:
        self.start = start
        self.end = end
        self.words = ""
        self._pending = ""
        self._in_call = False

    def feed(self, delta: str) -> tuple[str, list[str]]:
        """The words that can be sent now, and the texts of the calls that ended."""
        self._pending += delta
        out: list[str] = []
        calls: list[str] = []
        while True:
            marker = self.end if self._in_call else self.start
            at = self._pending.find(marker)
            if at < 0:
                break
            if self._in_call:
                calls.append(self._pending[:at])
            else:
                out.append(self._pending[:at])
            self._pending = self._pending[at + len(marker) :]
            self._in_call = not self._in_call
        if not self._in_call:
            keep = _partial_marker(self._pending, self.start)
            out.append(self._pending[: len(self._pending) - keep])
            self._pending = self._pending[len(self._pending) - keep :]
        words = "".join(out)
        self.words += words
        return words, calls

    def flush(self) -> tuple[str, list[str]]:
        """At the end of the answer: the words held back, and a call cut short (its text, which
        its parser may still read)."""
        rest, self._pending = self._pending, ""
        if self._in_call:
            return "", [rest] if rest.strip() else []
        self.words += rest
        return rest, []


def _partial_marker(text: str, marker: str) -> int:
    """The length of the longest end of `text` that begins `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0
