"""Prior-precision sweep benchmark on SmolLM2-135M-Instruct + VADER movie (one LoRA adapter on q/v of the last
layers, LoRA B drawn N(0, 0.02²) as in benchmarks/laplace_fit.py, so every block has curvature):

* our 32-value Ray Tune prior sweep (`rayblora.workflows.sweeps.sweep_prior`: one caching GLM pass over the validation
  split, then 32 trials reading the cached Jacobians from the object store) vs one validation pass
  (target <= 1.5x), where "one validation pass" is the GLM predictive at one prior precision (a forward and C
  backward passes per batch: what one grid value costs without a cache); the plain forward-only pass is
  reported too;
* the same sweep vs laplace-torch's grid search (`optimize_prior_precision(method="gridsearch")`, probit GLM
  predictive, validation NLL) over the same 32 values, on the same adapter and data, its K-FAC fitted on the
  same training examples (target <= 0.1x). `--lt-values K` < 32 times the first K of the 32 values and scales
  the time by 32 / K (each value is an independent validation pass; the report says so).

    .venv/bin/python benchmarks/prior_sweep.py [--n-train 64] [--n-val 64] [--layers 26,27,28,29] [--lt-values 32]

Writes benchmarks/results/prior_sweep.json and prints the markdown rows for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from record import BenchmarkRecord

VALUES, LOW, HIGH = 32, 1e-4, 1e4


def _config(args, out_dir: str):
    from rayblora.config import load_config

    return load_config(None, [
        f"model.name={args.model}", "data.task=movie", "data.shift_tasks=[]", f"data.train_size={args.n_train}",
        f"data.val_size={args.n_val}", "data.test_size=32", "data.max_length=64", f"adapter.layers=[{args.layers}]",
        f"train.batch_size={args.batch}", "laplace.prior_method=fixed", "laplace.link=probit",
        f"cluster.num_cpus={args.cpus}", f"output.dir={out_dir}"])


def _setup(args, out_dir: str):
    """Config, data, scorer with the fixed adapter loaded, its state, and a fitted `laplace` posterior."""
    import torch

    from rayblora.data import load_task_data
    from rayblora.model import set_lora_state
    from rayblora.posteriors.laplace import LaplacePosterior
    from rayblora.scoring import build_scorer

    cfg = _config(args, out_dir)
    data = load_task_data(cfg.data)
    scorer = build_scorer(cfg.model, cfg.adapter, data.spec, cfg.data.max_length, seed=0)
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(v.shape, generator=g) * 0.02 if "lora_B" in k else v)
             for k, v in scorer.adapter_state().items()}
    set_lora_state(scorer.model, state)
    scorer.model.eval()
    post = LaplacePosterior.build(scorer, [state], [{}], data=data, config=cfg)
    return cfg, data, scorer, post


def _timed(fn):
    t0 = time.perf_counter()
    value = fn()
    return round(time.perf_counter() - t0, 2), value


def _validation_passes(cfg, data, scorer, post) -> dict:
    """One forward-only validation pass, and one fresh GLM pass at one prior precision (no Jacobian cache)."""
    from rayblora.train.loop import validate

    validate(scorer, data.validation.select(range(min(8, len(data.validation)))), cfg.train.batch_size)  # warm
    plain, _ = _timed(lambda: validate(scorer, data.validation, cfg.train.batch_size))
    glm, _ = _timed(lambda: post.predict_dataset(data.validation, cfg.train.batch_size))
    return {"plain_validation_s": plain, "glm_validation_s": glm}


def _our_sweep(cfg, post, root: Path) -> dict:
    """The Tune sweep on the saved artifact (the driver reuses the loaded base model's artifact load)."""
    from rayblora.artifact import save_posterior
    from rayblora.workflows.runtime import ensure_ray
    from rayblora.workflows.sweeps import sweep_prior

    artifact = save_posterior(post, root / "posterior", model_config=cfg.model, adapter_config=cfg.adapter)
    start, _ = _timed(lambda: ensure_ray(cfg.cluster))
    wall, result = _timed(lambda: sweep_prior(artifact, cfg, root / "sweep", values=VALUES, low=LOW, high=HIGH,
                                              log=lambda _m: None))
    best = result.best
    return {"ray_start_s": start, "sweep_wall_s": wall, **{f"sweep_{k}_s": round(v, 2)
                                                             for k, v in result.seconds.items()},
            "chosen_prior_precision": best["prior_precision"], "chosen_val_nll": round(best["val_nll"], 4),
            "val_nll_by_prior": {f"{r['prior_precision']:.4g}": round(r["val_nll"], 4) for r in result.rows}}


def _laplace_torch(cfg, data, scorer, k: int) -> dict:
    """laplace-torch K-FAC on the same adapter and training examples, then its grid search over the first `k`
    of the same 32 values (probit GLM predictive, validation NLL)."""
    import torch
    from laplace import Laplace
    from torch.utils.data import DataLoader

    from rayblora.data.batches import make_batch

    class ScorerLogits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = scorer.model

        def forward(self, batch):
            return scorer.logits(batch)

    def loader(split):
        rows = [split[i] for i in range(len(split))]
        return DataLoader(rows, batch_size=cfg.train.batch_size, collate_fn=lambda r: make_batch(
            scorer.tokenizer, {key: [x[key] for x in r] for key in r[0]}, scorer.max_length))

    la = Laplace(ScorerLogits().eval(), "classification", subset_of_weights="all", hessian_structure="kron",
                 dict_key_x="input_ids", dict_key_y="labels", asdl_fisher_kwargs={"kfac_approx": "reduce"})
    fit, _ = _timed(lambda: la.fit(loader(data.train)))
    step = 8.0 / (VALUES - 1)
    search, _ = _timed(lambda: la.optimize_prior_precision(
        pred_type="glm", method="gridsearch", val_loader=loader(data.validation), link_approx="probit",
        log_prior_prec_min=-4.0, log_prior_prec_max=-4.0 + step * (k - 1), grid_size=k))
    return {"laplace_torch_fit_s": fit, "laplace_torch_values_timed": k, "laplace_torch_search_s": search,
            "laplace_torch_search_32_s": round(search * VALUES / k, 2),
            "laplace_torch_prior_precision": float(la.prior_precision.reshape(-1)[0])}


def _rows(r: dict) -> str:
    total, glm, plain, lt = r["sweep_total_s"], r["glm_validation_s"], r["plain_validation_s"], \
        r["laplace_torch_search_32_s"]
    scaled = "" if r["laplace_torch_values_timed"] == VALUES else \
        f" (timed {r['laplace_torch_values_timed']} of the 32 values, scaled by 32/{r['laplace_torch_values_timed']})"
    return "\n".join([
        f"| 32-value Tune prior sweep vs one GLM validation pass ({r['n_val']} ex.) | {total} s vs {glm} s | "
        f"{total / glm:.2f}x (target <= 1.5x) |",
        f"| of which: caching GLM pass / 32 Tune trials | {r['sweep_cache_s']} s / {r['sweep_tune_s']} s | "
        f"Tune part {r['sweep_tune_s'] / plain:.2f}x a forward-only validation pass ({plain} s) |",
        f"| 32-value sweep vs laplace-torch grid search, same 32 values | {total} s vs {lt} s{scaled} | "
        f"{total / lt:.3f}x (target <= 0.1x) |",
        f"| chosen prior precision: ours (val NLL) / laplace-torch | {r['chosen_prior_precision']:.4g} / "
        f"{r['laplace_torch_prior_precision']:.4g} | our val NLL {r['chosen_val_nll']} |"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--n-val", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layers", default="26,27,28,29")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2, help="logical CPUs of the local Ray (Tune trials at once)")
    parser.add_argument("--lt-values", type=int, default=VALUES, help="laplace-torch grid values to time (<= 32)")
    parser.add_argument("--out", default="benchmarks/results/prior_sweep.json")
    args = parser.parse_args()
    record = BenchmarkRecord()
    for key, value in (("HF_HUB_OFFLINE", "1"), ("RAY_USAGE_STATS_ENABLED", "0"),
                       ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(key, value)
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="rayblora-prior-bench-") as tmp:
        cfg, data, scorer, post = _setup(args, tmp)
        results = {"n_val": len(data.validation), "n_train": len(data.train)}
        results.update(_validation_passes(cfg, data, scorer, post))
        results.update(_our_sweep(cfg, post, Path(tmp)))
        results.update(_laplace_torch(cfg, data, scorer, min(args.lt_values, VALUES)))
    results = record.write(Path(args.out), {**results, "args": vars(args)})
    print(json.dumps(results, indent=2))
    print(_rows(results))


if __name__ == "__main__":
    main()
