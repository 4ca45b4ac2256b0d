"""Which hidden state should a feature density score? The candidates of one trained artifact side by side.

    .venv/bin/python benchmarks/density_features.py --posterior runs/calibration-bench/seed0/posterior \
        --config jobs/configs/calibration.yaml [--rows 500] [--json benchmarks/results/density_features.json] \
        [overrides ...]

For the artifact's training rows, its in-domain test rows (the first `--rows`), each shift split and each far-OOD
split, one pass collects (all read from the forward every prediction runs anyway):

* `answer_member0` / `answer_members`: the final-normed hidden state the answer logits read, of member 0 / of every
  member (one Gaussian each, distances averaged);
* `trunk_last`, `trunk_mean`: the frozen layers' output (entering the first adapted layer) at the read position /
  averaged over the prompt's tokens;
* `trunk` (what `posterior.density_features: trunk` fits): the two concatenated, one Gaussian.

Each is fitted as :mod:`rayblora.density` does (class-conditional means, one Ledoit–Wolf-shrunk covariance) on the
training rows, and the AUROC of its Mahalanobis distance separating the in-domain test rows from each other split
(positive) is printed and written to `--json` with the machine record. One seed's artifact: a probe for choosing,
not a claim (the claims are `benchmarks/calibration.py`'s, over seeds).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from record import BenchmarkRecord
from rayblora.artifact import load_posterior
from rayblora.config import load_config
from rayblora.data.batches import eval_batches
from rayblora.data.sources import split_name
from rayblora.data.trained_splits import artifact_data
from rayblora.density import FeatureDensity
from rayblora.metrics import ood_auroc
from rayblora.workflows.members import trunk_cache_for
from rayblora.manifest import open_artifact


def collect(post, dataset, batch_size: int = 16) -> dict[str, np.ndarray]:
    """Every candidate feature of a split's rows: answer (K, N, H), trunk_last / trunk_mean (N, H), labels (N,)."""
    answer, trunk, labels = [], [], []
    for batch in eval_batches(dataset, post.scorer.tokenizer, batch_size, post.scorer.max_length):
        with post.scorer.capturing_features() as captured:
            post.scorer.logits_for_states(batch, post.members)
        rows = len(batch["input_ids"])
        answer.append(torch.cat(captured.answer).reshape(len(post.members), rows, -1))
        trunk.append(captured.trunk[0])
        labels.append(batch["labels"])
    trunk_all = torch.cat(trunk).numpy()
    half = trunk_all.shape[1] // 2
    return {"answer": torch.cat(answer, 1).numpy(), "trunk_last": trunk_all[:, :half],
            "trunk_mean": trunk_all[:, half:], "trunk": trunk_all, "labels": torch.cat(labels).numpy()}


def distances(train: dict, classes: int) -> dict:
    """name -> function(split features) -> (N,) distance, each candidate fitted on the training rows."""
    labels = torch.as_tensor(train["labels"]) if classes > 1 else torch.zeros(len(train["labels"]), dtype=torch.long)

    def fitted(features: np.ndarray) -> FeatureDensity:
        return FeatureDensity.fit(torch.as_tensor(features), labels, classes)

    members = fitted(train["answer"])

    def member_distance(split: dict, k: int) -> np.ndarray:
        return members.member(k).raw_scores(torch.as_tensor(split["answer"][k:k + 1]))[0][0].numpy()

    out = {"answer_member0": lambda s: member_distance(s, 0),
           "answer_members": lambda s: np.mean([member_distance(s, k) for k in range(len(s["answer"]))], 0)}
    for name in ("trunk_last", "trunk_mean", "trunk"):
        density = fitted(train[name][None])
        out[name] = lambda s, d=density, n=name: d.raw_scores(torch.as_tensor(s[n][None]))[0][0].numpy()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--posterior", required=True)
    parser.add_argument("--config", default="jobs/configs/calibration.yaml")
    parser.add_argument("--rows", type=int, default=500, help="in-domain test rows (the first of the test split)")
    parser.add_argument("--json", default="benchmarks/results/density_features.json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    record = BenchmarkRecord()
    cfg = load_config(args.config, args.overrides)
    post = load_posterior(args.posterior)
    post.scorer.use_trunk_cache(trunk_cache_for(cfg, post.scorer, print))
    data = artifact_data(open_artifact(args.posterior), cfg.data, print)
    in_domain = split_name(cfg.data.task)
    splits = {"train": data.train, in_domain: data.test.select(range(min(args.rows, len(data.test)))),
              **data.shifts, **data.far_ood}
    with torch.no_grad(), post.scorer.restoring_adapter():
        feats = {name: collect(post, ds) for name, ds in splits.items()}
    classes = post.scorer.num_choices if post.scorer.spec.kind == "classification" else 1
    others = [s for s in splits if s not in ("train", in_domain)]
    table = {}
    for name, score in distances(feats["train"], classes).items():
        base = score(feats[in_domain])
        table[name] = {s: ood_auroc(base, score(feats[s])) for s in others}
        shifts = [s for s in others if s in data.shifts]
        table[name]["shift_mean"] = float(np.mean([table[name][s] for s in shifts])) if shifts else float("nan")
        print(f"{name:16s} " + "  ".join(f"{s} {v:.3f}" for s, v in table[name].items()), flush=True)
    record.write(args.json, {"posterior": args.posterior, "rows": {s: len(d) for s, d in splits.items()},
                             "auroc": table})


if __name__ == "__main__":
    main()
