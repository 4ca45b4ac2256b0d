"""The coordinator: one Ray Train run per member, launched concurrently, gathered into a posterior artifact.

Ray Train is SPMD (its workers share one model), so K independent members are K TorchTrainer runs
(DESIGN rule 5). They are started together from driver threads; Ray schedules as many at once as the
cluster's resources allow and queues the rest. Finished members are kept under `<output.dir>/members/<i>/`,
so a resubmitted job skips them.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import load_file

from rayblora.config import ClusterConfig, Config
from rayblora.train.loop import ADAPTER, STATE_JSON
from rayblora.train.worker import member_seed, member_train_loop

RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}


class TrainingError(RuntimeError):
    """Too few members finished training."""


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


def ensure_ray(cluster: ClusterConfig) -> None:
    """Connect to the configured cluster, or start a local Ray in this process."""
    import ray

    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return
    address = cluster.address or os.environ.get("RAY_ADDRESS", "")
    if address:  # a running cluster (`ray job submit` sets RAY_ADDRESS for the driver); its env is its own
        ray.init(address=address)
    else:
        start_local_ray(cluster.num_cpus or None)


def start_local_ray(num_cpus: int | None) -> None:
    """Start a local Ray head whose workers know its address.

    Ray Train's placement-group cleaner polls the State API from inside the cluster; without it a Train run
    whose controller is killed (a Tune trial stopped by ASHA) leaks its workers' placement group and CPUs, and
    later trials wait forever. The State API needs the dashboard (bound to 127.0.0.1) and, when another local
    Ray runs on the machine (a notebook, a test session), `RAY_ADDRESS` in the workers' environment: without it
    they cannot tell which cluster is theirs. So the GCS port is chosen here and passed to every worker.
    """
    import socket

    import ray

    with socket.socket() as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    gcs_address = f"{ray.util.get_node_ip_address()}:{port}"
    previous = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True,
                 runtime_env={"env_vars": {"RAY_ADDRESS": gcs_address}})
    finally:
        if previous is None:
            os.environ.pop("RAY_GCS_SERVER_PORT")
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = previous


def config_digest(cfg: Config) -> str:
    """Digest of what determines a member's training (model, adapter, data, train)."""
    d = cfg.to_dict()
    keep = {k: d[k] for k in ("model", "adapter", "data", "train")}
    keep["posterior_method"] = d["posterior"]["method"]
    from rayblora.posteriors import get_posterior_class

    for section in get_posterior_class(cfg.posterior.method).training_sections:
        keep[section] = d[section]
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def _member_dir(cfg: Config, i: int) -> Path:
    return cfg.out_dir.resolve() / "members" / str(i)


def _load_finished(cfg: Config, i: int) -> MemberResult | None:
    """A member finished by an earlier submission of the same config, if any."""
    d = _member_dir(cfg, i)
    try:
        meta = json.loads((d / "member.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("config_digest") != config_digest(cfg):
        return None
    return MemberResult(i, meta["seed"], load_file(str(d / ADAPTER)), meta["metrics"], str(d))


def _keep_finished(cfg: Config, i: int, checkpoint_dir: str) -> MemberResult:
    """Copy a member's final checkpoint to `<out>/members/<i>/` (atomically) and load it."""
    import shutil

    final = _member_dir(cfg, i)
    tmp = final.with_name(f".{i}.tmp-{uuid.uuid4().hex}")
    shutil.copytree(checkpoint_dir, tmp)
    state = json.loads((tmp / STATE_JSON).read_text())
    meta = {"seed": member_seed(cfg, i), "metrics": state["metrics"], "config_digest": config_digest(cfg)}
    (tmp / "member.json").write_text(json.dumps(meta))
    from rayblora.artifact import replace_dir

    replace_dir(tmp, final)
    return MemberResult(i, meta["seed"], load_file(str(final / ADAPTER)), meta["metrics"], str(final))


def member_trainer(cfg: Config, i: int, run_tag: str, extra: dict[str, Any] | None = None,
                   callbacks: Sequence[Any] = ()):
    """The TorchTrainer of member `i`: its own seed, the configured scaling, storage and retries.

    `callbacks` are Ray Train run callbacks (e.g. the Tune sweep's relay of reported metrics to its trial)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage = cfg.cluster.storage_path or str(cfg.out_dir.resolve() / "ray_runs")
    return TorchTrainer(
        member_train_loop,
        train_loop_config={"config": cfg.to_dict(), "member": i, **(extra or {})},
        scaling_config=ScalingConfig(num_workers=cfg.cluster.workers_per_member, use_gpu=cfg.cluster.use_gpu,
                                     resources_per_worker={"CPU": cfg.cluster.cpus_per_worker}),
        run_config=RunConfig(name=f"{cfg.output.name}-member{i}-{run_tag}", storage_path=storage,
                             failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
                             callbacks=list(callbacks) or None),
    )


def _fit_member(cfg: Config, i: int, run_tag: str, extra: dict[str, Any],
                log: Callable[[str], None]) -> MemberResult | BaseException:
    t0 = time.time()
    try:
        result = member_trainer(cfg, i, run_tag, extra).fit()
        if result.checkpoint is None:
            raise TrainingError(f"member {i} finished without a checkpoint")
        with result.checkpoint.as_directory() as d:
            member = _keep_finished(cfg, i, d)
    except Exception as exc:  # one member failing must not stop the others
        log(f"[coordinator] member {i} failed after {time.time() - t0:.0f} s: {type(exc).__name__}: {exc}")
        return exc
    log(f"[coordinator] member {i} done in {time.time() - t0:.0f} s: {member.metrics}")
    return member


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


def run_members(cfg: Config, log: Callable[[str], None] = print,
                extra: dict[str, Any] | None = None) -> EnsembleOutcome:
    """Train `posterior.members` members as concurrent Ray Train runs; skip members already finished.

    A member whose run fails for good does not stop the others. Raises TrainingError (before anything is
    written besides the finished members' folders) if fewer than `posterior.min_members` (or, when that is 0,
    not all) members finish.
    """
    ensure_ray(cfg.cluster)
    k = cfg.posterior.members
    done = {i: m for i in range(k) if (m := _load_finished(cfg, i)) is not None}
    if done:
        log(f"[coordinator] reusing finished members {sorted(done)} from {cfg.out_dir / 'members'}")
    outcome = EnsembleOutcome(k, [], sorted(done), {})
    todo = [i for i in range(k) if i not in done]
    run_tag = config_digest(cfg)  # same config + output dir -> same run name -> Ray Train resumes it
    log(f"[coordinator] launching {len(todo)} member run(s) of {cfg.cluster.workers_per_member} worker(s) each")
    if todo:
        with ThreadPoolExecutor(max_workers=len(todo)) as pool:
            results = list(pool.map(lambda i: _fit_member(cfg, i, run_tag, extra or {}, log), todo))
        done.update({i: r for i, r in zip(todo, results) if isinstance(r, MemberResult)})
        outcome.failed = {i: _failure_reason(r) for i, r in zip(todo, results) if not isinstance(r, MemberResult)}
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
