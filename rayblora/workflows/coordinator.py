"""The coordinator: members as Ray Train runs, launched concurrently, gathered into a posterior's members.

Ray Train is SPMD (its workers share one model), so separate members are one TorchTrainer run each, and a packed
group (`cluster.member_runner`, :func:`~rayblora.workflows.members.packs_members`) is one run of one worker
training its members in one loop (docs/ARCHITECTURE.md, "members are independent members"). Runs go from driver
threads, as many at once as the cluster's resources hold side by side (:func:`member_slots`;
`cluster.max_concurrent_members` overrides it; packed members split into that many groups, :func:`run_groups`),
the next starting when one finishes: a run launched beyond that would only wait in Ray Train's worker-group
startup, which retries (and logs a traceback) every time its start timeout expires. A member's worker runs
:func:`member_train_loop` (through :func:`rayblora.workflows.members.train_one_member`), a group's
:func:`group_train_loop`; both report checkpoints (adapter, optimizer, scheduler, step, hook state; a group's hold
one folder per member) so a restarted worker resumes where the last one left off. Finished members are kept under
`<output.dir>/members/<i>/`, so a resubmitted job skips them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from rayblora.config import ClusterConfig, Config, ConfigError, config_from_dict
from rayblora.data import load_task_data
from rayblora.registry import get_posterior_class
from rayblora.train.faults import injected_hooks
from rayblora.train.loop import TrainerState, nan_safe
from rayblora.workflows.members import (MemberResult, config_digest, keep_finished, load_finished, pack_group,
                                        packs_members, train_one_member)
from rayblora.workflows.runtime import RAY_ENV, ensure_ray

__all__ = ["EnsembleOutcome", "GroupCheckpoints", "MemberResult", "RAY_ENV", "TrainingError", "config_digest",
           "ensure_ray", "group_train_loop", "group_trainer", "member_resources", "member_slots", "member_train_loop",
           "member_trainer", "run_groups", "run_members", "runs_that_fit", "train_members"]


class TrainingError(RuntimeError):
    """Too few members finished training."""


def _resume_dir() -> str | None:
    """A local copy of the checkpoint Ray Train restores this worker from, if any (the caller removes it)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    resume_dir = tempfile.mkdtemp(prefix="rayblora-resume-")
    with checkpoint.as_directory() as d:
        shutil.copytree(d, resume_dir, dirs_exist_ok=True)
    return resume_dir


def _worker_log(message: str) -> None:
    """One line per event from a Ray Train worker: Ray Train's print patch tees `print` to the worker's
    redirected stdout and also logs it, so the driver showed every progress line twice; the process's own stdout
    is forwarded once."""
    sys.__stdout__.write(message + "\n")
    sys.__stdout__.flush()


def worker_threads(torch_threads: int, cpus_per_worker: float, default: int) -> int:
    """torch threads of a member's Ray Train worker: `train.torch_threads` (0: `default`), at most the CPUs the
    worker holds (≥ 1). More threads than reserved CPUs oversubscribe the cores the scheduler gave to the other
    members' workers: on the 2-core CPU, two concurrent members of 2 threads each took 2.2 s per cached step where
    one thread each takes ~0.8 s."""
    return max(1, min(torch_threads or default, math.floor(cpus_per_worker) or 1))


