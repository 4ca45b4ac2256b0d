"""Packed vs separate members: the training wall of K members of one config, in one run on an idle machine.

    .venv/bin/python benchmarks/packed_members.py [--config jobs/configs/demo.yaml] [--threads 2] [--skip-ray]
                                                  [--p8-only]
                                                  [--out benchmarks/results/packed_members.json]

Three ways to train the config's K members (its full regime: steps, validation passes, SWAG collection), each
in a fresh spawned process so its peak resident memory is its own:

* ``separate``  — `rayblora train --in-process`, one member after another (`cluster.member_runner=separate`),
  `--threads` torch threads;
* ``packed``    — the same with all K in one loop (`cluster.member_runner=packed`, :mod:`rayblora.train.packed`);
* ``ray``       — today's default for `rayblora train` / `make demo`: one Ray Train run per member, as many at
  once as `cluster.num_cpus` / `cluster.cpus_per_worker` hold (skipped with `--skip-ray`).

Each writes the artifact as `rayblora train` does (members, posterior, feature density); evaluation is not timed.

Also in the same run: the fp32 GEMM FLOP/s of `torch.mm` at a layer's MLP shape, and ``p8_fraction`` of the
packed loop — the adapted layers' training FLOPs of a step of K members (:func:`trunk_cache.adapted_flops` per
member) over the measured time of a step (`--p8-steps` steps without validation), over that GEMM rate. Writes
`--out` (wall seconds, ratios, peak RSS, GEMM FLOP/s, machine, date, load average, command) and prints it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import time

import torch

from record import BenchmarkRecord
from trunk_cache import adapted_flops, gemm_flops
from rayblora.config import config_from_dict, load_config


def _peak_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def _train_child(cfg_dict: dict, runner: str, threads: int) -> dict:
    """`rayblora train` of the config with `runner` in this (fresh) process — members, artifact and feature
    density, as `make demo` trains — its wall seconds and peak RSS."""
    import ray

    from rayblora.workflows.runtime import ensure_ray
    from rayblora.workflows.train import train

    torch.set_num_threads(threads)
    cfg = config_from_dict(cfg_dict)
    started = time.perf_counter()
    try:
        if runner == "ray":
            ensure_ray(cfg.cluster)
        train(cfg, log=lambda _m: None, in_process=runner != "ray")
    finally:
        ray.shutdown()  # the local head this process started (a no-op in process)
    return {"train_s": round(time.perf_counter() - started, 1), "peak_rss_mib": round(_peak_mib(), 1)}


def _packed_step_child(cfg_dict: dict, threads: int, steps: int) -> dict:
    """Seconds per step of the packed loop alone and the adapted-layer training FLOPs of one member's step: two
    runs of `steps` / 5 and `steps` steps after an epoch that fills the trunk cache, their difference over the
    difference of steps (what every run pays once — the final validation pass, set-up — cancels)."""
    from rayblora.data import load_task_data
    from rayblora.registry import get_posterior_class
    from rayblora.train.packed import train_packed
    from rayblora.workflows.members import prepare_packed

    torch.set_num_threads(threads)
    cfg = config_from_dict(cfg_dict)
    data = load_task_data(cfg.data)
    scorer, members = prepare_packed(cfg, range(cfg.posterior.members), data,
                                     get_posterior_class(cfg.posterior.method), lambda _m: None)

    def timed(n: int) -> float:
        run_cfg = dataclasses.replace(cfg.train, steps=n, eval_every=0, keep_best=False)
        started = time.perf_counter()
        train_packed(scorer, members, data.validation, run_cfg)
        return time.perf_counter() - started

    timed(-(-len(data.train) // cfg.train.batch_size))  # one epoch puts every training prompt in the trunk cache
    short = max(1, steps // 5)
    step_s = (timed(steps) - timed(short)) / (steps - short)
    flops, _, tokens = adapted_flops(cfg, scorer, data)
    return {"step_s": step_s, "member_step_flops": flops, "tokens_per_member_step": tokens}


def _spawned(fn, *args):
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="jobs/configs/demo.yaml")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in process")
    parser.add_argument("--p8-steps", type=int, default=40)
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--p8-only", action="store_true", help="measure the packed step and GEMM rate only, adding "
                        "them to the training walls already in --out (from an earlier run, whose record is kept)")
    parser.add_argument("--out", default="benchmarks/results/packed_members.json")
    args = parser.parse_args()
    record = BenchmarkRecord()
    figures: dict = {"config": args.config, "threads": args.threads}
    base = load_config(args.config, [])
    runners = () if args.p8_only else ("separate", "packed", *(() if args.skip_ray else ("ray",)))
    if args.p8_only:
        earlier = json.loads(open(args.out).read())
        figures.update({k: earlier[k] for k in ("separate", "packed", "ray") if k in earlier},
                       walls_measured=earlier.get("walls_measured") or {
                           k: earlier[k] for k in ("date", "load_average_1m", "command") if k in earlier})
    for runner in runners:
        cfg = load_config(args.config, [f"cluster.member_runner={'separate' if runner == 'ray' else runner}",
                                        f"output.dir=runs/packed-bench/{runner}"])
        figures[runner] = _spawned(_train_child, cfg.to_dict(), runner, args.threads)
        print(runner, figures[runner], flush=True)
        record.write(args.out, figures)
    step = _spawned(_packed_step_child, base.to_dict(), args.threads, args.p8_steps)
    gemm = gemm_flops(int(step["tokens_per_member_step"]) * base.posterior.members, 576, 1536)
    figures.update(
        packed_over_separate=round(figures["packed"]["train_s"] / figures["separate"]["train_s"], 3),
        gemm_flops=gemm, packed_step_s=round(step["step_s"], 4),
        p8_fraction=round(base.posterior.members * step["member_step_flops"] / step["step_s"] / gemm, 3))
    if "ray" in figures:
        figures["packed_over_ray"] = round(figures["packed"]["train_s"] / figures["ray"]["train_s"], 3)
    print(json.dumps(record.write(args.out, figures), indent=1))


if __name__ == "__main__":
    main()
