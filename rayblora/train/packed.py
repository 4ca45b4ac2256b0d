"""Packed members: K LoRA members of one run trained by one batched forward / backward over the shared frozen base.

Every step stacks the K members' micro-batches (rows member-major: block k is member k's own batch, left-padded to
the longest) and runs them through one forward in which each LoRA Linear applies member k's factors to block k
(:func:`rayblora.batched.stacked_factors`, trainable here: A (K, r, d_in), B (K, d_out, r)), so each frozen
projection runs one K-times-larger GEMM instead of K small ones (the idea of multi-LoRA training on one base,
ASPEN / mLoRA, arXiv 2312.02515). The loss is the sum of the members' own mean losses, so member k's gradient is
exactly that of its own run; AdamW and the schedule act elementwise, so one optimizer over the stacked factors is
K optimizers. Each member keeps what makes it a member:

* its seed, initialisation, training rows (all, or its bootstrap resample) and batch order;
* its LoRA dropout masks: drawn over its own rows and its own (unpadded) positions from its own generator state,
  which continues its own run's stream (:class:`MemberDropout`);
* its step hooks (SWAG moments), validation, early-stopped adapter and checkpoints, which see only its slice
  (:class:`MemberStepper`), in the format a separate run writes; a group resumes from its members' checkpoints
  (each continuing its own generator stream), so a killed group loses no finished checkpoint.

So a packed group equals K separate runs of :func:`rayblora.train.loop.train_member` to float rounding (tested).
Families with a training objective of their own (BLoB, the hybrid adapter) and DeepSpeed members run separately.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from safetensors.torch import load_file
from torch import nn

from rayblora.batched import plain_lora_adapter, lora_linear_layers, stacked_factors
from rayblora.config import TrainConfig
from rayblora.data.batches import train_batch
from rayblora.model import set_lora_state
from rayblora.train.checkpoint import ADAPTER, BEST_ADAPTER, read_step_state, read_trainer_state
from rayblora.train.loop import (BestAdapter, LoopContext, TrainerState, is_due, lr_factor, progress_line,
                                 training_objective, validate)

AdapterState = dict[str, torch.Tensor]
PAD_FILL = {"input_ids": None, "attention_mask": 0, "segments": 0, "target_mask": 0}
"""How each (B, T) batch tensor is left-padded when members' batches are stacked (None: the row's own first
token; padded positions are masked out of attention and never read)."""


@dataclass
class PackedMember:
    """One member of a packed group: its seed (batch order), training rows, initial adapter, the CPU generator
    state its own run's loop would start from, and its loop context (hooks, checkpoint callback, log label)."""

    seed: int
    train_rows: Any
    init: AdapterState
    rng_state: torch.Tensor
    ctx: LoopContext


class StackedLora:
    """The K members' LoRA factors as trainable stacked parameters: per LoRA Linear layer `name`, A (K, r, d_in)
    and B (K, d_out, r), in the model's LoRA parameter order (that of a single member's optimizer)."""

    def __init__(self, model: nn.Module, inits: Sequence[AdapterState]):
        self.layers = lora_linear_layers(model)
        self.factors: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
        for name, layer in self.layers.items():
            weight = layer.lora_A[plain_lora_adapter(layer)].weight
            self.factors[name] = tuple(nn.Parameter(torch.stack([s[f"{name}.lora_{f}.weight"] for s in inits])
                                                    .to(weight.device, weight.dtype)) for f in ("A", "B"))

    def parameters(self) -> list[nn.Parameter]:
        return [p for pair in self.factors.values() for p in pair]

    def member_state(self, k: int) -> AdapterState:
        """Member k's adapter tensors (PEFT saved-file naming, detached CPU copies)."""
        return {f"{name}.lora_{f}.weight": p[k].detach().to("cpu").clone()
                for name, pair in self.factors.items() for f, p in zip(("A", "B"), pair)}


