"""Token ids -> text pieces for streaming, as the generator model does it (in the engine's callbacks).

Two upstream complaints shape this: decoding each streamed token alone loses spaces and breaks multi-byte
characters, and stop strings leak into the output when they span tokens or responses. So text is decoded
over a sliding window of tokens (a piece is released only once it is stable), and text that could still turn
into a stop string is held back until it cannot. Tokens are always fed one at a time, which makes the pieces
independent of how tokens were grouped into responses: a stream concatenates to exactly the whole answer.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from tokenizers import Tokenizer

_INCOMPLETE = "\ufffd"  # what a decoder makes of an unfinished UTF-8 sequence


class IncrementalDetokenizer:
    """Decode a growing token sequence into the text added by each token (vLLM/TGI-style offsets)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the context window decoded with each new token
        self.read_offset = 0  # tokens before this have been released as text

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        # Decoding with a few tokens of left context keeps the spaces that some decoders strip from a first token.
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        if len(text) > len(prefix) and not text.endswith(_INCOMPLETE):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever is still unreleased (an unfinished character decodes to U+FFFD)."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix) :]


class StopStringFilter:
    """Pass text through until the first stop string, never releasing any part of one.

    A tail of the text that is a proper prefix of some stop string is held back until the next piece shows
    whether the stop string follows; so is a tail that is a prefix of one of `hold` (or all of it).
    `flush()` releases the held text at the end of the stream."""

    def __init__(self, stop_strings: Iterable[str], hold: Iterable[str] = ()) -> None:
        self.stops = sorted({s for s in stop_strings if s}, key=len, reverse=True)
        # (string, longest prefix to hold)
        self._holds = [(s, len(s) - 1) for s in self.stops] + [(h, len(h)) for h in hold if h]
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending, self.stopped = self.pending[: min(hits)], "", True
            return out
        hold = self._held_tail()
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out

    def _held_tail(self) -> int:
        """Length of the longest tail of `pending` that may still turn into a stop string (or is held)."""
        best = 0
        for s, longest in self._holds:
            for n in range(min(longest, len(self.pending)), best, -1):
                if self.pending.endswith(s[:n]):
                    best = n
                    break
        return best

    def flush(self, strip_suffix: str = "") -> str:
        """Release the held-back tail at the end of the stream, without `strip_suffix` if it ends with it."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        if strip_suffix and out.endswith(strip_suffix):
            out = out[: -len(strip_suffix)]
        return out


class TextStream:
    """The answer text of one request, fed with the token ids of each generation response in turn.

    The answer ends at the end id or at a stop string (neither is shown) or after `max_tokens` tokens.
    An answer that ends at the end id (rather than being cut at `max_tokens`) also loses its `trailer`, the
    template's separator after an answer, as `answer_stop_strings` makes it do before a stop string."""

    def __init__(self, tokenizer: Tokenizer, stop_strings: Iterable[str], end_id: int | None = None,
                 max_tokens: int | None = None, trailer: str = "") -> None:
        self.detok = IncrementalDetokenizer(tokenizer)
        # The trailer is held back so that it can still be dropped if the end id follows.
        self.filter = StopStringFilter(stop_strings, hold=[trailer])
        self.end_id = end_id
        self.max_tokens = max_tokens
        self.trailer = trailer
        self.count = 0
        self.done = False

    def feed(self, ids: Iterable[int]) -> str:
        out = []
        for tid in ids:
            if self.done:
                break
            self.count += 1
            if tid == self.end_id:
                out.append(self._finish(ended=True))
                break
            out.append(self.filter.push(self.detok.push(tid)))
            if self.filter.stopped:
                self.done = True
            elif self.max_tokens is not None and self.count >= self.max_tokens:
                out.append(self._finish(ended=False))
        return "".join(out)

    def finish(self) -> str:
        """The generator sent its last response: release what is held back."""
        if self.done:
            return ""
        # Before max_tokens, so the generator stopped at its end id (which it does not return) or a stop word.
        return self._finish(ended=True)

    def _finish(self, ended: bool) -> str:
        self.done = True
        return self.filter.push(self.detok.flush()) + self.filter.flush(self.trailer if ended else "")


def answer_stop_strings(stop_strings: Iterable[str], answer_end: str) -> list[str]:
    """The model's stop strings plus each preceded by the template's answer separator (it belongs to no answer)."""
    stops = [s for s in stop_strings if s]
    return stops + ([answer_end + s for s in stops] if answer_end else [])
