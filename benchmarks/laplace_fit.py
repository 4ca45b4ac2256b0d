"""Laplace-LoRA fit benchmarks on SmolLM2-135M-Instruct + VADER movie (one LoRA adapter, q/v of the last layers):

* curvature fit time vs one training epoch over the same examples (target <= 1.2x);
* fit time and peak memory vs laplace-torch's K-FAC (curvlinops, K-FAC-reduce) on the same adapter
  (target: memory <= laplace-torch's);
* `with_prior_precision` re-evaluation time vs one plain validation pass.

    .venv/bin/python benchmarks/laplace_fit.py [--n-train 64] [--n-val 64] [--layers 26,27,28,29]

Each measurement runs in a fresh subprocess (`--part NAME`), so peak memory is that part's own: the increase of
the process's peak RSS over its value just before the measured section (model loaded, one warm-up pass done).
Writes benchmarks/results/laplace_fit.json and prints markdown rows for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from record import BenchmarkRecord

PARTS = ("train_epoch", "ours_kfac", "ours_kfac_low_rank", "laplace_torch_kfac", "reevaluate")


def _config(args):
    from rayblora.config import load_config

    return load_config(None, [
        "model.name=smollm2-135m-instruct", "data.task=movie", "data.shift_tasks=[]",
        f"data.train_size={args.n_train}", f"data.val_size={args.n_val}", "data.test_size=32", "data.max_length=64",
        f"adapter.layers=[{args.layers}]", f"train.batch_size={args.batch}",
        f"train.steps={args.n_train // args.batch}",
        "train.warmup_steps=1", "laplace.prior_method=fixed", "laplace.link_samples=20"])


def _setup(args):
    """Config, data, scorer with a fixed adapter (LoRA B drawn N(0, 0.02²) so every block has curvature)."""
    import torch

    from rayblora.data import load_task_data
    from rayblora.model import set_lora_state
    from rayblora.scoring import build_scorer

    torch.set_num_threads(args.threads)
    cfg = _config(args)
    data = load_task_data(cfg.data)
    scorer = build_scorer(cfg.model, cfg.adapter, data.spec, cfg.data.max_length, seed=0)
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(v.shape, generator=g) * 0.02 if "lora_B" in k else v)
             for k, v in scorer.adapter_state().items()}
    set_lora_state(scorer.model, state)
    with torch.no_grad():
        scorer.logits(scorer.encode(data.train["prompt"][:args.batch]))  # warm-up
    return cfg, data, scorer, state


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measure(fn) -> dict:
    before = _peak_mib()
    t0 = time.perf_counter()
    extra = fn() or {}
    return {"seconds": round(time.perf_counter() - t0, 2), "peak_rss_increase_mib": round(_peak_mib() - before, 1),
            **extra}


def _tensor_mib(tensors) -> float:
    return round(sum(t.numel() * t.element_size() for t in tensors) / 2 ** 20, 2)


def part_train_epoch(args) -> dict:
    import dataclasses

    from rayblora.workflows.members import train_one_member

    cfg, data, scorer, _ = _setup(args)
    one_val = dataclasses.replace(data, validation=data.validation.select(range(1)))  # end-of-run check: negligible

    def epoch():
        train_one_member(cfg, 0, data=one_val, scorer=scorer, log=lambda _m: None)
        return {"steps": cfg.train.steps}

    return _measure(epoch)


def _ours(args, **laplace) -> dict:
    import dataclasses

    from rayblora.posteriors.laplace import LaplacePosterior, fit_curvature

    cfg, data, scorer, state = _setup(args)
    cfg = dataclasses.replace(cfg, laplace=dataclasses.replace(cfg.laplace, **laplace))

    def fit():
        curv = fit_curvature(scorer, state, data.train, cfg.laplace, cfg.train.batch_size)
        stored = _tensor_mib(curv.state_tensors().values())
        LaplacePosterior.from_curvatures(scorer, [state], [{}], {0: curv}, cfg)
        return {"curvature_mib": stored, "n_data": curv.n_data}

    return _measure(fit)


def part_ours_kfac(args) -> dict:
    return _ours(args)


def part_ours_kfac_low_rank(args) -> dict:
    return _ours(args, low_rank_threshold=256, low_rank=32)


def part_laplace_torch_kfac(args) -> dict:
    import torch
    from laplace import Laplace
    from torch.utils.data import DataLoader

    from rayblora.data.batches import make_batch

    cfg, data, scorer, _ = _setup(args)

    class ScorerLogits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = scorer.model

        def forward(self, batch):
            return scorer.logits(batch)

    rows = [data.train[i] for i in range(len(data.train))]
    loader = DataLoader(rows, batch_size=cfg.train.batch_size, collate_fn=lambda r: make_batch(
        scorer.tokenizer, {k: [x[k] for x in r] for k in r[0]}, scorer.max_length))

    def fit():
        la = Laplace(ScorerLogits().eval(), "classification", subset_of_weights="all", hessian_structure="kron",
                     dict_key_x="input_ids", dict_key_y="labels", asdl_fisher_kwargs={"kfac_approx": "reduce"})
        la.fit(loader)
        return {"curvature_mib": _tensor_mib(t for f in la.H_facs.kfacs for t in f)}

    return _measure(fit)


def part_reevaluate(args) -> dict:
    from rayblora.posteriors.laplace import LaplacePosterior, fit_curvature
    from rayblora.train.loop import validate

    cfg, data, scorer, state = _setup(args)
    curv = fit_curvature(scorer, state, data.train, cfg.laplace, cfg.train.batch_size)
    post = LaplacePosterior.from_curvatures(scorer, [state], [{}], {0: curv}, cfg)
    val, batch = data.validation, cfg.train.batch_size
    plain = _measure(lambda: {"val": validate(scorer, val, batch)})
    post.enable_jacobian_cache()
    first = _measure(lambda: {"nll": _nll(post.predict_dataset(val, batch), val)})
    priors = (0.1, 0.5, 2.0, 10.0, 50.0)
    sweep = _measure(lambda: {"nll": [_nll(post.with_prior_precision(p).predict_dataset(val, batch), val)
                                      for p in priors]})
    return {"validation_pass_s": plain["seconds"], "first_glm_pass_s": first["seconds"], "val_nll": sweep["nll"],
            "with_prior_precision_s": round(sweep["seconds"] / len(priors), 3), "n_val": len(val)}


def _nll(pred, dataset) -> float:
    import torch

    labels = torch.as_tensor(dataset["label"])
    return round(float(-pred.probs.gather(1, labels[:, None]).clamp_min(1e-12).log().mean()), 4)


def _run_part(name: str, argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--part", name, *argv], capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(f"part {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _rows(r: dict) -> str:
    ours, theirs, epoch, rev = r["ours_kfac"], r["laplace_torch_kfac"], r["train_epoch"], r["reevaluate"]
    low = r["ours_kfac_low_rank"]
    return "\n".join([
        f"| fit vs one training epoch ({epoch['steps']} steps) | {ours['seconds']} s vs {epoch['seconds']} s | "
        f"{ours['seconds'] / epoch['seconds']:.2f}x (target <= 1.2x) |",
        f"| fit time: ours vs laplace-torch K-FAC | {ours['seconds']} s vs {theirs['seconds']} s | "
        f"{ours['seconds'] / theirs['seconds']:.2f}x |",
        f"| peak RSS increase: ours vs laplace-torch | {ours['peak_rss_increase_mib']} MiB vs "
        f"{theirs['peak_rss_increase_mib']} MiB | target: ours <= laplace-torch |",
        f"| stored curvature: ours / ours low-rank (r=32, >256) / laplace-torch | {ours['curvature_mib']} / "
        f"{low['curvature_mib']} / {theirs['curvature_mib']} MiB | low-rank fit {low['seconds']} s |",
        f"| with_prior_precision vs one validation pass ({rev['n_val']} ex.) | {rev['with_prior_precision_s']} s vs "
        f"{rev['validation_pass_s']} s | first (caching) GLM pass {rev['first_glm_pass_s']} s |"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--n-val", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layers", default="26,27,28,29")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--part", choices=PARTS, default=None)
    parser.add_argument("--out", default="benchmarks/results/laplace_fit.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.part:
        print(json.dumps(globals()[f"part_{args.part}"](args)))
        return
    record = BenchmarkRecord()
    argv = [f"--n-train={args.n_train}", f"--n-val={args.n_val}", f"--batch={args.batch}",
            f"--layers={args.layers}", f"--threads={args.threads}"]
    results = {name: _run_part(name, argv) for name in PARTS}
    results = record.write(Path(args.out), {**results, "args": vars(args)})
    print(json.dumps(results, indent=2))
    print(_rows(results))


if __name__ == "__main__":
    main()
