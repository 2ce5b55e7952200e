"""MLX chats batched through mlx-lm's `BatchGenerator` (continuous batching), in the engine child.

One driver owns the generator, on the process's one batch thread: it alone calls MLX for the
batch, so the generator (not thread-safe) never sees two threads. The thread lives as long as the
process and serves each loaded model's driver in turn: a thread that ran MLX's CPU kernels and
ended made a process abort at its exit ("terminate called without an active exception", MLX
0.32, in a script). Each chat runs in a thread of its own (the engine child's, as for every engine
of capacity above 1): it hands the driver its prompt tokens and sampling through the inbox and
reads its tokens from its own queue. Between two decode steps the driver
inserts the chats that arrived (a new chat's prefill interleaves with the others' decoding) and
removes the ones their thread gave up (a cancel, a deadline, a stop string); a chat that ends on
its own (an end-of-sequence token, `max_tokens`) leaves the batch by itself.

A chat of `n` answers is n rows of the batch, each its choice's sampler, processors and
`max_tokens`. Its prompt is computed once: the first row (choice 0) is inserted alone with its
prompt in two segments (all but the last token, then the last), and once the generator has
computed the first segment the driver inserts the other rows with copies of that row's KV cache,
each to compute only the last token, so all n rows start decoding in the same step.

How many chats at once is what memory allows (`runner.mlx_capacity`).

A chat's KV cache outlives it in mlx-lm's LRU prompt cache (as mlx-lm's server keeps one): the
next chat whose prompt starts with the same tokens (a conversation's next turn, a shared system
prompt) computes only the rest. The cache holds at most PROMPT_CACHE_CHATS chats in its bytes
(`Capacity.prompt_cache_bytes`), the oldest dropped first; of a chat of `n`, choice 0's (a next
turn continues one answer). A seeded chat is computed from its whole prompt, as on llama.cpp
here: the last tokens computed apart from a cached prefix give logits that may differ in their
last bits.
"""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal, cast

import msgspec
from loguru import logger

from exojet.bus.sampling import MAX_CHOICES, Sampling, choices
from exojet.runner.engine_protocol import Generate
from exojet.runner.mlx_capacity import PROMPT_CACHE_CHATS, Capacity

# Prompts prefilled together (mlx-lm's server's default prompt concurrency).
PREFILL_CHATS = 8
# The prompt cache's key for the one model a driver runs.
_MODEL = "model"


class Step(msgspec.Struct, frozen=True):
    """One token of a chat; `finish` on its last ("stop": the token is an end-of-sequence one)."""

    token: int
    finish: Literal["stop", "length"] | None = None
    # The answer of the chat's `n` it belongs to.
    choice: int = 0
    # The token's log-probability and the likeliest at its place (id, log-probability), when asked.
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


def make_chat_sampler(sampling: Sampling, choice: int = 0) -> Any:
    """Answer `choice`'s sampler of the chat (None: greedy, which the generator batches in one argmax).

    A seeded chat draws from a random key of its own, split at each token, so its answer does
    not depend on the chats beside it (MLX's global random state is shared by all of them):
    choice 0 from the seed's key (the answer of the chat asked alone), choice i from the i-th of
    the seed's key split in MAX_CHOICES (whatever `n` is).
    Call in the thread that runs the model (the driver's, or the one-at-a-time path's): it makes MLX arrays.
    """
    import mlx.core as mx
    from mlx_lm.sample_utils import apply_top_p, make_sampler

    if sampling.greedy:
        return None
    if sampling.seed is None:
        return make_sampler(sampling.temperature_or_greedy, sampling.top_p_or_all)
    key = mx.random.key(sampling.seed)
    if choice > 0:
        key = mx.random.split(key, MAX_CHOICES)[choice]
    scale = 1.0 / sampling.temperature_or_greedy
    top_p = sampling.top_p_or_all

    def sample(logprobs: Any) -> Any:
        nonlocal key
        key, draw = mx.random.split(key)
        if 0 < top_p < 1:
            logprobs = apply_top_p(logprobs, top_p)
        return mx.random.categorical(logprobs * scale, key=draw)

    return sample


class BatchChat:
    """One chat in the batch (its `n` answers), as its own thread sees it."""

    def __init__(self, driver: BatchDriver, n: int) -> None:
        self.driver = driver
        self.steps: queue.SimpleQueue[Step | BaseException] = queue.SimpleQueue()
        # The answers still in the batch, as the chat's thread knows (read by that thread only).
        self.open = set(range(n))
        # Set by the driver (read by the driver only): the chat's rows in the generator (uid ->
        # choice), and the choices to insert once choice 0's prompt is computed.
        self.rows: dict[int, int] = {}
        self.waiting: tuple[int, ...] = ()
        # How many of the likeliest tokens each step reports (None: no log-probabilities).
        self.top: int | None = None

    @property
    def ended(self) -> bool:
        return not self.open

    def next_step(self, timeout: float) -> Step | None:
        """The chat's next token, of any of its answers (None if none came within `timeout`
        seconds); raises what the driver failed with."""
        try:
            item = self.steps.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            self.open.clear()
            raise item
        if item.finish is not None:
            self.open.discard(item.choice)
        return item

    def leave(self, choices: tuple[int, ...] | None = None) -> None:
        """Take the chat's answers `choices` (None: all) out of the batch if they are still in it
        (a cancel; a stop string, that answer's)."""
        gone = tuple(c for c in (self.open if choices is None else choices) if c in self.open)
        if gone:
            self.open.difference_update(gone)
            self.driver.inbox.put(_Remove(self, gone))


