"""Entry point for `ray job submit`: a train sweep (one member per Tune trial, as a Ray Train run; ASHA on val_nll).

    ray job submit --working-dir . -- python jobs/sweep_train.py --config jobs/configs/demo.yaml \
        --space jobs/configs/sweep_space.yaml --num-samples 8 --out runs/sweep-train [k=v ...]

The arguments are those of `rayblora sweep train` (see `rayblora sweep train --help`). Under `ray job submit` the
driver connects to the running cluster (RAY_ADDRESS is set by Ray); the config and the search space are checked
before any cluster work. Resubmitting with the same --out continues an interrupted sweep (Tuner.restore). On a
multi-node cluster, --out (or cluster.storage_path) must be on storage every node sees.
"""

from __future__ import annotations

import sys

from rayblora.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", "train", *sys.argv[1:]]))
