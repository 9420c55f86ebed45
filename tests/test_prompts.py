"""Prompt rendering and action parsing (pure functions, hand-made cases + round trips)."""

from __future__ import annotations

import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from _llm_helpers import AWKWARD_TITLES
from ulrec.config import load_config
from ulrec.errors import InputError
from ulrec.prompts import (
    DEFAULT_TEMPLATE,
    PromptBuilder,
    StepView,
    completion_text,
    format_action,
    observation_text,
    parse_action,
)


def test_action_and_completion_format():
    assert format_action("Heat (1995)") == "recommend[ Heat (1995) ]"
    assert completion_text("Heat (1995)") == " recommend[ Heat (1995) ]"


@pytest.mark.parametrize("title", AWKWARD_TITLES)
def test_round_trip_awkward_titles(title):
    expected = title.strip()
    assert parse_action(format_action(title)) == expected
    assert parse_action(completion_text(title)) == expected
    # As the policy would continue after the action.
    assert parse_action(completion_text(title) + "\nObservation 3: The user stayed") == expected
    assert parse_action(completion_text(title) + " Observation 3: x ] y") == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("recommend[Heat]", "Heat"),
        ("  recommend [   Heat (1995)   ]  ", "Heat (1995)"),
        ("Recommend[ Heat ]", "Heat"),
        ("Action 4: recommend[ Heat ]", "Heat"),
        ("recommend[ A ] recommend[ B ]", "A"),  # the first action only
        ("recommend[ [REC] ]]", "[REC] ]"),  # the last ] on the line closes the action
        ("recommend[ Se7en ] ]\nrecommend[ X ]", "Se7en ]"),
        ("recommend[ Heat ]\n]", "Heat"),  # a ] on a later line does not count
        ("recommend[ Heat", None),  # unclosed
        ("recommend[ Heat\n]", None),  # closed only on the next line
        ("recommend[   ]", None),  # empty title
        ("Heat (1995)", None),
        ("", None),
        ("recommend( Heat )", None),
    ],
)
def test_parse_action_cases(text, expected):
    assert parse_action(text) == expected


_title_chars = st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp"), blacklist_characters="\r\n\x85")


@settings(max_examples=150, deadline=None)
@given(st.text(_title_chars, min_size=1, max_size=40))
def test_round_trip_any_single_line_title(title):
    stripped = title.strip()
    assume(stripped)
    # The documented exceptions: text that itself starts a new action or an observation.
    assume(not re.search(r"recommend\s*\[|\bObservation\s*\d*\s*:", title, re.IGNORECASE))
    assert parse_action(completion_text(title)) == stripped


def test_observation_texts():
    assert observation_text(stayed=True, reward=4.0) == "The user stayed, reward=4.00"
    assert observation_text(stayed=False, reward=1.234) == "The user left, reward=1.23"
    sub = observation_text(
        stayed=True, reward=3.5, proposed_title="Heat", recommended_title="Heat (1995)", substituted=True
    )
    assert "'Heat (1995)' instead (closest catalogue item)" in sub and sub.startswith("'Heat' is not in")
    assert sub.endswith("The user stayed, reward=3.50")
    err = observation_text(stayed=False, reward=None, format_error=True)
    assert "nothing was recommended" in err and err.endswith("The user left")
    with pytest.raises(InputError):
        observation_text(stayed=True, reward=1.0, substituted=True)


def test_build_prompt_layout():
    builder = PromptBuilder(history_length=3)
    steps = [
        StepView("Heat (1995)", observation_text(stayed=True, reward=4.0)),
        StepView("Heet", observation_text(stayed=True, reward=3.0, proposed_title="Heet",
                                          recommended_title="Heat 2 (2001)", substituted=True)),
        StepView(None, observation_text(stayed=True, reward=None, format_error=True), raw_output="blah\nmore"),
    ]
    history = ["A (1990)", "B, the [Sequel]", "C\nwith newline", "D 'quoted'"]
    prompt = builder.build(history, steps)
    assert prompt.endswith("\nAction 4:")
    lines = prompt.split("\n")
    # Only the last 3 history titles, one per line, newlines inside titles flattened.
    assert "- A (1990)" not in lines
    assert lines.index("- B, the [Sequel]") + 1 == lines.index("- C with newline")
    assert "Action 1: recommend[ Heat (1995) ]" in lines
    assert "Action 2: recommend[ Heet ]" in lines
    assert any(l.startswith("Observation 2: 'Heet' is not in the catalogue; recommended 'Heat 2 (2001)'") for l in lines)
    assert "Action 3: blah more" in lines
    # The action lines the policy sees parse back to what it wrote.
    assert parse_action(lines[lines.index("Action 2: recommend[ Heet ]")]) == "Heet"


def test_build_without_steps_and_history():
    prompt = PromptBuilder().build([], [])
    assert prompt.endswith("- (none)\nAction 1:")
    assert PromptBuilder().build(["X"], []).startswith(DEFAULT_TEMPLATE.split("{history}")[0])


def test_training_prompt_plus_completion_is_a_transcript_line():
    prompt = PromptBuilder().build(["X"], [])
    assert (prompt + completion_text("Heat")).endswith("Action 1: recommend[ Heat ]")


def test_template_file_override(tmp_path):
    path = tmp_path / "template.txt"
    path.write_text("Suggest one film. {{literal braces}} {history_count} seen:\n{history}\n")
    builder = PromptBuilder.from_file(path, history_length=2)
    prompt = builder.build(["A", "B", "C"], [StepView("B", "ok")])
    assert prompt == "Suggest one film. {literal braces} 2 seen:\n- B\n- C\nAction 1: recommend[ B ]\nObservation 1: ok\nAction 2:"


def test_template_from_config(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("H:\n{history}")
    cfg = load_config(None, [f"policy.template_file={path}", "policy.history_length=1"])
    assert PromptBuilder.from_config(cfg.policy).build(["a", "b"], []) == "H:\n- b\nAction 1:"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("no history field here", "missing the {history} field"),
        ("{history} {user_name}", "unknown field {user_name}"),
        ("{history} {", "prompt template"),
        ("{history} }", "prompt template"),
    ],
)
def test_bad_template_names_the_file(tmp_path, text, message):
    path = tmp_path / "bad_template.txt"
    path.write_text(text)
    with pytest.raises(InputError) as err:
        PromptBuilder.from_file(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_missing_template_file(tmp_path):
    with pytest.raises(InputError, match="nope.txt"):
        PromptBuilder.from_file(tmp_path / "nope.txt")