def member_train_loop(config: dict[str, Any]) -> None:
    """`train_loop_per_worker` of one member run (called by Ray Train on every worker).

    Everything the worker needs travels in `config`: the run config as a dict and the member index (plus the
    fault-injection keys of :mod:`rayblora.train.faults` in tests)."""
    cfg = config_from_dict(config["config"])
    member = int(config["member"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    test_hooks = injected_hooks(config, member, rank, ray.get_runtime_context().get_node_id())  # tests only
    torch.set_num_threads(worker_threads(cfg.train.torch_threads, cfg.cluster.cpus_per_worker, torch.get_num_threads()))

    def on_checkpoint(step: int, metrics: dict[str, float], state: TrainerState) -> None:
        clean = nan_safe(metrics)
        with tempfile.TemporaryDirectory() as d:
            state.save(d, clean, primary=rank == 0)  # every rank: ZeRO shards and gathers are collective
            has_files = any(os.scandir(d))
            ray.train.report(clean, checkpoint=ray.train.Checkpoint.from_directory(d) if has_files else None)

    resume_dir = _resume_dir()
    device = str(ray.train.torch.get_device()) if cfg.cluster.use_gpu else None  # the GPU Ray Train assigned
    try:
        train_one_member(cfg, member, log=_worker_log, label=f"member {member} rank {rank}",
                         on_checkpoint=on_checkpoint, resume_dir=resume_dir, rank=rank, world_size=world,
                         device=device, extra_hooks=test_hooks)
    finally:
        if resume_dir:
            shutil.rmtree(resume_dir, ignore_errors=True)


class GroupCheckpoints:
    """A packed group's checkpoints on a Ray Train worker: each member writes its own at once (while its own
    generator state is current) into `member<i>/` of the step's folder, which is reported to Ray Train when the
    group's last member has written, so every reported checkpoint holds the whole group at one step."""

    def __init__(self, group: Sequence[int]):
        self.group, self.folder, self.metrics = list(group), None, {}

    def callback(self, i: int):
        def on_checkpoint(step: int, metrics: dict[str, float], state: TrainerState) -> None:
            self.folder = self.folder or tempfile.mkdtemp(prefix="rayblora-group-")
            clean = nan_safe(metrics)
            state.save(os.path.join(self.folder, f"member{i}"), clean)
            self.metrics.update({f"member{i}/{k}": v for k, v in clean.items()})
            if i == self.group[-1]:
                try:
                    ray.train.report({"step": step, **self.metrics},
                                     checkpoint=ray.train.Checkpoint.from_directory(self.folder))
                finally:
                    shutil.rmtree(self.folder, ignore_errors=True)
                    self.folder, self.metrics = None, {}

        return on_checkpoint


def group_train_loop(config: dict[str, Any]) -> None:
    """`train_loop_per_worker` of a packed group's run (one worker): the members `config["members"]` trained in
    one loop (:func:`rayblora.workflows.members.pack_group`); a restarted worker resumes every member from the
    group's last checkpoint."""
    cfg = config_from_dict(config["config"])
    group = [int(i) for i in config["members"]]
    node = ray.get_runtime_context().get_node_id()
    torch.set_num_threads(worker_threads(cfg.train.torch_threads, cfg.cluster.cpus_per_worker, torch.get_num_threads()))
    resume_dir = _resume_dir()
    resume = {i: os.path.join(resume_dir, f"member{i}") for i in group} if resume_dir else None
    device = str(ray.train.torch.get_device()) if cfg.cluster.use_gpu else None  # the GPU Ray Train assigned
    try:
        pack_group(cfg, group, load_task_data(cfg.data), get_posterior_class(cfg.posterior.method), _worker_log,
                   GroupCheckpoints(group).callback, resume, device,
                   extra_hooks_for=lambda i: injected_hooks(config, i, 0, node))  # tests only
    finally:
        if resume_dir:
            shutil.rmtree(resume_dir, ignore_errors=True)


def member_trainer(cfg: Config, i: int, run_tag: str, extra: dict[str, Any] | None = None,
                   callbacks: Sequence[Any] = ()):
    """The TorchTrainer of member `i`: its own seed, the configured scaling, storage and retries.

    `callbacks` are Ray Train run callbacks (e.g. the Tune sweep's relay of reported metrics to its trial)."""
    return _trainer(cfg, member_train_loop, {"member": i, **(extra or {})}, f"member{i}-{run_tag}",
                    cfg.cluster.workers_per_member, callbacks)


def group_trainer(cfg: Config, group: Sequence[int], run_tag: str, extra: dict[str, Any] | None = None):
    """The TorchTrainer of a packed group of members (one worker, :func:`group_train_loop`)."""
    return _trainer(cfg, group_train_loop, {"members": list(group), **(extra or {})},
                    f"members{'-'.join(map(str, group))}-{run_tag}", 1)


def _trainer(cfg: Config, loop, loop_config: dict[str, Any], name: str, workers: int, callbacks: Sequence[Any] = ()):
    storage = cfg.cluster.storage_path or str(cfg.out_dir.resolve() / "ray_runs")
    absolute = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, dir=str(cfg.out_dir.resolve())))
    return TorchTrainer(
        loop,  # output.dir made absolute: workers find the run's trunk cache whatever their cwd
        train_loop_config={"config": absolute.to_dict(), **loop_config},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=cfg.cluster.use_gpu,
                                     resources_per_worker={"CPU": cfg.cluster.cpus_per_worker}),
        run_config=RunConfig(name=f"{cfg.output.name}-{name}", storage_path=storage,
                             failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
                             callbacks=list(callbacks) or None),
    )


