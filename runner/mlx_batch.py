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

How many chats at once (`chat_capacity`) is what memory allows: each chat's KV cache at
CHAT_WINDOW tokens (or the model's window, if shorter), in half the memory left free once the
weights are in, at most MAX_CHATS (mlx-lm's server decodes 32 at once by default).

A chat's KV cache outlives it in mlx-lm's LRU prompt cache (as mlx-lm's server keeps one): the
next chat whose prompt starts with the same tokens (a conversation's next turn, a shared system
prompt) computes only the rest. The cache holds at most PROMPT_CACHE_CHATS chats in a quarter of
the memory free once the weights are in (at most 8 GiB, llama.cpp's default), the oldest dropped
first. A seeded chat is computed from its whole prompt, as on llama.cpp here: the last tokens
computed apart from a cached prefix give logits that may differ in their last bits.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, Literal, cast

import msgspec
from loguru import logger

from exojet.bus.sampling import Sampling
from exojet.runner.engine_protocol import Generate

# mlx-lm's server's default decode concurrency: beyond it a step's cost grows with the batch.
MAX_CHATS = 32
# The KV caches' share of the memory free after the weights are in (the rest: prompts being
# tokenized, MLX's buffer cache, other processes).
KV_MAX_FREE_FRACTION = 0.5
# A chat is counted at this many tokens of KV cache (or its model's window, if shorter), as
# llama.cpp's engine here gives each chat a window of 4,096 (`engine_llamacpp.MAX_CONTEXT`):
# counting a long-context model's whole window (128k tokens) would leave it one chat.
CHAT_WINDOW = 4096
# Prompts prefilled together (mlx-lm's server's default prompt concurrency).
PREFILL_CHATS = 8
# The prompt cache: chats kept (the router remembers each runner's last 64), its share of the
# memory free once the weights are in, and its bound (llama.cpp's default `cache_ram_mib`).
PROMPT_CACHE_CHATS = 64
PROMPT_CACHE_SHARE = 0.25
PROMPT_CACHE_MAX_BYTES = 8 << 30
# The prompt cache's key for the one model a driver runs.
_MODEL = "model"


class Step(msgspec.Struct, frozen=True):
    """One token of a chat; `finish` on its last ("stop": the token is an end-of-sequence one)."""

    token: int
    finish: Literal["stop", "length"] | None = None
    # The token's log-probability and the likeliest at its place (id, log-probability), when asked.
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


class Capacity(msgspec.Struct, frozen=True):
    """Chats served at once, the bytes of earlier chats' caches kept, and why."""

    chats: int
    reason: str
    prompt_cache_bytes: int = 0


def chat_capacity(free_bytes: int, kv_bytes_per_token: int, window: int | None) -> Capacity:
    """How many chats fit in memory, each counted at CHAT_WINDOW tokens or its model's
    `window` (None: unknown), whichever is shorter."""
    tokens = min(window or CHAT_WINDOW, CHAT_WINDOW)
    per_chat = max(1, kv_bytes_per_token * tokens)
    budget = int(free_bytes * KV_MAX_FREE_FRACTION)
    chats = max(1, min(MAX_CHATS, budget // per_chat))
    kept = min(int(free_bytes * PROMPT_CACHE_SHARE), PROMPT_CACHE_MAX_BYTES)
    return Capacity(
        chats,
        f"{chats} chats of up to {tokens} tokens ({per_chat / 1e6:.0f} MB of KV cache each) "
        f"in {KV_MAX_FREE_FRACTION:.0%} of {free_bytes / 1e6:.0f} MB free, at most {MAX_CHATS}; "
        f"earlier chats' caches kept in {kept / 1e6:.0f} MB",
        kept,
    )


def kv_bytes_per_token(model: Any) -> int | None:
    """The KV cache bytes one token of one chat takes on `model` (measured on one token);
    None if its caches cannot be batched (mlx-lm merges only some cache types)."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    cache = make_prompt_cache(model)
    if not all(hasattr(c, "merge") for c in cache):
        return None
    model(mx.array([[0]]), cache=cache)
    mx.eval([c.state for c in cache])
    # A cache holds room for KVCache.step tokens once it holds one; a cache that does not grow
    # with the chat (a sliding window, a recurrent state) is so counted generously.
    per_token: int = max(1, -(-sum(c.nbytes for c in cache) // KVCache.step))
    return per_token


def make_chat_sampler(sampling: Sampling) -> Any:
    """The chat's sampler (None: greedy, which the generator batches in one argmax).

    A seeded chat draws from a random key of its own, split at each token, so its answer does
    not depend on the chats beside it (MLX's global random state is shared by all of them).
    Call in the thread that runs the model (the driver's, or the one-at-a-time path's): it makes MLX arrays.
    """
    import mlx.core as mx
    from mlx_lm.sample_utils import apply_top_p, make_sampler

    if sampling.greedy:
        return None
    if sampling.seed is None:
        return make_sampler(sampling.temperature_or_greedy, sampling.top_p_or_all)
    key = mx.random.key(sampling.seed)
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
    """One chat in the batch, as its own thread sees it."""

    def __init__(self, driver: BatchDriver) -> None:
        self.driver = driver
        self.steps: queue.SimpleQueue[Step | BaseException] = queue.SimpleQueue()
        # Set by the driver when the chat is in the generator (read by the driver only).
        self.uid: int | None = None
        self.ended = False
        # How many of the likeliest tokens each step reports (None: no log-probabilities).
        self.top: int | None = None

    def next_step(self, timeout: float) -> Step | None:
        """The chat's next token (None if none came within `timeout` seconds); raises what
        the driver failed with."""
        try:
            item = self.steps.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            self.ended = True
            raise item
        if item.finish is not None:
            self.ended = True
        return item

    def leave(self) -> None:
        """Take the chat out of the batch if it is still in it (a cancel, a stop string)."""
        if not self.ended:
            self.ended = True
            self.driver.inbox.put(_Remove(self))


# An mlx-lm logits processor: (the sequence's tokens so far, its row of logits) -> new logits.
LogitsProcessor = Callable[[Any, Any], Any]


class _Insert(msgspec.Struct, frozen=True):
    chat: BatchChat
    prompt: list[int]
    req: Generate
    processors: tuple[LogitsProcessor, ...] = ()


class _Remove(msgspec.Struct, frozen=True):
    chat: BatchChat


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
        _batch_thread().put(self._run)

    def submit(self, prompt: list[int], req: Generate, processors: tuple[LogitsProcessor, ...] = ()) -> BatchChat:
        """Start `req`'s chat on its prompt's tokens, its logits passed through `processors` (its
        own: a grammar's mask) before its sampler: its tokens come through the returned handle."""
        chat = BatchChat(self)
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
        chats: dict[int, BatchChat] = {}
        kept = LRUPromptCache(PROMPT_CACHE_CHATS, self.prompt_cache_bytes)
        while True:
            try:
                for message in self._messages(block=not chats):
                    if isinstance(message, _Close):
                        gen.close()
                        return
                    self._apply(gen, chats, kept, message)
                if chats:
                    _step(gen, chats, kept)
            except Exception as exc:  # the batch's state is unknown: fail its chats, start anew
                logger.exception("MLX batch failed")
                for chat in chats.values():
                    chat.steps.put(exc)
                chats.clear()
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

    def _apply(self, gen: Any, chats: dict[int, BatchChat], kept: Any, message: _Insert | _Remove) -> None:
        if isinstance(message, _Remove):
            uid = message.chat.uid
            if uid is not None and chats.pop(uid, None) is not None:
                for cache, tokens in gen.remove([uid], return_prompt_caches=True).values():
                    kept.insert_cache(_MODEL, tokens, cache)
            return
        try:
            sampler = make_chat_sampler(message.req.sampling)
            cache, rest = _cached_prefix(kept, message)
            (uid,) = gen.insert(
                [rest],
                [message.req.sampling.answer_length],
                caches=[cache] if cache is not None else None,
                all_tokens=[message.prompt[: len(message.prompt) - len(rest)]],
                samplers=[sampler],
                logits_processors=[list(message.processors)],
            )
        except Exception as exc:  # this chat's request, not the batch, is at fault
            message.chat.steps.put(exc)
            return
        message.chat.uid = uid
        message.chat.top = message.req.sampling.reported_top
        chats[uid] = message.chat


def _step(gen: Any, chats: dict[int, BatchChat], kept: Any) -> None:
    """One step of the batch (a decode step, and a chunk of any prompts coming in): each chat
    its token; a chat that ended leaves `chats`, its cache kept."""
    _, responses = gen.next()
    for r in responses:
        if (owner := chats.get(r.uid)) is None:
            continue
        owner.steps.put(step_of(r.token, r.finish_reason, r.logprobs, owner.top))
        if r.finish_reason is not None:
            del chats[r.uid]
            kept.insert_cache(_MODEL, r.all_tokens, r.prompt_cache)


def step_of(token: int, finish: Any, logprobs: Any, top: int | None) -> Step:
    """A token's step, with its log-probability and the `top` likeliest when asked (`logprobs`:
    the row of log-probabilities it was sampled from, after the chat's logits processors)."""
    if top is None:
        return Step(token, finish)
    import mlx.core as mx

    likeliest: tuple[tuple[int, float], ...] = ()
    if top > 0:
        ids = mx.argpartition(-logprobs, top - 1)[:top]
        values = logprobs[ids]
        order = mx.argsort(-values)
        top_ids = cast(list[int], ids[order].tolist())
        likeliest = tuple(zip(top_ids, cast(list[float], values[order].tolist()), strict=True))
    return Step(token, finish, logprobs[token].item(), likeliest)


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
