"""The serving core, free of Ray: which posteriors are served, request inputs -> prompts, batched prediction.

A request's inputs are formatted with the artifact's task (:mod:`rayblora.data.formats`), checked against the
posterior (task kind, answer choices, token counts with its tokenizer), and predicted together with the inputs
of other requests: :func:`predict_jobs` flattens the jobs of one dynamic batch into one
``posterior.predict_batch`` call per posterior, whose S parameter samples share one base model
(``AnswerScorer.logits_for_states``). Posteriors with the same base model, adapter shape and task share one
:class:`~rayblora.scoring.AnswerScorer`, so a replica holds one copy of each base model.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from tokenizers import Tokenizer

from rayblora.data.batches import prompt_texts
from rayblora.data.formats import TaskSpec, choice_example, format_classification
from rayblora.manifest import Artifact
from rayblora.predictive import Predictive

Loader = Callable[..., Any]
"""`loader(path, scorer=None) -> Posterior`, e.g. :func:`rayblora.artifact.load_posterior`."""


class UnknownPosterior(KeyError):
    """A request names a posterior this endpoint does not serve (HTTP 404)."""

    def __init__(self, name: str, known: Sequence[str]):
        super().__init__(name)
        self.known = list(known)
        self.message = f"unknown posterior {name!r}; this endpoint serves {self.known}"

    def __reduce__(self):  # rebuilt from its own arguments when it crosses from a replica to the ingress
        return type(self), (self.args[0], self.known)


class InputError(ValueError):
    """Inputs that the posterior cannot answer (HTTP 422); `fields` are (field path, message) pairs."""

    def __init__(self, fields: Sequence[tuple[str, str]]):
        self.fields = [tuple(f) for f in fields]
        super().__init__("; ".join(f"{f}: {m}" for f, m in self.fields))

    def __reduce__(self):
        return type(self), (self.fields,)


@dataclass(frozen=True)
class PosteriorEntry:
    """A served posterior as its manifest describes it (known before it is loaded)."""

    name: str
    path: str
    method: str
    version: str
    created: str
    members: int
    spec: TaskSpec
    base_model: str
    scorer_key: str
    """Equal for artifacts that can share one AnswerScorer (base model, adapter shape, task, max length)."""

    @classmethod
    def from_artifact(cls, name: str, artifact: Artifact) -> "PosteriorEntry":
        """The entry of an opened artifact (:func:`rayblora.manifest.open_artifact`)."""
        manifest = artifact.manifest
        key = {k: manifest[k] for k in ("base_model", "adapter", "task")}
        return cls(name=name, path=str(artifact.root), method=artifact.method, version=artifact.manifest_sha256[:12],
                   created=manifest.get("created", ""), members=len(manifest["members"]),
                   spec=TaskSpec.from_dict(manifest["task"]), base_model=manifest["base_model"]["name"],
                   scorer_key=json.dumps(key, sort_keys=True))


def _token_counter(tokenizer):
    """A private copy of a fast tokenizer's backend without truncation or padding, for counting tokens
    outside the thread that runs forward passes (a shared Rust tokenizer must not be reconfigured
    concurrently)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"serving needs a fast tokenizer, got {type(tokenizer).__name__}")
    counter = Tokenizer.from_str(backend.to_str())
    counter.no_truncation()
    counter.no_padding()
    return counter


