"""The exact UniNER strings (docs/design.md section 2)."""

import pytest

from uniner.formats import LLAMA_EOS, Template, question, teacher_messages, text_turn


def test_teacher_prompt_type_variant_is_exact():
    messages = teacher_messages("Paris is in France.")
    assert messages == [
        {"role": "system", "content": "You are a helpful information extraction system."},
        {
            "role": "user",
            "content": "Given a passage, your task is to extract all entities and identify their entity types. "
            "The output should be in a list of tuples of the following format: "
            '[("entity 1", "type of entity 1"), ... ].'
            "\n\nPassage: Paris is in France.",
        },
    ]


def test_teacher_prompt_definition_variant_is_exact():
    user = teacher_messages("X", variant="definition")[1]["content"]
    assert user == (
        "Given a paragraph, your task is to extract all entities and concepts, and define their type using a short "
        'sentence. The output should be in the following format: [("entity", "definition of entity type in a short '
        'sentence"), ... ]\n\nPassage: X'
    )


def test_unknown_teacher_variant_is_refused():
    with pytest.raises(ValueError, match="unknown prompt variant"):
        teacher_messages("X", variant="json")


def test_query_template_matches_the_official_string():
    prompt = Template().query("Barack Obama visited Berlin.", "person")
    assert prompt == (
        "A virtual assistant answers questions from a user based on the provided text. "
        "USER: Text: Barack Obama visited Berlin. ASSISTANT: I've read this text.</s>"
        "USER: What describes person in the text? ASSISTANT:"
    )
    assert not prompt.endswith(" ")


def test_full_conversation_ends_each_answer_with_eos():
    turns = [
        ("human", text_turn("T")),
        ("gpt", "I've read this text."),
        ("human", question("a")),
        ("gpt", '["x"]'),
        ("human", question("b")),
        ("gpt", "[]"),
    ]
    assert Template().render(turns) == (
        "A virtual assistant answers questions from a user based on the provided text. USER: Text: T ASSISTANT: "
        'I\'ve read this text.</s>USER: What describes a in the text? ASSISTANT: ["x"]</s>'
        "USER: What describes b in the text? ASSISTANT: []</s>"
    )


def test_answer_segments_start_with_the_space_so_prompts_match_inference():
    template = Template(eos="<|im_end|>")
    turns = [("human", text_turn("T")), ("gpt", "I've read this text."), ("human", question("a")), ("gpt", "[]")]
    segments = template.segments(turns)
    assert [is_answer for _, is_answer in segments] == [False, True, False, True]
    # The prompt before the last answer, rendered as pieces, equals the inference prompt exactly.
    assert "".join(piece for piece, _ in segments[:3]) == template.query("T", "a")
    assert segments[3][0] == " []<|im_end|>"


def test_student_eos_replaces_llama_eos():
    assert "<|im_end|>USER:" in Template(eos="<|im_end|>").query("T", "a")
    assert LLAMA_EOS not in Template(eos="<|im_end|>").query("T", "a")


def test_dataset_specific_variant_puts_the_name_on_its_own_line():
    assert text_turn("Some text", dataset="conll2003") == "Dataset: conll2003\nText: Some text"
    assert (
        Template()
        .query("S", "person", dataset="mit-movie")
        .startswith(
            "A virtual assistant answers questions from a user based on the provided text. "
            "USER: Dataset: mit-movie\nText: S ASSISTANT:"
        )
    )


def test_turns_must_alternate():
    with pytest.raises(ValueError, match="alternate"):
        Template().render([("human", "a"), ("human", "b")])


@pytest.mark.parametrize(
    ("output", "official", "lenient"),
    [
        ('["Paris", "Rome"]', ["Paris", "Rome"], ["Paris", "Rome"]),
        ('A virtual assistant ... USER: What describes city? ASSISTANT: ["Paris"]\n', ["Paris"], ["Paris"]),
        ('  ["Paris"] and more [text]', ["Paris"], ["Paris"]),
        ('Sure: ["Paris"]', [], ["Paris"]),  # the official parser only looks at the start
        ('["Paris",\n "Rome"]', [], ["Paris", "Rome"]),  # one line only
        ('```json\n["Paris"]\n```', [], ["Paris"]),
        ("['Paris', \"Rome's\"]", [], ["Paris", "Rome's"]),
        ('["Paris", "Ro', [], ["Paris"]),  # truncated: the complete strings survive
        ('["a]b", "c"]', [], ["a]b", "c"]),
        ("[1, 2]", [1, 2], []),
        ("no list here", [], []),
        ("[]", [], []),
    ],
)
def test_answer_parsers(output, official, lenient):
    from uniner.formats import parse_answer, parse_answer_lenient

    assert parse_answer(output) == official
    assert parse_answer_lenient(output) == lenient