# An mlx-lm logits processor: (the sequence's tokens so far, its row of logits) -> new logits.
LogitsProcessor = Callable[[Any, Any], Any]
# Each answer's processors, by choice (empty: none for any).
ChoiceProcessors = tuple[tuple[LogitsProcessor, ...], ...]


class _Insert(msgspec.Struct, frozen=True):
    chat: BatchChat
    prompt: list[int]
    req: Generate
    processors: ChoiceProcessors = ()

    def of(self, choice: int) -> list[LogitsProcessor]:
        return list(self.processors[choice]) if self.processors else []


class _Remove(msgspec.Struct, frozen=True):
    chat: BatchChat
    choices: tuple[int, ...]


class _Close(msgspec.Struct, frozen=True):
    pass


_jobs: queue.SimpleQueue[Callable[[], None]] | None = None
_jobs_lock = threading.Lock()


def _batch_thread() -> queue.SimpleQueue[Callable[[], None]]:
    """The jobs of the process's one batch thread (started on first use, never ended)."""
    global _jobs
    with _jobs_lock:
        if _jobs is None:
            jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()

            def serve() -> None:
                while True:
                    jobs.get()()

            threading.Thread(target=serve, name="mlx-batch", daemon=True).start()
            _jobs = jobs
        return _jobs


