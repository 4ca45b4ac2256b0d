"""HTTP schemas of the prediction endpoint (pydantic v2; they also make the OpenAPI document).

Request models carry the limits of a :class:`~rayblora.config.ServeConfig` (inputs per request, characters per
text, options per question), so they are built per configuration by :func:`request_model`. Every model forbids
unknown fields. Limits that need the posterior (its task kind, its number of answer choices, token counts with
its tokenizer) are checked after the posterior is loaded (:mod:`rayblora.serve.engine`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (AfterValidator, BaseModel, ConfigDict, Discriminator, Field, StrictFloat, StrictStr, Tag,
                      create_model)

from rayblora.config import ServeConfig

FORBID = ConfigDict(extra="forbid")
CHARS_PER_TOKEN_BOUND = 16
"""A text with more than this many characters per allowed token is refused before it is tokenised."""
TEXT_TAG, CHOICE_TAG = "TextInput", "ChoiceInput"
"""Names of the two input shapes (pydantic puts them in error locations; :func:`field_name` drops them)."""
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
"""Posterior names: letters, digits, '.', '_', '-'; at most 64 characters."""


def _has_content(text: str) -> str:
    if not text.strip():
        raise ValueError("must contain a non-whitespace character")
    return text


def _input_kind(value: Any) -> str | None:
    """Which input shape a raw JSON object (or a model) is: by its keys, so errors name the right fields."""
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if not isinstance(value, dict):
        return None
    if "text" in value:
        return TEXT_TAG
    if "question" in value or "choices" in value:
        return CHOICE_TAG
    return None


def request_model(cfg: ServeConfig) -> type[BaseModel]:
    """The POST /v1/predict body model with `cfg`'s limits."""
    text = Annotated[StrictStr, Field(min_length=1, max_length=cfg.max_tokens_per_input * CHARS_PER_TOKEN_BOUND),
                     AfterValidator(_has_content)]
    text_input = create_model(TEXT_TAG, __config__=FORBID, text=(text, Field(description="text to classify")))
    choice_input = create_model(
        CHOICE_TAG, __config__=FORBID, question=(text, Field(description="the question")),
        choices=(Annotated[list[text], Field(min_length=2, max_length=cfg.max_choices)],
                 Field(description="answer options, answered by their letters A, B, ...")))
    one_input = Annotated[Union[Annotated[text_input, Tag(TEXT_TAG)], Annotated[choice_input, Tag(CHOICE_TAG)]],
                          Discriminator(_input_kind, custom_error_type="input_shape",
                                        custom_error_message='each input must be {"text": ...} or '
                                                             '{"question": ..., "choices": [...]}')]
    return create_model(
        "PredictRequest", __config__=FORBID,
        posterior=(Optional[Annotated[StrictStr, Field(pattern=NAME_PATTERN)]],
                   Field(None, description="posterior name (default: the first one served)")),
        inputs=(Annotated[list[one_input], Field(min_length=1, max_length=cfg.max_inputs_per_request)],
                Field(description="texts to classify or multiple-choice questions")),
        abstain_threshold=(Optional[Annotated[StrictFloat, Field(ge=0.0, le=1.0, allow_inf_nan=False)]],
                           Field(None, description="abstain when confidence is below this "
                                                   f"(default {cfg.abstain_threshold})")))


def field_name(loc: tuple[Any, ...] | list[Any]) -> str:
    """Readable field path of a pydantic error location: ("body", "inputs", 0, "TextInput", "text") ->
    "inputs[0].text"."""
    parts = [p for p in loc if p not in (TEXT_TAG, CHOICE_TAG)]
    if parts and parts[0] == "body":
        parts = parts[1:]
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


class InputPrediction(BaseModel):
    """The posterior predictive on one input (entropies in nats)."""

    model_config = FORBID
    label: str = Field(description="predicted label name (a letter for multiple choice)")
    label_index: int = Field(description="index of the predicted label")
    probs: list[float] = Field(description="Bayesian model average of the class probabilities")
    confidence: float = Field(description="largest averaged probability")
    entropy: float = Field(description="total predictive entropy = aleatoric + mutual_information")
    aleatoric: float = Field(description="expected entropy of the samples")
    mutual_information: float = Field(description="epistemic part: total minus expected entropy")
    abstained: bool = Field(description="confidence is below the abstain threshold")


class PredictResponse(BaseModel):
    """Predictions of one posterior for every input of a request, in order."""

    model_config = FORBID
    posterior: str
    method: str
    version: str = Field(description="short hash of the artifact manifest (changes with any artifact file)")
    created: str = Field(description="creation time stamp of the artifact")
    samples: int = Field(description="parameter samples averaged per prediction")
    abstain_threshold: float
    predictions: list[InputPrediction]


class PosteriorInfo(BaseModel):
    """One served posterior (from its manifest; `samples` once loaded on the answering replica)."""

    model_config = FORBID
    name: str
    method: str
    version: str
    created: str
    members: int
    samples: Optional[int]
    loaded: bool
    task: Literal["classification", "multiple_choice"]
    labels: list[str]
    base_model: str


class PosteriorList(BaseModel):
    model_config = FORBID
    default: str
    posteriors: list[PosteriorInfo]


class Health(BaseModel):
    model_config = FORBID
    status: Literal["ok"]


class FieldError(BaseModel):
    model_config = FORBID
    field: str
    message: str


class ErrorResponse(BaseModel):
    """Body of every 4xx/5xx answer made by the application (not by the proxy)."""

    model_config = FORBID
    message: str
    fields: list[FieldError] = Field(default_factory=list)
