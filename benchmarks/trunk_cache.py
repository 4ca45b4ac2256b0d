"""Training and evaluation at the machine's limit (frozen-trunk cache, exact tail, length-grouped evaluation).

    .venv/bin/python benchmarks/trunk_cache.py [--config jobs/configs/calibration.yaml --epochs E --test N
                                                --shift-test M --skip-uncached-training]

One seed of `--config` (default the calibration regime: K = 4 MultiSWAG members of SmolLM2-135M-Instruct, LoRA on
the last 4 of its 30 layers, VADER movie), at its full size unless `--epochs` / `--test` / `--shift-test` shrink it:

* p8_fraction  — achieved FLOP/s of a cached training step over the fp32 GEMM FLOP/s of a `torch.mm` of a layer's
  MLP shape, both timed in this run. FLOPs counted as required: forward 2 and input gradients 2 per token and
  parameter of the adapted layers, the last layer's queries, attention output and MLP at the answer position only
  (`p8_fraction_full_count` counts every position of every adapted layer, as issue 14 did).
* p9_ratio     — training wall, cached / uncached, K members as Ray Train runs (`rayblora.workflows.train.train`);
  with `--skip-uncached-training` null, and `p9_step_ratio` = a cached over an uncached training step of one member
  in this process instead.
* eval_passes  — evaluation wall of map, temperature, ensemble, multiswag and laplace over every evaluation row
  (their fits included), over the wall of one uncached single-adapter forward pass over the same rows.
* seed_minutes — cached training + evaluation of the config's `posterior.eval_methods`, in minutes.
* peak_rss_mib — a member process's peak resident memory, training with and without the cache.

Writes benchmarks/results/trunk_cache.json (these top-level numbers, per-method seconds, and a meta object with
machine, date, load average and command) and prints the RESULTS.md row.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from record import BenchmarkRecord
from rayblora.config import load_config
from rayblora.data import load_task_data
from rayblora.data.sources import split_name
from rayblora.workflows.evaluate import evaluate_methods
from rayblora.workflows.members import train_one_member
from rayblora.workflows.runtime import RAY_ENV, ensure_ray
from rayblora.workflows.train import train

PASS_METHODS = ["map", "temperature", "ensemble", "multiswag", "laplace"]
"""The rows whose evaluation wall `eval_passes` counts."""


def _config(args, out: Path, cached: bool):
    """`--config` with its size overridden by the command line, writing to `out`."""
    base = load_config(args.config, [])
    overrides = [f"train.trunk_cache={str(cached).lower()}", f"output.dir={out}"]
    if args.epochs:
        per_epoch = base.data.train_size // base.train.batch_size
        steps = args.epochs * per_epoch
        scale = steps / base.train.steps
        overrides += [f"train.steps={steps}", f"swag.start_step={int(base.swag.start_step * scale)}",
                      f"swag.collect_every={max(1, int(base.swag.collect_every * scale))}",
                      f"train.eval_every={per_epoch}"]
    if args.test:
        overrides.append(f"data.test_size={args.test}")
    if args.shift_test:
        overrides.append(f"data.shift_test_size={args.shift_test}")
    return load_config(args.config, overrides)


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


def one_member(cfg, steps: int):
    """`cfg` as one plain member trained for `steps` steps, without validation passes."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps, eval_every=0, keep_best=False),
                               posterior=dataclasses.replace(cfg.posterior, method="ensemble"))


def member_step(cfg, data, steps: int = 20, warmup: int = 5):
    """(median seconds of a training step, the trained member) of member 0 of `cfg` on `data`, in this process."""
    clock = StepClock()
    trained = train_one_member(one_member(cfg, steps), 0, data=data, log=lambda _m: None, extra_hooks=[clock])
    return statistics.median(b - a for a, b in zip(clock.times[warmup:], clock.times[warmup + 1:])), trained


