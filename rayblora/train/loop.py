"""The pure-torch member training loop (no Ray): AdamW over the LoRA parameters, warm-up + linear decay,
gradient accumulation, periodic validation and resumable checkpoints, with per-step hooks (e.g. SWAG).

The loss is the cross-entropy of the C-way answer softmax (Laplace-LoRA, arXiv 2308.13111, sec. 4); weight
decay on the LoRA parameters is the Gaussian prior of the MAP estimate.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from rayblora.config import TrainConfig
from rayblora.data.batches import eval_batches, train_batch
from rayblora.model import set_lora_state
from rayblora.train.checkpoint import (ADAPTER, BEST_ADAPTER, STATE_JSON, TRAINER_STATE, read_step_state,
                                       read_trainer_state)
from rayblora.train.deepspeed import DeepSpeedStepper


class StepHook(Protocol):
    """Called after every optimizer step; may carry state that is checkpointed with the member.

    A hook may also define `bind(state)`, called once with the loop's :class:`TrainerState` when it is created
    (for hooks that set the optimizer's learning rate or read the adapter through `state.stepper`).
    """

    def __call__(self, step: int, scorer) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TrainingObjective(Protocol):
    """Optional extension of a step hook that changes what the loop trains and how (e.g. variational
    inference, :mod:`rayblora.posteriors.hybrid.variational`); at most one hook of a member may implement it."""

    def trainable_parameters(self, scorer) -> list[tuple[str, torch.nn.Parameter]]:
        """The parameters the optimizer updates (instead of the scorer's LoRA parameters)."""

    def logits(self, scorer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Training answer logits (B, C) of a micro-batch (with grad)."""

    def regulariser(self, scorer, step: int, train_size: int) -> torch.Tensor:
        """The scalar the loop adds to every micro-batch's mean loss at optimizer step `step` (0-based), e.g. a
        KL to a prior divided by N = `train_size`, the training-set size."""

    keeps_trunk_frozen: bool
    """Whether the layers below the first adapted one stay exactly as the base model's (then the frozen-trunk
    cache, :mod:`rayblora.trunk_cache`, may serve this objective's training forwards)."""


def training_objective(hooks: Sequence[StepHook]) -> TrainingObjective | None:
    """The one hook implementing :class:`TrainingObjective`, or None (plain likelihood training)."""
    found = [h for h in hooks if hasattr(h, "trainable_parameters")]
    if len(found) > 1:
        raise ValueError(f"{len(found)} step hooks define a training objective; at most one may")
    return found[0] if found else None


def lr_factor(cfg: TrainConfig) -> Callable[[int], float]:
    """Multiplier of the peak lr at a step: linear warm-up, then linear decay to `final_lr_fraction`."""

    warmup = min(cfg.warmup_steps, cfg.steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        span = max(1, cfg.steps - warmup)
        frac = min(1.0, (step - warmup) / span)
        return 1.0 - (1.0 - cfg.final_lr_fraction) * frac

    return factor


def allreduce_mean_grads(params: Sequence[torch.nn.Parameter]) -> None:
    """Average LoRA gradients over the torch.distributed group (a no-op when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


@torch.no_grad()
def validate(scorer, dataset, batch_size: int) -> dict[str, float]:
    """Validation NLL and accuracy of the current adapter (a generation task: the targets' sequence NLL and
    exact match of greedy decoding, which teacher forcing decides: every target token is the argmax)."""
    was_training = scorer.model.training
    scorer.model.eval()
    nll, correct, n = 0.0, 0, 0
    for batch in eval_batches(dataset, scorer.tokenizer, batch_size, scorer.max_length, by_length=True):
        if "target_mask" in batch:  # generation: the target's NLL and teacher-forced exact match
            row_nll, hit = scorer.target_scores(batch)
            nll, correct = nll + row_nll.sum().item(), correct + hit.sum().item()
        else:
            logits = scorer.logits(batch)
            labels = batch["labels"].to(logits.device)
            nll += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(-1) == labels).sum().item()
        n += len(batch["labels"])
    scorer.model.train(was_training)
    return {"val_nll": nll / max(n, 1), "val_accuracy": correct / max(n, 1)}


@dataclass
class LoopContext:
    """Where a member's loop runs: its seed, its data-parallel rank, and what it reports to."""

    seed: int
    rank: int = 0
    world_size: int = 1
    hooks: Sequence[StepHook] = ()
    on_checkpoint: Callable[[int, dict[str, float], "TrainerState"], None] | None = None
    log: Callable[[str], None] = print
    label: str = "member"
    resume_dir: str | None = None
    use_gpu: bool = False
    history: list[dict[str, float]] = field(default_factory=list)


class TorchStepper:
    """Plain optimizer mechanics: AdamW + schedule, LoRA gradients averaged over the data-parallel group."""

    def __init__(self, scorer, optimizer, scheduler, cfg: TrainConfig):
        self.scorer, self.optimizer, self.scheduler = scorer, optimizer, scheduler
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.grad_accum = cfg.grad_accum

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> None:
        allreduce_mean_grads(self.params)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=False)

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return self.scorer.adapter_state()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def save(self, directory: Path) -> None:
        """Nothing beyond what TrainerState writes."""

    def load(self, directory: Path) -> bool:
        """False: the adapter comes from adapter.safetensors."""
        return False


@dataclass
class BestAdapter:
    """The adapter of the validation pass with the lowest validation NLL so far (`train.keep_best`): the
    early-stopped baseline, kept beside the final adapter."""

    step: int = 0
    val_nll: float = math.inf
    state: dict[str, torch.Tensor] | None = None

    def offer(self, step: int, metrics: dict[str, float], stepper) -> None:
        nll = metrics.get("val_nll")
        if nll is not None and nll < self.val_nll:
            self.step, self.val_nll = step, float(nll)
            self.state = {k: v.detach().cpu().clone() for k, v in stepper.adapter_state().items()}

    def record(self) -> dict[str, float]:
        return {"step": self.step, "val_nll": self.val_nll}


@dataclass
class TrainerState:
    """Everything a resumed loop needs besides the frozen base."""

    step: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scorer: Any
    hooks: Sequence[StepHook]
    stepper: Any = None
    best: BestAdapter | None = None

    def save(self, directory: str | Path, metrics: dict[str, float], primary: bool = True) -> None:
        """Write adapter (safetensors), optimizer / scheduler / hook state and step into `directory`.

        Every data-parallel rank calls it (DeepSpeed checkpoints and ZeRO-3 gathers are collective); only the
        `primary` rank writes the adapter and loop state.
        """
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.stepper.save(d)
        adapter = self.stepper.adapter_state()
        if not primary:
            return
        save_file({k: v.contiguous() for k, v in adapter.items()}, str(d / ADAPTER))
        torch.save({"stepper": self.stepper.state_dict(),
                    "hooks": [h.state_dict() for h in self.hooks], "cpu_rng": torch.get_rng_state()},
                   d / TRAINER_STATE)
        step_state: dict[str, Any] = {"step": self.step, "metrics": metrics}
        if self.best is not None and self.best.state is not None:
            save_file({k: v.contiguous() for k, v in self.best.state.items()}, str(d / BEST_ADAPTER))
            step_state["best"] = self.best.record()
        (d / STATE_JSON).write_text(json.dumps(step_state))

    def restore(self, directory: str | Path) -> None:
        """Load a checkpoint written by :meth:`save` (tensors only: `weights_only=True`)."""
        d = Path(directory)
        blob = read_trainer_state(d)
        if not self.stepper.load(d):
            set_lora_state(self.scorer.model, load_file(str(d / ADAPTER)))
        self.stepper.load_state_dict(blob["stepper"])
        if "cpu_rng" in blob:  # LoRA dropout masks continue as in an uninterrupted run
            torch.set_rng_state(blob["cpu_rng"])
        for hook, state in zip(self.hooks, blob["hooks"]):
            hook.load_state_dict(state)
        step_state = read_step_state(d)
        self.step = step_state["step"]
        if self.best is not None and "best" in step_state:
            self.best = BestAdapter(step_state["best"]["step"], step_state["best"]["val_nll"],
                                    load_file(str(d / BEST_ADAPTER)))


def _accumulate(state: TrainerState, train_ds, cfg: TrainConfig, ctx: LoopContext) -> float:
    """Forward/backward of the step's micro-batches; returns the mean micro-batch loss."""
    scorer, total = state.scorer, 0.0
    objective = training_objective(state.hooks)
    for micro in range(cfg.grad_accum):
        number = (state.step * cfg.grad_accum + micro) * ctx.world_size + ctx.rank
        batch = train_batch(train_ds, scorer.tokenizer, cfg.batch_size, scorer.max_length, ctx.seed, number)
        if objective:
            logits = objective.logits(scorer, batch)
            loss = F.cross_entropy(logits, batch["labels"].to(logits.device))
            loss = loss + objective.regulariser(scorer, state.step, len(train_ds))
        else:
            loss = scorer.training_loss(batch)
        state.stepper.backward(loss)
        total += loss.item() / cfg.grad_accum
    return total


def make_trainer_state(scorer, cfg: TrainConfig, hooks: Sequence[StepHook] = (),
                       use_gpu: bool = False) -> TrainerState:
    """Optimizer, schedule and the stepper of `cfg.strategy` (ddp: by hand; deepspeed: a ZeRO engine).

    The optimizer updates the LoRA parameters, or those of the hooks' :class:`TrainingObjective`."""
    objective = training_objective(hooks)
    if objective is not None and scorer.spec.kind == "generation":
        raise ValueError(f"{type(objective).__name__}: this family trains through the C answer logits; a "
                         "generation task trains plain LoRA members (ensemble, map, swag, multiswag, mc_dropout)")
    params = [p for _, p in (objective.trainable_parameters(scorer) if objective else scorer.lora_parameters())]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
    if cfg.strategy == "deepspeed":
        stepper = DeepSpeedStepper(scorer, optimizer, scheduler, cfg, use_gpu)
    else:
        stepper = TorchStepper(scorer, optimizer, scheduler, cfg)
    state = TrainerState(0, optimizer, scheduler, scorer, hooks, stepper, BestAdapter() if cfg.keep_best else None)
    for hook in hooks:  # e.g. SWAG: sets the SWA lr on the optimizer, reads the (gathered) adapter via the stepper
        if hasattr(hook, "bind"):
            hook.bind(state)
    return state


def progress_line(label: str, metrics: dict[str, float], steps: int, seconds_per_step: float, what: str = "") -> str:
    """A member's progress line: step, training loss, validation metrics of the step (if any), rate."""
    extra = "".join(f" {k} {v:.4f}" for k, v in metrics.items() if k.startswith("val_"))
    return (f"[{label}] step {metrics['step']}/{steps} loss {metrics['train_loss']:.4f}{extra} "
            f"({seconds_per_step:.2f} s/step{what})")


def is_due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def train_member(scorer, train_ds, val_ds, cfg: TrainConfig, ctx: LoopContext) -> dict[str, float]:
    """Train the scorer's adapter in place for `cfg.steps` optimizer steps; returns the final metrics.

    Resumes from `ctx.resume_dir` when given. Calls `ctx.on_checkpoint(step, metrics, state)` every
    `cfg.checkpoint_every` steps and at the end.
    """
    state = make_trainer_state(scorer, cfg, ctx.hooks, ctx.use_gpu)
    if ctx.resume_dir:
        state.restore(ctx.resume_dir)
        ctx.log(f"[{ctx.label}] resumed from step {state.step}")
    scorer.model.train()
    metrics: dict[str, float] = {}
    t0, log_every = time.time(), max(1, cfg.steps // 10)
    while state.step < cfg.steps:
        loss = _accumulate(state, train_ds, cfg, ctx)
        state.stepper.step()
        state.step += 1
        for hook in ctx.hooks:
            hook(state.step, scorer)
        metrics = {"step": state.step, "train_loss": loss, "lr": state.stepper.lr()}
        if is_due(state.step, cfg.eval_every, cfg.steps):
            metrics.update(validate(scorer, val_ds, cfg.batch_size))
            if state.best is not None:
                state.best.offer(state.step, metrics, state.stepper)
        ctx.history.append(metrics)
        if state.step % log_every == 0 or state.step == cfg.steps:
            ctx.log(progress_line(ctx.label, metrics, cfg.steps, (time.time() - t0) / max(1, len(ctx.history))))
        if ctx.on_checkpoint is not None and is_due(state.step, cfg.checkpoint_every, cfg.steps):
            ctx.on_checkpoint(state.step, metrics, state)
    scorer.model.eval()
    return metrics


def nan_safe(metrics: dict[str, float]) -> dict[str, float]:
    """Metrics with non-finite values dropped (JSON manifests are strict)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
