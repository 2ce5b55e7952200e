"""An answer's text and its tokens' log-probabilities go out together (runner/choice_text.py):
nothing past a stop string, and the tokens sent join to the text sent."""

from __future__ import annotations

from exojet.bus.logprobs import TokenLogprob
from exojet.runner.choice_text import ChoiceText
from exojet.runner.engine_protocol import Token


def _lp(token: str) -> tuple[TokenLogprob, ...]:
    return (TokenLogprob(token=token, logprob=-0.5),)


def test_tokens_wait_with_the_text_held_for_a_stop_string_and_none_past_it_go_out() -> None:
    answer = ChoiceText(["END"], choice=1)
    sent_text, sent_tokens = "", []
    for piece in ["Hel", "lo E", "N", "D more"]:
        text, tokens, stopped = answer.feed(piece, _lp(piece))
        sent_text += text
        sent_tokens.extend(tokens)
        if stopped:
            break
    assert stopped and sent_text == "Hello " == answer.text
    # "lo E" made text before the cut: its token goes; "N" and "D more" made none that was sent.
    assert [t.token for t in sent_tokens] == ["Hel", "lo E"]
    assert answer.piece(sent_text, tuple(sent_tokens)) == Token(text="Hello ", choice=1, logprobs=tuple(sent_tokens))


def test_without_stop_strings_each_token_goes_with_its_text_and_a_plain_answer_is_plain_text() -> None:
    answer = ChoiceText([])
    assert answer.feed("ab", _lp("ab")) == ("ab", _lp("ab"), False)
    # A token that made no text (part of a character) goes out at once, with none.
    assert answer.feed("", _lp("\\xe2")) == ("", _lp("\\xe2"), False)
    assert answer.flush() == ("", ())
    assert answer.piece("ab", ()) == "ab"
