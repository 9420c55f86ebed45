"""The action-only transcript the policy completes, and the parser for its answers.

One :class:`PromptBuilder` renders every prompt in the project (rollouts, serving, training rows,
the base model's warm start), so what the policy is trained on is exactly what it sees.

A prompt is a *header* (instruction, one worked example, the user's last ``history_length`` titles)
followed by the earlier steps of this episode and an open action::

    <header with the user's history>
    Action 1: recommend[ Heat (1995) ]
    Observation 1: The user stayed, reward=4.00
    Action 2:

The policy completes ``" recommend[ <title> ]"`` (see :func:`completion_text`); trainers append EOS.

Template files
--------------
``PromptBuilder.from_file(path)`` reads a user header template: plain text in :meth:`str.format`
syntax with these fields (literal braces are written ``{{`` and ``}}``):

``{history}``        required; the history titles, one per line, each as ``- <title>``
``{history_count}``  optional; how many titles are shown

The builder appends the steps and the open ``Action k:`` line itself, so every template yields
prompts that end the same way.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path

from ulrec.errors import InputError

ACTION_NAME = "recommend"

# Our own wording (paper A.5 shows the authors' version). The example teaches the format only.
DEFAULT_TEMPLATE = """\
You recommend items to one user, one item per turn. Write each turn as recommend[ title ] with \
the exact title of one catalogue item. After every turn an observation says whether the user \
stayed and how much they liked the item (the reward). The user leaves after an item they dislike, \
an item recommended before, or an item too similar to the last few, so aim to keep them for as \
many turns as possible.

Example:
The user's history:
- Toy Story (1995)
- Heat (1995)
- Fargo (1996)
Action 1: recommend[ Casablanca (1942) ]
Observation 1: The user stayed, reward=4.00
Action 2: recommend[ Vertigo (1958) ]
Observation 2: The user left, reward=1.00
(end of example)

