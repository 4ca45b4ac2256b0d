"""DeepSpeed ZeRO member on GPU (issue 7): one member trained in-process (no Ray) by the real member loop
(`rayblora.workflows.members.train_one_member`) with plain `ddp` mechanics (baseline) and with the DeepSpeed ZeRO-2 / ZeRO-3
engine (`DeepSpeedStepper`, bf16 with fp32 master weights), on SmolLM2-135M + VADER movie.

    python benchmarks/deepspeed_gpu.py [--model smollm2-135m-instruct] [--random-init-from CONFIG_DIR] \
        [--runs ddp,zero2,zero3] [--batch-sizes 8,32] [--steps 30] [--warmup-steps 5] [--device cuda] \
        [--out benchmarks/results/deepspeed_gpu.json] [overrides ...]

`--random-init-from DIR` builds the model from DIR's config.json with random weights (tokenizer files copied from
DIR) instead of loading trained weights: throughput and memory do not depend on the weight values.

Per run it reports tokens/s (non-pad prompt tokens trained on per second, over the steps after the warm-up steps),
the mean and median step time, the loss curve, and the peak GPU memory (`torch.cuda.max_memory_allocated`, reset
after the base model is loaded, so it covers engine set-up and training). Each run is a fresh subprocess
(`--one RUN`): DeepSpeed's process group and ZeRO-3's parameter hooks belong to a process. World size is 1
(one GPU); ZeRO sharding over several ranks is exercised on CPU by tests/test_deepspeed.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from record import BenchmarkRecord

RUNS = {
    "ddp": ["train.strategy=ddp"],
    "zero2": ["train.strategy=deepspeed", "train.zero_stage=2"],
    "zero3": ["train.strategy=deepspeed", "train.zero_stage=3"],
}
"""Benchmark runs: name -> train-config overrides."""

MODEL_FILES = ("config.json", "model.safetensors")
"""Files of a model folder that `--random-init-from` does not copy (the rest are tokenizer / template files)."""


def run_config(args, run: str, batch_size: int):
    """The config of one run: the base in bf16 on `args.device`, LoRA r=8 on q/v of all layers, VADER movie."""
    from rayblora.config import load_config

    return load_config(None, [
        f"model.name={args.model}", "model.dtype=bfloat16", f"model.device={args.device}",
        "data.task=movie", "data.shift_tasks=[]", "data.train_size=2000", "data.val_size=64", "data.test_size=64",
        f"data.max_length={args.max_length}", "adapter.rank=8", "adapter.target_modules=[q_proj,v_proj]",
        "adapter.layers=[]", f"train.steps={args.steps}", f"train.batch_size={batch_size}",
        "train.warmup_steps=2", *RUNS[run], *args.overrides])


def random_init_model(config_dir: Path, out_dir: Path, seed: int = 0) -> Path:
    """Save a randomly initialised model of `config_dir`'s architecture (plus its tokenizer files) in `out_dir`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(config_dir))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    for path in config_dir.iterdir():
        if path.is_file() and path.name not in MODEL_FILES and not (tmp / path.name).exists():
            shutil.copy(path, tmp / path.name)
    os.replace(tmp, out_dir)
    return out_dir


class StepClock:
    """Step hook: the wall-clock time at the end of every optimizer step (after a device synchronize)."""

    def __init__(self, sync):
        self.sync = sync
        self.times: list[float] = []

    def __call__(self, step: int, scorer) -> None:
        self.sync()
        self.times.append(time.perf_counter())

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore: a benchmark run does not resume."""


def tokens_per_step(train_ds, tokenizer, cfg, seed: int, max_length: int) -> list[tuple[int, int]]:
    """(non-pad tokens, padded tokens) of each optimizer step's micro-batches, replaying the loop's batch order
    (`train_batch` numbering for world size 1, rank 0)."""
    from rayblora.data.batches import train_batch

    counts = []
    for step in range(cfg.steps):
        real = padded = 0
        for micro in range(cfg.grad_accum):
            batch = train_batch(train_ds, tokenizer, cfg.batch_size, max_length, seed, step * cfg.grad_accum + micro)
            real += int(batch["attention_mask"].sum())
            padded += batch["attention_mask"].numel()
        counts.append((real, padded))
    return counts


def summarise(clock: StepClock, counts: list[tuple[int, int]], warmup: int, batch_examples: int) -> dict:
    """Throughput over the steps after `warmup` (clock.times[i] ends step i + 1)."""
    times = clock.times
    if warmup >= len(times) - 1:
        raise ValueError(f"--warmup-steps {warmup} leaves no timed steps out of {len(times)}")
    elapsed = times[-1] - times[warmup]
    timed = counts[warmup + 1:len(times)]
    steps = [b - a for a, b in zip(times[warmup:], times[warmup + 1:])]
    return {"timed_steps": len(timed), "timed_s": round(elapsed, 4),
            "tokens_per_s": round(sum(c[0] for c in timed) / elapsed, 1),
            "padded_tokens_per_s": round(sum(c[1] for c in timed) / elapsed, 1),
            "examples_per_s": round(batch_examples * len(timed) / elapsed, 1),
            "step_ms_mean": round(1000 * elapsed / len(timed), 2),
            "step_ms_median": round(1000 * statistics.median(steps), 2),
            "mean_tokens_per_example": round(sum(c[0] for c in timed) / (batch_examples * len(timed)), 1)}


def measure(args, run: str, batch_size: int) -> dict:
    """Train one member with the run's strategy and return its figures (called in the `--one` subprocess)."""
    import torch

    from rayblora.data.sources import load_task_data
    from rayblora.scoring import build_scorer
    from rayblora.workflows.members import train_one_member

    cfg = run_config(args, run, batch_size)
    on_gpu = cfg.model.device != "cpu"
    data = load_task_data(cfg.data)
    torch.manual_seed(cfg.train.seed)
    scorer = build_scorer(cfg.model, cfg.adapter, data.spec, cfg.data.max_length, seed=cfg.train.seed)
    base_bytes = torch.cuda.memory_allocated() if on_gpu else 0
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    clock = StepClock(torch.cuda.synchronize if on_gpu else (lambda: None))
    t0 = time.perf_counter()
    trained = train_one_member(cfg, 0, data=data, scorer=scorer, label=run, extra_hooks=[clock])
    wall = time.perf_counter() - t0
    final = trained.metrics
    counts = tokens_per_step(data.train, scorer.tokenizer, cfg.train, cfg.train.seed, cfg.data.max_length)
    mib = 1 << 20
    result = {"run": run, "strategy": cfg.train.strategy,
              "zero_stage": cfg.train.zero_stage if cfg.train.strategy == "deepspeed" else None,
              "batch_size": batch_size, "max_length": cfg.data.max_length, "steps": cfg.train.steps,
              "warmup_steps": args.warmup_steps, "train_member_s": round(wall, 2),
              "engine_setup_and_first_step_s": round(clock.times[0] - t0, 2),
              **summarise(clock, counts, args.warmup_steps, batch_size),
              "base_model_mib": round(base_bytes / mib, 1),
              "peak_allocated_mib": round(torch.cuda.max_memory_allocated() / mib, 1) if on_gpu else None,
              "peak_reserved_mib": round(torch.cuda.max_memory_reserved() / mib, 1) if on_gpu else None,
              "lora_parameters": sum(p.numel() for _, p in scorer.lora_parameters()),
              "loss_curve": [round(m["train_loss"], 5) for m in trained.history],
              "final_val_nll": final.get("val_nll"), "final_val_accuracy": final.get("val_accuracy")}
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return result


