"""Entry point for `ray job submit`: train a posterior's members as Ray Train runs, write the artifact, evaluate.

    ray job submit --working-dir . -- python jobs/train_ensemble.py --config jobs/configs/demo.yaml [k=v ...]

Under `ray job submit` the driver connects to the running cluster (RAY_ADDRESS is set by Ray); run directly, it
starts a local Ray. The config is validated before any cluster work.
"""

from __future__ import annotations

import argparse
import sys

from rayblora.config import ConfigError, load_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (jobs/configs/*.yaml)")
    parser.add_argument("--no-eval", action="store_true", help="train and write the artifact only")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"train_ensemble: config error: {exc}", file=sys.stderr)
        return 2
    from rayblora.pipeline import train, train_and_evaluate

    if args.no_eval:
        train(cfg)
    else:
        train_and_evaluate(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
