"""Driver of the node-loss test; runs in its own process because it starts its own two-node Ray.

    python tests/node_loss_driver.py RESULT.json PROBE_DIR [dotted overrides ...]

A simulated cluster (`ray.cluster_utils.Cluster`): a head with no CPUs (it holds only the driver-side Ray Train
controllers) and two worker nodes of 2 CPUs. The configured members train there; member 0 pauses after step 6
(`rayblora.train.faults`), the node it runs on is removed, and the ensemble must finish on the remaining node.
Writes RESULT.json: the removed and remaining node ids, the finished / failed members.
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PAUSE_STEP = 6
# fast node-death detection (defaults take ~15 s): GCS health checks every 0.5 s, dead after 3 misses
HEAD_SYSTEM_CONFIG = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}


def run_dir(cfg, member: int | str) -> Path:
    """Ray Train's storage directory of member `member`'s run, or of the packed group run named `member` (e.g.
    "members0-1"; see `rayblora.workflows.coordinator.member_trainer` / `group_trainer`)."""
    from rayblora.workflows.members import config_digest

    name = f"member{member}" if isinstance(member, int) else member
    return cfg.out_dir / "ray_runs" / f"{cfg.output.name}-{name}-{config_digest(cfg)}"


def wait_for_checkpoint(cfg, member: int | str, step: int, timeout_s: float = 60) -> None:
    """Until Ray Train's controller has recorded the checkpoint of `step` of member `member`'s run (or of the
    group run so named) as the latest in its snapshot (the one a restarted worker resumes from), so that a kill
    lands after it."""
    snapshot = run_dir(cfg, member) / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if snapshot.exists():
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
            if latest.get("metrics", {}).get("step") == step:
                return
        time.sleep(0.2)
    raise TimeoutError(f"member {member}'s checkpoint of step {step} was not registered in {snapshot}")


def run(result_path: Path, probe_dir: Path, overrides: list[str]) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from rayblora.config import load_config
    from rayblora.workflows.coordinator import RAY_ENV, run_members
    from rayblora.train.faults import wait_for_pause

    for key, value in RAY_ENV.items():  # before the nodes start: their processes inherit it
        os.environ.setdefault(key, value)
    cfg = load_config(None, overrides)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": HEAD_SYSTEM_CONFIG})
    pool = ThreadPoolExecutor(1)
    try:
        workers = {node.node_id: node for node in (cluster.add_node(num_cpus=2) for _ in range(2))}
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        extra = {"probe_dir": str(probe_dir), "pause_member": 0, "pause_step": PAUSE_STEP, "pause_timeout_s": 120}
        job = pool.submit(run_members, cfg, print, extra)
        paused = wait_for_pause(probe_dir, 0, gave_up=job.done)
        wait_for_checkpoint(cfg, 0, cfg.train.checkpoint_every)
        cluster.remove_node(workers[paused["node"]], allow_graceful=False)
        print(f"[node-loss] removed node {paused['node']} running member 0 (pid {paused['pid']})", flush=True)
        outcome = job.result(timeout=600)
        result = {"removed": paused["node"], "remaining": [n for n in workers if n != paused["node"]],
                  "paused": paused, "finished": [m.index for m in outcome.members], "failed": outcome.failed}
        result_path.write_text(json.dumps(result))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    run(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
