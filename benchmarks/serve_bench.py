"""Serve benchmark: K = 1 vs K = 4 SmolLM2 LoRA posteriors behind the HTTP endpoint, and 10x overload.

    .venv/bin/python benchmarks/serve_bench.py [--posterior DIR] [--out benchmarks/results/serve_bench.json]

Measures, over real HTTP on loopback against one replica that holds both posteriors (one shared base model):
  1. latency at batch 1: sequential requests of one input each, p50 / p99;
  2. throughput under concurrency: `--concurrency` closed-loop clients, one input per request, inputs/s;
  3. overload: open-loop arrivals at 10x the sustainable request rate of the K = 1 posterior (phase 2) for
     `--overload-s`: share answered 503, p50 of those refusals, p99 of accepted requests; then recovery, the
     time from the end of the load until a probe answers 200 within 2x the batch-1 p50.
With `--density` the two posteriors are the K = 4 one without and with the source's feature density (its p50
overhead, issue 34).
The K = 4 posterior is the first 4 members of `--posterior` (any artifact with >= 4 members, e.g. the demo's MultiSWAG
run, whose members are the trajectories' SWA means; default runs/demo/posterior), or,
if absent, 4 SmolLM2 adapters trained for `--train-steps` steps each on VADER movie, cached under
~/.cache/rayblora/bench. The K = 1 posterior is its member 0 alone (MAP), saved next to it. The load generator
(aiohttp) runs in this process, on the same cores as the replica: figures include its cost.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rayblora.manifest import read_manifest  # noqa: E402
from record import BenchmarkRecord  # noqa: E402

BENCH_CACHE = Path.home() / ".cache" / "rayblora" / "bench"


def _tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def train_k4(steps: int, out: Path) -> Path:
    """4 freshly initialised SmolLM2 LoRA members (seeds 0..3), `steps` optimizer steps each, as an ensemble."""
    from rayblora.artifact import save_posterior
    from rayblora.config import load_config
    from rayblora.posteriors.ensemble import EnsemblePosterior
    from rayblora.workflows.members import train_members_in_process

    cfg = load_config(ROOT / "jobs/configs/demo.yaml", [
        f"train.steps={steps}", "train.warmup_steps=1", "train.torch_threads=0", "data.shift_tasks=[]",
        "data.far_ood_tasks=[]", "posterior.method=ensemble", "posterior.members=4", f"output.dir={out.parent / (out.name + '-members')}"])
    scorer, members = train_members_in_process(cfg, log=lambda _m: None)
    for m in members:
        print(f"member {m.index}: {m.metrics}", flush=True)
    return save_posterior(EnsemblePosterior(scorer, [m.adapter for m in members], [m.info() for m in members]),
                          out, model_config=cfg.model, adapter_config=cfg.adapter,
                          training={"steps": steps, "purpose": "serve benchmark"})


def derive(source: Path, k: int, out: Path, density: bool = False) -> Path:
    """An ensemble artifact of the first `k` members of `source` (reused if already derived from it), with the
    source's feature density when `density`."""
    from rayblora.artifact import load_posterior, save_posterior
    from rayblora.config import AdapterConfig, ModelConfig
    from rayblora.posteriors.ensemble import EnsemblePosterior

    digest = hashlib.sha256((source / "manifest.json").read_bytes()).hexdigest()
    if (out / "manifest.json").is_file() and read_manifest(out).get("lineage", {}).get("source") == digest:
        return out
    manifest = read_manifest(source)
    post = load_posterior(source)
    if len(post.members) < k:
        raise SystemExit(f"{source}: has {len(post.members)} members; the benchmark needs at least {k}")
    sub = EnsemblePosterior(post.scorer, post.members[:k], post.member_info[:k])
    if density:
        if post.density is None:
            raise SystemExit(f"{source}: has no feature density (add one with `rayblora fit --density`)")
        sub.density = post.density
    return save_posterior(sub, out, model_config=ModelConfig(**_tuples(manifest["base_model"]["config"])),
                          adapter_config=AdapterConfig(**_tuples(manifest["adapter"])),
                          training=manifest.get("training", {}),
                          lineage={"source": digest, "source_path": str(source), "members": list(range(k))})


