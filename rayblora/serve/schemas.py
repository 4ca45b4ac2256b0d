"""HTTP schemas of the prediction endpoint (pydantic v2; they also make the OpenAPI document).

Request models carry the limits of a :class:`~rayblora.config.ServeConfig` (inputs per request, characters per
text, options per question, new tokens per prompt), so they are built per configuration by
:func:`request_model` (POST /v1/predict) and :func:`generate_request_model` (POST /v1/generate). Every model
forbids unknown fields. Limits that need the posterior (its task kind, its number of answer choices, token counts with
its tokenizer) are checked after the posterior is loaded (:mod:`rayblora.serve.engine`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (AfterValidator, BaseModel, ConfigDict, Discriminator, Field, StrictBool, StrictFloat,
                      StrictInt, StrictStr, Tag, ValidationInfo, create_model, field_validator)

from rayblora.config import ServeConfig
from rayblora.generation.decode import MODES, DecodingSettings, sequence_scores

FORBID = ConfigDict(extra="forbid")
CHARS_PER_TOKEN_BOUND = 16
"""A text with more than this many characters per allowed token is refused before it is tokenised."""
TEXT_TAG, CHOICE_TAG = "TextInput", "ChoiceInput"
"""Names of the two input shapes (pydantic puts them in error locations; :func:`field_name` drops them)."""
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
"""Posterior names: letters, digits, '.', '_', '-'; at most 64 characters."""
BMA_SCORES = tuple(sequence_scores([], [], [], []))
"""Sequence scores of a BMA answer (:func:`rayblora.generation.decode.sequence_scores`); higher = less certain."""
PREDICT_ABSTAIN_SCORES = ("confidence", "density", "either")
"""What a prediction may abstain on: its confidence, its feature density, or either of them."""
PER_STATE_SCORES = ("group_entropy",)
"""Per-state scores an abstain threshold may apply to (entropy over the states' answer groups)."""
DENSITY_SCORES = ("feature_distance",)
"""Scores of either mode from the posterior's feature density (the prompt's distance to the training prompts)."""
MAX_STOP_STRINGS, MAX_STOP_CHARS = 8, 32
"""Most stop strings of one generate request, and most characters of each."""
MIN_TEMPERATURE = 0.05
"""Lowest sampling temperature: below it probs^(1/T) can underflow to all zeros for a flat distribution."""


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
                 Field(description="answer options, scored as the posterior's task is (by each option's "
                                   "likelihood after the question, or by their letters A, B, ...)")))
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
                                                   f"(default {cfg.abstain_threshold})")),
        abstain_score=(Literal[PREDICT_ABSTAIN_SCORES],
                       Field("confidence", description='what abstains: "confidence" (below the threshold), '
                                                       '"density" (the input lies outside the training features: '
                                                       '`in_distribution` false; needs a posterior with a feature '
                                                       'density) or "either"')))


def _text(cfg: ServeConfig):
    """A non-blank string of at most 16 characters per allowed token."""
    return Annotated[StrictStr, Field(min_length=1, max_length=cfg.max_tokens_per_input * CHARS_PER_TOKEN_BOUND),
                     AfterValidator(_has_content)]


def _stream_alone(stream: bool, info: ValidationInfo) -> bool:
    """`stream` decodes one prompt by the model average: not with several prompts or per-state mode."""
    if stream and len(info.data.get("prompts") or ()) > 1:
        raise ValueError("streaming answers one prompt; send one prompt or set stream to false")
    if stream and info.data.get("mode") == "per_state":
        raise ValueError("streaming decodes by the Bayesian model average; use mode 'bma' or set stream to false")
    return stream


def _score_of_mode(score: str, info: ValidationInfo) -> str:
    """With a threshold, `abstain_score` must be a score the chosen mode produces."""
    mode = info.data.get("mode")
    if info.data.get("abstain_threshold") is None or mode is None:
        return score
    known = (PER_STATE_SCORES if mode == "per_state" else BMA_SCORES) + DENSITY_SCORES
    if score not in known:
        raise ValueError(f"mode {mode!r} scores an answer by {list(known)}, not {score!r}")
    return score


def _decoding_fields(cfg: ServeConfig) -> dict[str, Any]:
    """The decoding fields of a generate request (defaults of :class:`DecodingSettings`)."""
    new_tokens = min(DecodingSettings.max_new_tokens, cfg.max_new_tokens)
    stop = Annotated[StrictStr, Field(min_length=1, max_length=MAX_STOP_CHARS)]
    return {
        "max_new_tokens": (Annotated[StrictInt, Field(ge=1, le=cfg.max_new_tokens)],
                           Field(new_tokens, description="most tokens generated per prompt, the stop token "
                                                         f"included (at most {cfg.max_new_tokens})")),
        "mode": (Literal[MODES], Field("bma", description='"bma": one answer from the averaged next-token '
                                                          'distribution; "per_state": one answer per state, '
                                                          "grouped (the modal group's answer)")),
        "do_sample": (StrictBool, Field(False, description="sample the next token instead of the argmax")),
        "temperature": (Annotated[StrictFloat, Field(ge=MIN_TEMPERATURE, le=100.0, allow_inf_nan=False)],
                        Field(1.0, description=f"sampling temperature in [{MIN_TEMPERATURE}, 100] (with do_sample); "
                                               "uncertainties are always those of the T = 1 model")),
        "seed": (Annotated[StrictInt, Field(ge=0, lt=2 ** 63)],
                 Field(0, description="seed of the sampling generator (an answer repeats)")),
        "stop": (Annotated[list[stop], Field(max_length=MAX_STOP_STRINGS)],
                 Field(list(DecodingSettings.stop), description="strings that end an answer (besides the "
                                                                "end-of-sequence token)")),
    }


