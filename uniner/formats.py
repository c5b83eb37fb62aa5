"""The UniNER formats: teacher prompts, the conversation template and the dataset-specific variant.

The single source of these strings for the teacher, training and inference (docs/design.md section 2).
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass

TEACHER_SYSTEM = "You are a helpful information extraction system."
TEACHER_INSTRUCTIONS = {
    "type": (
        "Given a passage, your task is to extract all entities and identify their entity types. "
        'The output should be in a list of tuples of the following format: [("entity 1", "type of entity 1"), ... ].'
    ),
    "definition": (
        "Given a paragraph, your task is to extract all entities and concepts, and define their type using a "
        "short sentence. The output should be in the following format: "
        '[("entity", "definition of entity type in a short sentence"), ... ]'
    ),
}
PROMPT_VARIANTS = tuple(TEACHER_INSTRUCTIONS)

SYSTEM = "A virtual assistant answers questions from a user based on the provided text."
READ_ACK = "I've read this text."
# The EOS string of the released UniNER checkpoints (LLaMA tokenizer); other students use their own EOS there.
LLAMA_EOS = "</s>"


def teacher_messages(passage: str, *, variant: str = "type") -> list[dict[str, str]]:
    """Chat messages asking the teacher for (entity, type) pairs, exactly as in the paper's data construction."""
    if variant not in TEACHER_INSTRUCTIONS:
        raise ValueError(f"unknown prompt variant {variant!r}; choose one of {', '.join(PROMPT_VARIANTS)}")
    return [
        {"role": "system", "content": TEACHER_SYSTEM},
        {"role": "user", "content": f"{TEACHER_INSTRUCTIONS[variant]}\n\nPassage: {passage}"},
    ]


def question(entity_type: str) -> str:
    """The per-type question of the conversations."""
    return f"What describes {entity_type} in the text?"


def text_turn(text: str, *, dataset: str | None = None) -> str:
    """The first user turn; the dataset-specific (supervised) format puts `Dataset: {name}` on a line before it."""
    return f"Dataset: {dataset}\nText: {text}" if dataset else f"Text: {text}"


@dataclass(frozen=True)
class Template:
    """The official `ie_as_qa` conversation template (FastChat separator style TWO: sep " ", sep2 = EOS).

    `eos` is the student's end-of-sequence string: `</s>` for the released LLaMA checkpoints, the tokenizer's own
    EOS for any other student.
    """

    eos: str = LLAMA_EOS

    def segments(self, turns: list[tuple[str, str]]) -> list[tuple[str, bool]]:
        """Split a conversation into (string, is_assistant_answer) pieces whose concatenation is the full text.

        `turns` alternate ("human", value), ("gpt", value). A prompt piece ends with `ASSISTANT:` with no space;
        the answer piece starts with the space and ends with EOS, so that a prompt tokenized on its own for
        inference is token for token what the model saw before its answers in training.
        """
        pieces: list[tuple[str, bool]] = []
        prompt = SYSTEM + " "
        for index, (role, value) in enumerate(turns):
            expected = "human" if index % 2 == 0 else "gpt"
            if role != expected:
                raise ValueError(f"turn {index} is from {role!r}, expected {expected!r} (turns must alternate)")
            if role == "human":
                prompt += f"USER: {value} ASSISTANT:"
            else:
                pieces.append((prompt, False))
                pieces.append((f" {value}{self.eos}", True))
                prompt = ""
        if prompt:
            pieces.append((prompt, False))
        return pieces

    def render(self, turns: list[tuple[str, str]]) -> str:
        """The full conversation text."""
        return "".join(piece for piece, _ in self.segments(turns))

    def query(self, text: str, entity_type: str, *, dataset: str | None = None) -> str:
        """The inference prompt for one (text, type) query; the model's answer follows it directly."""
        return self.render(
            [("human", text_turn(text, dataset=dataset)), ("gpt", READ_ACK), ("human", question(entity_type))]
        )


# The official UniNER evaluation reads only what follows the last `ASSISTANT:`, and only a bracketed list at the
# very start of it, on one line, up to the first `]`.
OFFICIAL_LIST = re.compile(r"\[(.*?)\]")
_QUOTED = re.compile(r'"((?:[^"\\\n]|\\.)*)"' + r"|'((?:[^'\\\n]|\\.)*)'")
_FENCE = re.compile(r"```[a-zA-Z]*")


def answer_text(output: str) -> str:
    """The model's answer: what follows the last `ASSISTANT:` of a raw output, without surrounding whitespace."""
    return output.split("ASSISTANT:")[-1].strip()


def parse_answer(output: str) -> list:
    """The official parser: the JSON list at the start of the answer, or [] on any failure. Items are as decoded."""
    return official_list(answer_text(output))


def official_list(text: str) -> list:
    """The JSON list that `text` starts with (one line, up to the first `]`), or [] on any failure."""
    match = OFFICIAL_LIST.match(text)
    try:
        items = json.loads(match.group() if match else "[]")
    except (ValueError, RecursionError):
        return []
    return items if isinstance(items, list) else []


def decode_literal(text: str) -> object | None:
    """A list written as JSON or as a Python literal (models and teachers write both), or None."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None


def parse_answer_lenient(output: str) -> list[str]:
    """Our forgiving parser: a list anywhere in the answer, across lines, in code fences, JSON or Python quoting,
    or cut off before its `]`; returns the strings it holds, in order."""
    text = _FENCE.sub("", answer_text(output))
    start = text.find("[")
    if start < 0:
        return []
    # The list may end at its last `]` (a `]` inside an entity) or at its first (text with brackets follows).
    candidates = [text[start : end + 1] for end in {text.rfind("]"), text.find("]", start)} if end > start]
    for body in sorted(candidates, key=len, reverse=True):
        items = decode_literal(body)
        if isinstance(items, (list, tuple)):
            return [item for item in items if isinstance(item, str)]
    end = text.find("]", start)
    body = text[start : end + 1] if end >= 0 else text[start:]
    # A truncated or otherwise broken list: keep each complete quoted string.
    return [double if double or not single else single for double, single in _QUOTED.findall(body)]
