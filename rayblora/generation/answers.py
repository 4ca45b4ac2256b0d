"""Answer normalisation, exact match and grouping of sampled answers.

Answers are compared after :func:`normalise_answer` (case, surrounding whitespace and punctuation, inner runs
of whitespace, a trailing period): two answers are in one group exactly when they are an exact match of each
other, the grouping Kuhn et al.'s semantic entropy (arXiv 2302.09664, sec. 3) makes with an entailment model,
here with the task's own correctness criterion.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Sequence

_SPACES = re.compile(r"\s+")
_EDGE_PUNCTUATION = string.punctuation.replace("-", "").replace("+", "")


def normalise_answer(text: str) -> str:
    """Lower-cased, whitespace collapsed, leading / trailing punctuation (but not a sign) removed."""
    return _SPACES.sub(" ", text.strip().lower()).strip(_EDGE_PUNCTUATION + " ")


def exact_match(answer: str, targets: str | Sequence[str]) -> bool:
    """Whether `answer` equals the target (or one of the targets) after normalisation."""
    wanted = [targets] if isinstance(targets, str) else list(targets)
    return normalise_answer(answer) in {normalise_answer(t) for t in wanted}


def group_scores(answers: Sequence[str]) -> tuple[str, dict[str, float]]:
    """The modal answer of S sampled answers (the first one of the largest group) and
    {"modal_share": its group's share, "group_entropy": −Σ_g q_g log q_g over the groups' shares q_g (nats),
    "num_groups": the number of distinct normalised answers}."""
    if not answers:
        raise ValueError("group_scores needs at least one answer")
    keys = [normalise_answer(a) for a in answers]
    counts = Counter(keys)
    top = max(counts.values())
    modal = next(a for a, k in zip(answers, keys) if counts[k] == top)
    shares = [c / len(keys) for c in counts.values()]
    entropy = -sum(q * math.log(q) for q in shares)
    return modal, {"modal_share": top / len(keys), "group_entropy": max(0.0, entropy),
                   "num_groups": float(len(counts))}