def generate_request_model(cfg: ServeConfig) -> type[BaseModel]:
    """The POST /v1/generate body model with `cfg`'s limits (token counts are checked once the posterior is
    loaded, with its tokenizer)."""
    return create_model(
        "GenerateRequest", __config__=FORBID,
        __validators__={"stream_alone": field_validator("stream")(_stream_alone),
                        "score_of_mode": field_validator("abstain_score")(_score_of_mode)},
        posterior=(Optional[Annotated[StrictStr, Field(pattern=NAME_PATTERN)]],
                   Field(None, description="posterior name (default: the first one served)")),
        prompts=(Annotated[list[_text(cfg)], Field(min_length=1, max_length=cfg.max_inputs_per_request)],
                 Field(description="raw prompts, decoded as they are (no task template)")),
        **_decoding_fields(cfg),
        stream=(StrictBool, Field(False, description="answer as server-sent events, one per token (one prompt, "
                                                     'mode "bma")')),
        abstain_threshold=(Optional[Annotated[StrictFloat, Field(ge=0.0, allow_inf_nan=False)]],
                           Field(None, description="abstain when the answer's `abstain_score` is above this "
                                                   "(default: never)")),
        abstain_score=(Literal[BMA_SCORES + PER_STATE_SCORES + DENSITY_SCORES],
                       Field("mean_token_mi", validate_default=True,
                             description="the sequence score the threshold applies to (per_state mode: "
                                         "group_entropy; either mode: feature_distance, with a feature "
                                         "density)")))


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
    distance: Optional[float] = Field(None, description="Mahalanobis distance of the input's features to the "
                                                        "training features (null without a feature density)")
    log_density: Optional[float] = Field(None, description="log-density of the input's features under the "
                                                           "training features' Gaussian (null without one)")
    in_distribution: Optional[bool] = Field(None, description="distance within the threshold that keeps "
                                                              "`density_quantile` of validation rows (null without "
                                                              "a feature density)")
    abstained: bool = Field(description="the request's `abstain_score` says so: confidence below the abstain "
                                        "threshold, or (density) the input outside the training features")


class PredictResponse(BaseModel):
    """Predictions of one posterior for every input of a request, in order."""

    model_config = FORBID
    posterior: str
    method: str
    version: str = Field(description="short hash of the artifact manifest (changes with any artifact file)")
    created: str = Field(description="creation time stamp of the artifact")
    samples: int = Field(description="parameter samples averaged per prediction")
    abstain_threshold: float
    abstain_score: Literal[PREDICT_ABSTAIN_SCORES]
    density_threshold: Optional[float] = Field(None, description="the distance up to which an input is "
                                                                 "`in_distribution` (null without a density)")
    predictions: list[InputPrediction]


class GenerationOut(BaseModel):
    """One prompt's generated answer and its uncertainty (nats; per token under the model average in "bma"
    mode, answer groups of the states in "per_state" mode)."""

    model_config = FORBID
    text: str = Field(description="the answer (stop token and anything after a stop string removed)")
    tokens: list[int] = Field(description="token ids of the answer (the stop token included when produced)")
    entropy: list[float] = Field(description="per token: total entropy of the averaged next-token distribution")
    aleatoric: list[float] = Field(description="per token: expected entropy of the states")
    mutual_information: list[float] = Field(description="per token: epistemic part (entropy minus aleatoric)")
    log_prob: list[float] = Field(description="per token: log-probability under the model average")
    scores: dict[str, float] = Field(description="sequence scores (mean_token_mi, ...; group_entropy, ...; "
                                                 "feature_distance with a feature density)")
    samples: list[str] = Field(description="per_state mode: each state's answer")
    state_scores: list[dict[str, float]] = Field(
        default_factory=list, description="per_state mode: each answer's mean_token_entropy and sequence_nll "
                                          "under its own state (each state alone is a single adapter)")
    log_density: Optional[float] = Field(None, description="log-density of the prompt's features under the "
                                                           "training prompts' Gaussian (null without a density)")
    in_distribution: Optional[bool] = Field(None, description="the prompt's distance within the density's "
                                                              "threshold (null without a feature density)")
    abstained: bool = Field(description="the `abstain_score` is above the request's threshold")


class GenerateResponse(BaseModel):
    """Answers of one posterior to every prompt of a request, in order."""

    model_config = FORBID
    posterior: str
    method: str
    generations: list[GenerationOut]


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
    task: Literal["classification", "multiple_choice", "generation"]
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
