"""llama.cpp in the engine child, through `xllamacpp` (prebuilt CPU wheels, no compiler).

xllamacpp embeds llama.cpp's own server engine in the process: its slots, its chat
templates (the GGUF's, rendered by llama.cpp's Jinja engine), its sampling. Stop strings
are cut from the text as the user sees it, by the same scanner as MLX's (llama.cpp's
server matches the raw bytes, and misses a stop string holding a character it shows as
U+FFFD). A generation is one streamed chat completion handed to it; the engine's loop
thread computes the tokens while the calling thread receives each chunk, and the
chunk callback's answer (True) stops the generation between two tokens.

The embedded server also opens an HTTP listener; it is put on a Unix socket in a
private folder (mode 0700) so no other local user can reach the model through it.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import psutil

from exojet.bus.capabilities import Capabilities
from exojet.bus.chat_ends import KV_CACHE_FULL
from exojet.bus.results import ChoiceResult
from exojet.bus.sampling import Sampling, choices
from exojet.bus.tools import wanted_tools
from exojet.runner import generic_tools
from exojet.runner.answer_plan import chat_message, plan_answer
from exojet.runner.engine_backend import Emit, RequestError, check_choices, raw_prompt, refuse_logprobs_beside_calls
from exojet.runner.engine_protocol import Done, Generate, Load, ModelLoaded
from exojet.runner.llamacpp_chunks import Generation, chunk_decoder

# A chat's window: this many tokens (or the model's own context, if shorter).
MAX_CONTEXT = 4096
# Chats served at once (llama.cpp's slots), batched together by its server engine.
SLOTS = 16
# The one KV cache all slots share holds this many whole windows: a long chat may use its
# whole window while others run, and 16 short chats (a few hundred tokens each) fit beside.
KV_WINDOWS = 4
# A conversation's earlier turns stay cached for its next one: in a slot while no other prompt
# takes it, then in llama.cpp's prompt cache in RAM, bounded to this share of the memory free at
# load (at most llama.cpp's own default of 8 GiB).
PROMPT_CACHE_SHARE = 0.25
PROMPT_CACHE_MAX_MIB = 8192

# llama.cpp's server error types, as the runner's refusals name them.
_ERROR_TYPES = {
    "exceed_context_size_error": "ContextLengthExceeded",
    "invalid_request_error": "InvalidRequest",
}
# What llama.cpp's server answers every chat in flight when its shared KV cache has no room left.
_KV_FULL_MESSAGE = "Context size has been exceeded."


class GgufFacts(msgspec.Struct, frozen=True):
    """What a GGUF's header says about the model."""

    architecture: str
    n_layers: int
    context_length: int | None
    # Whether its chat template renders the tools it is given (else: runner.generic_tools).
    template_has_tools: bool = False
    # Tokens in its vocabulary.
    n_vocab: int = 0


def gguf_facts(path: Path) -> GgufFacts:
    """The architecture, layer count and trained context of a GGUF (its header only)."""
    import gguf

    reader = gguf.GGUFReader(path)

    def value(key: str) -> Any:
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    arch = str(value("general.architecture") or "")
    context = value(f"{arch}.context_length")
    return GgufFacts(
        architecture=arch,
        n_layers=int(value(f"{arch}.block_count") or 0),
        context_length=int(context) if context else None,
        # llama.cpp's own test of a template (jinja caps) is whether it reads `tools`.
        template_has_tools="tools" in str(value("tokenizer.chat_template") or ""),
        n_vocab=len(tokens.data) if (tokens := reader.fields.get("tokenizer.ggml.tokens")) is not None else 0,
    )


def server_params(path: Path, context_length: int, socket_path: Path) -> Any:
    """How the engine opens a GGUF; the bench and the tests run the library directly
    with the same parameters, so a greedy answer there equals the engine's."""
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(path)
    params.n_ctx = context_length * KV_WINDOWS
    params.n_parallel = SLOTS
    # One KV cache for all slots: a long chat may use a whole window while others run.
    params.kv_unified = True
    # And no more: a slot of a unified cache may otherwise take all of it (up to the model's
    # trained context), serving a 13,516-token prompt in a 4,096-token window.
    params.kv_unified_per_slot = context_length
    threads = engine_threads(len(os.sched_getaffinity(0)))
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    params.n_threads_http = 1
    params.cache_ram_mib = prompt_cache_mib()
    params.hostnames = [str(socket_path)]
    # A final assistant message is one more turn, as on MLX and in every dialect, not the start of
    # the answer (llama.cpp's prefill, which also refused two of them at the end).
    params.prefill_assistant = False
    # Warnings and errors only: the parent keeps the child's last stderr lines for a crash report.
    params.verbosity = 1
    return params


