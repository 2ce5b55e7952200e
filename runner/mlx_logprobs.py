"""`logprobs`, `top_logprobs` and `logit_bias` on MLX: a chat's bias as a logits processor of its own
(the per-chat hook its grammar's mask uses), and each token's log-probability as the text it made.

A token's `token` is the text it added to the answer (the detokenizer's segment), so the tokens join
to the answer's text: a token that ends inside a UTF-8 character adds none, and the next carries the
whole character. The likeliest tokens beside it are each decoded alone.
"""

from __future__ import annotations

from typing import Any

from exojet.bus.logprobs import Logprobs, TokenLogprob
from exojet.runner.engine_backend import RequestError
from exojet.runner.mlx_batch import LogitsProcessor, Step


def vocab_size(model: Any, tokenizer: Any) -> int:
    """The rows of the model's logits (its config's vocab_size; else the tokenizer's tokens)."""
    args = getattr(model, "args", None)
    size = getattr(args, "vocab_size", None)
    return int(size) if size else len(tokenizer.vocab)


def bias_processor(bias: dict[int, float], vocab: int) -> LogitsProcessor:
    """Adds `bias` to a chat's logits before its sampler (RequestError: a token beyond `vocab`)."""
    import mlx.core as mx

    beyond = sorted(t for t in bias if t >= vocab)
    if beyond:
        raise RequestError(
            "InvalidRequest", f"logit_bias names token {beyond[0]}, beyond this model's vocabulary of {vocab}"
        )
    ids = sorted(bias)
    # Made on the first call, in the thread that runs the chat's logits (the batch's: MLX's arrays
    # belong to the thread's stream that made them).
    added: list[Any] = []

    def add(_tokens: Any, logits: Any) -> Any:
        if not added:
            row = mx.zeros((vocab,), dtype=logits.dtype)
            row[mx.array(ids)] = mx.array([bias[t] for t in ids], dtype=logits.dtype)
            added.append(row)
        return logits + added[0]

    return add


def token_logprobs(tokenizer: Any, text: str, step: Step) -> Logprobs:
    """The step's token as the answer's text `text` it made, with its log-probability (none when
    the chat asked for none)."""
    if step.logprob is None:
        return ()
    top = tuple(TokenLogprob(token=tokenizer.decode([t]), logprob=lp) for t, lp in step.top)
    return (TokenLogprob(token=text, logprob=step.logprob, top=top),)