The user's history:
{history}
"""

_TEMPLATE_FIELDS = {"history", "history_count"}

# The longest raw output echoed back into a prompt after a format error.
MAX_ECHOED_OUTPUT_CHARS = 200


def format_action(title: str) -> str:
    """The action text for ``title``: ``recommend[ <title> ]``."""
    return f"{ACTION_NAME}[ {title} ]"


def completion_text(title: str) -> str:
    """The training completion for ``title`` (leading space, no EOS: trainers add EOS)."""
    return " " + format_action(title)


_ACTION_START = re.compile(rf"{ACTION_NAME}\s*\[", re.IGNORECASE)
# Where an action's text ends: a newline, the next "Observation k:" or the next action.
_ACTION_END = re.compile(rf"[\r\n]|\bObservation\s*\d*\s*:|{ACTION_NAME}\s*\[", re.IGNORECASE)


def parse_action(text: str) -> str | None:
    """The title of the first ``recommend[ ... ]`` action in ``text``, or None.

    Rule: find the first ``recommend[`` (case-insensitive, any whitespace before ``[``). Its
    action runs to the first newline, ``Observation k:`` or next ``recommend[`` after it, or to
    the end of the text. The title is everything between that ``[`` and the LAST ``]`` inside the
    action, stripped of surrounding whitespace, so titles may themselves contain brackets, quotes,
    commas and any unicode. No closing ``]`` or an empty title gives None.
    """
    if not text:
        return None
    start = _ACTION_START.search(text)
    if start is None:
        return None
    body_start = start.end()
    end = _ACTION_END.search(text, body_start)
    body = text[body_start : end.start() if end else len(text)]
    close = body.rfind("]")
    if close < 0:
        return None
    title = body[:close].strip()
    return title or None


def single_line(text: str) -> str:
    """``text`` on one line (newlines and runs of whitespace become one space)."""
    return " ".join(text.split())


def _reward(reward: float) -> str:
    return f"reward={reward:.2f}"


def observation_text(
    *,
    stayed: bool,
    reward: float | None,
    proposed_title: str | None = None,
    recommended_title: str | None = None,
    substituted: bool = False,
    format_error: bool = False,
) -> str:
    """The observation shown after one action.

    stayed:            whether the user stayed after this step (False = left).
    reward:            the user's reward for the recommended item (None when nothing was
                       recommended, i.e. after a format error).
    proposed_title:    the title the policy wrote (used in the substitution note).
    recommended_title: the catalogue title actually recommended; with ``substituted`` the note
                       says so, because the policy must learn what the user really received.
    format_error:      the output could not be read as an action; nothing was recommended.
    """
    parts: list[str] = []
    if format_error:
        parts.append("Could not read that action (write recommend[ title ]); nothing was recommended.")
    elif substituted:
        if recommended_title is None:
            raise InputError("observation_text: substituted=True needs recommended_title")
        shown = f"'{single_line(proposed_title)}' is not in the catalogue; " if proposed_title else ""
        parts.append(f"{shown}recommended '{single_line(recommended_title)}' instead (closest catalogue item).")
    verdict = "The user stayed" if stayed else "The user left"
    parts.append(f"{verdict}, {_reward(reward)}" if reward is not None else verdict)
    return " ".join(parts)


@dataclass(frozen=True)
class StepView:
    """One earlier step as the policy sees it.

    title:       the title the policy wrote (its parsed action), shown back in ``Action k:``;
                 None after a format error, when ``raw_output`` (first line, trimmed) is shown.
    observation: the text after ``Observation k:`` (see :func:`observation_text`).
    raw_output:  the policy's raw completion, used only when ``title`` is None.
    """

    title: str | None
    observation: str
    raw_output: str = ""

    def action_line_text(self) -> str:
        if self.title is not None:
            return format_action(single_line(self.title))
        echoed = single_line(self.raw_output)[:MAX_ECHOED_OUTPUT_CHARS]
        return echoed or "(no output)"


def _check_template(template: str, source: str) -> None:
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise InputError(f"prompt template {source}: {exc} (write literal braces as {{{{ and }}}})") from None
    unknown = sorted(f for f in fields if f not in _TEMPLATE_FIELDS)
    if unknown:
        raise InputError(
            f"prompt template {source}: unknown field {{{unknown[0]}}} (allowed: {{history}}, {{history_count}})"
        )
    if "history" not in fields:
        raise InputError(f"prompt template {source}: missing the {{history}} field")


class PromptBuilder:
    """Renders prompts: header (with the last ``history_length`` titles) + steps + ``Action k:``."""

    def __init__(self, template: str | None = None, history_length: int = 15, *, source: str = "<string>") -> None:
        if history_length < 1:
            raise InputError(f"history_length must be >= 1 (got {history_length})")
        self.template = DEFAULT_TEMPLATE if template is None else template
        _check_template(self.template, source)
        self.history_length = history_length

    @classmethod
    def from_file(cls, path: str | Path, history_length: int = 15) -> "PromptBuilder":
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"prompt template {p}: cannot read ({exc.__class__.__name__})") from None
        return cls(text, history_length, source=str(p))

    @classmethod
    def from_config(cls, policy_cfg) -> "PromptBuilder":
        """From ``cfg.policy`` (its ``template_file`` and ``history_length``)."""
        if policy_cfg.template_file:
            return cls.from_file(policy_cfg.template_file, policy_cfg.history_length)
        return cls(None, policy_cfg.history_length)

    def header(self, history_titles: list[str]) -> str:
        shown = [single_line(t) for t in history_titles[-self.history_length :]]
        history = "\n".join(f"- {t}" for t in shown) if shown else "- (none)"
        text = self.template.format(history=history, history_count=len(shown))
        return text.rstrip("\n") + "\n"

    def build(self, history_titles: list[str], steps: list[StepView]) -> str:
        """The prompt for the next action: ends with ``Action k:`` (no trailing space)."""
        lines = [self.header(history_titles)]
        for k, step in enumerate(steps, start=1):
            lines.append(f"Action {k}: {step.action_line_text()}\n")
            lines.append(f"Observation {k}: {single_line(step.observation)}\n")
        lines.append(f"Action {len(steps) + 1}:")
        return "".join(lines)


class ChatRenderer:
    """The text a model reads for a transcript: the transcript itself, or — when the model's
    tokenizer has a chat template (``policy.chat_template``: auto | on | off) — the transcript up
    to its open ``Action k:`` line as one user turn, then the assistant turn opened with that
    ``Action k:`` line. The completion is the same either way (`` recommend[ title ]`` + EOS), so
    rows, title masks and parsing do not change; instruct models answer in their own turn format.

    The one renderer of the project: policy backends (rollouts, evaluation, serving) render before
    they tokenize, and the trainers render the rows' prompts, so training sees what inference sees.
    """

    def __init__(self, tokenizer, mode: str = "auto", *, source: str = "the model") -> None:
        if mode not in ("auto", "on", "off"):
            raise InputError(f"policy.chat_template must be auto, on or off (got {mode!r})")
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if mode == "on" and not has_template:
            raise InputError(f"policy.chat_template=on but the tokenizer of {source} has no chat template")
        self.tokenizer = tokenizer
        self.enabled = has_template if mode == "auto" else mode == "on"
        # Templates that write BOS as text (Llama-3) would get a second one from tokenizers that
        # add it on encode: drop the textual one then.
        bos = getattr(tokenizer, "bos_token", None)
        self._strip_bos = None
        if self.enabled and bos:
            ids = tokenizer("a")["input_ids"]
            if ids and ids[0] == tokenizer.bos_token_id:
                self._strip_bos = bos

    def render(self, transcript: str) -> str:
        if not self.enabled:
            return transcript
        head, _, open_action = transcript.rpartition("\n")
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": head}], tokenize=False, add_generation_prompt=True
        )
        if self._strip_bos and text.startswith(self._strip_bos):
            text = text[len(self._strip_bos) :]
        return text + open_action

    def render_all(self, transcripts: list[str]) -> list[str]:
        return [self.render(t) for t in transcripts] if self.enabled else list(transcripts)


# ReAct collection (paper §4.1.2, Table 8), in our own words. The collector thinks in one line before
# each action; the transcript it builds on is the action-only one, so the rows (built from the
# action-only transcript) never contain a thought.
REACT_NOTE = (
    "Before each action, think first, in one line that starts with 'Thought k:' (k is the turn): "
    "which items the user liked, what was already recommended, and what to try next. Then write "
    "the action line."
)


def _open_action(transcript: str) -> tuple[str, int]:
    head, _, open_action = transcript.rpartition("\n")
    match = re.fullmatch(r"Action (\d+):", open_action)
    if match is None:
        raise InputError(f"transcript must end with an open 'Action k:' line (got {open_action[-40:]!r})")
    return head, int(match.group(1))


def react_thought_prompt(transcript: str) -> str:
    """The collector's prompt for its thought at the open step: the note, the transcript without
    its open action, and ``Thought k:``."""
    head, k = _open_action(transcript)
    return f"{REACT_NOTE}\n\n{head}\nThought {k}:"


def react_action_prompt(transcript: str, thought: str) -> str:
    """The prompt for the action after ``thought`` (one line): thought prompt + thought + ``Action k:``."""
    _, k = _open_action(transcript)
    return f"{react_thought_prompt(transcript)} {single_line(thought)}\nAction {k}:"