def member_resources(cluster: ClusterConfig, driver: Mapping[str, float] | None = None) -> dict[str, float]:
    """The Ray resources one member run holds: its workers' CPUs, one GPU per worker with `cluster.use_gpu`,
    plus `driver`'s (e.g. a Tune trial's own, which drives the run)."""
    need = {"CPU": float(cluster.workers_per_member * cluster.cpus_per_worker)}
    if cluster.use_gpu:
        need["GPU"] = float(cluster.workers_per_member)
    for key, amount in (driver or {}).items():
        need[key] = need.get(key, 0.0) + amount
    return need


def runs_that_fit(need: Mapping[str, float], resources: Mapping[str, float]) -> int:
    """How many runs that each hold `need` fit side by side in `resources` (a resource absent there counts as 0;
    a quotient a rounding error short of a whole number counts as that number)."""
    return min(int(resources.get(key, 0.0) / amount + 1e-6) for key, amount in need.items())


def member_slots(cluster: ClusterConfig, total: Mapping[str, float]) -> int:
    """Member runs to keep in flight at once on a cluster whose resources are `total` (`ray.cluster_resources()`).

    `cluster.max_concurrent_members` when set; else as many as `total` holds side by side, so that no run waits
    for a placement while the others train. Raises ConfigError when not even one member run fits (Ray Train would
    wait for it forever)."""
    if cluster.max_concurrent_members:
        return cluster.max_concurrent_members
    need = member_resources(cluster)
    slots = runs_that_fit(need, total)
    if slots < 1:
        raise ConfigError(f"cluster: one member run needs {need} but the whole cluster has "
                          f"{ {k: total.get(k, 0.0) for k in need} }; lower cluster.workers_per_member / "
                          "cpus_per_worker, add nodes, or, on a cluster that autoscales, set "
                          "cluster.max_concurrent_members")
    return slots


def _fit_run(cfg: Config, group: Sequence[int], packed: bool, run_tag: str, extra: dict[str, Any],
             log: Callable[[str], None], queued: bool = False) -> list[MemberResult | BaseException]:
    """One Ray Train run to its members' kept folders: member `group[0]` alone, or a packed group; per member its
    :class:`MemberResult` or the exception the run failed with for good."""
    what = f"members {list(group)} (packed)" if packed else f"member {group[0]}"
    if queued:
        log(f"[coordinator] {what} starting: a run slot is free")
    t0 = time.time()
    try:
        trainer = group_trainer(cfg, group, run_tag, extra) if packed else member_trainer(cfg, group[0], run_tag,
                                                                                          extra)
        result = trainer.fit()
        if result.checkpoint is None:
            raise TrainingError(f"{what} finished without a checkpoint")
        with result.checkpoint.as_directory() as d:
            members = [keep_finished(cfg, i, os.path.join(d, f"member{i}") if packed else d) for i in group]
    except Exception as exc:  # one run failing must not stop the others
        log(f"[coordinator] {what} failed after {time.time() - t0:.0f} s: {type(exc).__name__}: {exc}")
        return [exc] * len(group)
    for member in members:
        log(f"[coordinator] member {member.index} done in {time.time() - t0:.0f} s: {member.metrics}")
    return members


def run_groups(todo: Sequence[int], slots: int, packed: bool) -> list[list[int]]:
    """The runs that train members `todo`: one per member, or (packed) `slots` groups of consecutive members,
    as even as they divide, so every run slot holds one group."""
    if not packed:
        return [[i] for i in todo]
    count = max(1, min(slots, len(todo)))
    size, extra = divmod(len(todo), count)
    starts = [g * size + min(g, extra) for g in range(count + 1)]
    return [list(todo[a:b]) for a, b in zip(starts, starts[1:])]


@dataclass
class EnsembleOutcome:
    """What became of the members one submission asked for.

    `members` are the finished ones in index order (including those `reused` from an earlier submission of
    the same config); `failed` gives, per member that failed for good (Ray Train's retries spent), why.
    """

    requested: int
    members: list[MemberResult]
    reused: list[int]
    failed: dict[int, str]

    def summary(self) -> dict[str, Any]:
        """The manifest's record (JSON): which members were requested, finished, reused and failed."""
        return {"members_requested": list(range(self.requested)),
                "members_finished": [m.index for m in self.members], "members_reused": self.reused,
                "members_failed": {str(i): why for i, why in sorted(self.failed.items())},
                "partial": bool(self.failed)}


