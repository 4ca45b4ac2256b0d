"""Ensemble scaling: K = 2 members as two concurrent Ray Train runs (1 CPU, 1 torch thread each) vs one member
alone, same steps, on SmolLM2-135M-Instruct + VADER movie. Target: wall-time ratio K=2 / K=1 <= 1.15.

    .venv/bin/python benchmarks/ensemble_scaling.py [--steps 10] [--out benchmarks/results/ensemble_scaling.json]

Also reports the seconds `ray.init` takes to start a local Ray. Writes a JSON result and prints a markdown row
for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from record import BenchmarkRecord
from rayblora.config import load_config
from rayblora.workflows.coordinator import RAY_ENV, train_members


def _config(members: int, steps: int, out: Path, extra: list[str]):
    return load_config(None, [
        "model.name=smollm2-135m-instruct", "data.task=movie", "data.shift_tasks=[]", "data.train_size=1000",
        "data.val_size=32", "data.test_size=32", "data.max_length=64", f"train.steps={steps}",
        "train.batch_size=8", "train.torch_threads=1", "train.warmup_steps=1",
        "adapter.layers=[22,23,24,25,26,27,28,29]", f"posterior.members={members}", "cluster.cpus_per_worker=1",
        f"output.dir={out}", "output.name=bench", *extra])


def _timed_members(members: int, steps: int, root: Path, extra: list[str]) -> float:
    cfg = _config(members, steps, root / f"k{members}", extra)
    t0 = time.perf_counter()
    train_members(cfg, log=lambda _m: None)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/ensemble_scaling.json")
    parser.add_argument("overrides", nargs="*", help="extra dotted config overrides")
    args = parser.parse_args()
    record = BenchmarkRecord()
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    import ray

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=True, log_to_driver=False)
    startup = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        _timed_members(1, 2, Path(tmp) / "warm", args.overrides)  # page cache, imports, worker pool
        one = _timed_members(1, args.steps, Path(tmp), args.overrides)
        two = _timed_members(2, args.steps, Path(tmp), args.overrides)
    ray.shutdown()
    figures = {"steps": args.steps, "ray_init_s": round(startup, 2), "one_member_s": round(one, 1),
              "two_members_s": round(two, 1), "ratio": round(two / one, 3), "target_ratio": 1.15}
    out = Path(args.out)
    result = record.write(out, figures)
    print(json.dumps(result, indent=2))
    print(f"| {result['date']} | {result['machine']} | {args.steps} | {startup:.1f} | {one:.1f} | {two:.1f} | "
          f"{two / one:.2f} |")


if __name__ == "__main__":
    main()
