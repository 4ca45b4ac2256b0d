"""Entry point for `ray job submit`: a post-hoc prior-precision sweep of a Laplace-LoRA artifact on Ray Tune.

    ray job submit --working-dir . -- python jobs/sweep_prior.py --posterior runs/demo/posterior-laplace_ensemble \
        --values 32 --select val_nll --out runs/sweep-prior --config jobs/configs/demo.yaml [k=v ...]

The arguments are those of `rayblora sweep prior` (see `rayblora sweep prior --help`). The validation Jacobians are
computed once by the driver and shared with every trial through the object store; the chosen prior precision is
written into a new artifact `<out>/posterior` whose lineage names the parent and the sweep.
"""

from __future__ import annotations

import sys

from rayblora.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", "prior", *sys.argv[1:]]))
