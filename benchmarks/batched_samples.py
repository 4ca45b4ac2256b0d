"""Batched sample execution: S adapter states in one forward over the shared base vs S sequential forwards.

Same inputs (VADER movie test prompts, batches of B), same S LoRA states (SWAG-like Gaussian perturbations of one
adapter), SmolLM2-135M-Instruct, LoRA on q/v of all layers or of `--layers`. Target: time ratio batched /
sequential <= 0.5, where "sequential" is S full forwards. With `--layers` the batched path also runs the frozen
layers below the adapter once (`rayblora.trunk`); S sequential forwards sharing that trunk are timed too. The
paths are timed in one process, rotating their order batch by batch (so load drift on a shared machine hits all
alike). Peak memory is taken for each path in its own fresh subprocess over one call: the resident-set peak
(sampled every 2 ms) over the RSS before the call (CPU), or `torch.cuda.max_memory_allocated` over the
allocation before it (GPU). (`tracemalloc` only sees Python's allocator, not torch's tensor memory, so it is not
used.) A first check compares the logits.

    .venv/bin/python benchmarks/batched_samples.py [--samples 8] [--batch-size 8] [--batches 4] [--device cpu]
                                                   [--layers 26,27,28,29]

`--random-weights` builds the model from the cached config.json with random weights in a temporary folder (for
a machine where the cached weights are not available; timings depend on the architecture only). Writes
benchmarks/results/batched_samples[_<device>].json and prints a markdown row for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import torch

from rayblora import assets
from record import BenchmarkRecord
from rayblora.config import AdapterConfig, DataConfig, ModelConfig
from rayblora.data.batches import eval_batches
from rayblora.data.sources import load_task_data
from rayblora.scoring import build_scorer


def _random_weight_folder(root: Path) -> str:
    """A HF model folder with the cached SmolLM2 config + tokenizer and random weights (seed 0)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = assets.model_dir(assets.SMOLLM2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
    model.save_pretrained(root)
    AutoTokenizer.from_pretrained(source).save_pretrained(root)
    return str(root)


def _inputs(args, model_name: str):
    data = load_task_data(DataConfig(task="movie", shift_tasks=(), train_size=0, val_size=8,
                                     test_size=args.batch_size * (args.batches + 1), max_length=64))
    layers = tuple(int(x) for x in args.layers.split(",")) if args.layers else ()
    scorer = build_scorer(ModelConfig(name=model_name, device=args.device),
                          AdapterConfig(rank=8, alpha=16, layers=layers), data.spec, 64)
    scorer.max_batch_rows = args.samples * args.batch_size  # all S states in one forward
    batches = list(eval_batches(data.test, scorer.tokenizer, args.batch_size, 64))
    g = torch.Generator().manual_seed(0)
    base = scorer.adapter_state()
    states = [{k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in base.items()}
              for _ in range(args.samples)]
    return scorer, batches, states


class PeakRss:
    """Samples this process's resident set size every 2 ms while active (bytes)."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def current() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(0.002)

    def __enter__(self) -> "PeakRss":
        self.peak = self.current()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(run, batch, states, device: str) -> float:
    t0 = time.perf_counter()
    run(batch, states)
    _sync(device)
    return time.perf_counter() - t0


def _paths(scorer) -> dict:
    """Timed paths: S full forwards, S forwards sharing the frozen trunk, one batched forward."""
    return {"sequential": partial(scorer.logits_for_states_sequential, share_trunk=False),
            "sequential_shared_trunk": scorer.logits_for_states_sequential, "batched": scorer.logits_for_states}


def _time_both(scorer, batches, states, device: str) -> dict:
    """All paths on the same batches, rotating their order per batch (load drift hits all alike); batch 0 warms
    up."""
    paths = _paths(scorer)
    for run in paths.values():
        run(batches[0], states)
    times = {name: [] for name in paths}
    for i, batch in enumerate(batches[1:]):
        names = list(paths)
        for name in names[i % len(names):] + names[:i % len(names)]:
            times[name].append(_timed(paths[name], batch, states, device))
    return {name: {"seconds": sum(t), "seconds_per_batch": [round(x, 3) for x in t]} for name, t in times.items()}


def _peak_memory(run, batch, states, device: str) -> dict:
    """Peak memory of one call (warm-up included) over what the loaded model and states already hold."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        _timed(run, batch, states, device)
        peak = torch.cuda.max_memory_allocated()
    else:
        before = PeakRss.current()
        with PeakRss() as rss:
            _timed(run, batch, states, device)
        peak = rss.peak
    return {"peak_increase_mib": round((peak - before) / 2 ** 20, 1),
            "process_max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def _child(args, model_name: str) -> dict:
    """One subprocess job: check (logit agreement) | time (both paths) | sequential / batched (peak memory)."""
    scorer, batches, states = _inputs(args, model_name)
    if args.child == "check":
        batched = scorer.logits_for_states(batches[0], states)
        sequential = _paths(scorer)["sequential"](batches[0], states)
        return {"max_abs_logit_diff": float((batched - sequential).abs().max()),
                "logit_scale": float(sequential.abs().max())}
    if args.child == "time":
        return _time_both(scorer, batches, states, args.device)
    return _peak_memory(_paths(scorer)[args.child], batches[0], states, args.device)


def _run_child(mode: str, model_folder: str) -> dict:
    cmd = [sys.executable, __file__, *sys.argv[1:], "--child", mode]
    if model_folder:
        cmd += ["--model-folder", model_folder]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=4, help="timed batches (one more is the warm-up)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--layers", default="", help="adapted decoder layers, e.g. 26,27,28,29 (default: all)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--model-folder", default="", help=argparse.SUPPRESS)
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(_child(args, args.model_folder or assets.SMOLLM2)))
        return
    record = BenchmarkRecord(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        folder = _random_weight_folder(Path(tmp)) if args.random_weights else ""
        check, times = _run_child("check", folder), _run_child("time", folder)
        sequential = {**times["sequential"], **_run_child("sequential", folder)}
        batched = {**times["batched"], **_run_child("batched", folder)}
    figures = {"device": args.device, "torch_threads": torch.get_num_threads(),
               "model": assets.SMOLLM2 + (" (random weights)" if args.random_weights else ""),
              "samples": args.samples, "batch_size": args.batch_size, "timed_batches": args.batches,
              "adapter_layers": args.layers or "all", "check": check, "sequential": sequential,
              "sequential_shared_trunk": times["sequential_shared_trunk"], "batched": batched,
              "time_ratio": round(batched["seconds"] / sequential["seconds"], 3), "target_ratio": 0.5}
    suffix = "" if args.device == "cpu" else f"_{args.device.split(':')[0]}"
    suffix += f"_layers{args.layers.replace(',', '-')}" if args.layers else ""
    out = Path(args.out or f"benchmarks/results/batched_samples{suffix}.json")
    result = record.write(out, figures)
    print(json.dumps(result, indent=2))
    print(f"| {result['date']} | {result['machine']} | S={args.samples}, B={args.batch_size} | "
          f"{sequential['seconds'] / args.batches:.2f} | {batched['seconds'] / args.batches:.2f} | "
          f"{result['time_ratio']:.2f} | {sequential['peak_increase_mib']} | {batched['peak_increase_mib']} | "
          f"{check['max_abs_logit_diff']:.1e} |")


if __name__ == "__main__":
    main()
