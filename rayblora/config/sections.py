"""Config sections of what a member trains on and how: model, adapter, data, train, posterior and the
per-family sections (swag, laplace, blob, tfb, hybrid). Each field carries a docstring (the string literal under it) and
every section validates itself in `__post_init__`, naming the dotted field."""

from __future__ import annotations

import math
from dataclasses import dataclass

from rayblora.config.validation import check, one_of
from rayblora.registry import available_methods


@dataclass(frozen=True)
class ModelConfig:
    name: str = "smollm2-135m-instruct"
    """Base causal LM: "smollm2-135m-instruct" (the registry asset, see `rayblora assets fetch`),
    "tiny-llama" (a random 2-layer Llama for tests), or a path to a HF model folder."""
    dtype: str = "float32"
    """Parameter dtype of the frozen base model: float32 | bfloat16 | float16."""
    tiny_layers: int = 2
    """Number of layers of the "tiny-llama" test model."""
    tiny_hidden: int = 64
    """Hidden size of the "tiny-llama" test model."""
    seed: int = 0
    """Seed for the random weights of "tiny-llama" (the base model must be identical across members)."""
    device: str = "cpu"
    """Where the base model is placed: cpu | cuda (the current CUDA device) | cuda:N | auto (CUDA when
    available, else CPU). Ray Train GPU workers (cluster.use_gpu) use the GPU Ray gave them."""

    def __post_init__(self) -> None:
        one_of(self.dtype, ("float32", "bfloat16", "float16"), "model.dtype")
        check(self.device in ("cpu", "cuda", "auto") or
               (self.device.startswith("cuda:") and self.device[5:].isdigit()), "model.device",
               f"must be cpu, cuda, cuda:N or auto, got {self.device!r}")
        check(self.tiny_layers >= 1, "model.tiny_layers", "must be >= 1")
        check(self.tiny_hidden >= 8 and self.tiny_hidden % 4 == 0, "model.tiny_hidden",
               "must be a multiple of 4 and >= 8")


@dataclass(frozen=True)
class AdapterConfig:
    rank: int = 8
    """LoRA rank r."""
    alpha: float = 16.0
    """LoRA scaling numerator (the update is scaled by alpha / rank)."""
    dropout: float = 0.0
    """LoRA dropout probability (kept on at test time by the mc_dropout posterior)."""
    target_modules: tuple[str, ...] = ()
    """Names of the linear modules that receive LoRA adapters; empty = the base architecture's usual ones
    (q_proj, v_proj for Llama / Mistral / Qwen2 / Gemma; qkv_proj for Phi-3; c_attn for GPT-2;
    query_key_value for GPT-NeoX: :func:`rayblora.model.default_target_modules`)."""
    layers: tuple[int, ...] = ()
    """Restrict adapters to these decoder layer indices (empty = all layers)."""
    init_b_std: float = 0.0
    """Standard deviation of a random initial B (0 = PEFT's B = 0, so every member starts as the base model).
    > 0 starts each member, seeded by its seed, as a different function."""
    init_a_gain: float = 0.0
    """Gain of a Xavier-normal initial A, std = gain · sqrt(2 / (r + d_in)) (0 = PEFT's Kaiming-uniform A). A large
    gain (≈ 10) is LoRA-Ensemble's diversity recipe (arXiv 2405.14438: randomness of the initialisation drives
    the members apart)."""

    def __post_init__(self) -> None:
        check(self.rank >= 1, "adapter.rank", f"must be >= 1, got {self.rank}")
        check(self.alpha > 0, "adapter.alpha", f"must be > 0, got {self.alpha}")
        check(0.0 <= self.dropout < 1.0, "adapter.dropout", f"must be in [0, 1), got {self.dropout}")
        check(all(isinstance(m, str) and m for m in self.target_modules), "adapter.target_modules",
              "must be module names (or empty for the architecture's default)")
        check(all(i >= 0 for i in self.layers), "adapter.layers", "indices must be >= 0")
        check(self.init_b_std >= 0, "adapter.init_b_std", f"must be >= 0, got {self.init_b_std}")
        check(self.init_a_gain >= 0, "adapter.init_a_gain", f"must be >= 0, got {self.init_a_gain}")


CHOICE_SCORINGS = ("likelihood_per_token", "likelihood", "letter")
"""How a multiple-choice row is scored (`data.choice_scoring`), the default first."""
MAX_OPTIONS = 26
"""The most options a multiple-choice row may have (one letter each, whichever the scoring)."""


