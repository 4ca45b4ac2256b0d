"""How many member runs the coordinator keeps in flight (`member_slots`): as many as the cluster's resources hold
side by side, so none waits in Ray Train's worker-group startup; an explicit `cluster.max_concurrent_members`
wins; a member run no cluster of this size can hold is refused before any run; packed members split into one
group per run slot. Pure logic, no Ray started."""

from __future__ import annotations

from pathlib import Path

import pytest

from rayblora.config import ClusterConfig, ConfigError, load_config
from rayblora.workflows.coordinator import member_resources, member_slots, runs_that_fit

ROOT = Path(__file__).resolve().parents[1]


def test_demo_cluster_runs_two_members_at_a_time():
    """`make demo`: K = 4 members of one 1-CPU worker on a 2-CPU local Ray -> 2 in flight, 2 queued."""
    demo = load_config(ROOT / "jobs" / "configs" / "demo.yaml", []).cluster
    assert member_resources(demo) == {"CPU": 1.0}
    assert member_slots(demo, {"CPU": 2.0, "memory": 8e9, "node:__internal_head__": 1.0}) == 2


@pytest.mark.parametrize("cluster, total, slots", [
    (ClusterConfig(cpus_per_worker=1), {"CPU": 3.0}, 3),
    (ClusterConfig(workers_per_member=2, cpus_per_worker=0.5), {"CPU": 4.0}, 4),
    (ClusterConfig(cpus_per_worker=1.5), {"CPU": 4.0}, 2),  # whole runs only
    (ClusterConfig(workers_per_member=3, cpus_per_worker=0.1), {"CPU": 0.9}, 3),  # 0.1 * 3 = 0.30000000000000004
    (ClusterConfig(workers_per_member=2, cpus_per_worker=4, use_gpu=True), {"CPU": 64.0, "GPU": 4.0}, 2),
    (ClusterConfig(workers_per_member=2, cpus_per_worker=4, use_gpu=True), {"CPU": 12.0, "GPU": 8.0}, 1),
])
def test_slots_are_the_runs_every_resource_holds(cluster, total, slots):
    assert member_slots(cluster, total) == slots


def test_max_concurrent_members_wins_whatever_the_cluster_holds_now():
    """An autoscaling cluster may have no GPU node yet: the configured runs are launched and wait for nodes."""
    autoscaling = ClusterConfig(workers_per_member=2, use_gpu=True, max_concurrent_members=4)
    assert member_slots(autoscaling, {"CPU": 8.0}) == 4
    assert member_slots(ClusterConfig(max_concurrent_members=1), {"CPU": 16.0}) == 1


def test_a_member_run_the_whole_cluster_cannot_hold_is_refused():
    with pytest.raises(ConfigError, match=r"one member run needs \{'CPU': 4\.0\} but the whole cluster has "
                                          r"\{'CPU': 2\.0\}.*cluster\.max_concurrent_members"):
        member_slots(ClusterConfig(cpus_per_worker=4), {"CPU": 2.0})
    with pytest.raises(ConfigError, match=r"'GPU': 0\.0"):
        member_slots(ClusterConfig(use_gpu=True), {"CPU": 8.0})


def test_a_driver_share_counts_against_the_cluster():
    """A train-sweep trial holds its own resources besides its member run's workers: memory only, so that member
    runs dividing the CPUs exactly still all fit; a CPU share of its own would cost a whole run."""
    need = member_resources(ClusterConfig(cpus_per_worker=1), driver={"memory": 2.0**28})
    assert need == {"CPU": 1.0, "memory": 2.0**28}
    assert runs_that_fit(need, {"CPU": 2.0, "memory": 2.0**33}) == 2
    assert runs_that_fit(need, {"CPU": 2.0, "memory": 2.0**28}) == 1  # the drivers' memory counts too
    assert runs_that_fit(need, {"CPU": 2.0}) == 0
    with_cpu = member_resources(ClusterConfig(cpus_per_worker=1), driver={"CPU": 0.01})
    assert with_cpu == {"CPU": 1.01} and runs_that_fit(with_cpu, {"CPU": 2.0}) == 1


def test_a_member_worker_uses_no_more_torch_threads_than_the_cpus_it_holds():
    from rayblora.workflows.coordinator import worker_threads

    assert worker_threads(2, 1, 8) == 1  # the calibration config on a 1-CPU worker: no oversubscription
    assert worker_threads(0, 4, 1) == 1  # torch's default (Ray sets it to the worker's CPUs)
    assert worker_threads(2, 4, 1) == 2 and worker_threads(0, 0.5, 1) == 1


@pytest.mark.parametrize("todo, slots, groups", [
    ([0, 1, 2, 3], 2, [[0, 1], [2, 3]]),           # `make demo`'s cluster: two packed runs of two members
    ([0, 1, 2, 3, 4], 2, [[0, 1, 2], [3, 4]]),    # as even as they divide, in member order
    ([1, 3], 4, [[1], [3]]),                      # more slots than members: one run each
    ([0, 1, 2], 1, [[0, 1, 2]]),
])
def test_packed_members_split_into_one_group_per_run_slot(todo, slots, groups):
    from rayblora.workflows.coordinator import run_groups

    assert run_groups(todo, slots, packed=True) == groups
    assert run_groups(todo, slots, packed=False) == [[i] for i in todo]
