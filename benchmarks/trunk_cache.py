"""Frozen-trunk feature cache (rayblora.trunk_cache): cached vs uncached paths timed in one run.

    .venv/bin/python benchmarks/trunk_cache.py [--members 4 --epochs 20 --prompts 320 --test 1000 --shift-test 500]

On SmolLM2-135M-Instruct + VADER movie, LoRA r = 8 on q/v of the last 4 of its 30 layers, MultiSWAG members
(so that every evaluation method below can be built from one artifact):

* P9  — training K members × E epochs of `--prompts` prompts as Ray Train runs (`rayblora.workflows.train.train`:
  the driver fills the cache, the workers read it): wall time with `train.trunk_cache=true` over `false`.
* P10 — evaluating map, ensemble, multiswag (S = 8), temperature and laplace on the test split and the three
  shift splits (`evaluate_methods`): wall time cached over uncached.
* P8  — achieved FLOP/s of a cached training step (the adapted layers' forward and backward, counted as
  4 · tokens · parameters of those layers, the frozen weights needing input gradients only) over the fp32 GEMM
  FLOP/s of a `torch.mm` of a layer's MLP shape timed in the same run.
* seed_minutes — one full seed of the regime with the cache: cached training + cached evaluation, in minutes.

Writes benchmarks/results/trunk_cache.json (top-level p9_ratio, p10_ratio, p8_fraction, seed_minutes and a meta
object with machine, date, load average and command) and prints the RESULTS.md rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from record import BenchmarkRecord
from rayblora.config import load_config
from rayblora.data import load_task_data
from rayblora.workflows.evaluate import evaluate_methods
from rayblora.workflows.members import train_one_member
from rayblora.workflows.runtime import RAY_ENV, ensure_ray
from rayblora.workflows.train import train

LAYERS = "[26,27,28,29]"
METHODS = ["map", "ensemble", "multiswag", "temperature", "laplace"]


def _config(args, out: Path, cached: bool):
    steps = args.epochs * args.prompts // 8
    return load_config(None, [
        "model.name=smollm2-135m-instruct", "data.task=movie", f"data.train_size={args.prompts}",
        "data.val_size=64", f"data.test_size={args.test}", "data.max_length=64", f"train.steps={steps}",
        "train.batch_size=8", "train.torch_threads=1", "train.warmup_steps=5", "train.lr=1e-3",
        f"adapter.layers={LAYERS}", "posterior.method=multiswag", f"posterior.members={args.members}",
        f"swag.start_step={steps // 2}", "swag.samples=8", "laplace.fit_batches=8", "cluster.cpus_per_worker=1",
        f"cluster.num_cpus={args.cpus}", f"train.trunk_cache={str(cached).lower()}", f"output.dir={out}",
        "output.name=trunk-bench"])


def _eval_data(cfg, shift_size: int):
    """The run's splits (as trained: same config), each shift split cut to its first `shift_size` prompts."""
    data = load_task_data(cfg.data)
    data.shifts = {k: v.select(range(min(shift_size, len(v)))) for k, v in data.shifts.items()}
    return data