class MemberDropout:
    """LoRA dropout of member-major row blocks, each drawn from its member's own generator state over its own
    positions (the last `own_lengths[k]` of the padded length), exactly the masks its separate run draws; the
    caller's generator state is left as it was. Called as `dropout(module, x)` by the stacked LoRA forward."""

    def __init__(self, rng_states: Sequence[torch.Tensor]):
        self.rng_states = list(rng_states)
        self.own_lengths: list[int] = []

    def __call__(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not (isinstance(module, nn.Dropout) and module.training and module.p > 0):
            return module(x)
        if x.device.type != "cpu":
            raise NotImplementedError("packed members' LoRA dropout draws from CPU generators; train on the CPU "
                                      "or with adapter.dropout=0")
        length, rows, blocks = x.shape[1], x.shape[0] // len(self.rng_states), []
        for k, own in enumerate(self.own_lengths):
            block = x[k * rows:(k + 1) * rows]
            with self.stream(k):
                dropped = module(block[:, length - own:])
            blocks.append(torch.cat([block[:, :length - own], dropped], 1))
        return torch.cat(blocks)

    @contextmanager
    def stream(self, k: int) -> Iterator[None]:
        """Within the block the CPU generator is member k's (what it draws advances member k's stream); the
        caller's state is put back on exit."""
        outer = torch.get_rng_state()
        torch.set_rng_state(self.rng_states[k])
        try:
            yield
        finally:
            self.rng_states[k] = torch.get_rng_state()
            torch.set_rng_state(outer)


def stack_batches(batches: Sequence[dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The members' batches as one member-major batch, each left-padded to the longest; and each one's own
    length T_k (its positions are the last T_k of the stacked batch)."""
    width = max(b["input_ids"].shape[1] for b in batches)
    out: dict[str, torch.Tensor] = {}
    for key in batches[0]:
        parts = []
        for b in batches:
            t = b[key]
            if t.dim() == 2 and key in PAD_FILL and t.shape[1] < width:
                fill = t[:, :1] if PAD_FILL[key] is None else torch.full_like(t[:, :1], PAD_FILL[key])
                t = torch.cat([fill.expand(-1, width - t.shape[1]), t], 1)
            parts.append(t)
        out[key] = torch.cat(parts)
    return out, [b["input_ids"].shape[1] for b in batches]


class MemberStepper:
    """Member k's view of the packed optimizer, as a separate run's stepper: its adapter slice, the optimizer
    state of its slice in a single member's format, the shared schedule (the members' lr is one schedule)."""

    def __init__(self, stacked: StackedLora, k: int, optimizer: torch.optim.Optimizer, scheduler):
        self.stacked, self.k, self.optimizer, self.scheduler = stacked, k, optimizer, scheduler

    def adapter_state(self) -> AdapterState:
        return self.stacked.member_state(self.k)

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def state_dict(self) -> dict[str, Any]:
        full = self.optimizer.state_dict()
        state = {i: {name: (v[self.k].clone() if torch.is_tensor(v) and v.dim() > 0 else v)
                     for name, v in s.items()} for i, s in full["state"].items()}
        return {"optimizer": {"state": state, "param_groups": full["param_groups"]},
                "scheduler": self.scheduler.state_dict()}

    def save(self, directory) -> None:
        """Nothing beyond what TrainerState writes."""

    def load(self, directory) -> bool:
        return False


@dataclass
class PackedRun:
    """The state of a packed group's loop: the stacked factors, one optimizer and schedule, each member's view
    (a :class:`~rayblora.train.loop.TrainerState` whose stepper is its :class:`MemberStepper`) and its dropout."""

    stacked: StackedLora
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    views: list[TrainerState]
    dropout: MemberDropout
    step: int = 0
    started: float = field(default_factory=time.time)
    first_step: int = 0
    """The step this loop started from (0, or where it resumed): the rate counts the steps run here."""
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    """Each member's metrics of the last step."""


def _packed_run(scorer, members: Sequence[PackedMember], cfg: TrainConfig) -> PackedRun:
    stacked = StackedLora(scorer.model, [m.init for m in members])
    optimizer = torch.optim.AdamW(stacked.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
    views = []
    for k, m in enumerate(members):
        view = TrainerState(0, optimizer, scheduler, scorer, m.ctx.hooks, MemberStepper(stacked, k, optimizer,
                                                                                        scheduler),
                            BestAdapter() if cfg.keep_best else None)
        for hook in m.ctx.hooks:  # SWAG: the (shared, equal) SWA lr on the optimizer; snapshots of its own slice
            if hasattr(hook, "bind"):
                hook.bind(view)
        views.append(view)
    return PackedRun(stacked, optimizer, scheduler, views, MemberDropout([m.rng_state for m in members]))


def _accumulate(run: PackedRun, scorer, members: Sequence[PackedMember], cfg: TrainConfig) -> list[float]:
    """Forward / backward of one step's micro-batches of every member; each member's mean micro-batch loss."""
    totals = [0.0] * len(members)
    for micro in range(cfg.grad_accum):
        number = run.step * cfg.grad_accum + micro
        batch, run.dropout.own_lengths = stack_batches(
            [train_batch(m.train_rows, scorer.tokenizer, cfg.batch_size, scorer.max_length, m.seed, number)
             for m in members])
        with stacked_factors(scorer.model, run.stacked.factors, run.dropout):
            losses = scorer.row_losses(batch).reshape(len(members), -1).mean(1)  # (K,)
        (losses.sum() / cfg.grad_accum).backward()
        totals = [t + v / cfg.grad_accum for t, v in zip(totals, losses.tolist())]
    return totals


def _after_step(run: PackedRun, scorer, members: Sequence[PackedMember], val_ds, cfg: TrainConfig,
                losses: list[float]) -> None:
    """Each member's hooks, validation (its adapter loaded into the model), log line and checkpoint callback."""
    log_every = max(1, cfg.steps // 10)
    for k, (m, view) in enumerate(zip(members, run.views)):
        view.step = run.step
        for hook in m.ctx.hooks:
            hook(run.step, scorer)
        metrics = {"step": run.step, "train_loss": losses[k], "lr": view.stepper.lr()}
        if is_due(run.step, cfg.eval_every, cfg.steps):
            set_lora_state(scorer.model, view.stepper.adapter_state())
            metrics.update(validate(scorer, val_ds, cfg.batch_size))
            if view.best is not None:
                view.best.offer(run.step, metrics, view.stepper)
        m.ctx.history.append(metrics)
        if run.step % log_every == 0 or run.step == cfg.steps:
            rate = (time.time() - run.started) / (run.step - run.first_step)
            m.ctx.log(progress_line(m.ctx.label, metrics, cfg.steps, rate, f" for {len(members)} packed"))
        if m.ctx.on_checkpoint is not None and is_due(run.step, cfg.checkpoint_every, cfg.steps):
            with run.dropout.stream(k):  # the checkpoint keeps the member's own stream
                m.ctx.on_checkpoint(run.step, metrics, view)
        run.metrics[k] = metrics


def check_packable(members: Sequence[PackedMember], cfg: TrainConfig) -> None:
    """Refuse what a packed group cannot train exactly as separate runs (ValueError naming it)."""
    if cfg.strategy != "ddp":
        raise ValueError(f"packed members: train.strategy={cfg.strategy!r}; a DeepSpeed member runs on its own")
    if any(training_objective(m.ctx.hooks) is not None for m in members):
        raise ValueError("packed members: the family trains an objective of its own; its members run separately")
    if any(m.ctx.world_size != 1 for m in members):
        raise ValueError("packed members: a group trains in one process (one worker)")
    if len({bool(m.ctx.resume_dir) for m in members}) > 1:
        raise ValueError("packed members: a group resumes together, from one checkpoint per member")


def _stack_optimizer_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The packed optimizer's state dict from each member's (a separate run's format): per-parameter tensors
    stacked along a new member axis, scalars (AdamW's step) taken from the first."""
    stacked = {i: {name: torch.stack([s["state"][i][name] for s in states])
                   if torch.is_tensor(v) and v.dim() > 0 else v for name, v in first.items()}
               for i, first in states[0]["state"].items()}
    return {"state": stacked, "param_groups": states[0]["param_groups"]}


def _restore(run: PackedRun, members: Sequence[PackedMember]) -> None:
    """Continue every member from its checkpoint (`ctx.resume_dir`, written by a packed or a separate run): its
    adapter slice, optimizer slice, the schedule, its hooks, its generator state and its early-stopped adapter;
    all at one step."""
    dirs = [Path(m.ctx.resume_dir) for m in members]
    steps = [read_step_state(d) for d in dirs]
    if len({s["step"] for s in steps}) != 1:
        raise ValueError(f"packed members: their checkpoints are at steps {[s['step'] for s in steps]}; a group "
                         "resumes from one step")
    blobs = [read_trainer_state(d) for d in dirs]
    adapters = [load_file(str(d / ADAPTER)) for d in dirs]
    with torch.no_grad():
        for name, pair in run.stacked.factors.items():
            for f, param in zip(("A", "B"), pair):
                param.copy_(torch.stack([a[f"{name}.lora_{f}.weight"] for a in adapters]))
    run.optimizer.load_state_dict(_stack_optimizer_states([b["stepper"]["optimizer"] for b in blobs]))
    run.scheduler.load_state_dict(blobs[0]["stepper"]["scheduler"])
    run.step = steps[0]["step"]
    for k, (m, view, blob, step_state) in enumerate(zip(members, run.views, blobs, steps)):
        for hook, state in zip(m.ctx.hooks, blob["hooks"]):
            hook.load_state_dict(state)
        run.dropout.rng_states[k] = blob["cpu_rng"]
        view.step = run.step
        if view.best is not None and "best" in step_state:
            view.best = BestAdapter(step_state["best"]["step"], step_state["best"]["val_nll"],
                                    load_file(str(dirs[k] / BEST_ADAPTER)))
        m.ctx.log(f"[{m.ctx.label}] resumed from step {run.step} (packed)")


def train_packed(scorer, members: Sequence[PackedMember], val_ds,
                 cfg: TrainConfig) -> list[tuple[AdapterState, dict[str, float]]]:
    """Train the members of a packed group for `cfg.steps` steps over `scorer`'s frozen base (its own adapter
    serves validation only); each member's context gets its history, log lines and checkpoints as in
    :func:`rayblora.train.loop.train_member`. Returns each member's final adapter and final metrics."""
    check_packable(members, cfg)
    run = _packed_run(scorer, members, cfg)
    if members[0].ctx.resume_dir:
        _restore(run, members)
        run.first_step = run.step
    scorer.model.train()
    while run.step < cfg.steps:
        losses = _accumulate(run, scorer, members, cfg)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=False)
        run.step += 1
        _after_step(run, scorer, members, val_ds, cfg, losses)
    scorer.model.eval()
    return [(run.stacked.member_state(k), run.metrics.get(k, {})) for k in range(len(members))]
