"""Answer scoring: one PEFT model + tokenizer + answer tokens -> C-way logits, under any adapter state.

Every posterior family evaluates the same function f_θ(x) ∈ R^C for different LoRA parameters θ; the
:class:`AnswerScorer` owns the single shared base model and swaps adapter tensors in and out. f_θ(x)_c is the
next-token logit of answer c's first token, or, for a multiple-choice row scored by option likelihood, option c's
log-likelihood log p_θ(option c | prompt) (summed or averaged over its tokens), so every family's predictive,
curvature and GLM Jacobian is over the option scores.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from rayblora.batched import batched_logits, lora_dropout_active
from rayblora.config import AdapterConfig, ModelConfig
from rayblora.data.batches import choice_batch, encode, model_attention, position_ids, use_chat_template
from rayblora.data.formats import TaskSpec
from rayblora.model import (ModelError, add_lora, answer_token_ids, base_fingerprint, load_base_model, lora_parameters,
                            lora_state, set_lora_state)
from rayblora.trunk import (above_trunk, decoder_parts, first_adapted_layer, prompt_summary, tail_hidden, tail_ready,
                            trunk_hidden)
from rayblora.trunk_cache import TrunkCache


def attention_kernels(device: torch.device):
    """Context choosing the SDPA kernels of a forward on `device`: on CUDA every kernel but cuDNN attention,
    whose backward gives NaN gradients for left-padded batches (fully masked query rows) whose length is 64
    mod 128 on Hopper GPUs (pytorch/pytorch#196678, torch 2.11 to 2.13); elsewhere torch's own choice."""
    if device.type != "cuda":
        return nullcontext()

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


@dataclass
class CapturedFeatures:
    """What the forwards inside :meth:`AnswerScorer.capturing_features` read.

    answer: per answer-logit forward, the final-normed hidden state (N, H) its logits read — the answer position of
        a classification row, the prompt's last position of a multiple-choice row (where every option's first token
        is read); N is the forward's rows (S·B for S batched adapter states, sample-major).
    trunk: per :meth:`AnswerScorer.shared_trunk` call, the frozen layers' output summarised per prompt (B, 2H)
        (:func:`rayblora.trunk.prompt_summary`): the same for every adapter state.
    """

    answer: list[torch.Tensor]
    trunk: list[torch.Tensor]


class AnswerScorer:
    """C-way answer logits of a LoRA-adapted causal LM.

    Args:
        peft_model: a PEFT model with one LoRA adapter (the slot that adapter states are loaded into).
        tokenizer: its tokenizer (left padding).
        spec: the task spec; `spec.choices[i]`'s first token scores label i.
        max_length: prompt truncation length in tokens.
        fingerprint: `base_fingerprint` of the base model.
    """

    def __init__(self, peft_model, tokenizer, spec: TaskSpec, max_length: int, fingerprint: str):
        self.model = peft_model
        self.tokenizer = tokenizer
        if spec.chat_template:
            try:
                use_chat_template(tokenizer)  # every prompt tokenised for this task goes through it
            except ValueError as exc:
                raise ModelError(str(exc)) from None
        self.spec = spec
        self.max_length = max_length
        self.fingerprint = fingerprint
        self.answer_ids = torch.tensor(answer_token_ids(tokenizer, spec.choices) if spec.choices else [],
                                       dtype=torch.long)
        self.device = next(peft_model.parameters()).device
        """Where batches go: the model's device (a DeepSpeed engine sets its own compute device)."""
        self.max_batch_rows = 256 if self.device.type == "cuda" else 64
        """Cap on the rows (samples × batch) of one batched multi-state forward: activation memory on a GPU;
        on a CPU, rows beyond ~64 no longer raise throughput and spill out of cache."""
        self.trunk_cache: TrunkCache | None = None
        """Set by :meth:`use_trunk_cache`: the frozen layers' output per prompt (:mod:`rayblora.trunk_cache`)."""
        self.tail_only = True
        """Run the last decoder layer only at the positions the logits read, where that is exact
        (:func:`rayblora.trunk.tail_hidden`); False runs every position of every layer."""
        self._features: CapturedFeatures | None = None
        """While :meth:`capturing_features` is open: what the forwards read (:class:`CapturedFeatures`)."""

    @contextmanager
    def capturing_features(self) -> Iterator["CapturedFeatures"]:
        """Within the block, the forwards keep what a feature density scores (:mod:`rayblora.density`), detached
        in float32 on the host, in the yielded :class:`CapturedFeatures`. No extra computation: each forward holds
        those hidden states already."""
        outer, self._features = self._features, CapturedFeatures([], [])
        try:
            yield self._features
        finally:
            self._features = outer

    def use_trunk_cache(self, cache: TrunkCache | None) -> None:
        """Read the frozen trunk's hidden states from `cache` from now on (None: compute them every time); every
        forward without an explicit trunk (training, Laplace passes, validation) then starts at L₀ too."""
        if cache is not None and (cache.fingerprint != self.fingerprint
                                  or cache.start != first_adapted_layer(self.model)):
            raise ValueError(f"trunk cache {cache.identity} does not belong to this base model and adapter "
                             f"(fingerprint {self.fingerprint[:12]}…, first adapted layer "
                             f"{first_adapted_layer(self.model)})")
        self.trunk_cache = cache

    @property
    def num_choices(self) -> int:
        return len(self.spec.choices)

    def encode(self, prompts: Sequence[str],
               choices: Sequence[Sequence[str]] | None = None) -> dict[str, torch.Tensor]:
        """Tokenise prompts into a left-padded batch, all the spec's choices valid; a task scored by option
        likelihood needs each row's option continuations `choices` (:func:`~rayblora.data.formats.choice_example`),
        and only those are valid."""
        if not self.spec.by_likelihood:
            batch = encode(self.tokenizer, prompts, self.max_length)
            batch["num_choices"] = torch.full((len(prompts),), self.num_choices, dtype=torch.long)
            return batch
        if choices is None or len(choices) != len(prompts):
            raise ValueError("a multiple-choice task scored by option likelihood needs every row's choices")
        batch = choice_batch(self.tokenizer, prompts, choices, self.max_length)
        batch["num_choices"] = torch.as_tensor([len(c) for c in choices], dtype=torch.long)
        return batch

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch's tensors on :attr:`device` (no copy for tensors already there)."""
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def last_hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Final-layer hidden state at the last prompt position, (B, H)."""
        batch = self.to_device(batch)
        with attention_kernels(self.device):
            out = self.model(input_ids=batch["input_ids"], attention_mask=self.attention(batch),
                             position_ids=position_ids(batch), output_hidden_states=True,
                             logits_to_keep=1)
        return out.hidden_states[-1][:, -1]

    def logits(self, batch: dict[str, torch.Tensor], trunk: tuple[int, torch.Tensor] | None = None) -> torch.Tensor:
        """f_θ(x): answer logits (B, C) in float32 under the currently loaded adapter; invalid choices -inf.

        Runs with autograd as the caller's context says (training calls it with grad enabled). The batch's
        tensors are moved to :attr:`device`; the logits stay there. `trunk` = (L₀, hidden states (B, T, H)
        entering layer L₀) from :meth:`shared_trunk` skips the frozen layers below L₀ (:mod:`rayblora.trunk`).
        """
        if self.spec.kind == "generation":
            raise ValueError("answer logits need a task with answer choices; a generation task is scored by its "
                             "targets' likelihood (AnswerScorer.target_scores) and decoded with Posterior.generate")
        if self.spec.by_likelihood:
            return mask_choices(self._option_scores(self.to_device(batch), trunk), batch.get("num_choices"))
        logits = self._head_logits(self.to_device(batch), trunk, 1, self.answer_ids.to(self.device),
                                   read_at=0)[:, -1].float()
        return mask_choices(logits, batch.get("num_choices"))

    def attention(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The attention mask the model takes for `batch` (:func:`~rayblora.data.batches.model_attention`)."""
        return model_attention(batch, self.model.get_input_embeddings().weight.dtype)

    def _option_scores(self, batch: dict[str, torch.Tensor], trunk: tuple[int, torch.Tensor] | None) -> torch.Tensor:
        """Option scores (B, C) of a packed batch on :attr:`device`: s_c = Σ_t log p(o_c,t | prompt, o_c,<t), or
        its mean over o_c's tokens (`likelihood_per_token`); 0 for options a row does not have (masked later).

        Every option's first token is read at the prompt's last position, its later tokens at their predecessor:
        the logits are needed only at the last `span + 1` positions (span: the most option tokens of a row)."""
        segments = batch["segments"]
        option_tokens = (segments > 0).sum(-1)  # (B,)
        span = int(option_tokens.max())
        logp = torch.log_softmax(self._head_logits(batch, trunk, span + 1, read_at=span - option_tokens).float(),
                                 -1)  # (B, span + 1, V)
        window = segments[:, -span - 1:]
        targets, parts = batch["input_ids"][:, -span:], window[:, 1:]  # each read token and its option (0: none)
        previous = torch.arange(span, device=self.device)[None, :]
        source = torch.where(window[:, :-1] == parts, previous, (span - option_tokens)[:, None])
        token_logp = logp[torch.arange(len(logp), device=self.device)[:, None], source, targets] * (parts > 0)
        scores = torch.zeros(len(logp), self.num_choices + 1, device=self.device).scatter_add(1, parts, token_logp)
        if self.spec.scoring == "likelihood_per_token":
            counts = torch.zeros_like(scores).scatter_add(1, parts, (parts > 0).float())
            scores = scores / counts.clamp(min=1)
        return scores[:, 1:]

    def _head_logits(self, batch: dict[str, torch.Tensor], trunk: tuple[int, torch.Tensor] | None, keep: int,
                     vocab_rows: torch.Tensor | None = None, read_at: int | torch.Tensor | None = None
                     ) -> torch.Tensor:
        """The LM head's logits (B, keep, V) at the last `keep` positions of a batch on :attr:`device` — only the
        columns `vocab_rows` (R,) of the vocabulary when given (B, keep, R) — from the trunk's hidden states where
        there are some, and through :func:`~rayblora.trunk.tail_hidden` where that is exact. `read_at` (an index
        into the `keep` positions, or one per row (B,)) is where the answer is read: the hidden state there is
        kept while :meth:`capturing_features` is open."""
        if trunk is None and self.trunk_cache is not None:
            trunk = self.shared_trunk(batch)
        trunk = None if trunk is None else (trunk[0], trunk[1].to(self.device))
        mask, positions, length = self.attention(batch), position_ids(batch), batch["input_ids"].shape[-1]
        capture = self._features is not None and read_at is not None
        if self.tail_only and keep < length and tail_ready(self.model, length):
            with attention_kernels(self.device):
                hidden = tail_hidden(self.model, mask, positions, keep, batch["input_ids"], trunk)
            if capture:
                self._keep_feature(hidden, read_at)
            head = self.model.get_output_embeddings()
            weight = head.weight if vocab_rows is None else head.weight.index_select(0, vocab_rows)
            bias = head.bias if head.bias is None or vocab_rows is None else head.bias.index_select(0, vocab_rows)
            return torch.nn.functional.linear(hidden, weight, bias)
        window = nullcontext() if trunk is None else above_trunk(self.model, *trunk)
        normed = decoder_parts(self.model).norm if capture else None
        hook = normed.register_forward_hook(
            lambda _m, _a, out: self._keep_feature(out[:, -keep:], read_at)) if normed is not None else None
        try:
            with attention_kernels(self.device), window:
                logits = self.model(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False,
                                    position_ids=positions, logits_to_keep=keep).logits
        finally:
            if hook is not None:
                hook.remove()
        return logits if vocab_rows is None else logits.index_select(-1, vocab_rows)

    def _keep_feature(self, window: torch.Tensor, read_at: int | torch.Tensor) -> None:
        """Append the hidden state (N, H) at `read_at` of the last positions `window` (N, keep, H)."""
        index = torch.as_tensor(read_at, device=window.device).expand(window.shape[0])
        rows = torch.arange(window.shape[0], device=window.device)
        self._features.answer.append(window[rows, index].detach().float().cpu())

    def target_scores(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """A generation batch's target likelihood under the current adapter (with autograd as the caller's
        context says): the sequence NLL −Σ_t log p(y_t | x, y_<t) over the target's tokens and EOS (B,), and
        whether every one of them is the argmax (B,) — which is exactly when greedy decoding returns the target."""
        batch = self.to_device(batch)
        span = int(batch["target_mask"].sum(-1).max())  # targets end every row (left padding): the last `span`
        logits = self._head_logits(batch, None, span + 1)[:, :-1].float()  # (B, span, V)
        targets, keep = batch["input_ids"][:, -span:], batch["target_mask"][:, -span:].bool()
        token_nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        nll = (token_nll * keep).sum(-1)
        hit = ((logits.argmax(-1) == targets) | ~keep).all(-1)
        return nll, hit

    def training_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The mean negative log-likelihood of a micro-batch (the mean of :meth:`row_losses`)."""
        return self.row_losses(batch).mean()

    def row_losses(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each row's negative log-likelihood (B,): of its labelled answer among the C choices, or of its
        generation target's tokens (summed over them)."""
        if self.spec.kind == "generation":
            return self.target_scores(batch)[0]
        logits = self.logits(batch)
        return torch.nn.functional.cross_entropy(logits, batch["labels"].to(logits.device), reduction="none")

    @torch.no_grad()
    def shared_trunk(self, batch: dict[str, torch.Tensor]) -> tuple[int, torch.Tensor] | None:
        """(L₀, hidden states (B, T, H) entering L₀) when the adapter leaves layers 0..L₀−1 frozen, else None.

        Computed once per batch, it lets every adapter state of a posterior skip those layers; with a
        :attr:`trunk_cache` of this L₀, once per prompt (cached rows are read, the others computed and kept).
        """
        start = first_adapted_layer(self.model)
        if start == 0:
            return None
        batch = self.to_device(batch)

        def compute(rows: dict[str, torch.Tensor]) -> torch.Tensor:
            with attention_kernels(self.device):
                inputs = {"input_ids": rows["input_ids"], "attention_mask": self.attention(rows)}
                return trunk_hidden(self.model, inputs, position_ids(rows), start)

        if self.trunk_cache is not None and self.trunk_cache.start == start:
            hidden = self.trunk_cache.hidden(batch, compute).to(self.device)
        else:
            hidden = compute(batch)
        if self._features is not None:
            self._features.trunk.append(
                prompt_summary(hidden, batch["attention_mask"], batch.get("segments")).cpu())
        return start, hidden

    @torch.no_grad()
    def logits_for_states(self, batch: dict[str, torch.Tensor], states: Sequence[dict[str, torch.Tensor]],
                          lora_dropout: bool = False) -> torch.Tensor:
        """Answer logits (S, B, C) under each of S adapter states, sharing the one base model.

        Plain LoRA states run batched: S·B rows in one forward with per-row adapter factors
        (:func:`rayblora.batched.batched_logits`); anything else runs :meth:`logits_for_states_sequential`.
        `lora_dropout` keeps LoRA dropout on (each sample an independent MC-dropout pass).
        """
        return batched_logits(self, batch, states, lora_dropout=lora_dropout, max_rows=self.max_batch_rows)

    @torch.no_grad()
    def logits_for_states_sequential(self, batch: dict[str, torch.Tensor],
                                     states: Sequence[dict[str, torch.Tensor]],
                                     lora_dropout: bool = False, share_trunk: bool = True) -> torch.Tensor:
        """Answer logits (S, B, C): one forward per state, swapping the adapter tensors in between; the frozen
        layers below the adapter run once unless `share_trunk` is False (S full forwards)."""
        with self.restoring_adapter(), lora_dropout_active(self.model, lora_dropout):
            outs, trunk = [], self.shared_trunk(batch) if share_trunk else None
            for state in states:
                set_lora_state(self.model, state)
                outs.append(self.logits(batch, trunk))
        return torch.stack(outs)

    @contextmanager
    def restoring_adapter(self) -> Iterator[None]:
        """Evaluate in eval mode and put the current adapter tensors and mode back afterwards."""
        saved, was_training = lora_state(self.model), self.model.training
        self.model.eval()
        try:
            yield
        finally:
            set_lora_state(self.model, saved)
            self.model.train(was_training)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The current adapter tensors (PEFT saved-file naming)."""
        return lora_state(self.model)

    def lora_parameters(self):
        return lora_parameters(self.model)


def mask_choices(logits: torch.Tensor, num_choices: torch.Tensor | None) -> torch.Tensor:
    """Set logits (B, C) of choices beyond each example's `num_choices` (B,) to -inf."""
    if num_choices is None:
        return logits
    cols = torch.arange(logits.shape[-1], device=logits.device)
    return logits.masked_fill(cols[None, :] >= num_choices.to(logits.device)[:, None], float("-inf"))


def build_scorer(model_cfg: ModelConfig, adapter_cfg: AdapterConfig, spec: TaskSpec, max_length: int,
                 seed: int = 0, base=None) -> AnswerScorer:
    """Load the base model (or take `base` = (model, tokenizer)), attach a LoRA seeded by `seed`."""
    model, tokenizer = base if base is not None else load_base_model(model_cfg)
    fingerprint = base_fingerprint(model)
    peft_model = add_lora(model, adapter_cfg, seed)
    return AnswerScorer(peft_model, tokenizer, spec, max_length, fingerprint)
