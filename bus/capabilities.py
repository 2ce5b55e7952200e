"""What a runner can do with the model it loaded beyond a plain chat: stated, never assumed.

A runner states its capabilities in its LoadModel result (`LoadResult.capabilities`, names on the
wire); a chat needs some (`needed`); a chat goes only to an instance whose runners state every one
it needs (supervisor/chat_routing.py), and an engine refuses a chat needing one it lacks. A runner
that states none (v0.1.0, before the field) is sent no chat carrying a field it would ignore.

A set of them is a tuple in `KNOWN`'s order: the projection's state is hashed by its bytes, and a
frozenset's order varies between processes.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Sequence
from typing import Literal, Protocol, get_args

from exojet.bus.sampling import Reported, choices
from exojet.bus.tools import ResponseFormat, Tool, ToolCall

# logit_bias: a bias added to chosen tokens' logits; logprobs: each token's log-probability (and
# the likeliest beside it); n: several answers to one chat; raw: a prompt given as is, without the
# chat template; response_format: a JSON object or schema the answer must follow; tools: `tools`
# and tool calls and results in the history. Declared in order (a set's order, see above).
Capability = Literal["logit_bias", "logprobs", "n", "raw", "response_format", "tools"]
Capabilities = tuple[Capability, ...]

KNOWN: Capabilities = get_args(Capability)

# How the refusals and `exojet state` name each.
WORDS: dict[Capability, str] = {
    "logit_bias": "logit_bias",
    "logprobs": "logprobs",
    "n": "several answers (n)",
    "raw": "raw prompts",
    "response_format": "structured output (response_format)",
    "tools": "tool calls",
}


class _Message(Protocol):
    @property
    def role(self) -> str: ...
    @property
    def tool_calls(self) -> tuple[ToolCall, ...]: ...


class Asking(Protocol):
    """A chat as a routed command, a task or an engine request carries it (its sampling aside)."""

    @property
    def messages(self) -> Sequence[_Message]: ...
    @property
    def raw(self) -> bool: ...
    @property
    def tools(self) -> tuple[Tool, ...]: ...
    @property
    def response_format(self) -> ResponseFormat | None: ...


def capabilities(names: Iterable[str]) -> Capabilities:
    """The capabilities among `names`, as a set: a name this version does not know (a newer
    runner's) is left out, so the runner is sent nothing that needs it."""
    return _in_order(set(names))


def needed(chat: Asking, sampling: Reported) -> Capabilities:
    """What a runner must state to be given `chat` sampled by `sampling` (the message itself when it
    carries the fields flat: a routed command, a task; an engine request's `sampling`): each field
    it would otherwise ignore."""
    need: set[Capability] = set()
    if sampling.logit_bias:
        need.add("logit_bias")
    if sampling.logprobs or sampling.top_logprobs:
        need.add("logprobs")
    if choices(sampling) > 1:
        need.add("n")
    if chat.raw:
        need.add("raw")
    if chat.response_format is not None and chat.response_format.type != "text":
        need.add("response_format")
    if chat.tools or any(m.tool_calls or m.role == "tool" for m in chat.messages):
        need.add("tools")
    return _in_order(need)


def missing(need: Capabilities, stated: Capabilities) -> Capabilities:
    """What of `need` is not in `stated`."""
    return tuple(c for c in need if c not in stated)


def common(sets: Iterable[Capabilities]) -> Capabilities:
    """What every one of `sets` states (a pipeline group can do what all its ranks can; none of none)."""
    together: set[Capability] | None = None
    for s in sets:
        together = set(s) if together is None else together & set(s)
    return _in_order(together or set())


def _in_order(names: Container[str]) -> Capabilities:
    return tuple(c for c in KNOWN if c in names)


def words(caps: Capabilities) -> str:
    """`caps` as people read them ("tool calls, raw prompts"); "nothing" for none."""
    return ", ".join(WORDS[c] for c in caps) or "nothing"
