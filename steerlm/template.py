"""The SteerLM prompt template, as data.

A template is a handful of format strings (the SteerLM format of NVIDIA/NeMo-Aligner
docs/user-guide/steerlm.rst and the Llama2-70B-SteerLM-Chat model card). Rendering produces *segments*:
literal template text, which may contain control tokens such as `<extra_id_1>`, and user-supplied
text, which must never turn into control tokens. `steerlm.tokenize` encodes the two kinds
differently; `render()` joins them into the exact prompt string.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

DEFAULT_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass(frozen=True)
class Turn:
    """One exchange: the user's question, the assistant's answer (None for the open final turn) and its labels."""

    question: str
    answer: str | None = None
    labels: str = ""


@dataclass(frozen=True)
class Segment:
    text: str
    user: bool  # True: user-supplied text, encoded with control tokens disabled


@dataclass(frozen=True)
class PromptTemplate:
    system: str = "<extra_id_0>System\n{system}\n"
    user: str = "<extra_id_1>User\n{question}\n"
    assistant: str = "<extra_id_1>Assistant\n<extra_id_2>{labels}\n"
    answer_end: str = "\n"
    # Emitted by the model after an answer; in training it follows `answer_end` and carries loss.
    turn_end: str = "<extra_id_1>"
    control_tokens: tuple[str, ...] = ("<extra_id_0>", "<extra_id_1>", "<extra_id_2>")
    # Strings that end generation; none of them is ever returned to the user.
    stop_strings: tuple[str, ...] = ("<extra_id_1>",)
    default_system: str = DEFAULT_SYSTEM

    def segments(self, turns: Sequence[Turn], system: str | None = None, *, train: bool = False) -> list[Segment]:
        """Segments of a conversation. The last turn stays open (answer None) unless `train` is set,
        in which case every turn has an answer and the final `turn_end` is appended."""
        if not turns:
            raise ValueError("a conversation needs at least one turn")
        out: list[Segment] = []
        _fill(out, self.system, {"system": self.default_system if system is None else system})
        for i, turn in enumerate(turns):
            last = i == len(turns) - 1
            if turn.answer is None and not (last and not train):
                raise ValueError(f"turn {i} has no answer; only the final turn of a prompt may be open")
            _fill(out, self.user, {"question": turn.question})
            _fill(out, self.assistant, {"labels": turn.labels}, user_fields=())
            if turn.answer is not None:
                out.append(Segment(turn.answer, True))
                out.append(Segment(self.answer_end, False))
        if train:
            out.append(Segment(self.turn_end, False))
        return _merge(out)

    def render(self, turns: Sequence[Turn], system: str | None = None, *, train: bool = False) -> str:
        return "".join(s.text for s in self.segments(turns, system, train=train))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["control_tokens"] = list(self.control_tokens)
        d["stop_strings"] = list(self.stop_strings)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "PromptTemplate":
        d = dict(d)
        for key in ("control_tokens", "stop_strings"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    def chat_template(self) -> str:
        """The same template as a Hugging Face (Jinja) chat template for `tokenizer_config.json`.

        Messages use roles `system`, `user` and `assistant`; an assistant message may carry
        `labels` (a label string). `add_generation_prompt` opens the final assistant turn, whose
        labels come from the `labels` variable. Tested byte-equal with `render()`.

        `apply_chat_template(..., tokenize=True)` tokenizes the rendered string with control tokens recognised
        everywhere, so text a user typed could become a control token there; the template therefore refuses
        (raise_exception) any message content holding a control string, and label strings holding one or a
        line break. Labels are not checked against the schema here: build them with `steerlm.schema`."""
        def j(s: str) -> str:
            return s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")

        controls = "[" + ", ".join(f"'{j(c)}'" for c in self.control_tokens) + "]"

        def guard(expr: str, what: str, one_line: bool = False) -> str:
            out = ("{%- for c in " + controls + " -%}{%- if c in " + expr + " -%}{{- raise_exception('" + what
                   + " holds the control string ' + c + '; SteerLM user text and labels may not contain one') -}}"
                   "{%- endif -%}{%- endfor -%}")
            if one_line:
                out += ("{%- if '\\n' in " + expr + " -%}{{- raise_exception('" + what
                        + " holds a line break; a label string is one line') -}}{%- endif -%}")
            return out

        def piece(fmt: str, field_name: str, expr: str) -> str:
            before, _, after = fmt.partition("{" + field_name + "}")
            return f"'{j(before)}' + {expr} + '{j(after)}'"

        return (
            "{%- set ns = namespace(system='" + j(self.default_system) + "') -%}"
            "{%- if messages and messages[0]['role'] == 'system' -%}{%- set ns.system = messages[0]['content'] -%}{%- endif -%}"
            "{{- " + piece(self.system, "system", "ns.system") + " -}}"
            "{%- for m in messages -%}"
            + guard("m['content']", "a ' + m['role'] + ' message")
            + guard("(m['labels'] if m['labels'] is defined else '')", "the labels of an assistant message", True)
            + "{%- if m['role'] == 'user' -%}{{- " + piece(self.user, "question", "m['content']") + " -}}"
            "{%- elif m['role'] == 'assistant' -%}"
            "{{- " + piece(self.assistant, "labels", "(m['labels'] if m['labels'] is defined else '')") + " -}}"
            "{{- m['content'] + '" + j(self.answer_end) + "' -}}"
            "{%- endif -%}"
            "{%- endfor -%}"
            + guard("(labels if labels is defined else '')", "labels", True)
            + "{%- if add_generation_prompt -%}{{- "
            + piece(self.assistant, "labels", "(labels if labels is defined else '')")
            + " -}}{%- endif -%}"
        )


def _fill(out: list[Segment], fmt: str, values: Mapping[str, str], user_fields: Sequence[str] | None = None) -> None:
    """Append the segments of one format string; its fields are user text unless excluded."""
    rest = fmt
    while rest:
        start = rest.find("{")
        if start < 0:
            out.append(Segment(rest, False))
            break
        end = rest.index("}", start)
        name = rest[start + 1 : end]
        if start:
            out.append(Segment(rest[:start], False))
        is_user = name in values if user_fields is None else name in user_fields
        out.append(Segment(str(values[name]), is_user))
        rest = rest[end + 1 :]


def _merge(segments: list[Segment]) -> list[Segment]:
    merged: list[Segment] = []
    for s in segments:
        if not s.text:
            continue
        if merged and merged[-1].user == s.user:
            merged[-1] = Segment(merged[-1].text + s.text, s.user)
        else:
            merged.append(s)
    return merged