@dataclass(frozen=True)
class DataConfig:
    task: str = "movie"
    """Training task: a built-in VADER domain (movie | tweets | amazon | nyt) or a path to a user file
    (.jsonl, .csv, .parquet) or a `datasets.save_to_disk` folder."""
    shift_tasks: tuple[str, ...] = ("tweets", "amazon", "nyt")
    """Evaluation-only tasks with the same labels (distribution shift); built-in names or paths."""
    far_ood_tasks: tuple[str, ...] = ()
    """Unlabelled far-OOD text for OOD detection: built-in newsgroups | reuters (`rayblora assets fetch`) or a file
    with a `text` column, `test_size` rows of each, fed through `prompt_template`; only their uncertainty is
    reported (OOD AUROC against the in-domain test split), never an accuracy. Classification tasks only."""
    joint_tasks: tuple[str, ...] = ()
    """Further tasks whose training and validation splits are pooled with the task's (joint training, e.g. the
    retrain-on-all-data baseline of dynamic fine-tuning); each is split exactly as when it is the run's task."""
    label_names: tuple[str, ...] = ("negative", "positive")
    """Answer words for classification tasks, in label order (label i is answered by label_names[i])."""
    prompt_template: str = "Review: {text}\nIs the sentiment of this review positive or negative?\nAnswer:"
    """Prompt for classification tasks; `{text}` is replaced by the example text."""
    train_size: int = 2000
    """Number of training examples drawn from the task (0 = all that remain after val/test)."""
    val_size: int = 200
    """Number of validation examples (used for temperature, prior precision, early checks)."""
    test_size: int = 500
    """Number of test examples of the task, and of each shift task."""
    shift_test_size: int = 0
    """Rows of each shift and far-OOD split (0 = test_size)."""
    max_length: int = 64
    """Maximum prompt length in tokens; longer prompts keep their last tokens (the question). A row scored by
    option likelihood counts its prompt and all its options' tokens."""
    choice_scoring: str = CHOICE_SCORINGS[0]
    """Multiple-choice rows (`question` + `choices` + `label`): `likelihood_per_token` scores each option by the
    mean log-likelihood of its tokens as a continuation of "Question: ...\nAnswer:", `likelihood` by their sum,
    `letter` by the next token after a lettered list (" A", " B", ...). Other tasks ignore it."""
    chat_template: bool = False
    """Wrap every prompt in the tokenizer's own chat template (one user turn, the assistant's turn opened) before
    it is tokenised: in training, evaluation, serving and generation alike (instruct models; the tokenizer must
    have a template). Recorded in the artifact's task."""
    seed: int = 0
    """Seed of the deterministic train/validation/test split."""

    def __post_init__(self) -> None:
        check(bool(self.task), "data.task", "must name a task or a file")
        check(len(self.label_names) >= 2, "data.label_names", "needs at least two labels")
        check("{text}" in self.prompt_template, "data.prompt_template", "must contain {text}")
        for name in ("train_size", "val_size", "test_size", "shift_test_size"):
            check(getattr(self, name) >= 0, f"data.{name}", "must be >= 0")
        check(self.val_size > 0 and self.test_size > 0, "data.val_size/test_size", "must be > 0")
        check(8 <= self.max_length <= 8192, "data.max_length", "must be in [8, 8192]")
        one_of(self.choice_scoring, CHOICE_SCORINGS, "data.choice_scoring")
        check(self.task not in self.joint_tasks and len(set(self.joint_tasks)) == len(self.joint_tasks),
               "data.joint_tasks", "must not repeat a task or name data.task itself")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 80
    """Optimizer steps per member."""
    batch_size: int = 8
    """Examples per micro-batch (per worker)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 5e-4
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay on the LoRA parameters (a Gaussian prior around zero at the MAP)."""
    warmup_steps: int = 5
    """Linear warm-up steps (capped at `steps`); the lr then decays linearly to `lr * final_lr_fraction`."""
    final_lr_fraction: float = 0.1
    """Learning rate at the last step as a fraction of the peak."""
    eval_every: int = 0
    """Run a validation pass every this many steps (0 = only at the end)."""
    checkpoint_every: int = 0
    """Report a checkpoint every this many steps (0 = only at the end)."""
    seed: int = 0
    """Base seed; member i uses seed + 1000 * i for LoRA init and data order."""
    torch_threads: int = 0
    """torch intra-op threads of a training process (0 = leave torch's default); a member's Ray Train worker uses
    at most its `cluster.cpus_per_worker` of them, so concurrent members never oversubscribe the cores."""
    strategy: str = "ddp"
    """How a member is distributed over its workers: ddp | deepspeed."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage when strategy is deepspeed (0-3)."""
    offload_optimizer: bool = False
    """DeepSpeed: keep the optimizer state in CPU memory (ZeRO stage >= 1)."""
    offload_params: bool = False
    """DeepSpeed: keep parameters in CPU memory (ZeRO stage 3)."""
    keep_best: bool = False
    """Also keep the adapter of the validation pass (every `eval_every` steps) with the lowest validation NLL,
    as `best_adapter.safetensors` in the member's checkpoint: the early-stopped baseline."""
    member_data: str = "all"
    """Training rows of each member: all (every member sees the training split, in its own order) | bootstrap
    (member i trains on a resample with replacement of the split, seeded by its seed: members that start as
    the same function, LoRA's B = 0, then differ by more than their data order and A's init)."""
    trunk_cache: bool = True
    """Compute the frozen layers below the first adapted one once per prompt and reuse them in every epoch,
    member, evaluation method and Laplace pass (:mod:`rayblora.trunk_cache`); applies only where it is exact:
    LoRA on the top layers (`adapter.layers`), no dropout in the frozen layers, `ddp` strategy, no hybrid
    training objective. The file lives under `<output.dir>/trunk_cache/` (shared storage on a multi-node run)."""

    def __post_init__(self) -> None:
        check(self.steps >= 1, "train.steps", f"must be >= 1, got {self.steps}")
        check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        check(self.grad_accum >= 1, "train.grad_accum", "must be >= 1")
        check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        check(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        check(0 <= self.final_lr_fraction <= 1, "train.final_lr_fraction", "must be in [0, 1]")
        check(self.eval_every >= 0 and self.checkpoint_every >= 0, "train.eval_every/checkpoint_every",
               "must be >= 0")
        check(self.torch_threads >= 0, "train.torch_threads", "must be >= 0")
        one_of(self.strategy, ("ddp", "deepspeed"), "train.strategy")
        one_of(self.member_data, ("all", "bootstrap"), "train.member_data")
        check(not self.keep_best or self.eval_every > 0, "train.keep_best", "needs train.eval_every > 0")
        one_of(self.zero_stage, (0, 1, 2, 3), "train.zero_stage")
        check(not self.offload_params or self.zero_stage == 3, "train.offload_params", "needs train.zero_stage 3")


@dataclass(frozen=True)
class PosteriorConfig:
    method: str = "ensemble"
    """Posterior family to build (see `rayblora.posteriors.available_methods()`)."""
    members: int = 4
    """Independently trained members (ensemble size K; K = 1 gives the MAP)."""
    min_members: int = 0
    """Build the posterior from the survivors if at least this many members finish (0 = all must)."""
    eval_methods: tuple[str, ...] = ("map", "ensemble")
    """Rows of the evaluation report; "map" is every member evaluated alone (mean ± sd over members)."""
    member_adapter: str = "final"
    """Which adapter of each member the family is built from: "final" (the last step) or "best" (the
    lowest-validation-NLL one, `train.keep_best`: early-stopped members, the deep-ensemble recipe of arXiv
    2402.12264). "best" applies to families built from member adapters (ensemble, laplace, tfb, temperature,
    mc_dropout, ...), not to those that collect along the trajectory (swag, multiswag, blob, hybrid_vi)."""
    density: bool = True
    """Fit the members' feature density when the artifact is written (a class-conditional Gaussian over the
    hidden state the answer logits read, one pass over the training and validation rows; `rayblora.density`):
    every prediction then carries a Mahalanobis distance, a log-density and an `in_distribution` flag."""
    density_features: str = "auto"
    """What the density scores: "trunk" (the frozen layers' output at the read position and averaged over the
    prompt: one Gaussian, the same for every member), "answer" (the final hidden state the logits read, one
    Gaussian per member), "auto" (trunk where the adapter leaves frozen layers below it, else answer)."""
    density_quantile: float = 0.99
    """The fraction of validation rows the in-distribution threshold keeps (its distance quantile)."""
    calibrate: str = "none"
    """"temperature": evaluation adds, for every family, that family recalibrated after pooling — one temperature
    fitted to its predictive on the validation split (`ensemble+T`, `laplace+T`, ...); "none": no such rows."""

    def __post_init__(self) -> None:
        known = available_methods()
        one_of(self.method, known, "posterior.method")
        one_of(self.member_adapter, ("final", "best"), "posterior.member_adapter")
        one_of(self.calibrate, ("none", "temperature"), "posterior.calibrate")
        check(0.0 < self.density_quantile <= 1.0, "posterior.density_quantile", "must be in (0, 1]")
        one_of(self.density_features, ("auto", "trunk", "answer"), "posterior.density_features")
        for m in self.eval_methods:
            one_of(m, known, "posterior.eval_methods")
        check(self.members >= 1, "posterior.members", f"must be >= 1, got {self.members}")
        check(0 <= self.min_members <= self.members, "posterior.min_members", "must be in [0, members]")


@dataclass(frozen=True)
class SamplingConfig:
    samples: int = 8
    """S, the predictive's samples per member of the families that draw them at prediction time: mc_dropout's
    passes, TFB's and BLoB's weight-space draws (SWAG's are `swag.samples`, the hybrid adapter's
    `hybrid.samples`)."""
    seed: int = 0
    """Seed of those draws (member k draws with seed + 1000 k, so predictions repeat)."""

    def __post_init__(self) -> None:
        check(self.samples >= 1, "sampling.samples", "must be >= 1")


@dataclass(frozen=True)
class SwagConfig:
    start_step: int = 0
    """First optimizer step at which SWAG moments are collected (0 = half of train.steps)."""
    collect_every: int = 1
    """Collect a snapshot every this many steps after `start_step`."""
    max_rank: int = 10
    """K, the number of deviation columns kept (the low-rank part of the SWAG covariance)."""
    samples: int = 8
    """S, parameter samples drawn per prediction."""
    scale: float = 1.0
    """Scale of the sampled deviation from the SWA mean (1.0 = the SWAG covariance)."""
    swa_lr: float = 0.0
    """Learning rate from `start_step` on (0 = keep the configured schedule)."""
    lr_schedule: str = "constant"
    """Schedule after `start_step` when swa_lr > 0: constant | cyclic."""
    sample_seed: int = 0
    """Seed of the posterior samples (predictions are reproducible)."""

    def __post_init__(self) -> None:
        check(self.start_step >= 0, "swag.start_step", "must be >= 0")
        check(self.collect_every >= 1, "swag.collect_every", "must be >= 1")
        check(self.max_rank >= 2, "swag.max_rank", "must be >= 2")
        check(self.samples >= 1, "swag.samples", "must be >= 1")
        check(self.scale >= 0, "swag.scale", "must be >= 0")
        check(self.swa_lr >= 0, "swag.swa_lr", "must be >= 0")
        one_of(self.lr_schedule, ("constant", "cyclic"), "swag.lr_schedule")


@dataclass(frozen=True)
class LaplaceConfig:
    structure: str = "kfac"
    """Curvature structure over the LoRA parameters: kfac | diag."""
    subset: str = "all"
    """Which LoRA parameters: all | last_layer (the adapter of the last adapted module only)."""
    factors: str = "ab"
    """Which LoRA factors of those modules: ab (A and B) | b (B only; A stays at its trained value). B starts at
    zero, so the zero-mean prior fits it, while A starts random and its ‖A‖² dominates a zero-mean prior's
    evidence (Laplace-LoRA, arXiv 2308.13111, sec. 3 fits both)."""
    hessian: str = "ggn"
    """Curvature: ggn (Fisher under the model's own answer distribution, exact over C) | ef (empirical)."""
    prior_precision: float = 1.0
    """Initial / fixed prior precision λ."""
    prior_method: str = "marglik"
    """How λ is chosen: marglik (Laplace evidence) | val_nll (grid on validation NLL) | fixed."""
    per_module: bool = False
    """Optimise one λ per adapted module instead of one scalar (marglik only)."""
    link: str = "probit"
    """Link approximation of the GLM predictive: probit | mc; or nn for weight-space sampling."""
    link_samples: int = 100
    """Samples of the mc link (and of nn sampling); the probit link draws this many for its uncertainty split."""
    sample_seed: int = 0
    """Seed of the link / weight-space draws (a batch's prediction is reproducible)."""
    generation_samples: int = 8
    """Weight-space draws per fitted member that decode generated answers (`Posterior.generate`)."""
    low_rank_threshold: int = 1024
    """Kronecker factors wider than this are kept as a rank-`low_rank` eigen-approximation."""
    low_rank: int = 64
    """Rank of the low-rank factor approximation."""
    fit_batches: int = 0
    """Batches of the training split used for the curvature (0 = the whole split)."""
    fit_workers: int = 0
    """Ray Train workers sharing the curvature pass of `rayblora fit` (0 = fit in this process, no Ray)."""

    def __post_init__(self) -> None:
        one_of(self.structure, ("kfac", "diag"), "laplace.structure")
        one_of(self.subset, ("all", "last_layer"), "laplace.subset")
        one_of(self.factors, ("ab", "b"), "laplace.factors")
        one_of(self.hessian, ("ggn", "ef"), "laplace.hessian")
        check(self.prior_precision > 0, "laplace.prior_precision", "must be > 0")
        one_of(self.prior_method, ("marglik", "val_nll", "fixed"), "laplace.prior_method")
        one_of(self.link, ("probit", "mc", "nn"), "laplace.link")
        check(self.link_samples >= 1, "laplace.link_samples", "must be >= 1")
        check(self.generation_samples >= 1, "laplace.generation_samples", "must be >= 1")
        check(self.low_rank_threshold >= 1 and self.low_rank >= 1, "laplace.low_rank*", "must be >= 1")
        check(self.fit_batches >= 0, "laplace.fit_batches", "must be >= 0")
        check(self.fit_workers >= 0, "laplace.fit_workers", "must be >= 0")
        check(not self.per_module or self.prior_method != "val_nll", "laplace.per_module",
               "per-module prior precision is chosen by marglik (or fixed), not val_nll")


BLOB_KL_WEIGHTINGS = ("uniform", "reweighted")
"""Choices of `blob.kl_weighting`."""


@dataclass(frozen=True)
class BlobConfig:
    init_std: float = 0.05
    """ε of the initialisation G ~ U(ε/√2, ε) of Ω = G², the std of q(A) (BLoB, arXiv 2406.11675, sec. 3.4)."""
    prior_std: float = 0.2
    """β, the std of the prior N(0, β² I) over A."""
    kl_weight: float = 1.0
    """Scale of the KL term (1 = the paper's: one KL per epoch of steps)."""
    kl_lr: float = 0.02
    """Learning rate of the separate SGD step on the weighted KL after each optimizer step (the paper's second
    optimizer; it follows the run's lr schedule); 0 = add the weighted KL to the training loss instead."""
    kl_weighting: str = "uniform"
    """How an epoch's steps share the KL: uniform (1 / M_e each) | reweighted (2^(M_e − i) / (2^M_e − 1),
    Blundell et al. 2015, eq. 9)."""

    def __post_init__(self) -> None:
        check(self.init_std > 0 and math.isfinite(self.init_std), "blob.init_std", "must be finite and > 0")
        check(self.prior_std > 0 and math.isfinite(self.prior_std), "blob.prior_std", "must be finite and > 0")
        check(self.kl_weight >= 0 and math.isfinite(self.kl_weight), "blob.kl_weight", "must be finite and >= 0")
        check(self.kl_lr >= 0 and math.isfinite(self.kl_lr), "blob.kl_lr", "must be finite and >= 0")
        one_of(self.kl_weighting, BLOB_KL_WEIGHTINGS, "blob.kl_weighting")


TFB_METRICS = ("nll", "accuracy")
"""Choices of `tfb.metric`."""


@dataclass(frozen=True)
class TfbConfig:
    metric: str = "nll"
    """Validation performance TFB's σ search guards (arXiv 2412.05723, sec. 3.3): nll (relative increase over
    the adapter's own validation NLL) | accuracy (absolute loss of validation accuracy)."""
    tolerance: float = 0.01
    """Largest allowed drop of `metric` (0.01: NLL 1 % above the adapter's, or 1 accuracy point)."""
    sigma_min: float = 1e-4
    """Lower end of the σ search range."""
    sigma_max: float = 1.0
    """Upper end of the σ search range."""
    search_steps: int = 8
    """Geometric bisection steps, one validation pass each (plus one pass at σ = 0); n steps pin σ to a factor
    (sigma_max / sigma_min)^(1 / 2^n) (8 steps over the default range: 3.7 %)."""
    search_samples: int = 1
    """Parameter samples per search pass (the same draws at every σ)."""

    def __post_init__(self) -> None:
        one_of(self.metric, TFB_METRICS, "tfb.metric")
        check(self.tolerance >= 0 and math.isfinite(self.tolerance), "tfb.tolerance", "must be finite and >= 0")
        check(0 < self.sigma_min < self.sigma_max and math.isfinite(self.sigma_max), "tfb.sigma_min",
              f"need 0 < sigma_min < sigma_max < inf, got {self.sigma_min}, {self.sigma_max}")
        check(self.search_steps >= 1, "tfb.search_steps", "must be >= 1")
        check(self.search_samples >= 1, "tfb.search_samples", "must be >= 1")


ROUND_PRECISIONS = ("variational", "laplace")
"""Choices of `hybrid.round_precision`."""


@dataclass(frozen=True)
class HybridConfig:
    lora: bool = True
    """Hybrid adapter: train the LoRA part (false = the LoRA stays at its zero-update initialisation)."""
    prefix_tokens: int = 0
    """Hybrid adapter: prefix-tuning tokens per adapted layer (0 = no prefix)."""
    prefix_init_std: float = 0.02
    """Standard deviation of the random initial prefix keys and values."""
    bottleneck_dim: int = 0
    """Hybrid adapter: width of the bottleneck adapter after each adapted layer's MLP (0 = none)."""
    kl_weight: float = 1.0
    """Weight of KL(q ‖ prior) / N in the variational objective (1 = the ELBO; < 1 tempers the prior)."""
    prior_std: float = 1.0
    """Standard deviation of the zero-mean Gaussian prior of the first round (no `prior_artifact`)."""
    init_std: float = 1e-3
    """Initial posterior standard deviation σ = softplus(ρ) of every adapter parameter."""
    samples: int = 8
    """S, parameter draws per prediction."""
    sample_seed: int = 0
    """Seed of the prediction draws (a batch's prediction is reproducible)."""
    prior_artifact: str = ""
    """Posterior artifact of the previous round (dynamic fine-tuning): its Gaussian N(μ_t, Λ_t⁻¹) is this
    run's prior and μ_t, σ_t its initial posterior ("" = first round: N(0, prior_std²), fresh adapter); every
    Ray worker must be able to read the path (shared storage on a cluster)."""
    round_prior: bool = True
    """With `prior_artifact`: use it as the prior (true) or only as the initialisation, keeping the prior
    N(0, prior_std²) (false = naive sequential fine-tuning)."""
    prior_scale: float = 1.0
    """Multiplier of the previous round's precision Λ_t (tempering of the round-to-round prior)."""
    round_precision: str = "variational"
    """Precision Λ_t of the round-to-round prior: `variational` = 1 / σ_t² of round t's posterior; `laplace` =
    the diagonal GGN of round t's training split at μ_t plus round t's own prior precision
    (:mod:`rayblora.posteriors.hybrid.laplace_prior`, computed when round t's artifact is written)."""
    rounds: tuple[str, ...] = ()
    """Dynamic fine-tuning: tasks trained round after round by `rayblora train --rounds` (built-in names or
    paths); empty = one ordinary run on data.task."""
    compare_naive: bool = True
    """Dynamic fine-tuning: also run the same rounds without the round-to-round prior, for the report."""
    compare_retrain: bool = False
    """Dynamic fine-tuning: also train one posterior from scratch on the pooled training data of every round
    (`train.steps` × rounds steps), the retrain-on-all-data reference of the report."""

    def __post_init__(self) -> None:
        check(self.prefix_tokens >= 0, "hybrid.prefix_tokens", "must be >= 0")
        check(self.bottleneck_dim >= 0, "hybrid.bottleneck_dim", "must be >= 0")
        check(self.lora or self.prefix_tokens > 0 or self.bottleneck_dim > 0, "hybrid.lora",
               "every part of the hybrid adapter is off; turn on lora, prefix_tokens or bottleneck_dim")
        check(self.kl_weight >= 0, "hybrid.kl_weight", "must be >= 0")
        for name in ("prior_std", "init_std", "prior_scale", "prefix_init_std"):
            check(getattr(self, name) > 0, f"hybrid.{name}", f"must be > 0, got {getattr(self, name)}")
        check(self.samples >= 1, "hybrid.samples", "must be >= 1")
        check(self.round_precision in ROUND_PRECISIONS, "hybrid.round_precision",
               f"must be one of {ROUND_PRECISIONS}, got {self.round_precision!r}")
