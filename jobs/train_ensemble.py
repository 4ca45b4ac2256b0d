"""Entry point for `ray job submit`: train a posterior's members as Ray Train runs, write the artifact, evaluate.

    ray job submit --working-dir . -- python jobs/train_ensemble.py --config jobs/configs/demo.yaml [k=v ...]

The arguments are those of `rayblora train` (see `rayblora train --help`) plus `--no-eval` (train and write the
artifact only; without it the artifact is evaluated as with `rayblora train --evaluate`). Under `ray job submit`
the driver connects to the running cluster (RAY_ADDRESS is set by Ray); run directly, it starts a local Ray.
The config is validated before any cluster work.
"""

from __future__ import annotations

import sys

from rayblora.cli import main


def job_args(argv: list[str]) -> list[str]:
    """`rayblora train` arguments of this job: `--evaluate` unless `--no-eval` is given."""
    return ["train", *([] if "--no-eval" in argv else ["--evaluate"]), *(a for a in argv if a != "--no-eval")]


if __name__ == "__main__":
    sys.exit(main(job_args(sys.argv[1:])))