def engine_threads(cores: int) -> int:
    """The threads llama.cpp computes a token with, given the cores this process may run on:
    all but one. Every operation of a token ends at a barrier of all its threads, so a token
    waits for the slowest one, and the runner, its NATS server and the API take a core while
    chunks stream: with every core, a thread that lost its core held each token up (on 2 loaded
    cores, 2 threads decoded the tiny GGUF 9x and the default model over 12x slower than 1: a
    3,000-token chat seemed to stall)."""
    return max(1, cores - 1)


def prompt_cache_mib() -> int:
    """The RAM llama.cpp may keep earlier prompts' caches in (PROMPT_CACHE_SHARE of what is free)."""
    free_mib = psutil.virtual_memory().available // (1 << 20)
    return int(min(PROMPT_CACHE_MAX_MIB, free_mib * PROMPT_CACHE_SHARE))


def _sampling(sampling: Sampling) -> dict[str, Any]:
    """The chat's sampling as llama.cpp's server takes it: OpenAI's meaning (temperature and
    top_p only), so llama.cpp's own defaults (top_k 40, min_p 0.05) are turned off."""
    body: dict[str, Any] = {
        "max_tokens": sampling.answer_length,
        "temperature": sampling.temperature_or_greedy,
        "top_p": sampling.top_p_or_all,
        "top_k": 0,
        "min_p": 0.0,
    }
    if (top := sampling.reported_top) is not None:
        body["logprobs"] = True
        # llama.cpp reports no log-probability at all with top_logprobs 0: the top one is cut off here.
        body["top_logprobs"] = max(1, top)
    if (n := choices(sampling)) > 1:
        # llama.cpp's server computes the prompt once and copies it to n slots, generated together.
        body["n"] = n
    if sampling.biases:
        body["logit_bias"] = {str(token): bias for token, bias in sampling.biases.items()}
    if sampling.seed is not None:
        # A seeded chat is computed from its whole prompt: one that reused a cached prefix
        # computes its last prompt token alone, whose logits differ in the last bits from a
        # whole prompt's, and a sampled answer then drifts from the same seed's earlier one.
        body["seed"] = sampling.seed
        body["cache_prompt"] = False
    return body


def chat_body(req: Generate, template_has_tools: bool = True) -> dict[str, Any]:
    """The streamed chat completion (or, for a raw request, text completion) handed to
    llama.cpp's server engine for `req` (a model whose template renders no tools, or a chat
    that must call one, takes runner.generic_tools' path)."""
    text: dict[str, Any] = {"prompt": raw_prompt(req)} if req.raw else _chat(req, template_has_tools)
    return {
        **text,
        "stream": True,
        "stream_options": {"include_usage": True},
        **_sampling(req.sampling),
    }


def _chat(req: Generate, template_has_tools: bool) -> dict[str, Any]:
    plan = plan_answer(req, template_has_tools)
    body: dict[str, Any] = {"messages": [chat_message(m, plan.generic, "text") for m in plan.messages]}
    if plan.template_tools:
        body["tools"] = [msgspec.to_builtins(t) for t in plan.template_tools]
        body["tool_choice"] = "auto"
        body["parallel_tool_calls"] = req.parallel_tool_calls
    if plan.grammar is not None:
        # A grammar, not `response_format`: given one, llama.cpp also parses the answer (at every
        # chunk) and fails the chat with a 500 when the text so far is not yet JSON it can read
        # (a character split across tokens), where the grammar alone already guarantees the JSON.
        body["grammar"] = plan.grammar
    return body