class LoadedPosterior:
    """A loaded posterior with what requests need: its entry, task spec and a token counter."""

    def __init__(self, entry: PosteriorEntry, posterior):
        self.entry = entry
        self.posterior = posterior
        self.spec: TaskSpec = posterior.scorer.spec
        self._counter = _token_counter(posterior.scorer.tokenizer)

    def rows(self, inputs: Sequence[Any], max_tokens: int) -> "Job":
        """The formatted rows of validated request inputs (objects with `text`, or `question` + `choices`, formatted
        as the task's training rows are). Raises InputError naming every input this posterior cannot answer."""
        errors, job = [], Job(self, [], [], [] if self.spec.by_likelihood else None)
        for i, item in enumerate(inputs):
            refusal = self._refusal(item)
            if refusal is not None:
                errors.append((f"inputs[{i}]{refusal[0]}", refusal[1]))
                continue
            if self.spec.kind == "classification":
                job.prompts.append(format_classification(item.text, self.spec.prompt_template))
                job.num_choices.append(len(self.spec.choices))
                continue
            example = choice_example(item.question, item.choices, self.spec, f"inputs[{i}]")
            job.prompts.append(example["prompt"])
            job.num_choices.append(example["num_choices"])
            if job.choices is not None:
                job.choices.append(example["choices"])
        if not errors:
            errors = self._over_length(inputs, job, max_tokens)
        if errors:
            raise InputError(errors)
        return job

    def _refusal(self, item: Any) -> tuple[str, str] | None:
        """(field suffix, message) when this posterior cannot answer `item`, else None."""
        name, spec = self.entry.name, self.spec
        is_text = getattr(item, "text", None) is not None
        if spec.kind == "generation":
            return "", f"posterior {name!r} generates free-text answers: POST /v1/generate with prompts"
        if spec.kind == "classification" and not is_text:
            return "", f'posterior {name!r} classifies text: send {{"text": ...}}, not a question'
        if spec.kind != "classification" and is_text:
            return "", (f"posterior {name!r} answers multiple-choice questions: send "
                        '{"question": ..., "choices": [...]}, not text')
        if not is_text and len(item.choices) > len(spec.choices):
            return ".choices", (f"posterior {name!r} answers at most {len(spec.choices)} options, "
                                f"got {len(item.choices)}")
        return None

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text with the posterior's tokenizer (no special tokens, no truncation)."""
        return [len(e.ids) for e in self._counter.encode_batch(list(texts), add_special_tokens=False)]

    def prompt_token_counts(self, prompts: Sequence[str]) -> list[int]:
        """Tokens of each formatted prompt as the model sees it (in the chat template if the task uses one)."""
        return self.token_counts(prompt_texts(self.posterior.scorer.tokenizer, prompts))

    def _over_length(self, inputs: Sequence[Any], job: "Job", max_tokens: int) -> list:
        lengths = self.prompt_token_counts(job.prompts)
        if job.choices is not None:  # scored by option likelihood: every option's tokens join the row
            lengths = [n + sum(self.token_counts(options)) for n, options in zip(lengths, job.choices)]
        return [(f"inputs[{i}]." + ("text" if hasattr(inputs[i], "text") else "question"),
                 f"{n} tokens once formatted with the task prompt; the limit is {max_tokens} "
                 "(serve.max_tokens_per_input)") for i, n in enumerate(lengths) if n > max_tokens]

    def predict(self, prompts: Sequence[str], num_choices: Sequence[int],
                choices: Sequence[Sequence[str]] | None = None) -> Predictive:
        """Predictive (B = len(prompts)) in one batched call; options beyond an input's count are masked (`choices`:
        each row's option continuations, for a task scored by option likelihood)."""
        batch = self.posterior.scorer.encode(list(prompts), choices)
        batch["num_choices"] = torch.as_tensor(list(num_choices), dtype=torch.long)
        return self.posterior.predict_scored(batch)


