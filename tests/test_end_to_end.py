"""End to end on Ray: tiny K = 2 ensemble as two Ray Train runs -> artifact -> evaluate -> report; the CLI;
and `ray job submit` against a real local head started (and stopped by its process group) by the test."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
REPORT_KEYS = {"accuracy", "nll", "ece", "ece_em", "brier", "auroc", "aurc", "acc_at_90", "reject10",
               "in_distribution", "density_threshold"}
"""Every row's metrics: the feature density (fitted at training end by default) adds the last two."""
ROW_EXTRAS = {"map": {"sd", "members"}, "ensemble": {"member_disagreement"}}
pytestmark = pytest.mark.slow


def _check_report(report: dict, splits: set[str]) -> None:
    assert set(report) == {"methods", "ood", "meta", "far_ood"}
    assert set(report["methods"]) == {"map", "ensemble"}
    for method, by_split in report["methods"].items():
        assert set(by_split) == splits
        for metrics in by_split.values():
            assert set(metrics) == REPORT_KEYS | ROW_EXTRAS[method]
            assert 0.0 <= metrics["accuracy"] <= 1.0
            assert 0.0 <= metrics.get("member_disagreement", 0.0) <= 1.0
    assert set(report["ood"]["ensemble"]["shift"]) == {"auroc_entropy", "auroc_mi", "auroc_density"}


def _check_trained_run(out: Path, overrides: list[str]) -> None:
    """The run directory of a trained and evaluated tiny ensemble: its report (held again by `rayblora evaluate`
    of the same artifact into another directory), its figures and its K = 2 artifact."""
    from rayblora.artifact import load_posterior
    from rayblora.cli import main

    report = json.loads((out / "report.json").read_text())
    _check_report(report, {"train", "shift"})
    assert report["methods"]["ensemble"]["train"]["accuracy"] > 0.6
    for name in ("report.md", "reliability.png", "coverage.png"):
        assert (out / name).is_file()
    post = load_posterior(out / "posterior")
    assert post.method == "ensemble" and len(post.members) == 2
    assert [m["seed"] for m in json.loads((out / "posterior" / "manifest.json").read_text())["members"]] == [0, 1000]
    config = ["--config", str(ROOT / "jobs" / "configs" / "tiny.yaml"), "--", *overrides]
    assert main(["evaluate", "--posterior", str(out / "posterior"), "--out", str(out.parent / "cli"), *config]) == 0
    assert json.loads((out.parent / "cli" / "report.json").read_text())["methods"] == report["methods"]


def test_cli_rejects_bad_config_before_cluster_work(capsys):
    from rayblora.cli import main

    assert main(["train", "--", "train.steps=-1"]) == 2
    assert "train.steps" in capsys.readouterr().err


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class LocalHead:
    """A standalone `ray start --head --block` in its own process group, stopped by that group's id."""

    def __init__(self, tmp: Path):
        tmp.mkdir(parents=True, exist_ok=True)
        names = ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
                 "dashboard-agent-grpc-port", "metrics-export-port", "node-manager-port", "object-manager-port",
                 "runtime-env-agent-port")
        self.ports = dict(zip(names, _free_ports(len(names))))
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "5",
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        ray_bin = str(Path(sys.executable).parent / "ray")
        cmd = [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=4",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--temp-dir={tmp}"]
        cmd += [f"--{k}={v}" for k, v in self.ports.items()]
        self.log = open(tmp / "head.log", "w")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.tmp = tmp
        self.address = f"http://127.0.0.1:{self.ports['dashboard-port']}"

    def wait_ready(self, timeout: float = 120) -> None:
        import urllib.request

        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, "ray head exited early"
            try:
                urllib.request.urlopen(f"{self.address}/api/version", timeout=2)
                return
            except OSError:
                time.sleep(1)
        raise TimeoutError("ray head did not come up")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        Path("/tmp/ray/ray_current_cluster").unlink(missing_ok=True)


def test_ray_job_submit_against_a_local_head(sentiment_files, tmp_path):
    """`ray job submit` of jobs/train_ensemble.py to a standalone head: members as Ray Train runs, the artifact,
    the report (and the same report from `rayblora evaluate` here)."""
    head = LocalHead(Path(f"/tmp/rb{os.getpid()}"))
    try:
        head.wait_ready()
        out = tmp_path / "job"
        cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", head.address,
               "--working-dir", str(ROOT), "--", "python", "jobs/train_ensemble.py",
               "--config", "jobs/configs/tiny.yaml"] + tiny_overrides(sentiment_files, out)
        done = subprocess.run(cmd, env=head.env, capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "succeeded" in done.stdout
    finally:
        head.stop()
        shutil.rmtree(head.tmp, ignore_errors=True)
    assert head.proc.returncode is not None
    _check_trained_run(out, tiny_overrides(sentiment_files, out))