class LlamaCppEngine:
    """A GGUF loaded in llama.cpp's server engine."""

    engine = "llamacpp"
    capacity = SLOTS
    capabilities: Capabilities = ("logit_bias", "logprobs", "n", "raw", "response_format", "tools")

    def __init__(self, req: Load) -> None:
        import xllamacpp

        started = time.perf_counter()
        path = Path(req.model_path)
        if not path.is_file():
            raise RequestError("ModelLoadError", f"could not load model from {path}: not a file")
        try:
            self.facts = gguf_facts(path)
        except Exception as exc:
            raise RequestError("ModelLoadError", f"could not load model from {path}: {exc}") from exc
        self.context_length = min(MAX_CONTEXT, self.facts.context_length or MAX_CONTEXT)
        self._socket_dir = tempfile.TemporaryDirectory(prefix="exojet-llamacpp-")
        try:
            self.server = xllamacpp.Server(
                server_params(path, self.context_length, Path(self._socket_dir.name) / "engine.sock")
            )
        except Exception as exc:
            self._socket_dir.cleanup()
            raise RequestError("ModelLoadError", f"could not load model from {path}: {exc}") from exc
        self.path = path
        self.load_seconds = time.perf_counter() - started

    def loaded(self) -> ModelLoaded:
        return ModelLoaded(
            n_layers=self.facts.n_layers,
            start_layer=0,
            end_layer=self.facts.n_layers,
            model_type=self.facts.architecture,
            weight_bytes=self.path.stat().st_size,
            load_seconds=self.load_seconds,
            weights="stored",
            weights_reason=f"llama.cpp runs the GGUF as stored ({self.path.name})",
            engine=self.engine,
            chat_capacity=self.capacity,
            capabilities=self.capabilities,
        )

    def generate(self, req: Generate, emit: Emit | None, cancelled: Callable[[], bool]) -> Done:
        """Generate a chat completion, calling `emit` with each text delta and tool-call piece;
        `cancelled` is asked after each chunk."""
        sampling = req.sampling
        if sampling.answer_length >= self.context_length:
            raise RequestError(
                "ContextLengthExceeded",
                f"max_tokens {sampling.answer_length} does not fit the model's context window of "
                f"{self.context_length} tokens with any prompt; lower max_tokens",
            )
        self._check_choices(req)
        started = time.perf_counter()
        body = chat_body(req, self.facts.template_has_tools)
        # A generic tool answer is JSON read whole at its end, not text to stream.
        generic = "tools" not in body and bool(wanted_tools(req.tools, req.tool_choice)) and not req.raw
        refuse_logprobs_beside_calls(req, generic, "llama.cpp")
        state = Generation(
            [] if generic else sampling.stop_strings,
            None if generic else emit,
            choices(sampling),
            sampling.reported_top,
        )

        def on_chunk(raw: str) -> bool:
            # xllamacpp swallows a callback's exception (taking it for "stop"): keep it to raise.
            try:
                return state.take(chunk_decoder.decode(raw)) or cancelled()
            except BaseException as exc:  # noqa: BLE001 - re-raised below, in the caller's frame
                state.failure = exc
                return True

        handle = self.server.handle_completions if req.raw else self.server.handle_chat_completions
        try:
            handle(msgspec.json.encode(body).decode(), on_chunk)
        except ValueError as exc:
            # llama.cpp's std::invalid_argument, a request it cannot take: its server answers 400.
            raise RequestError("InvalidRequest", str(exc)) from exc
        if state.failure is not None:
            raise state.failure
        if state.error is not None and state.error.message == _KV_FULL_MESSAGE:
            raise RequestError(
                KV_CACHE_FULL,
                f"llama.cpp's KV cache of {self.context_length * KV_WINDOWS} tokens, shared by the chats it "
                f"serves at once, is full ({_KV_FULL_MESSAGE}): the chats in flight ended; retry shortly, "
                "or lower max_tokens",
            )
        if state.error is not None:
            raise RequestError(_ERROR_TYPES.get(state.error.type, "EngineError"), state.error.message)
        state.end()
        text, calls = state.answers[0].text, state.calls()
        if generic:
            text, calls = generic_tools.emit_answer(text, generic_tools.call_ids(req.request_id, started), emit)
        ended = time.perf_counter()
        first_at = state.first_at or ended
        # A cancelled generation ends before its usage chunk: each content chunk is a token.
        completion_tokens = state.usage.completion_tokens or state.deltas
        decoded = completion_tokens - 1
        decode_seconds = ended - first_at
        finish = state.finish_reason(0)
        return Done(
            text=text,
            finish_reason="tool_calls" if calls and finish == "stop" else finish,
            prompt_tokens=state.usage.prompt_tokens,
            completion_tokens=completion_tokens,
            tokens_per_second=decoded / decode_seconds if decoded > 0 and decode_seconds > 0 else 0.0,
            time_to_first_token=first_at - started,
            tool_calls=tuple(calls),
            choices=tuple(
                ChoiceResult(index=a.choice, text=a.text, finish_reason=state.finish_reason(a.choice))
                for a in state.answers[1:]
            ),
        )

    def _check_choices(self, req: Generate) -> None:
        """Refuse what llama.cpp would silently do otherwise (ignore a bias, mix calls of answers)."""
        check_choices(req, self.capacity)
        beyond = sorted(t for t in req.sampling.biases if t >= self.facts.n_vocab)
        if beyond:
            raise RequestError(
                "InvalidRequest",
                f"logit_bias names token {beyond[0]}, beyond this model's vocabulary of {self.facts.n_vocab}",
            )

    def close(self) -> None:
        """Stop the server engine (its loop thread) and free the model."""
        del self.server
        self._socket_dir.cleanup()