def _failure_reason(exc: BaseException) -> str:
    """One line naming a member's failure: for a Ray Train worker-group failure, the lowest failed rank's error
    (the last line of its traceback, which names the exception); otherwise the error's first line."""
    workers = getattr(exc, "worker_failures", None) or {}
    if workers:
        rank, error = min(workers.items())
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        return f"{type(exc).__name__} at rank {rank}: {type(error).__name__}: {lines[-1] if lines else ''}"[:300]
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def _launch_line(cluster: ClusterConfig, total: Mapping[str, float], groups: Sequence[Sequence[int]], slots: int,
                 packed: bool = False) -> str:
    """The coordinator's launch line: how many runs, of which members, how many at once and which wait."""
    if packed:
        line = (f"[coordinator] launching {len(groups)} packed run(s) of one worker each, members "
                f"{' | '.join(map(str, map(list, groups)))}")
    else:
        line = f"[coordinator] launching {len(groups)} member run(s) of {cluster.workers_per_member} worker(s) each"
    if slots >= len(groups):
        return line
    need = member_resources(cluster)
    why = (f"cluster.max_concurrent_members = {slots}" if cluster.max_concurrent_members else
           f"the cluster's { {k: total.get(k, 0.0) for k in need} } hold {slots} run(s) of {need}")
    waiting = [i for g in groups[slots:] for i in g]
    return f"{line}, {slots} at a time ({why}); members {waiting} wait for a free slot"


def _fit_members(cfg: Config, todo: Sequence[int], extra: dict[str, Any],
                 log: Callable[[str], None]) -> list[MemberResult | BaseException]:
    """Run the members `todo` from driver threads, at most :func:`member_slots` runs at once, started in index
    order — one run per member, or packed groups (:func:`run_groups`) where
    :func:`~rayblora.workflows.members.packs_members`; each member's :class:`MemberResult` or the exception it
    failed with, in the order of `todo`."""
    run_tag = config_digest(cfg)  # same config + output dir -> same run name -> Ray Train resumes it
    total = ray.cluster_resources()
    slots = member_slots(cfg.cluster, total)
    packed = packs_members(cfg, get_posterior_class(cfg.posterior.method))
    groups = run_groups(todo, slots, packed)
    slots = min(len(groups), slots)
    log(_launch_line(cfg.cluster, total, groups, slots, packed))
    with ThreadPoolExecutor(max_workers=slots) as pool:  # the next run starts when a thread is free
        runs = list(pool.map(lambda g: _fit_run(cfg, g[1], packed, run_tag, extra, log, g[0] >= slots),
                             enumerate(groups)))
    return [result for run in runs for result in run]


def run_members(cfg: Config, log: Callable[[str], None] = print,
                extra: dict[str, Any] | None = None) -> EnsembleOutcome:
    """Train `posterior.members` members as Ray Train runs, as many at once as the cluster holds
    (:func:`member_slots`); skip members already finished.

    A member whose run fails for good does not stop the others. Raises ConfigError before any run when not even
    one member run fits the cluster, and TrainingError (before anything is written besides the finished members'
    folders) if fewer than `posterior.min_members` (or, when that is 0, not all) members finish.
    """
    ensure_ray(cfg.cluster)
    k = cfg.posterior.members
    done = {i: m for i in range(k) if (m := load_finished(cfg, i)) is not None}
    if done:
        log(f"[coordinator] reusing finished members {sorted(done)} from {cfg.out_dir / 'members'}")
    outcome = EnsembleOutcome(k, [], sorted(done), {})
    todo = [i for i in range(k) if i not in done]
    if todo:
        results = _fit_members(cfg, todo, extra or {}, log)
        done.update({i: r for i, r in zip(todo, results) if isinstance(r, MemberResult)})
        outcome.failed = {i: _failure_reason(r) for i, r in zip(todo, results) if not isinstance(r, MemberResult)}
    else:
        log(_launch_line(cfg.cluster, {}, [], 0))
    outcome.members = [done[i] for i in sorted(done)]
    need = cfg.posterior.min_members or k
    if len(done) < need:
        why = "; ".join(f"member {i}: {r}" for i, r in sorted(outcome.failed.items()))
        raise TrainingError(f"only {len(done)} of {k} members finished ({why}); posterior.min_members requires "
                            f"{need}. No posterior was written; the finished members are kept under "
                            f"{cfg.out_dir / 'members'} and reused when the same job is submitted again.")
    if outcome.failed:
        log(f"[coordinator] building the posterior from the {len(done)} surviving member(s) {sorted(done)}; "
            f"failed for good: {sorted(outcome.failed)}")
    return outcome


def train_members(cfg: Config, log: Callable[[str], None] = print,
                  extra: dict[str, Any] | None = None) -> list[MemberResult]:
    """The finished members of :func:`run_members`, in index order."""
    return run_members(cfg, log, extra).members
