"""llama.cpp in the engine child, through llama-cpp-python (`exojet[llamacpp]`).

The chat prompt is rendered by llama-cpp-python's own Jinja2 formatter from the
GGUF's chat template and tokenized as its `create_chat_completion` does, so a greedy
answer here equals that call's answer for the same model and options. Tokens are
then drawn one at a time (`Llama.generate`) so the child can stream each one, stop
at a stop string or eos, and notice a Cancel between two tokens.
"""

from __future__ import annotations

import codecs
import gc
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from exojet.runner.engine_protocol import Done, Generate, ModelLoaded
from exojet.runner.stop_scanner import StopScanner

# The KV cache is sized for this many tokens (or the model's own context, if shorter).
MAX_CONTEXT = 4096


def llama_options(path: Path) -> dict[str, Any]:
    """How the engine opens a GGUF; a direct run with the same options gives the same tokens."""
    threads = os.cpu_count() or 1
    return {
        "model_path": str(path),
        "n_ctx": MAX_CONTEXT,
        # llama-cpp-python's default is half the cores; decoding is memory-bound and gains from all.
        "n_threads": threads,
        "n_threads_batch": threads,
        "verbose": False,
    }


class LlamaCppModel:
    """A GGUF loaded in llama.cpp."""

    def __init__(self, path: Path) -> None:
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        started = time.perf_counter()
        if not path.is_file():
            raise FileNotFoundError(f"{path} is not a file")
        self.llm = Llama(**llama_options(path))
        template = self.llm.metadata.get("tokenizer.chat_template")
        if template is None:
            raise ValueError(f"{path} has no chat template")
        # As Llama.__init__ builds its own chat handler from the GGUF.
        eos, bos = self.llm.token_eos(), self.llm.token_bos()
        self.formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=self.llm._model.token_get_text(eos) if eos != -1 else "",
            bos_token=self.llm._model.token_get_text(bos) if bos != -1 else "",
            stop_token_ids=[eos],
        )
        self.path = path
        self.context_length: int = self.llm.n_ctx()
        self.load_seconds = time.perf_counter() - started

    def loaded(self) -> ModelLoaded:
        n_layers = int(self.llm.metadata.get(f"{self.llm.metadata['general.architecture']}.block_count", 0))
        return ModelLoaded(
            n_layers=n_layers,
            start_layer=0,
            end_layer=n_layers,
            model_type=self.llm.metadata.get("general.architecture", ""),
            weight_bytes=self.path.stat().st_size,
            load_seconds=self.load_seconds,
            weights="stored",
            weights_reason="llama.cpp runs the GGUF as stored",
            engine="llamacpp",
        )

    def prompt_tokens(self, req: Generate) -> list[int]:
        """The prompt as `create_chat_completion` tokenizes it."""
        messages: Any = [{"role": m.role, "content": m.content} for m in req.messages]
        rendered = self.formatter(messages=messages)
        return self.llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True)

    def generate(
        self,
        req: Generate,
        prompt: list[int],
        emit: Callable[[str], None] | None,
        cancelled: Callable[[], bool],
    ) -> Done:
        """Generate from `prompt` (from `prompt_tokens`), calling `emit` with each text delta;
        `cancelled` is asked between tokens."""
        from llama_cpp import llama_vocab_is_eog

        started = time.perf_counter()
        if req.seed is not None:
            self.llm.set_seed(req.seed)
        scanner = StopScanner(req.stop)
        finish: Literal["stop", "length", "cancelled"] = "length"
        completion: list[int] = []
        decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        first_at = None
        vocab = self.llm._model.vocab
        for token in self.llm.generate(
            prompt,
            temp=req.temperature,
            top_p=req.top_p,
            top_k=0,
            min_p=0.0,
            repeat_penalty=1.0,
            reset=True,
        ):
            if first_at is None:
                first_at = time.perf_counter()
            if llama_vocab_is_eog(vocab, token):
                finish = "stop"
                break
            completion.append(token)
            # A token can end inside a UTF-8 character (held until it is whole); bytes that
            # are no UTF-8 are dropped, as create_completion drops them.
            text = decoder.decode(self.llm.detokenize([token], prev_tokens=prompt + completion[:-1]))
            delta, stopped = scanner.feed(text)
            if emit is not None and delta:
                emit(delta)
            if stopped:
                finish = "stop"
                break
            if len(completion) >= req.max_tokens:
                break
            if cancelled():
                finish = "cancelled"
                break
        tail = scanner.flush()
        if emit is not None and tail:
            emit(tail)
        ended = time.perf_counter()
        first_at = first_at or ended
        decoded = len(completion) - 1
        decode_seconds = ended - first_at
        return Done(
            text=scanner.text,
            finish_reason=finish,
            prompt_tokens=len(prompt),
            completion_tokens=len(completion),
            tokens_per_second=decoded / decode_seconds if decoded > 0 and decode_seconds > 0 else 0.0,
            time_to_first_token=first_at - started,
        )

    def close(self) -> None:
        """Free the model and its context."""
        self.llm.close()
        del self.llm
        gc.collect()
