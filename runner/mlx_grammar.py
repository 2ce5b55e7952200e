"""Grammar-constrained decoding on MLX: LLGuidance's token mask as an mlx-lm logits processor.

The same grammar text as llama.cpp's (runner/answer_plan.py) is compiled by LLGuidance (the
library llama.cpp links) against the model's tokenizer; at each token its matcher, on the CPU,
takes the token sampled last and fills a bitmask of the tokens the grammar allows next
(LLGuidance's numpy path: `llguidance.mlx` applies the mask with a Metal kernel, which a CPU has
not), and the processor sets every other token's logit to -inf. mlx-lm's BatchGenerator runs a
sequence's processors on its row alone, so each chat of a batch has its own grammar and the
chats beside it decode free. Once the grammar is complete only the end-of-sequence token is
allowed, and the chat ends there.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
from loguru import logger

from exojet.runner.engine_backend import RequestError


class GrammarMask:
    """One chat's grammar as an mlx-lm logits processor: called once a token with the tokens so
    far (the first call's last one is the prompt's) and the row's logits."""

    def __init__(self, matcher: Any, vocab_size: int, eos_token_ids: list[int]) -> None:
        from llguidance.numpy import allocate_token_bitmask

        self.matcher = matcher
        self.eos_token_ids = eos_token_ids
        self._bitmask = allocate_token_bitmask(1, vocab_size)
        self._started = False

    def allowed(self, last_token: int | None, width: int) -> np.ndarray:
        """The tokens (of `width`, the logits' row) the grammar allows after `last_token` (None:
        the first token of the answer)."""
        from llguidance.numpy import fill_next_token_bitmask

        if last_token is not None:
            self.matcher.consume_token(last_token)
        if self.matcher.is_error():
            # A token the mask forbade cannot be sampled; were LLGuidance to fail anyway (a
            # resource limit), the chat ends here rather than go on unconstrained.
            logger.error("grammar failed: {}", self.matcher.get_error())
            allowed = np.zeros(width, dtype=bool)
            allowed[[t for t in self.eos_token_ids if t < width]] = True
            return allowed
        fill_next_token_bitmask(self.matcher, self._bitmask)
        bits = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little").astype(bool)
        # The logits may be wider than the tokenizer's vocabulary (padded embeddings): never allowed.
        return bits[:width] if bits.size >= width else np.pad(bits, (0, width - bits.size))

    def __call__(self, tokens: Any, logits: Any) -> Any:
        import mlx.core as mx

        last = int(tokens[-1].item()) if self._started else None
        self._started = True
        return mx.where(mx.array(self.allowed(last, logits.shape[-1])), logits, -mx.inf)


class GrammarCompiler:
    """Compiles grammars against one model's tokenizer. LLGuidance's view of the tokenizer is
    built on the first grammar (about 3 s for the default model's 49,152 tokens), not at load:
    most models' chats never need one."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._compiled: Any = None
        self._lock = threading.Lock()

    def _llg_tokenizer(self) -> Any:
        import llguidance.hf

        with self._lock:
            if self._compiled is None:
                self._compiled = llguidance.hf.from_tokenizer(
                    self._tokenizer._tokenizer, eos_token=list(self._tokenizer.eos_token_ids)
                )
            return self._compiled

    def mask(self, grammar: str) -> GrammarMask:
        """A fresh processor for one chat constrained by `grammar` (call in the chat's thread:
        compiling a large grammar takes a while, and LLGuidance lets the other threads run)."""
        import llguidance

        tokenizer = self._llg_tokenizer()
        matcher = llguidance.LLMatcher(tokenizer, grammar)
        if matcher.is_error():
            raise RequestError("InvalidRequest", f"the grammar does not compile: {matcher.get_error()}")
        return GrammarMask(matcher, tokenizer.vocab_size, list(tokenizer.eos_tokens))