def prepare_posteriors(args) -> dict[str, Path]:
    source = Path(args.posterior) if args.posterior else ROOT / "runs/demo/posterior"
    if not (source / "manifest.json").is_file():
        source = BENCH_CACHE / "serve-trained-k4"
        if not (source / "manifest.json").is_file():
            print(f"training 4 SmolLM2 members for {args.train_steps} steps each -> {source}", flush=True)
            train_k4(args.train_steps, source)
    if args.density:
        return {"k4": derive(source.resolve(), 4, BENCH_CACHE / "serve-k4"),
                "k4_density": derive(source.resolve(), 4, BENCH_CACHE / "serve-k4-density", density=True)}
    return {f"k{k}": derive(source.resolve(), k, BENCH_CACHE / f"serve-k{k}") for k in (1, 4)}


def movie_texts(n: int = 64) -> list[str]:
    from rayblora.data.sources import read_rows

    rows = read_rows("movie")
    pick = np.random.default_rng(0).choice(len(rows), size=n, replace=False)
    return [rows[int(i)]["text"] for i in pick]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def post(session, url: str, name: str, text: str) -> tuple[int, float]:
    start = time.perf_counter()
    async with session.post(url, json={"posterior": name, "inputs": [{"text": text}]}) as r:
        await r.read()
        return r.status, time.perf_counter() - start


def pct(xs, q: float) -> float:
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


async def sequential(session, url, name, texts, n: int) -> dict:
    lat = []
    for i in range(n):
        status, s = await post(session, url, name, texts[i % len(texts)])
        if status != 200:
            raise RuntimeError(f"{name}: status {status} at batch 1")
        lat.append(s)
    return {"p50_ms": 1e3 * pct(lat, 50), "p99_ms": 1e3 * pct(lat, 99), "requests": n}