def adapted_flops(cfg, scorer, data) -> tuple[float, float, float]:
    """(FLOPs a training step needs, FLOPs of every position of every adapted layer, mean real tokens of a step):
    4 per token and parameter
    (forward 2, input gradients 2), the last decoder layer's attention output and MLP (and its queries, without
    LoRA dropout) at one position."""
    prompts = scorer.tokenizer(list(data.train["prompt"]), truncation=True,
                               max_length=cfg.data.max_length, add_special_tokens=False)["input_ids"]
    tokens = cfg.train.batch_size * statistics.mean(len(p) for p in prompts)
    layers, last = cfg.adapter.layers, max(cfg.adapter.layers)
    params = {n: p.numel() for n, p in scorer.model.named_parameters()
              if any(f".layers.{i}." in n for i in layers)}
    everywhere = ("k_proj", "v_proj", "q_proj") if cfg.adapter.dropout > 0 else ("k_proj", "v_proj")  # LoRA
    # dropout draws over every query position, so training runs the last layer's queries everywhere then
    every_position = sum(v for n, v in params.items()
                         if f".layers.{last}." not in n or any(k in n for k in everywhere))
    answer_only = sum(params.values()) - every_position
    return (4 * (tokens * every_position + cfg.train.batch_size * answer_only), 4 * tokens * sum(params.values()),
            tokens)


def fast_path_ratios(scorer, cfg, data, rows: int = 256, repeats: int = 5) -> dict[str, float]:
    """Same process, same member, alternating paths (medians of `repeats`): a cached training step (forward +
    backward on a batch of test prompts, LoRA dropout on) with the exact tail over without it; a no-grad pass over
    `rows` test prompts in length-grouped batches over batches in row order."""
    from rayblora.data.batches import eval_batches

    test = data.test
    test = test.select(range(min(rows, len(test))))
    step_batch = next(eval_batches(test, scorer.tokenizer, cfg.train.batch_size, scorer.max_length))
    times: dict[str, list[float]] = {}

    def clock(name, fn):
        times.setdefault(name, []).append(_timed(fn)[0])

    def step():
        scorer.model.zero_grad()
        torch.nn.functional.cross_entropy(scorer.logits(step_batch), step_batch["labels"]).backward()

    def evaluate(by_length):
        with torch.no_grad():
            for b in eval_batches(test, scorer.tokenizer, 16, scorer.max_length, by_length=by_length):
                scorer.logits(b)

    scorer.model.train()
    for _ in range(repeats):
        for tail in (True, False):
            scorer.tail_only = tail
            clock(f"step_tail_{tail}", step)
    scorer.model.eval()
    for _ in range(repeats):
        for by_length in (True, False):
            clock(f"eval_by_length_{by_length}", lambda: evaluate(by_length))
    scorer.tail_only = True
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"tail_step_ratio": round(med["step_tail_True"] / med["step_tail_False"], 3),
            "length_grouped_eval_ratio": round(med["eval_by_length_True"] / med["eval_by_length_False"], 3),
            "seconds": {k: round(v, 3) for k, v in med.items()}}