class StepClock:
    """A step hook noting the time of every optimizer step (checkpointed state: none)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, step: int, scorer) -> None:
        self.times.append(time.perf_counter())

    def state_dict(self) -> dict:
        return {"hook": "clock"}

    def load_state_dict(self, state: dict) -> None:
        pass


def _timed(fn):
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def gemm_flops(rows: int, hidden: int, inner: int, repeats: int = 20) -> float:
    """fp32 FLOP/s of `torch.mm` (rows × hidden) @ (hidden × inner), best of `repeats`."""
    a, b = torch.randn(rows, hidden), torch.randn(hidden, inner)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * rows * hidden * inner / best


def cached_step_flops(cfg, steps: int = 30) -> tuple[float, float]:
    """(achieved FLOP/s of the adapted layers in a cached training step, mean real tokens per step): one member
    in this process with a filled cache, the median step after 5 warm-up steps; FLOPs = 4 · tokens · the
    adapted layers' parameters (forward 2, input gradients 2; the frozen weights get no weight gradient)."""
    import dataclasses

    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps, eval_every=0),
                              posterior=dataclasses.replace(cfg.posterior, method="ensemble"))
    clock = StepClock()
    trained = train_one_member(cfg, 0, log=lambda _m: None, extra_hooks=[clock])
    seconds = statistics.median(b - a for a, b in zip(clock.times[5:], clock.times[6:]))
    prompts = trained.scorer.tokenizer(list(load_task_data(cfg.data).train["prompt"]), truncation=True,
                                       max_length=cfg.data.max_length, add_special_tokens=False)["input_ids"]
    tokens = cfg.train.batch_size * statistics.mean(len(p) for p in prompts)
    params = sum(p.numel() for n, p in trained.scorer.model.named_parameters()
                 if any(f".layers.{i}." in n for i in json.loads(LAYERS)))
    return 4 * tokens * params / seconds, tokens


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=320, help="training prompts")
    parser.add_argument("--test", type=int, default=1000, help="in-domain test prompts")
    parser.add_argument("--shift-test", type=int, default=500, help="test prompts of each shift split")
    parser.add_argument("--cpus", type=int, default=2, help="logical CPUs of the local Ray")
    parser.add_argument("--out", default="benchmarks/results/trunk_cache.json")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    record = BenchmarkRecord()
    quiet = lambda _m: None  # noqa: E731
    figures: dict = {"args": vars(args)}

    def note(**values) -> dict:  # every phase's figures are written as soon as they exist
        figures.update(values)
        return record.write(args.out, {**figures, "meta": record.meta()})

    with tempfile.TemporaryDirectory(prefix="rayblora-trunk-bench-") as tmp:
        runs = {name: _config(args, Path(tmp) / name, name == "cached") for name in ("cached", "uncached")}
        ensure_ray(runs["cached"].cluster)
        train_s, artifacts, eval_s = {}, {}, {}
        train_s["cached"], artifacts["cached"] = _timed(lambda: train(runs["cached"], log=quiet))
        achieved, tokens = cached_step_flops(runs["cached"])  # reads the cached run's file: cached steps only
        peak = gemm_flops(int(tokens), 576, 1536)
        cache_mib = sum(p.stat().st_size for p in (Path(tmp) / "cached" / "trunk_cache").glob("*.safetensors"))
        note(p8_fraction=round(achieved / peak, 3), adapted_flops=achieved, gemm_flops=peak,
             tokens_per_step=tokens, cache_file_mib=round(cache_mib / 2**20, 1))
        train_s["uncached"], artifacts["uncached"] = _timed(lambda: train(runs["uncached"], log=quiet))
        note(p9_ratio=round(train_s["cached"] / train_s["uncached"], 3),
             train_s={k: round(v, 1) for k, v in train_s.items()})
        for name, cfg in runs.items():
            eval_s[name] = _timed(lambda c=cfg, a=artifacts[name]: evaluate_methods(
                a, c, METHODS, data=_eval_data(c, args.shift_test), log=quiet))[0]
    result = note(p10_ratio=round(eval_s["cached"] / eval_s["uncached"], 3),
                  eval_s={k: round(v, 1) for k, v in eval_s.items()},
                  seed_minutes=round((train_s["cached"] + eval_s["cached"]) / 60, 2))
    print(json.dumps(result, indent=2))
    print(f"| {result['date']} | K={args.members} × {args.epochs} epochs × {args.prompts} | "
          f"{result['train_s']['cached']} / {result['train_s']['uncached']} s = {result['p9_ratio']} | "
          f"{result['eval_s']['cached']} / {result['eval_s']['uncached']} s = {result['p10_ratio']} | "
          f"{result['p8_fraction']} | {result['seed_minutes']} min | load {result['load_average_1m']} |")


if __name__ == "__main__":
    main()