class BatchDriver:
    """Steps `model`'s BatchGenerator for every chat in flight, on the batch thread."""

    def __init__(self, model: Any, eos_token_ids: list[int], capacity: Capacity) -> None:
        self.model = model
        self.eos_token_ids = eos_token_ids
        self.capacity = capacity.chats
        self.prompt_cache_bytes = capacity.prompt_cache_bytes
        self.inbox: queue.SimpleQueue[_Insert | _Remove | _Close] = queue.SimpleQueue()
        self.closed = threading.Event()
        # The chats in the generator, by uid of each row (the driver's alone).
        self._chats: dict[int, BatchChat] = {}
        # Chats whose choice 0 is computing the prompt the other choices will copy, by its uid.
        self._leaders: dict[int, _Insert] = {}
        _batch_thread().put(self._run)

    def submit(self, prompt: list[int], req: Generate, processors: ChoiceProcessors = ()) -> BatchChat:
        """Start `req`'s chat (its `n` answers) on its prompt's tokens, each answer's logits passed
        through its `processors` (its own: a grammar's mask) before its sampler: their tokens come
        through the returned handle."""
        chat = BatchChat(self, choices(req.sampling))
        self.inbox.put(_Insert(chat, prompt, req, processors))
        return chat

    def close(self) -> None:
        """Stop the driver (no chat may be in flight) and drop its caches."""
        self.inbox.put(_Close())
        self.closed.wait()

    def _run(self) -> None:
        try:
            self._drive()
        finally:
            self.closed.set()

    def _generator(self) -> Any:
        from mlx_lm.generate import BatchGenerator

        return BatchGenerator(
            self.model,
            stop_tokens=[[t] for t in self.eos_token_ids],
            completion_batch_size=self.capacity,
            prefill_batch_size=min(self.capacity, PREFILL_CHATS),
        )

    def _drive(self) -> None:
        from mlx_lm.models.cache import LRUPromptCache

        gen = self._generator()
        kept = LRUPromptCache(PROMPT_CACHE_CHATS, self.prompt_cache_bytes)
        while True:
            try:
                for message in self._messages(block=not self._chats):
                    if isinstance(message, _Close):
                        gen.close()
                        return
                    self._apply(gen, kept, message)
                if self._chats:
                    self._step(gen, kept)
            except Exception as exc:  # the batch's state is unknown: fail its chats, start anew
                logger.exception("MLX batch failed")
                for chat in {id(c): c for c in self._chats.values()}.values():
                    chat.steps.put(exc)
                self._chats.clear()
                self._leaders.clear()
                gen.close()
                gen = self._generator()

    def _messages(self, block: bool) -> Iterator[_Insert | _Remove | _Close]:
        """What the chats asked since the last step (waiting for one when `block`)."""
        if block:
            yield self.inbox.get()
        while True:
            try:
                yield self.inbox.get_nowait()
            except queue.Empty:
                return

    def _apply(self, gen: Any, kept: Any, message: _Insert | _Remove) -> None:
        if isinstance(message, _Remove):
            self._remove(gen, kept, message)
            return
        try:
            cache, rest = _cached_prefix(kept, message)
            done = message.prompt[: len(message.prompt) - len(rest)]
            message.chat.top = message.req.sampling.reported_top
            n = choices(message.req.sampling)
            if n == 1 or len(rest) == 1:
                # Nothing to compute but the last token: every answer starts from the same cache.
                caches = None if cache is None else [cache, *(copy.deepcopy(cache) for _ in range(n - 1))]
                self._insert(gen, message, range(n), [[rest]] * n, caches, done)
                return
            (uid,) = self._insert(gen, message, [0], [[rest[:-1], rest[-1:]]], None if cache is None else [cache], done)
        except Exception as exc:  # this chat's request, not the batch, is at fault
            message.chat.steps.put(exc)
            return
        message.chat.waiting = tuple(range(1, n))
        self._leaders[uid] = message

    def _insert(
        self,
        gen: Any,
        message: _Insert,
        rows: Iterable[int],
        segments: list[list[list[int]]],
        caches: list[Any] | None,
        done: list[int],
    ) -> list[int]:
        """Rows of the chat's answers `rows` (their choices), each its prompt's `segments` to
        compute after `caches` (None: fresh) holding the prompt's tokens `done`."""
        answers = list(rows)
        uids: list[int] = gen.insert_segments(
            segments,
            [message.req.sampling.answer_length] * len(answers),
            caches=caches,
            all_tokens=[list(done) for _ in answers],
            samplers=[make_chat_sampler(message.req.sampling, c) for c in answers],
            logits_processors=[message.of(c) for c in answers],
        )
        for uid, choice in zip(uids, answers, strict=True):
            message.chat.rows[uid] = choice
            self._chats[uid] = message.chat
        return uids

    def _remove(self, gen: Any, kept: Any, message: _Remove) -> None:
        chat = message.chat
        chat.waiting = tuple(c for c in chat.waiting if c not in message.choices)
        rows = {uid: c for uid, c in chat.rows.items() if c in message.choices}
        for uid in rows:
            del chat.rows[uid]
            self._chats.pop(uid, None)
            self._leaders.pop(uid, None)
        for uid, (cache, tokens) in gen.remove(list(rows), return_prompt_caches=True).items():
            # Choice 0's alone: a next turn continues one answer, the one a reader of one sees.
            if rows[uid] == 0:
                kept.insert_cache(_MODEL, tokens, cache)

    def _step(self, gen: Any, kept: Any) -> None:
        """One step of the batch (a decode step, and a chunk of any prompts coming in): each row
        its token; a row that ended leaves, its cache kept (choice 0's); a leader whose prompt
        is computed is joined by its chat's other answers."""
        prompts, responses = gen.next()
        for r in responses:
            if (owner := self._chats.get(r.uid)) is None:
                continue
            choice = owner.rows[r.uid]
            owner.steps.put(step_of(r.token, r.finish_reason, r.logprobs, owner.top, choice))
            if r.finish_reason is not None:
                del self._chats[r.uid], owner.rows[r.uid]
                if choice == 0:
                    kept.insert_cache(_MODEL, r.all_tokens, r.prompt_cache)
        for p in prompts:
            if p.end_of_segment and not p.end_of_prompt and (leader := self._leaders.pop(p.uid, None)) is not None:
                self._follow(gen, leader, p.uid)

    def _follow(self, gen: Any, leader: _Insert, uid: int) -> None:
        """Insert the chat's other answers, each with a copy of its choice 0's computed prompt."""
        others = leader.chat.waiting
        leader.chat.waiting = ()
        if not others:
            return
        ((cache, tokens),) = gen.extract_cache([uid]).values()
        caches = [cache, *(copy.deepcopy(cache) for _ in others[1:])]
        self._insert(gen, leader, others, [[leader.prompt[-1:]]] * len(others), caches, list(tokens))


def step_of(token: int, finish: Any, logprobs: Any, top: int | None, choice: int = 0) -> Step:
    """A token's step, with its log-probability and the `top` likeliest when asked (`logprobs`:
    the row of log-probabilities it was sampled from, after the chat's logits processors)."""
    if top is None:
        return Step(token, finish, choice)
    import mlx.core as mx

    likeliest: tuple[tuple[int, float], ...] = ()
    if top > 0:
        ids = mx.argpartition(-logprobs, top - 1)[:top]
        values = logprobs[ids]
        order = mx.argsort(-values)
        top_ids = cast(list[int], ids[order].tolist())
        likeliest = tuple(zip(top_ids, cast(list[float], values[order].tolist()), strict=True))
    return Step(token, finish, choice, logprobs[token].item(), likeliest)


def _cached_prefix(kept: Any, message: _Insert) -> tuple[list[Any] | None, list[int]]:
    """The KV cache of the longest prefix of the chat's prompt an earlier chat left (None: none),
    and the prompt's tokens still to compute (at least its last, to sample from)."""
    from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

    prompt = message.prompt
    if message.req.sampling.seed is not None:
        return None, prompt
    cache, rest = kept.fetch_nearest_cache(_MODEL, prompt)
    if cache is None:
        return None, prompt
    if not rest:
        if not can_trim_prompt_cache(cache):
            return None, prompt
        trim_prompt_cache(cache, 1)
        rest = prompt[-1:]
    return cache, rest
