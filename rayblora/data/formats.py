"""Task formats: turn raw rows into (prompt, label, num_choices) examples scored over C answers.

Following Laplace-LoRA (arXiv 2308.13111, sec. 4), a classification task is posed as a prompt whose answer is one
of C choice strings; the model's next-token logits restricted to each choice's first token give a C-way softmax.
A multiple-choice row is scored either the same way on its option *letters* (`letter`), or, as
lm-evaluation-harness scores small and mid-size models, by the log-likelihood of each option's text as a
continuation of the question (`likelihood`: summed over the option's tokens; `likelihood_per_token`: their mean,
the length-normalised variant), the row's options ragged (2..C) and the missing ones masked.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any, Sequence

from rayblora.config import CHOICE_SCORINGS, MAX_OPTIONS

LETTERS = string.ascii_uppercase[:MAX_OPTIONS]


class DataError(ValueError):
    """A data file or row is malformed; the message names the file, row and column."""


@dataclass(frozen=True)
class TaskSpec:
    """What the model answers: `choices[i]` is the answer string for label i.

    kind: "classification" (text + label), "multiple_choice" (question + choices + label) or "generation"
    (prompt + target: a free-text answer, trained by its tokens' likelihood and scored by exact match; no answer
    choices). scoring: for multiple choice, one of :data:`CHOICE_SCORINGS` ("letter" for the other kinds, and
    for artifacts written before option-likelihood scoring existed).
    """

    kind: str
    choices: tuple[str, ...]
    label_names: tuple[str, ...]
    prompt_template: str
    scoring: str = "letter"
    chat_template: bool = False
    """Whether prompts are wrapped in the tokenizer's chat template before tokenising (`data.chat_template`)."""

    @property
    def by_likelihood(self) -> bool:
        """Whether rows are scored by their options' log-likelihood (rows carry `choices`, batches `segments`)."""
        return self.kind == "multiple_choice" and self.scoring != "letter"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "choices": list(self.choices), "label_names": list(self.label_names),
                "prompt_template": self.prompt_template, "scoring": self.scoring, "chat_template": self.chat_template}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TaskSpec":
        return cls(d["kind"], tuple(d["choices"]), tuple(d["label_names"]), d["prompt_template"],
                   d.get("scoring", "letter"), d.get("chat_template", False))


def classification_spec(label_names: Sequence[str], prompt_template: str) -> TaskSpec:
    """Spec for a text-classification task answered by " <label name>"."""
    return TaskSpec("classification", tuple(" " + n for n in label_names), tuple(label_names), prompt_template)


def multiple_choice_spec(max_choices: int, scoring: str = CHOICE_SCORINGS[0]) -> TaskSpec:
    """Spec for multiple choice with up to `max_choices` options (labels "A", "B", ...), scored as `scoring` says:
    by the letters " A", " B", ... after a lettered list, or by each option's likelihood after the question."""
    if not 2 <= max_choices <= MAX_OPTIONS:
        raise DataError(f"multiple choice needs 2..{MAX_OPTIONS} choices, got {max_choices}")
    if scoring not in CHOICE_SCORINGS:
        raise DataError(f"data.choice_scoring: {scoring!r} is not one of {list(CHOICE_SCORINGS)}")
    letters = tuple(LETTERS[:max_choices])
    return TaskSpec("multiple_choice", tuple(" " + c for c in letters), letters, "Question: {question}", scoring)


def generation_spec() -> TaskSpec:
    """Spec for a generative task: each row's `prompt` is used as written, its `target` is the answer trained
    on; an optional `targets` column lists every answer graded correct (default: the target alone)."""
    return TaskSpec("generation", (), (), "{prompt}")


def format_classification(text: str, template: str) -> str:
    """Prompt for one classification example."""
    return template.replace("{text}", text.strip())


def format_multiple_choice(question: str, choices: Sequence[str]) -> str:
    """Prompt with lettered options, ending in "Answer:" so the next token is the letter."""
    lines = [f"Question: {question.strip()}"]
    lines += [f"{LETTERS[i]}. {str(c).strip()}" for i, c in enumerate(choices)]
    lines.append("Answer:")
    return "\n".join(lines)