def environment(args) -> dict:
    """Versions and the device name, recorded with the figures."""
    import importlib.metadata as md

    import torch

    versions = {}
    for name in ("torch", "deepspeed", "transformers", "peft", "datasets"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    gpu = torch.cuda.get_device_name() if args.device != "cpu" and torch.cuda.is_available() else None
    return {"gpu": gpu, "cuda": torch.version.cuda, "versions": versions, "world_size": 1}


def run_child(args, run: str, batch_size: int, model: str, scratch: Path) -> dict:
    """Run `--one run` in a fresh interpreter and read back its JSON."""
    out = scratch / f"{run}-b{batch_size}.json"
    cmd = [sys.executable, __file__, "--one", run, "--batch-sizes", str(batch_size), "--model", model,
           "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps), "--device", args.device,
           "--max-length", str(args.max_length), "--out", str(out), *args.overrides]
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        return {"run": run, "batch_size": batch_size, "error": f"exit status {proc.returncode}"}
    return json.loads(out.read_text())


def markdown_rows(results: list[dict]) -> list[str]:
    """Rows of the RESULTS.md table, one per run."""
    rows = ["| run | batch × max_length | tokens/s (non-pad) | step ms (mean / median) | peak GPU MiB "
            "(allocated / reserved) | loss first → last |", "|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['run']} | {r['batch_size']} | failed: {r['error']} | | | |")
            continue
        curve = r["loss_curve"]
        rows.append(f"| {r['run']} | {r['batch_size']} × {r['max_length']} | {r['tokens_per_s']:,.0f} | "
                    f"{r['step_ms_mean']:.1f} / {r['step_ms_median']:.1f} | "
                    f"{r['peak_allocated_mib']} / {r['peak_reserved_mib']} | {curve[0]:.3f} → {curve[-1]:.3f} |")
    return rows


def run_all(args) -> None:
    """Prepare the model once, then every (batch size, run) in its own subprocess; write JSON and markdown."""
    record = BenchmarkRecord(args.device)
    with tempfile.TemporaryDirectory(prefix="rayblora-dsbench-") as scratch:
        model, weights = args.model, "trained (as loaded)"
        if args.random_init_from:
            model = str(random_init_model(Path(args.random_init_from), Path(scratch) / "model"))
            weights = f"random init from {Path(args.random_init_from).name}/config.json"
        results = [run_child(args, run, b, model, Path(scratch))
                   for b in args.batch_sizes for run in args.runs]
    payload = record.write(args.out, {**environment(args), "weights": weights, "results": results})
    print(json.dumps({k: v for k, v in payload.items() if k != "results"}, indent=2))
    print("\n".join(markdown_rows(results)))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model.name (registry name or folder)")
    parser.add_argument("--random-init-from", default="", help="folder whose config.json gives the architecture")
    parser.add_argument("--runs", default="ddp,zero2,zero3", type=lambda s: [r for r in s.split(",") if r])
    parser.add_argument("--batch-sizes", default="8,32", type=lambda s: [int(b) for b in s.split(",") if b])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup-steps", type=int, default=5, help="steps left out of the timing")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--device", default="cuda", help="model.device (cpu for a smoke test)")
    parser.add_argument("--out", default="benchmarks/results/deepspeed_gpu.json")
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="extra dotted config overrides")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.runs) - set(RUNS))
    if unknown or (args.one and args.one not in RUNS):
        parser.error(f"--runs: unknown run {unknown or args.one}; known runs: {sorted(RUNS)}")
    return args


def main() -> None:
    args = parse_args()
    if args.one:
        BenchmarkRecord(args.device).write(args.out, measure(args, args.one, args.batch_sizes[0]))
    else:
        run_all(args)


if __name__ == "__main__":
    main()
