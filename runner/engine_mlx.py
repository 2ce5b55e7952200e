"""MLX (mlx-lm) in the engine child: a whole model, or a pipeline rank's shard in a ring group.

A whole model is loaded lazily and materialised a layer at a time (each reported), then
turned into dense float32 where that is faster and fits (`runner.mlx_cpu`); its chats are
batched (`runner.mlx_batch`: as many at once as memory allows). In a group every rank runs
one chat at a time, in the same steps: no rank may stop on its own (a cancel is passed to the
others through the pipeline's stop sum and every rank stops at the same token), a stalled
peer ends the process, and a ring error ends it with RING_BROKEN_EXIT.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
from loguru import logger

from exojet.bus.capabilities import Capabilities
from exojet.bus.sampling import choices
from exojet.runner import generic_tools
from exojet.runner.answer_plan import AnswerPlan, chat_message, plan_answer
from exojet.runner.answer_stream import AnswerStream, ToolSyntax
from exojet.runner.engine_backend import (
    Emit,
    RequestError,
    check_choices,
    check_fits,
    raw_prompt,
    refuse_logprobs_beside_calls,
)
from exojet.runner.engine_protocol import RING_BROKEN_EXIT, Done, Generate, Load, ModelLoaded
from exojet.runner.mlx_batch import BatchDriver, ChoiceProcessors, LogitsProcessor, make_chat_sampler, step_of
from exojet.runner.mlx_capacity import Capacity, chat_capacity, kv_bytes_per_token
from exojet.runner.mlx_choices import Answer, Call, Finish, done, read_batched
from exojet.runner.mlx_cpu import choose_weights, to_dense_float32
from exojet.runner.mlx_grammar import GrammarCompiler
from exojet.runner.mlx_logprobs import bias_processor, token_logprobs, vocab_size
from exojet.runner.mlx_weights import context_length, materialise, shard_range

# A pipeline rank that sees no token for this long takes its peers for dead
# (a stalled peer would otherwise hold the ring forever); env overrides.
STALL_TIMEOUT_S = float(os.environ.get("EXO_PIPELINE_STALL_S", "30"))
LOAD_STALL_TIMEOUT_S = float(os.environ.get("EXO_PIPELINE_LOAD_STALL_S", "300"))
# MLX's random keys are 64-bit.
SEEDS = 2**64


@contextlib.contextmanager
def ring_guard() -> Iterator[None]:
    """A ring error (a peer gone) ends this process: its group cannot be rebuilt in it."""
    try:
        yield
    except RuntimeError as exc:
        if "[ring]" not in str(exc):
            raise
        logger.error("pipeline peer lost: {}", exc)
        os._exit(RING_BROKEN_EXIT)


class MlxEngine:
    """An mlx-lm model (or a pipeline rank's shard of one) in this process."""

    engine = "mlx"

    def __init__(self, req: Load, group: Any, on_layer: Callable[[int, int], None]) -> None:
        self.group = group
        # A pipeline rank runs no per-chat logits processor (a grammar's mask, a bias), reports no
        # logprobs and serves one sequence, so it states none of those (a whole model: once loaded).
        self.capabilities: Capabilities = ("raw",)
        self.model: Any = None
        self.tokenizer: Any = None
        self._context: int | None = None
        # Chats at once: a whole model's are batched by `_batch`; a pipeline rank serves one.
        self.capacity = 1
        self._capacity_reason = "a pipeline rank serves one chat at a time"
        self._batch: BatchDriver | None = None
        # The model's own tool syntax, where its template renders tools and mlx-lm knows how to
        # read its calls (else the generic path), and its grammars' compiler; set once loaded.
        self._tools: ToolSyntax | None = None
        self._grammars: GrammarCompiler | None = None
        self._started = time.perf_counter()
        path = Path(req.model_path)
        if group is not None:
            self._loaded = self._load_shard(req, path, on_layer)
        else:
            self._loaded = self._load_whole(req, path, on_layer)

    @property
    def context_length(self) -> int | None:
        return self._context

    def loaded(self) -> ModelLoaded:
        return self._loaded

    def _take_tokenizer(self, tokenizer: Any) -> None:
        """Keep the model's tokenizer, and what it says of tool calls and grammars."""
        self.tokenizer = tokenizer
        self._grammars = GrammarCompiler(tokenizer)
        template = str(getattr(tokenizer, "chat_template", None) or "")
        if tokenizer.has_tool_calling and "tools" in template:
            self._tools = ToolSyntax(tokenizer.tool_call_start, tokenizer.tool_call_end, tokenizer.tool_parser)

    def _load_whole(self, req: Load, path: Path, on_layer: Callable[[int, int], None]) -> ModelLoaded:
        import psutil
        from mlx_lm.utils import load_model, load_tokenizer

        try:
            # mlx_lm would try the Hugging Face hub for a missing path; a runner
            # only loads what it downloaded, so a missing folder is an error here.
            if not path.is_dir():
                raise FileNotFoundError(f"{path} is not a directory")
            model, config = load_model(path, lazy=True)
            tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
        except Exception as exc:
            raise RequestError("ModelLoadError", f"could not load model from {path}: {exc}") from exc
        n_layers = len(model.layers)
        start, end = shard_range(req, n_layers, path)
        weight_bytes = materialise(model, start, end, on_layer)
        free = psutil.virtual_memory().available
        weights, reason = choose_weights(model, (start, end) == (0, n_layers), req.weights, free)
        if weights == "dense":
            weight_bytes = to_dense_float32(model)
        self.model = model
        self._take_tokenizer(tokenizer)
        self._context = context_length(config)
        self._start_batching()
        return self._report(path, config, n_layers, (start, end), weight_bytes, weights, reason)

    def _start_batching(self) -> None:
        """Size the batch by the memory left once the weights are in, and start its driver."""
        import psutil

        per_token = kv_bytes_per_token(self.model)
        if per_token is None:
            capacity = Capacity(1, "mlx-lm cannot batch this model's KV caches")
        else:
            capacity = chat_capacity(psutil.virtual_memory().available, per_token, self._context)
        self.capacity, self._capacity_reason = capacity.chats, capacity.reason
        # n answers are n rows of the batch: one sequence at a time serves one.
        self.capabilities = ("logit_bias", "logprobs", "raw", "response_format", "tools")
        if capacity.chats > 1:
            self._batch = BatchDriver(self.model, list(self.tokenizer.eos_token_ids), capacity)
            self.capabilities = ("logit_bias", "logprobs", "n", "raw", "response_format", "tools")

    def _load_shard(self, req: Load, path: Path, on_layer: Callable[[int, int], None]) -> ModelLoaded:
        from mlx.utils import tree_flatten

        from exojet.runner.pipeline import StallWatchdog, load_shard

        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise RequestError("ModelLoadError", f"could not load model from {path}: {exc}") from exc
        n_layers = int(config["num_hidden_layers"])
        start, end = shard_range(req, n_layers, path)
        # A rank that failed before loading never joins the collectives the
        # others wait in: the watchdog turns that wait into a bounded failure.
        with ring_guard(), StallWatchdog(LOAD_STALL_TIMEOUT_S):
            self.model, tokenizer = load_shard(path, self.group, start, end, on_layer)
        self._take_tokenizer(tokenizer)
        self._context = context_length(config)
        params: dict[str, Any] = {}
        tree_flatten(self.model.parameters(), destination=params)
        weight_bytes = sum(a.nbytes for a in params.values())
        return self._report(path, config, n_layers, (start, end), weight_bytes, "stored", "a pipeline shard")

    def _report(
        self,
        path: Path,
        config: dict[str, Any],
        n_layers: int,
        shard: tuple[int, int],
        weight_bytes: int,
        weights: str,
        reason: str,
    ) -> ModelLoaded:
        """The reply to a Load of MLX weights, logged."""
        seconds = time.perf_counter() - self._started
        start, end = shard
        logger.bind(model=str(path), start=start, end=end).info(
            "loaded {} bytes of weights ({}: {}) in {:.2f} s; {}",
            weight_bytes,
            weights,
            reason,
            seconds,
            self._capacity_reason,
        )
        return ModelLoaded(
            n_layers=n_layers,
            start_layer=start,
            end_layer=end,
            model_type=str(config.get("model_type", "")),
            weight_bytes=weight_bytes,
            load_seconds=seconds,
            weights=weights,
            weights_reason=reason,
            engine=self.engine,
            chat_capacity=self.capacity,
            capabilities=self.capabilities,
        )

    def close(self) -> None:
        """Drop the model and return its memory to the system."""
        import mlx.core as mx

        if self._batch is not None:
            self._batch.close()
            self._batch = None
        self.model = self.tokenizer = self._grammars = self._tools = None
        gc.collect()
        mx.clear_cache()

    def generate(self, req: Generate, emit: Emit | None, cancelled: Callable[[], bool]) -> Done:
        started = time.perf_counter()
        sampling = req.sampling
        check_choices(req, self.capacity)
        try:
            plan = AnswerPlan(messages=tuple(req.messages)) if req.raw else plan_answer(req, self._tools is not None)
            # A chat template may refuse a role it does not know.
            prompt = self.tokenizer.encode(raw_prompt(req)) if req.raw else self._chat_prompt(plan)
        except RequestError:
            raise
        except Exception as exc:
            raise RequestError("InvalidRequest", f"the model cannot take these messages: {exc}") from exc
        refuse_logprobs_beside_calls(req, bool(plan.generic or plan.template_tools), "MLX")
        if not prompt:
            raise RequestError("InvalidRequest", "the prompt is empty")
        if sampling.seed is not None and not 0 <= sampling.seed < SEEDS:
            raise RequestError("InvalidRequest", f"seed {sampling.seed} is not in [0, 2**64): MLX cannot hold it")
        check_fits(len(prompt), sampling.answer_length, self._context)
        call_id = generic_tools.call_ids(req.request_id, started)
        answers = tuple(
            Answer(
                AnswerStream(plan, sampling.stop_strings, emit, call_id, self._tools, req.parallel_tool_calls, choice),
                self.tokenizer.detokenizer,
            )
            for choice in range(choices(sampling))
        )
        call = Call(req, prompt, answers, cancelled, started, self._processors(req, plan))
        if self._batch is not None:
            return self._generate_batched(self._batch, call)
        return self._generate_alone(call)

    def _processors(self, req: Generate, plan: AnswerPlan) -> ChoiceProcessors:
        """Each answer's own logits processors: its grammar's mask (a matcher of its own), the bias."""
        biases = req.sampling.biases
        if plan.grammar is None and not biases:
            return ()
        vocab = vocab_size(self.model, self.tokenizer)
        per_choice: list[tuple[LogitsProcessor, ...]] = []
        for _ in range(choices(req.sampling)):
            processors: tuple[LogitsProcessor, ...] = ()
            if plan.grammar is not None:
                assert self._grammars is not None  # a pipeline rank states no grammar, so it gets none
                processors = (self._grammars.mask(plan.grammar),)
            if biases:
                processors += (bias_processor(biases, vocab),)
            per_choice.append(processors)
        return tuple(per_choice)

    def _chat_prompt(self, plan: AnswerPlan) -> list[int]:
        """The tokens of a chat through the model's template (with the tools it renders)."""
        tools = [msgspec.to_builtins(t) for t in plan.template_tools] or None
        messages = [chat_message(m, plan.generic, "object") for m in plan.messages]
        return list(self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True))

    def _generate_batched(self, batch: BatchDriver, call: Call) -> Done:
        """The chat's answers among the others of the batch: their tokens come from the driver thread."""
        chat = batch.submit(call.prompt, call.req, call.processors)
        return done(call, read_batched(chat, call, self.tokenizer))

    def _generate_alone(self, call: Call) -> Done:
        """The chat on its own (a pipeline rank in step with the others, or a model whose
        caches mlx-lm cannot batch)."""
        from mlx_lm import stream_generate

        from exojet.runner.pipeline import StallWatchdog, pipeline_barrier

        first_at = None
        finish: Finish = "length"
        completion_tokens = 0
        answer = call.answers[0]
        in_group = self.group is not None
        stage = self.model.model if in_group else None
        if stage is not None:
            stage.stop_asked = False
        watchdog = StallWatchdog(STALL_TIMEOUT_S) if in_group else None
        sampler = make_chat_sampler(call.req.sampling)
        top = call.req.sampling.reported_top
        with ring_guard(), watchdog or contextlib.nullcontext():
            for response in stream_generate(
                self.model,
                self.tokenizer,
                call.prompt,
                max_tokens=call.req.sampling.answer_length,
                sampler=sampler,
                logits_processors=list(call.processors[0]) if call.processors else [],
            ):
                if watchdog is not None:
                    watchdog.beat()
                if first_at is None:
                    first_at = time.perf_counter()
                # The eos token ends a generation without being part of it.
                eos = response.finish_reason == "stop"
                completion_tokens = response.generation_tokens - (1 if eos else 0)
                step = step_of(response.token, None, response.logprobs, top)
                stopped = answer.stream.feed(
                    response.text, () if eos else token_logprobs(self.tokenizer, response.text, step)
                )
                if stopped or eos:
                    finish = "stop"
                    break
                if call.cancelled():
                    if stage is None:
                        finish = "cancelled"
                        break
                    stage.stop_asked = True
                if stage is not None and stage.stop_agreed():
                    finish = "cancelled"
                    break
            if in_group:
                pipeline_barrier(self.group)
        answer.finish, answer.tokens = finish, completion_tokens
        return done(call, first_at)
