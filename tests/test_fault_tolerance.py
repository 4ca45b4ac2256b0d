"""Fault tolerance of member training on Ray: a SIGKILLed worker resumes from its checkpoint, a lost node's
member finishes on the remaining node, `posterior.min_members` builds from survivors or fails cleanly, and a
resubmitted half-finished job redoes no finished member.

Members train 12 steps with a checkpoint every 4; a member made to pause after step 6 (`rayblora.train.faults`)
is killed from outside, so steps 5-6 run twice and nothing else does. Resumed members are compared with the same
member trained uninterrupted in this process (the oracle is itself checked against an uninterrupted Ray member).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides
from node_loss_driver import PAUSE_STEP, wait_for_checkpoint
from rayblora.config import load_config
from rayblora.train.faults import read_probe, wait_for_pause

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
STEPS, CHECKPOINT_EVERY = 12, 4  # and a pause after step PAUSE_STEP = 6


def fault_overrides(files, out_dir: Path, **extra: str) -> list[str]:
    """Tiny K = 2 run: 12 steps, checkpoints at 4, 8, 12; LoRA dropout so a resume must restore the RNG."""
    return tiny_overrides(files, out_dir, **{
        "train.steps": str(STEPS), "train.checkpoint_every": str(CHECKPOINT_EVERY), "adapter.dropout": "0.1",
        "data.shift_tasks": "[]", "cluster.max_failures": "1", **extra})


def uninterrupted_adapter(cfg, member: int) -> dict[str, torch.Tensor]:
    """Member `member` trained in this process without interruption, as its Ray Train worker would."""
    from rayblora.workflows.members import train_one_member

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(cfg.train.torch_threads)
        return train_one_member(cfg, member, log=lambda _m: None).scorer.adapter_state()
    finally:
        torch.set_num_threads(threads)


def assert_same_adapter(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def steps_by_attempt(records: list[dict]) -> list[list[int]]:
    """Steps rank 0 executed, split by worker process (each restart is a new pid), in order."""
    attempts: dict[int, list[int]] = {}
    for r in records:
        if r["rank"] == 0:
            attempts.setdefault(r["pid"], []).append(r["step"])
    return list(attempts.values())


def assert_resumed_from_last_checkpoint(records: list[dict]) -> None:
    """First attempt ran 1..6 and was killed; the restart resumed at checkpoint 4: steps 5-6 ran twice, no
    step ran more than twice, and every step ran."""
    killed_after = list(range(1, PAUSE_STEP + 1))
    last_checkpoint = PAUSE_STEP // CHECKPOINT_EVERY * CHECKPOINT_EVERY
    assert steps_by_attempt(records) == [killed_after, list(range(last_checkpoint + 1, STEPS + 1))]
    counts = Counter(r["step"] for r in records if r["rank"] == 0)
    assert set(counts) == set(range(1, STEPS + 1))
    assert {s for s, n in counts.items() if n == 2} == set(range(last_checkpoint + 1, PAUSE_STEP + 1))
    assert max(counts.values()) == 2


def manifest_training(artifact: Path) -> dict:
    return json.loads((artifact / "manifest.json").read_text())["training"]


def sigkill_when_paused(cfg, probe: Path, member: int, job) -> dict:
    """Once `member` has paused after step 6 and its step-4 checkpoint is registered, SIGKILL its Ray Train
    worker process (a real one, by pid); returns the pause record ({"step", "pid", "node"})."""
    paused = wait_for_pause(probe, member, gave_up=job.done)
    try:
        wait_for_checkpoint(cfg, member, CHECKPOINT_EVERY)
    finally:
        os.kill(paused["pid"], signal.SIGKILL)  # also on a failed wait: the paused worker must not linger
    return paused


def test_sigkilled_worker_resumes_its_member_from_the_last_checkpoint(ray_session, sentiment_files, tmp_path):
    from rayblora.artifact import load_posterior
    from rayblora.workflows.train import train

    cfg = load_config(None, fault_overrides(sentiment_files, tmp_path / "run"))
    probe = tmp_path / "probe"
    extra = {"probe_dir": str(probe), "pause_member": 0, "pause_step": PAUSE_STEP}
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(train, cfg, lambda _m: None, extra=extra)
        paused = sigkill_when_paused(cfg, probe, 0, job)
        artifact = job.result(timeout=600)

    training = manifest_training(artifact)
    assert training["members_finished"] == [0, 1] and training["members_failed"] == {}
    assert training["partial"] is False
    records = read_probe(probe, 0)
    assert records[PAUSE_STEP - 1]["pid"] == paused["pid"]
    assert_resumed_from_last_checkpoint(records)
    assert [r["step"] for r in read_probe(probe, 1)] == list(range(1, STEPS + 1))  # member 1 untouched

    posterior = load_posterior(artifact)
    assert len(posterior.members) == 2
    assert_same_adapter(posterior.members[1], uninterrupted_adapter(cfg, 1))  # the oracle is right ...
    assert_same_adapter(posterior.members[0], uninterrupted_adapter(cfg, 0))  # ... and resume changed nothing


def test_a_sigkilled_packed_group_resumes_every_member_from_its_last_checkpoint(ray_session, sentiment_files,
                                                                              tmp_path):
    """Members 0 and 1 packed into one Ray Train run (`cluster.member_runner=packed`, one run slot): its worker is
    killed after step 6, the restart resumes both from the group's step-4 checkpoint, and both equal members
    trained separately and uninterrupted."""
    from rayblora.artifact import load_posterior
    from rayblora.workflows.train import train

    cfg = load_config(None, fault_overrides(sentiment_files, tmp_path / "run", **{
        "cluster.member_runner": "packed", "cluster.max_concurrent_members": "1"}))
    probe, lines = tmp_path / "probe", []
    extra = {"probe_dir": str(probe), "pause_member": 1, "pause_step": PAUSE_STEP}
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(train, cfg, lines.append, extra=extra)
        paused = wait_for_pause(probe, 1, gave_up=job.done)
        try:
            wait_for_checkpoint(cfg, "members0-1", CHECKPOINT_EVERY)
        finally:
            os.kill(paused["pid"], signal.SIGKILL)
        artifact = job.result(timeout=600)

    assert any("launching 1 packed run(s)" in line and "[0, 1]" in line for line in lines)
    assert manifest_training(artifact)["members_finished"] == [0, 1]
    for member in (0, 1):  # one worker trained both: both ran 1..6, were killed, and resumed at 5
        assert_resumed_from_last_checkpoint(read_probe(probe, member))
    posterior = load_posterior(artifact)
    for member in (0, 1):
        assert_same_adapter(posterior.members[member], uninterrupted_adapter(cfg, member))


def test_min_members_builds_from_survivors_or_fails_without_an_artifact(ray_session, sentiment_files, tmp_path):
    from rayblora.artifact import load_posterior
    from rayblora.workflows.coordinator import TrainingError
    from rayblora.workflows.train import train

    fails_for_good = {"fail_members": [1]}  # member 1 raises (retries: the SIGKILL tests above)
    cfg = load_config(None, fault_overrides(sentiment_files, tmp_path / "survivors",
                                            **{"posterior.min_members": "1", "cluster.max_failures": "0"}))
    artifact = train(cfg, lambda _m: None, extra=dict(fails_for_good))
    training = manifest_training(artifact)
    assert training["members_requested"] == [0, 1] and training["members_finished"] == [0]
    assert list(training["members_failed"]) == ["1"]
    assert "InjectedFailure: member 1: injected permanent failure" in training["members_failed"]["1"]
    assert training["partial"] is True
    posterior = load_posterior(artifact)
    assert len(posterior.members) == 1 and posterior.member_info[0]["index"] == 0

    # all members required: member 0 is reused (copied from the run above), member 1 fails again -> no artifact
    strict_out = tmp_path / "strict"
    (strict_out / "members").mkdir(parents=True)
    shutil.copytree(tmp_path / "survivors" / "members" / "0", strict_out / "members" / "0")
    strict = load_config(None, fault_overrides(sentiment_files, strict_out, **{
        "posterior.min_members": "0", "cluster.max_failures": "0"}))
    with pytest.raises(TrainingError, match=r"only 1 of 2 members finished.*member 1.*posterior\.min_members"):
        train(strict, lambda _m: None, extra=dict(fails_for_good))
    assert sorted(p.name for p in strict_out.iterdir()) == ["members", "ray_runs"]  # no posterior, no temp dirs
    assert [p.name for p in (strict_out / "members").iterdir()] == ["0"]


def test_resubmitted_half_finished_job_redoes_no_finished_member(ray_session, sentiment_files, tmp_path):
    from rayblora.artifact import load_posterior
    from rayblora.workflows.coordinator import TrainingError
    from rayblora.workflows.train import train

    # first submission: no retries; member 1's worker is killed after its step-4 checkpoint -> job fails half done
    cfg = load_config(None, fault_overrides(sentiment_files, tmp_path / "run", **{"cluster.max_failures": "0"}))
    probe = tmp_path / "probe"
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(train, cfg, lambda _m: None,
                          extra={"probe_dir": str(probe), "pause_member": 1, "pause_step": PAUSE_STEP})
        sigkill_when_paused(cfg, probe, 1, job)
        with pytest.raises(TrainingError, match="member 1"):
            job.result(timeout=600)
    assert not (cfg.out_dir / "posterior").exists()
    member0 = cfg.out_dir / "members" / "0" / "member.json"
    finished_at = member0.stat().st_mtime_ns
    assert [r["step"] for r in read_probe(probe, 0)] == list(range(1, STEPS + 1))

    # the same job again: member 0 is reused as is, member 1's Ray Train run resumes from its checkpoint
    artifact = train(cfg, lambda _m: None, extra={"probe_dir": str(probe)})
    training = manifest_training(artifact)
    assert training["members_reused"] == [0] and training["members_finished"] == [0, 1]
    assert training["members_failed"] == {} and training["partial"] is False
    assert [r["step"] for r in read_probe(probe, 0)] == list(range(1, STEPS + 1))  # not one step redone
    assert member0.stat().st_mtime_ns == finished_at
    assert_resumed_from_last_checkpoint(read_probe(probe, 1))
    posterior = load_posterior(artifact)  # the same artifact as an uninterrupted run's
    for i in range(2):
        assert_same_adapter(posterior.members[i], uninterrupted_adapter(cfg, i))


def test_losing_the_node_of_a_member_finishes_the_ensemble_on_the_other_node(sentiment_files, tmp_path):
    """Two simulated nodes (`ray.cluster_utils.Cluster`) need their own Ray: the driver runs in a subprocess."""
    result_path, probe = tmp_path / "result.json", tmp_path / "probe"
    cmd = [sys.executable, str(ROOT / "tests" / "node_loss_driver.py"), str(result_path), str(probe)]
    done = subprocess.run(cmd + fault_overrides(sentiment_files, tmp_path / "run"), cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(result_path.read_text())
    assert result["finished"] == [0, 1] and result["failed"] == {}
    records = read_probe(probe, 0)
    assert records[PAUSE_STEP - 1] == {**result["paused"], "rank": 0}  # paused on the node that was removed
    assert result["paused"]["node"] == result["removed"]
    restarted = [r for r in records if r["pid"] != result["paused"]["pid"]]
    assert {r["node"] for r in restarted} == set(result["remaining"])
    assert_resumed_from_last_checkpoint(records)