class PosteriorPool:
    """The posteriors of one replica: entries for all, loaded ones sharing scorers.

    Args:
        entries: posterior name -> its entry, read when serving started (:func:`rayblora.serve.app.check_posteriors`);
            the first is the default.
        loader: `loader(path, scorer=None)` -> Posterior (the verified artifact loader: this replica's one read of
            the artifact, when the posterior is first asked for).
    """

    def __init__(self, entries: Mapping[str, PosteriorEntry], loader: Loader):
        if not entries:
            raise ValueError("serve needs at least one posterior")
        self.entries = dict(entries)
        self.default = next(iter(self.entries))
        self._loader = loader
        self._scorers: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._resident: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    def entry(self, name: str) -> PosteriorEntry:
        """The entry named `name`; UnknownPosterior otherwise."""
        if name not in self.entries:
            raise UnknownPosterior(name, list(self.entries))
        return self.entries[name]

    def load(self, name: str) -> LoadedPosterior:
        """Load and verify `name` through the loader, reusing a live scorer of an equal `scorer_key`."""
        entry = self.entry(name)
        posterior = self._loader(entry.path, scorer=self._scorers.get(entry.scorer_key))
        self._scorers[entry.scorer_key] = posterior.scorer
        loaded = LoadedPosterior(entry, posterior)
        self._resident[name] = loaded
        return loaded

    def describe(self) -> dict[str, Any]:
        """The GET /v1/posteriors body (`loaded` and `samples` as seen by this replica)."""
        rows = []
        for name, e in self.entries.items():
            live = self._resident.get(name)
            rows.append({"name": name, "method": e.method, "version": e.version, "created": e.created,
                         "members": e.members, "samples": live.posterior.num_samples if live else None,
                         "loaded": live is not None, "task": e.spec.kind, "labels": list(e.spec.label_names),
                         "base_model": e.base_model})
        return {"default": self.default, "posteriors": rows}


@dataclass
class Job:
    """The inputs of one request for one loaded posterior: the unit that dynamic batching collects."""

    loaded: LoadedPosterior
    prompts: list[str]
    num_choices: list[int]
    choices: list[list[str]] | None = None
    """Each input's option continuations, for a posterior scoring options by likelihood; else None."""


def count_inputs(jobs: Sequence[Job]) -> int:
    """Size of a dynamic batch in inputs (the `batch_size_fn` of `serve.batch`)."""
    return sum(len(job.prompts) for job in jobs)


def predict_jobs(jobs: Sequence[Job]) -> list[Predictive]:
    """Predictives of several requests' jobs: the inputs of all jobs of one posterior go through one
    ``predict`` call, then are split back per job (same order as `jobs`)."""
    groups: dict[int, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(id(job.loaded), []).append(i)
    out: list[Predictive | None] = [None] * len(jobs)
    for members in groups.values():
        loaded = jobs[members[0]].loaded
        pred = loaded.predict([p for i in members for p in jobs[i].prompts],
                              [n for i in members for n in jobs[i].num_choices],
                              [c for i in members for c in jobs[i].choices] if loaded.spec.by_likelihood else None)
        start = 0
        for i in members:
            stop = start + len(jobs[i].prompts)
            out[i] = pred.rows(start, stop)
            start = stop
    return out  # type: ignore[return-value]


def check_abstain_score(posterior, abstain_score: str) -> None:
    """InputError (422) for an `abstain_score` that needs a feature density the posterior does not carry."""
    if abstain_score != "confidence" and posterior.density is None:
        raise InputError([("abstain_score", f"{abstain_score!r} needs a posterior with a feature density; this one "
                                            "has none (add one with `rayblora fit --density`)")])


def predictions(spec: TaskSpec, pred: Predictive, num_choices: Sequence[int], threshold: float,
                abstain_score: str = "confidence") -> list[dict]:
    """Per-input response rows: label name, probabilities over the input's own options, uncertainty, the feature
    density's scores (None without one), and whether `abstain_score` abstains (see `PREDICT_ABSTAIN_SCORES`)."""
    rows = []
    for i, n in enumerate(num_choices):
        probs = pred.probs[i, :n]
        index = int(probs.argmax())
        confidence = float(probs[index])
        scored = pred.distance is not None
        outside = scored and not bool(pred.in_distribution[i])
        unsure = confidence < threshold
        abstained = {"confidence": unsure, "density": outside, "either": unsure or outside}[abstain_score]
        rows.append({"label": spec.label_names[index], "label_index": index, "probs": probs.tolist(),
                     "confidence": confidence, "entropy": float(pred.entropy[i]),
                     "aleatoric": float(pred.aleatoric[i]),
                     "mutual_information": float(pred.mutual_information[i]),
                     "distance": float(pred.distance[i]) if scored else None,
                     "log_density": float(pred.log_density[i]) if scored else None,
                     "in_distribution": not outside if scored else None,
                     "abstained": abstained})
    return rows
