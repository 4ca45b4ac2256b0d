"""Starting or joining Ray (workflows layer): the one place a rayblora process brings up its Ray runtime.

Training, fitting, sweeps and `rayblora serve` all call :func:`ensure_ray` with the run's `cluster` section.
"""

from __future__ import annotations

import os
import socket

import ray

from rayblora.config import ClusterConfig

RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "600",
           "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "1800"}
"""Environment defaults for every rayblora Ray process (unset keys only). The dashboard (which the State API and
Ray Train's placement-group cleaner need) gets 10 minutes to come up instead of Ray's 60 s: on a loaded
machine it has taken longer, and `ray.init` then failed. A Ray Train run waiting for its workers' resources (a
busy shared cluster, nodes an autoscaler is still adding, a lost node's replacement) waits 30 minutes between
start attempts instead of Ray's 60 s: every expiry is logged by Ray Train's controller as a failure with a full
traceback, and retried without limit, so the short default only fills the log while nothing has failed (the
coordinator itself launches no more member runs than the cluster holds). Ray Train passes it from the driver
to its controllers."""


def ensure_ray(cluster: ClusterConfig) -> None:
    """Connect to the configured cluster, or start a local Ray in this process."""
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
