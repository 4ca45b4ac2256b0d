"""Training one member from a run config, and the one in-process member runner (no Ray).

:func:`train_one_member` is the only place a member is built and trained from a Config: its seed, data, base
model + adapter, the family's training hooks and the pure-torch loop (:mod:`rayblora.train.loop`). The Ray Train
worker (:func:`rayblora.workflows.coordinator.member_train_loop`) and :func:`train_members_in_process` (rounds
with `--in-process`, benchmarks, tests) both call it, so a member trained either way is the same member.

Finished members are kept under `<output.dir>/members/<i>/` (the final checkpoint + `member.json` with the
config digest), so a resubmitted job reuses them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import load_file

from rayblora.config import Config, ConfigError
from rayblora.data.batches import check_options_fit, length_sorted_batches
from rayblora.data.sources import TaskData, bootstrap_rows, load_task_data
from rayblora.manifest import write_dir_atomic
from rayblora.model import set_lora_state
from rayblora.posteriors import Posterior
from rayblora.registry import get_posterior_class
from rayblora.scoring import AnswerScorer, build_scorer
from rayblora.train.checkpoint import ADAPTER, BEST_ADAPTER, read_step_state
from rayblora.train.loop import LoopContext, StepHook, TrainerState, nan_safe, train_member, training_objective
from rayblora.train.packed import PackedMember, train_packed
from rayblora.trunk import first_adapted_layer, trunk_dropout, trunk_dtype
from rayblora.trunk_cache import TrunkCache

MEMBER_JSON = "member.json"
Checkpoint = Callable[[int, dict[str, float], TrainerState], None]


def member_seed(cfg: Config, member: int) -> int:
    """Seed of member `member` (LoRA init and data order)."""
    return cfg.train.seed + 1000 * member


def make_hooks(cfg: Config, family: type[Posterior] | None = None) -> list[StepHook]:
    """Per-step hooks the posterior family needs during training (e.g. SWAG moment collection)."""
    return list((family or get_posterior_class(cfg.posterior.method)).training_hooks(cfg))


def _trunk_frozen(hooks: Sequence[StepHook]) -> bool:
    objective = training_objective(hooks)
    return objective is None or bool(getattr(objective, "keeps_trunk_frozen", False))


def trunk_cache_for(cfg: Config, scorer: AnswerScorer, log: Callable[[str], None] = print,
                    hooks: Sequence[StepHook] = ()) -> TrunkCache | None:
    """The trunk cache of `cfg`'s run for `scorer` (its file under `<output.dir>/trunk_cache/` read if valid), or
    None where it is off (`train.trunk_cache`), has nothing to share (an adapter on layer 0) or would not be
    exact: dropout in the frozen layers, a DeepSpeed member, a training objective that changes the frozen layers
    (hybrid_vi)."""
    start = first_adapted_layer(scorer.model)
    if not cfg.train.trunk_cache or start == 0:
        return None
    why = ("train.strategy=deepspeed" if cfg.train.strategy == "deepspeed" else
           "dropout in the frozen layers" if trunk_dropout(scorer.model, start) > 0 else
           "the family's training objective changes the frozen layers" if not _trunk_frozen(hooks) else "")
    if why:
        log(f"[trunk cache] off: {why}")
        return None
    cache = TrunkCache(scorer.fingerprint, start, trunk_dtype(scorer.model), cfg.out_dir.resolve() / "trunk_cache",
                       log)
    cache.load()
    return cache


def prepare_trunk_cache(cfg: Config, scorer: AnswerScorer, data: TaskData,
                        log: Callable[[str], None] = print) -> TrunkCache | None:
    """Fill the run's trunk cache for the training and validation splits (length-sorted batches) and write it,
    so that every member's workers read the frozen layers' output instead of computing it (None where off)."""
    cache = trunk_cache_for(cfg, scorer, log, make_hooks(cfg))
    if cache is None:
        return None
    scorer.use_trunk_cache(cache)
    for split in (data.train, data.validation):
        for batch in length_sorted_batches(split, scorer.tokenizer, cfg.train.batch_size, scorer.max_length):
            scorer.shared_trunk(batch)
    scorer.use_trunk_cache(None)
    cache.save()
    log(f"[train] {cache.summary()}")
    return cache


@dataclass
class TrainedMember:
    """A member trained in this process: its scorer (holding the trained adapter), seed, final metrics, the
    step hooks it ran (which carry what they collected) and the metrics of every step; the trunk cache it read is
    `scorer.trunk_cache` (None when off)."""

    scorer: AnswerScorer
    seed: int
    metrics: dict[str, float]
    hooks: list[StepHook]
    history: list[dict[str, float]]


def train_one_member(cfg: Config, member: int, *, data: TaskData | None = None,
                     family: type[Posterior] | None = None, log: Callable[[str], None] = print,
                     label: str | None = None, on_checkpoint: Checkpoint | None = None,
                     resume_dir: str | None = None, rank: int = 0, world_size: int = 1, device: str | None = None,
                     extra_hooks: Sequence[StepHook] = (), scorer: AnswerScorer | None = None,
                     trunk_cache: TrunkCache | None = None) -> TrainedMember:
    """Train member `member` of `cfg` with the pure-torch loop in this process and return it.

    `rank` / `world_size` place it in a data-parallel group (Ray Train workers); `device` overrides
    `model.device` (the GPU Ray Train assigned); `extra_hooks` run after the family's (tests' probes, timers);
    `scorer` trains that scorer's fresh adapter in place instead of building one with the member's seed
    (benchmarks that time the loop apart from the model load); `trunk_cache` is a cache to share with other
    members of this process (default: :func:`trunk_cache_for` the run).
    """
    data = data or load_task_data(cfg.data)
    scorer, ctx, rows = prepare_member(cfg, member, data, family=family, log=log, label=label,
                                       on_checkpoint=on_checkpoint, resume_dir=resume_dir, rank=rank,
                                       world_size=world_size, device=device, extra_hooks=extra_hooks, scorer=scorer,
                                       trunk_cache=trunk_cache)
    metrics = train_member(scorer, rows, data.validation, cfg.train, ctx)
    if scorer.trunk_cache is not None:
        log(f"[{ctx.label}] {scorer.trunk_cache.summary()}")
    return TrainedMember(scorer, ctx.seed, metrics, list(ctx.hooks), ctx.history)


def prepare_member(cfg: Config, member: int, data: TaskData, *, family: type[Posterior] | None = None,
                   log: Callable[[str], None] = print, label: str | None = None,
                   on_checkpoint: Checkpoint | None = None, resume_dir: str | None = None, rank: int = 0,
                   world_size: int = 1, device: str | None = None, extra_hooks: Sequence[StepHook] = (),
                   scorer: AnswerScorer | None = None, trunk_cache: TrunkCache | None = None,
                   ) -> tuple[AnswerScorer, LoopContext, Any]:
    """Everything member `member` needs before its first step (arguments as :func:`train_one_member`'s): its
    scorer with the seeded adapter and the trunk cache, its loop context (seed, hooks, callbacks) and its
    training rows. The CPU generator is left where the member's loop starts (its LoRA dropout stream)."""
    seed = member_seed(cfg, member)
    torch.manual_seed(seed)
    if scorer is None:
        model_cfg = dataclasses.replace(cfg.model, device=device) if device else cfg.model
        scorer = build_scorer(model_cfg, cfg.adapter, data.spec, cfg.data.max_length, seed=seed)
    check_options_fit({"train": data.train, "validation": data.validation, **data.eval_splits("test")},
                      scorer.tokenizer, scorer.max_length)
    hooks = make_hooks(cfg, family) + list(extra_hooks)
    scorer.use_trunk_cache(trunk_cache if trunk_cache is not None else trunk_cache_for(cfg, scorer, log, hooks))
    on_gpu = next(scorer.model.parameters()).device.type == "cuda"
    ctx = LoopContext(seed=seed, rank=rank, world_size=world_size, hooks=hooks, on_checkpoint=on_checkpoint,
                      log=log, label=label or f"{cfg.output.name} member {member}", resume_dir=resume_dir,
                      use_gpu=on_gpu)
    rows = bootstrap_rows(data.train, seed) if cfg.train.member_data == "bootstrap" else data.train
    return scorer, ctx, rows


@dataclass
class MemberResult:
    """A finished member: its adapter tensors, seed, final metrics and the directory of its last checkpoint."""

    index: int
    seed: int
    adapter: dict[str, torch.Tensor]
    metrics: dict[str, float]
    checkpoint_dir: str

    def info(self) -> dict[str, Any]:
        return {"index": self.index, "seed": self.seed, "metrics": self.metrics}


def config_digest(cfg: Config) -> str:
    """Digest of what determines a member's training (model, adapter, data, train, the family's sections)."""
    d = cfg.to_dict()
    keep = {k: d[k] for k in ("model", "adapter", "data", "train")}
    keep["posterior_method"] = d["posterior"]["method"]
    for section in get_posterior_class(cfg.posterior.method).training_sections:
        keep[section] = d[section]
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def member_dir(cfg: Config, i: int) -> Path:
    """`<output.dir>/members/<i>`: where member `i`'s final checkpoint is kept."""
    return cfg.out_dir.resolve() / "members" / str(i)


def load_finished(cfg: Config, i: int) -> MemberResult | None:
    """A member finished by an earlier submission of the same config, if any."""
    d = member_dir(cfg, i)
    try:
        meta = json.loads((d / MEMBER_JSON).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("config_digest") != config_digest(cfg):
        return None
    return MemberResult(i, meta["seed"], load_file(str(d / ADAPTER)), meta["metrics"], str(d))


def best_adapter(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """A finished member's lowest-validation-NLL adapter (`train.keep_best`), from its kept checkpoint."""
    path = Path(checkpoint_dir) / BEST_ADAPTER
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no early-stopped adapter; train with train.keep_best=true "
                                "and train.eval_every > 0")
    return load_file(str(path))


def early_stopped_adapters(cfg: Config) -> list[dict[str, torch.Tensor]]:
    """Each kept member's lowest-validation-NLL adapter (`train.keep_best`), in member order."""
    return [best_adapter(member_dir(cfg, i)) for i in range(cfg.posterior.members)]


def check_member_adapter(cfg: Config, family: type[Posterior]) -> None:
    """Refuse `posterior.member_adapter=best` where no early-stopped adapter is kept or the family collects its
    posterior along the trajectory (before any training)."""
    if cfg.posterior.member_adapter != "best":
        return
    if not cfg.train.keep_best:
        raise ConfigError("posterior.member_adapter: 'best' needs train.keep_best=true (and train.eval_every > 0)")
    if family.needs_checkpoints:
        raise ConfigError(f"posterior.member_adapter: 'best' does not apply to {family.method}, whose posterior "
                          "is collected along each member's trajectory; use 'final'")


def keep_finished(cfg: Config, i: int, checkpoint_dir: str | Path) -> MemberResult:
    """Copy a member's final checkpoint to `<out>/members/<i>/` (atomically) and load it."""
    final = member_dir(cfg, i)
    meta = {"seed": member_seed(cfg, i), "metrics": read_step_state(checkpoint_dir)["metrics"],
            "config_digest": config_digest(cfg)}

    def fill(tmp: Path) -> None:
        shutil.copytree(checkpoint_dir, tmp, dirs_exist_ok=True)
        (tmp / MEMBER_JSON).write_text(json.dumps(meta))

    write_dir_atomic(final, fill)
    return MemberResult(i, meta["seed"], load_file(str(final / ADAPTER)), meta["metrics"], str(final))


def train_members_in_process(cfg: Config, log: Callable[[str], None] = print, data: TaskData | None = None,
                             ) -> tuple[AnswerScorer, list[MemberResult]]:
    """Train the `posterior.members` members of `cfg` in this process (no Ray): one after another, or as one
    packed group where `cluster.member_runner` packs them (:func:`packs_members`).

    Each member's final checkpoint is kept under `<output.dir>/members/<i>/` as a Ray Train run keeps it.
    Returns the last member's scorer (to build the posterior on) and the finished members in index order."""
    data = data or load_task_data(cfg.data)
    family = get_posterior_class(cfg.posterior.method)
    indices = list(range(cfg.posterior.members))
    if packs_members(cfg, family):
        scorer, results = train_packed_group(cfg, indices, data, family, log)
    else:
        results, scorer = [], None
        for i in indices:
            with tempfile.TemporaryDirectory(prefix="rayblora-member-") as tmp:
                trained = train_one_member(cfg, i, data=data, family=family, log=log,
                                           on_checkpoint=_keep_last(cfg, tmp),
                                           trunk_cache=scorer.trunk_cache if scorer is not None else None)
                scorer = trained.scorer  # later members read the trunk cache member 0 filled
                results.append(keep_finished(cfg, i, tmp))
    if scorer.trunk_cache is not None:
        scorer.trunk_cache.save()  # evaluation's Laplace and temperature passes read the training / validation rows
    return scorer, results


def _keep_last(cfg: Config, directory: str) -> Checkpoint:
    """A checkpoint callback writing the member's final state into `directory`."""
    def keep_last(step: int, metrics: dict[str, float], state: TrainerState) -> None:
        if step == cfg.train.steps:
            state.save(directory, nan_safe(metrics))

    return keep_last


def packs_members(cfg: Config, family: type[Posterior]) -> bool:
    """Whether `cfg`'s members train in packed groups (:mod:`rayblora.train.packed`): `cluster.member_runner`
    packed, or auto wherever packing is exact — more than one member, plain LoRA training (no family objective, no
    DeepSpeed), one worker per member, LoRA dropout only on the CPU. Packed where it cannot be is refused."""
    runner = cfg.cluster.member_runner
    if runner == "separate" or cfg.posterior.members < 2:
        return False
    on_gpu = cfg.model.device != "cpu" or cfg.cluster.use_gpu
    why = ("the family trains an objective of its own" if training_objective(make_hooks(cfg, family)) else
           f"train.strategy={cfg.train.strategy}" if cfg.train.strategy != "ddp" else
           "data-parallel members (cluster.workers_per_member > 1)" if cfg.cluster.workers_per_member > 1 else
           "LoRA dropout off the CPU (its masks come from CPU generators)" if cfg.adapter.dropout > 0 and on_gpu
           else "")
    if runner == "packed" and why:
        raise ConfigError(f"cluster.member_runner: packed members cannot train here: {why}; use separate or auto")
    return not why


def train_packed_group(cfg: Config, indices: Sequence[int], data: TaskData, family: type[Posterior],
                       log: Callable[[str], None] = print) -> tuple[AnswerScorer, list[MemberResult]]:
    """Train members `indices` of `cfg` as one packed group in this process (:func:`pack_group`), each one's final
    checkpoint kept as a separate run keeps it. Returns the group's scorer and the members."""
    with contextlib.ExitStack() as stack:
        folders = {i: stack.enter_context(tempfile.TemporaryDirectory(prefix="rayblora-member-")) for i in indices}
        scorer, _ = pack_group(cfg, indices, data, family, log, lambda i: _keep_last(cfg, folders[i]))
        return scorer, [keep_finished(cfg, i, folders[i]) for i in indices]


def pack_group(cfg: Config, indices: Sequence[int], data: TaskData, family: type[Posterior],
               log: Callable[[str], None], on_checkpoint_for: Callable[[int], Checkpoint],
               resume_dirs: dict[int, str] | None = None, device: str | None = None,
               extra_hooks_for: Callable[[int], Sequence[StepHook]] = lambda _i: (),
               ) -> tuple[AnswerScorer, list[tuple[dict[str, torch.Tensor], dict[str, float]]]]:
    """Train members `indices` of `cfg` in one loop (:func:`rayblora.train.packed.train_packed`), prepared by
    :func:`prepare_packed`. Returns the group's scorer (holding the last member's adapter) and each member's final
    adapter and metrics."""
    scorer, members = prepare_packed(cfg, indices, data, family, log, on_checkpoint_for, resume_dirs, device,
                                     extra_hooks_for)
    log(f"[{cfg.output.name}] members {list(indices)} packed into one loop")
    finals = train_packed(scorer, members, data.validation, cfg.train)
    set_lora_state(scorer.model, finals[-1][0])
    return scorer, finals


def prepare_packed(cfg: Config, indices: Sequence[int], data: TaskData, family: type[Posterior],
                   log: Callable[[str], None], on_checkpoint_for: Callable[[int], Checkpoint | None] = lambda _i: None,
                   resume_dirs: dict[int, str] | None = None, device: str | None = None,
                   extra_hooks_for: Callable[[int], Sequence[StepHook]] = lambda _i: (),
                   ) -> tuple[AnswerScorer, list[PackedMember]]:
    """The group's scorer (the last member's, sharing the first's trunk cache) and members `indices` of `cfg`, each
    prepared as its separate run would be (:func:`prepare_member`: seed, initial adapter, rows, hooks, and the
    generator state its loop starts from), with its checkpoint callback `on_checkpoint_for(i)`, its checkpoint to
    resume from where given and its extra hooks."""
    members, scorer = [], None
    for i in indices:
        scorer, ctx, rows = prepare_member(cfg, i, data, family=family, log=log, on_checkpoint=on_checkpoint_for(i),
                                           resume_dir=(resume_dirs or {}).get(i), device=device,
                                           extra_hooks=extra_hooks_for(i),
                                           trunk_cache=scorer.trunk_cache if scorer is not None else None)
        members.append(PackedMember(ctx.seed, rows, scorer.adapter_state(), torch.get_rng_state(), ctx))
    return scorer, members