async def closed_loop(session, url, name, texts, concurrency: int, seconds: float) -> dict:
    done: list[tuple[int, float]] = []
    stop = time.perf_counter() + seconds

    async def client(w: int) -> None:
        i = w
        while time.perf_counter() < stop:
            done.append(await post(session, url, name, texts[i % len(texts)]))
            i += concurrency

    start = time.perf_counter()
    await asyncio.gather(*(client(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - start
    ok = [s for code, s in done if code == 200]
    return {"concurrency": concurrency, "inputs_per_s": len(ok) / elapsed, "p50_ms": 1e3 * pct(ok, 50),
            "p99_ms": 1e3 * pct(ok, 99), "errors": len(done) - len(ok), "seconds": elapsed}


async def recovery(session, url, name, text, since: float, target_s: float, limit_s: float = 120.0) -> float:
    """Seconds from `since` until a probe answers 200 within `target_s`."""
    while time.perf_counter() - since < limit_s:
        code, s = await post(session, url, name, text)
        if code == 200 and s <= target_s:
            return time.perf_counter() - since
        await asyncio.sleep(0.05)
    return float("inf")


async def overload(session, url, name, texts, rate: float, seconds: float, target_s: float) -> dict:
    """Open-loop arrivals at `rate` per second for `seconds`, then recovery probing while the backlog drains."""
    tasks, start, i = [], time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        due = start + i / rate
        if due > time.perf_counter():
            await asyncio.sleep(due - time.perf_counter())
        tasks.append(asyncio.create_task(post(session, url, name, texts[i % len(texts)])))
        i += 1
    end = time.perf_counter()
    recover_s = await recovery(session, url, name, texts[0], end, target_s)
    results = await asyncio.gather(*tasks)
    accepted = [s for code, s in results if code == 200]
    refused = [s for code, s in results if code == 503]
    return {"rate_per_s": rate, "seconds": seconds, "sent": len(results),
            "share_503": len(refused) / len(results), "other_errors": len(results) - len(accepted) - len(refused),
            "refusal_p50_ms": 1e3 * pct(refused, 50), "accepted_p50_ms": 1e3 * pct(accepted, 50),
            "accepted_p99_ms": 1e3 * pct(accepted, 99), "recovery_s": recover_s}


async def measure(url: str, names: list[str], texts: list[str], args) -> dict:
    import aiohttp

    out: dict = {"cold_first_request_s": {}, "batch1": {}, "throughput": {}}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=300)) as session:
        for name in names:
            code, s = await post(session, url, name, texts[0])
            out["cold_first_request_s"][name] = s
        for name in names:
            await sequential(session, url, name, texts, 3)  # warm
        out["batch1"] = await alternating_batch1(session, url, names, texts, args)
        for name in names:
            out["throughput"][name] = await closed_loop(session, url, name, texts, args.concurrency,
                                                        args.throughput_s)
            print(name, "throughput", out["throughput"][name], flush=True)
        if "k1" not in names:
            return out
        rate = args.overload_factor * out["throughput"]["k1"]["inputs_per_s"]
        target = 2 * out["batch1"]["k1"]["p50_ms"] / 1e3
        out["overload"] = await overload(session, url, "k1", texts, rate, args.overload_s, target)
        print("overload", out["overload"], flush=True)
    return out


async def alternating_batch1(session, url, names, texts, args) -> dict:
    """Batch-1 latency of each posterior over `args.rounds` rounds of `args.latency_requests` requests, the
    posteriors taking turns each round (so a drift in the machine's load falls on both): p50 / p99 of all."""
    lat: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            for i in range(args.latency_requests):
                status, s = await post(session, url, name, texts[i % len(texts)])
                if status != 200:
                    raise RuntimeError(f"{name}: status {status} at batch 1")
                lat[name].append(s)
    out = {name: {"p50_ms": 1e3 * pct(v, 50), "p99_ms": 1e3 * pct(v, 99), "requests": len(v)}
           for name, v in lat.items()}
    print("batch 1", out, flush=True)
    return out


def targets(r: dict) -> dict:
    if "k4_density" in r["batch1"]:
        plain, dens = r["batch1"]["k4"]["p50_ms"], r["batch1"]["k4_density"]["p50_ms"]
        t0, t1 = r["throughput"]["k4"]["inputs_per_s"], r["throughput"]["k4_density"]["inputs_per_s"]
        return {"density_over_plain_p50": dens / plain, "p50_overhead_target_met": dens <= 1.05 * plain,
                "density_over_plain_throughput": t1 / t0}
    k1, k4 = r["batch1"]["k1"]["p50_ms"], r["batch1"]["k4"]["p50_ms"]
    t1, t4 = r["throughput"]["k1"]["inputs_per_s"], r["throughput"]["k4"]["inputs_per_s"]
    return {"k4_over_k1_p50": k4 / k1, "p50_target_met": k4 <= 1.5 * k1,
            "k4_over_k1_throughput": t4 / t1, "throughput_target_met": t4 >= 0.9 / 4 * t1}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--posterior", default=None, help="artifact with >= 4 members (default runs/demo/posterior)")
    p.add_argument("--train-steps", type=int, default=5, help="steps per member when training the fallback")
    p.add_argument("--latency-requests", type=int, default=30)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--throughput-s", type=float, default=15.0)
    p.add_argument("--overload-s", type=float, default=10.0)
    p.add_argument("--overload-factor", type=float, default=10.0)
    p.add_argument("--torch-threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1, help="batch-1 rounds, the posteriors taking turns")
    p.add_argument("--density", action="store_true",
                   help="compare the K = 4 posterior with and without its feature density (--posterior must carry "
                        "one) instead of K = 1 against K = 4; no overload phase")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/serve_bench.json"))
    args = p.parse_args()

    import ray
    from ray import serve

    from rayblora.config import ServeConfig
    from rayblora.serve.app import start_server

    paths = prepare_posteriors(args)
    record = BenchmarkRecord()
    cfg = ServeConfig(port=free_port(), torch_threads=args.torch_threads, max_posteriors_per_replica=2,
                      auth_token_env="")
    ray.init(address="local", num_cpus=4, include_dashboard=True, log_to_driver=False)
    try:
        url = start_server(cfg, {name: str(path) for name, path in paths.items()}, name="serve-bench")
        result = asyncio.run(measure(f"{url}/v1/predict", list(paths), movie_texts(), args))
    finally:
        serve.shutdown()
        ray.shutdown()
    result.update(targets=targets(result), serve_config=dataclasses.asdict(cfg),
                  adapter=read_manifest(paths["k4"])["adapter"],
                  posteriors={k: str(v) for k, v in paths.items()}, ray=ray.__version__)
    record.write(args.out, result)
    print(json.dumps(result["targets"], indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