def _peak_rss_child(cfg_dict: dict, steps: int) -> tuple[float, float]:
    from rayblora.config import config_from_dict
    from rayblora.scoring import build_scorer
    from rayblora.workflows.members import member_seed

    def vm_hwm() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024

    cfg = one_member(config_from_dict(cfg_dict), steps)
    data = load_task_data(cfg.data)  # a fresh process: its own copy, as a member's worker has
    scorer = build_scorer(cfg.model, cfg.adapter, data.spec, cfg.data.max_length, seed=member_seed(cfg, 0))
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM: the peak of training, not of the model load
        f.write("5")
    train_one_member(cfg, 0, data=data, scorer=scorer, log=lambda _m: None)
    return round(vm_hwm(), 1), round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def peak_rss_mib(cfg, steps: int = 10) -> dict[str, float]:
    """A fresh process training member 0 of `cfg` for `steps` steps: its peak resident MiB while training (after
    the base model is loaded) and over its whole life (model load included)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        training, lifetime = pool.apply(_peak_rss_child, (cfg.to_dict(), steps))
    return {"training": training, "process": lifetime}


def single_adapter_pass(artifact, cfg, data) -> float:
    """Seconds of one uncached forward pass of member 0 alone over every evaluation row of `cfg`."""
    from rayblora.artifact import load_posterior

    full = load_posterior(artifact)
    one = full.view("map")
    one.scorer.use_trunk_cache(None)
    splits = data.eval_splits(split_name(cfg.data.task))
    return _timed(lambda: [one.predict_dataset(ds) for ds in splits.values()])[0]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="jobs/configs/calibration.yaml")
    parser.add_argument("--epochs", type=int, default=0, help="training epochs (default: the config's)")
    parser.add_argument("--test", type=int, default=0, help="in-domain test prompts (default: the config's)")
    parser.add_argument("--shift-test", type=int, default=0, help="prompts per shift / far-OOD split")
    parser.add_argument("--skip-uncached-training", action="store_true",
                        help="time one uncached training step instead of the uncached Ray Train run")
    parser.add_argument("--out", default="benchmarks/results/trunk_cache.json")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    record, quiet = BenchmarkRecord(), (lambda _m: None)
    figures: dict = {"args": vars(args)}

    def note(**values) -> dict:  # every phase's figures are written as soon as they exist
        figures.update(values)
        return record.write(args.out, {**figures, "meta": record.meta()})

    with tempfile.TemporaryDirectory(prefix="rayblora-trunk-bench-") as tmp:
        runs = {name: _config(args, Path(tmp) / name, name == "cached") for name in ("cached", "uncached")}
        note(config={"steps": runs["cached"].train.steps, "members": runs["cached"].posterior.members,
                     "test": runs["cached"].data.test_size, "shift_test": runs["cached"].data.shift_test_size})
        ensure_ray(runs["cached"].cluster)
        train_s, artifact = _timed(lambda: train(runs["cached"], log=print))
        note(train_s={"cached": round(train_s, 1)})
        data = load_task_data(runs["cached"].data)  # both runs' data section: the same splits
        cached_step, trained = member_step(runs["cached"], data)
        needed, full_count, tokens = adapted_flops(runs["cached"], trained.scorer, data)
        peak = gemm_flops(int(tokens), 576, 1536)
        note(p8_fraction=round(needed / cached_step / peak, 3), p8_fraction_full_count=round(full_count / cached_step
             / peak, 3), adapted_flops=needed / cached_step, gemm_flops=peak, cached_step_s=round(cached_step, 3))
        note(fast_paths=fast_path_ratios(trained.scorer, runs["cached"], data))
        timings: dict[str, float] = {}
        seed_eval, _ = _timed(lambda: evaluate_methods(artifact, runs["cached"], log=print, timings=timings))
        note(seed_minutes=round((train_s + seed_eval) / 60, 2), seed_eval_s=round(seed_eval, 1),
             seed_eval_timings={k: round(v, 1) for k, v in timings.items()})
        pass_timings: dict[str, float] = {}
        passes, _ = _timed(lambda: evaluate_methods(artifact, runs["cached"], PASS_METHODS, log=print,
                                                    timings=pass_timings))
        one_pass = single_adapter_pass(artifact, runs["cached"], data)
        note(eval_passes=round(passes / one_pass, 2), eval_s={"pass_methods": round(passes, 1),
             "single_adapter_uncached_pass": round(one_pass, 1)},
             pass_timings={k: round(v, 1) for k, v in pass_timings.items()})
        if args.skip_uncached_training:
            uncached_step, _ = member_step(runs["uncached"], data, steps=12, warmup=3)
            note(p9_ratio=None, p9_step_ratio=round(cached_step / uncached_step, 3),
                 uncached_step_s=round(uncached_step, 3))
        else:
            train_s_uncached, _ = _timed(lambda: train(runs["uncached"], log=quiet))
            note(p9_ratio=round(train_s / train_s_uncached, 3), train_s={"cached": round(train_s, 1),
                                                                         "uncached": round(train_s_uncached, 1)})
        result = note(peak_rss_mib={"cached": peak_rss_mib(runs["cached"]),
                                    "uncached": peak_rss_mib(runs["uncached"])})
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