def format_choice_question(question: str) -> str:
    """Prompt of a row scored by option likelihood: the question, then "Answer:", which each option continues."""
    return f"Question: {question.strip()}\nAnswer:"


def option_continuations(choices: Sequence[str]) -> list[str]:
    """The texts scored as continuations of :func:`format_choice_question`: " " + each option, stripped."""
    return [" " + str(c).strip() for c in choices]


def choice_example(question: Any, choices: Any, spec: TaskSpec, where: str) -> dict[str, Any]:
    """A validated multiple-choice example `{"prompt", "num_choices"}` (+ `choices` when scored by likelihood):
    raises DataError naming `where` and the field for an empty question, fewer than 2 or more than the spec's
    options, or an empty option."""
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}, column 'question': expected a non-empty string, got {question!r}")
    if not isinstance(choices, (list, tuple)) or not 2 <= len(choices) <= len(spec.choices):
        raise DataError(f"{where}, column 'choices': expected a list of 2..{len(spec.choices)} "
                        f"options, got {choices!r}")
    empty = [i for i, c in enumerate(choices) if not isinstance(c, str) or not c.strip()]
    if empty:
        raise DataError(f"{where}, column 'choices': option {empty[0]} is not a non-empty string "
                        f"({choices[empty[0]]!r})")
    if not spec.by_likelihood:
        return {"prompt": format_multiple_choice(question, choices), "num_choices": len(choices)}
    return {"prompt": format_choice_question(question), "choices": option_continuations(choices),
            "num_choices": len(choices)}


def _row_label(row: dict[str, Any], label_names: Sequence[str], n: int, where: str) -> int:
    label = row.get("label")
    if isinstance(label, str) and label in label_names:
        return list(label_names).index(label)
    try:
        value = int(label)
    except (TypeError, ValueError):
        raise DataError(f"{where}, column 'label': expected an integer in [0, {n}) "
                        f"or one of {list(label_names)}, got {label!r}") from None
    if isinstance(label, float) and not float(label).is_integer() or not 0 <= value < n:
        raise DataError(f"{where}, column 'label': {label!r} is out of range [0, {n})")
    return value


def _generation_example(row: dict[str, Any], where: str) -> dict[str, Any]:
    for column in ("prompt", "target"):
        value = row.get(column)
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}, column {column!r}: expected a non-empty string, got {value!r}")
    targets = row.get("targets")
    if targets is None:
        targets = [row["target"]]
    elif not isinstance(targets, (list, tuple)) or not targets or any(
            not isinstance(t, str) or not t.strip() for t in targets):
        raise DataError(f"{where}, column 'targets': expected a non-empty list of non-empty strings (every "
                        f"accepted answer), got {targets!r}")
    return {"prompt": row["prompt"], "target": row["target"], "targets": list(targets), "label": 0,
            "num_choices": 0}


def rows_to_examples(rows: Sequence[dict[str, Any]], spec: TaskSpec, source: str) -> list[dict[str, Any]]:
    """Validate raw rows and format them as examples `{"prompt", "label", "num_choices"}`.

    Raises DataError naming `source`, the 0-based row and the column on the first bad row.
    """
    out = []
    for i, row in enumerate(rows):
        where = f"{source}: row {i}"
        if spec.kind == "generation":
            out.append(_generation_example(row, where))
        elif spec.kind == "classification":
            text = row.get("text")
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{where}, column 'text': expected a non-empty string, got {text!r}")
            label = _row_label(row, spec.label_names, len(spec.choices), where)
            out.append({"prompt": format_classification(text, spec.prompt_template), "label": label,
                        "num_choices": len(spec.choices)})
        else:
            example = choice_example(row.get("question"), row.get("choices"), spec, where)
            example["label"] = _row_label(row, LETTERS[: example["num_choices"]], example["num_choices"], where)
            out.append(example)
    return out
