"""Incremental detokenization and stop strings, as the generator model applies them to token streams."""

from __future__ import annotations

import random

import pytest

from steerlm.serve.textstream import IncrementalDetokenizer, StopStringFilter, TextStream, answer_stop_strings
from steerlm.tokenize import load_tokenizer

TEXT = "Techno began in Detroit, 1985.  Ünïcödé, emoji 🎵🎶 and   spaces\nsurvive streaming."


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(tiny_model)


def pieces_of(tok, ids):
    detok = IncrementalDetokenizer(tok)
    return [detok.push(t) for t in ids] + [detok.flush()]


def test_streamed_pieces_concatenate_to_the_whole_text(tok):
    ids = tok.encode(TEXT, add_special_tokens=False).ids
    assert "".join(pieces_of(tok, ids)) == TEXT == tok.decode(ids)


def test_no_piece_holds_half_a_character(tok):
    ids = tok.encode("🎵🎶 Ünïcödé", add_special_tokens=False).ids
    assert len(ids) > len("🎵🎶 Ünïcödé") / 2, "the emoji should span several byte-level tokens"
    assert all("\ufffd" not in p for p in pieces_of(tok, ids))


def test_spaces_between_words_are_kept_in_pieces(tok):
    ids = tok.encode("where and when did it happen", add_special_tokens=False).ids
    pieces = [p for p in pieces_of(tok, ids) if p]
    assert len(pieces) > 1 and "".join(pieces) == "where and when did it happen"


def test_stop_string_spanning_pieces_is_never_released():
    f = StopStringFilter(["<extra_id_1>"])
    out = [f.push(p) for p in ["Hello <ext", "ra_i", "d_1> and more"]] + [f.flush()]
    assert "".join(out) == "Hello " and f.stopped
    assert all("<" not in p for p in out)


def test_held_back_prefix_is_released_once_it_cannot_be_a_stop_string():
    f = StopStringFilter(["<extra_id_1>"])
    assert f.push("a <ext") == "a "
    assert f.push("ended") == "<extended"
    assert f.push(" <") == " " and f.flush() == "<"


def test_earliest_of_several_stop_strings_wins():
    f = StopStringFilter(["world", "lo w", "zzz"])
    assert f.push("hello world") == "hel"


def test_answer_separator_before_a_model_stop_string_is_not_part_of_the_answer():
    f = StopStringFilter(answer_stop_strings(["<extra_id_1>"], "\n"))
    assert f.push("line one\nline two\n") == "line one\nline two"
    assert f.push("<extra_id_1>") == ""


def test_text_stream_is_independent_of_how_tokens_are_grouped_into_responses(tok):
    ids = tok.encode(TEXT + "<extra_id_1> never shown", add_special_tokens=False).ids
    whole = TextStream(tok, ["<extra_id_1>"])
    expected = whole.feed(ids) + whole.finish()
    assert expected == TEXT
    rng = random.Random(0)
    for _ in range(5):
        stream, out, i = TextStream(tok, ["<extra_id_1>"]), [], 0
        while i < len(ids):
            n = rng.randint(1, 4)
            out.append(stream.feed(ids[i : i + n]))
            i += n
        out.append(stream.finish())
        assert "".join(out) == expected


def test_end_id_ends_the_answer_and_drops_the_separator_before_it(tok):
    end = tok.token_to_id("<extra_id_1>")
    ids = tok.encode("an answer\n", add_special_tokens=False).ids + [end] + tok.encode("junk").ids
    stream = TextStream(tok, [], end_id=end, trailer="\n")
    assert stream.feed(ids) == "an answer" and stream.done
    assert stream.feed(tok.encode("more").ids) == ""


def test_answer_cut_at_max_tokens_keeps_everything_generated(tok):
    ids = tok.encode("cut here\n", add_special_tokens=False).ids
    stream = TextStream(tok, answer_stop_strings(["<extra_id_1>"], "\n"), max_tokens=len(ids), trailer="\n")
    assert stream.feed(ids) + stream.finish() == "cut here\n"
