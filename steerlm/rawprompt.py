"""Strict parsing of raw, client-rendered SteerLM prompts (NeMo's `/generate`, the model cards' code).

A raw prompt is accepted only as the conversation it encodes: it is split back into system prompt, turns and
label strings by the checkpoint's template, every label string is validated against the schema and must be
written in full and in schema order, no user-written field may contain a control string, and the conversation
must re-render byte for byte to what was sent. So a card's prompt works unchanged, while a crafted one cannot
smuggle a control token, an extra label line or an unvalidated label into the model's input.
"""

from __future__ import annotations

from dataclasses import dataclass

from steerlm.schema import SchemaError
from steerlm.spec import SteerSpec
from steerlm.template import PromptTemplate, Turn


class PromptParseError(ValueError):
    """A raw prompt does not follow the checkpoint's template, or its labels do not fit the schema."""


@dataclass(frozen=True)
class ParsedPrompt:
    system: str
    turns: tuple[Turn, ...]  # the last one is open (answer None); labels are canonical label strings

    @property
    def question(self) -> str:
        return self.turns[-1].question

    @property
    def labels(self) -> str:
        return self.turns[-1].labels

    def history(self) -> list[dict]:
        """Earlier turns in the ensemble's `history` form."""
        return [{"question": t.question, "answer": t.answer, "labels": t.labels} for t in self.turns[:-1]]


def _split(fmt: str, name: str) -> tuple[str, str]:
    before, found, after = fmt.partition("{" + name + "}")
    if not found or "{" in before + after:
        raise ValueError(f"template part {fmt!r} must hold exactly the field {{{name}}}")
    return before, after


def looks_raw(template: PromptTemplate, text: str) -> bool:
    """True when `text` holds a control string, i.e. it can only be meant as a rendered prompt."""
    return any(c in text for c in template.control_tokens)


def parse_prompt(spec: SteerSpec, text: str) -> ParsedPrompt:
    """The conversation a raw prompt encodes, or `PromptParseError` saying what is wrong and where."""
    t = spec.template
    sys_before, sys_after = _split(t.system, "system")
    user_before, user_after = _split(t.user, "question")
    asst_before, asst_after = _split(t.assistant, "labels")
    if not (sys_after + user_before and user_after + asst_before and asst_after and t.answer_end + user_before):
        raise ValueError("this template has adjacent fields and cannot be parsed back")

    def upto(delim: str, start: int, what: str) -> int:
        end = text.find(delim, start)
        if end < 0:
            raise PromptParseError(f"{what}: expected {delim!r} after character {start}, found none")
        return end

    if not text.startswith(sys_before):
        raise PromptParseError(f"a raw SteerLM prompt starts with {sys_before!r}; this one starts with "
                               f"{text[:len(sys_before) + 10]!r}")
    pos = len(sys_before)
    end = upto(sys_after + user_before, pos, "system prompt")
    system = text[pos:end]
    pos = end + len(sys_after)
    turns: list[Turn] = []
    while True:
        n = len(turns) + 1
        pos += len(user_before)
        end = upto(user_after + asst_before, pos, f"turn {n} question")
        question = text[pos:end]
        pos = end + len(user_after) + len(asst_before)
        end = upto(asst_after, pos, f"turn {n} label line")
        labels = _labels(spec, text[pos:end], n)
        pos = end + len(asst_after)
        if pos == len(text):
            turns.append(Turn(question, None, labels))
            break
        end = text.find(t.answer_end + user_before, pos)
        if end < 0:
            raise PromptParseError(
                f"text after the label line of turn {n}: {text[pos:pos + 60]!r}; a raw prompt must end right "
                f"after the open assistant turn's label line (...{asst_before}{labels}{asst_after!r})")
        turns.append(Turn(question, text[pos:end], labels))
        pos = end + len(t.answer_end)

    for where, value in [("system prompt", system)] + [
        (f"turn {i} {field}", v) for i, turn in enumerate(turns, 1)
        for field, v in (("question", turn.question), ("answer", turn.answer or ""))
    ]:
        for control in t.control_tokens:
            if control in value:
                raise PromptParseError(f"{where} contains the control string {control!r} where the template "
                                       f"puts none: {value[:80]!r}")
    rendered = t.render(turns, system)
    if rendered != text:
        at = next((i for i, (a, b) in enumerate(zip(rendered, text)) if a != b), min(len(rendered), len(text)))
        raise PromptParseError(f"the prompt does not re-render byte for byte by this model's template (first "
                               f"difference at character {at}: sent {text[at:at + 30]!r}, template gives "
                               f"{rendered[at:at + 30]!r})")
    return ParsedPrompt(system, tuple(turns))


def _labels(spec: SteerSpec, raw: str, n: int) -> str:
    schema = spec.schema
    try:
        values = schema.parse(raw, partial=False)
    except SchemaError as exc:
        raise PromptParseError(f"turn {n} labels {raw!r}: {exc}") from None
    canonical = schema.encode(values)
    if raw != canonical:
        raise PromptParseError(f"turn {n} labels {raw!r} must be written as {canonical!r} (every attribute, in "
                               f"schema order, name:value joined by ',' without spaces)")
    return canonical
