"""`rayblora` command line: assets | train | evaluate | demo (further verbs are added by their modules).

Every verb that takes `--config` also takes dotted overrides after it, e.g.
`rayblora train --config jobs/configs/tiny.yaml train.steps=5 posterior.members=2`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

from rayblora.config import ConfigError, load_config

DEMO_CONFIG = "jobs/configs/demo.yaml"


def _config_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--config", default=default, help="YAML config (see jobs/configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50")


def _cmd_assets(args) -> int:
    from rayblora import assets

    if args.action == "fetch":
        assets.fetch_all()
    else:
        assets.ensure_assets()
        print(f"assets ok under {assets.cache_dir()}")
    return 0


def _cmd_train(args) -> int:
    from rayblora.pipeline import train

    rounds = [f"hybrid.rounds={args.rounds}"] if args.rounds else []
    cfg = load_config(args.config, list(args.overrides) + rounds)
    if cfg.hybrid.rounds:  # dynamic fine-tuning: one posterior per round, each the next round's prior
        from rayblora.rounds import render_rounds_markdown, run_rounds

        print(render_rounds_markdown(run_rounds(cfg, in_process=args.in_process)))
        return 0
    print(train(cfg))
    return 0


def _cmd_evaluate(args) -> int:
    from rayblora.evaluate import evaluate
    from rayblora.report import render_markdown

    cfg = load_config(args.config, args.overrides)
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    report = evaluate(args.posterior, cfg, out_dir=args.out, methods=methods)
    print(render_markdown(report))
    return 0


def _cmd_demo(args) -> int:
    from rayblora.pipeline import train_and_evaluate

    if not Path(args.config).is_file():
        raise ConfigError(f"demo config {args.config} not found; run from the repository root or pass --config")
    train_and_evaluate(load_config(args.config, args.overrides))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayblora", description="Bayesian LoRA fine-tuning on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("assets", help="fetch or check the registry-shipped model and data")
    p.add_argument("action", choices=["fetch", "check"])
    p.set_defaults(func=_cmd_assets)
    p = sub.add_parser("train", help="train a posterior's members on Ray and write the artifact")
    _config_args(p)
    p.add_argument("--rounds", default="", help="dynamic fine-tuning over these tasks in order, e.g. "
                   "movie,tweets,amazon,nyt (sets hybrid.rounds; needs posterior.method=hybrid_vi)")
    p.add_argument("--in-process", action="store_true", help="with rounds: train in this process, without Ray")
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("evaluate", help="evaluate a posterior artifact and write the report")
    _config_args(p)
    p.add_argument("--posterior", required=True, help="posterior artifact directory")
    p.add_argument("--methods", default="", help="comma-separated rows (default: posterior.eval_methods)")
    p.add_argument("--out", default=None, help="report directory (default: output.dir)")
    p.set_defaults(func=_cmd_evaluate)
    p = sub.add_parser("demo", help="K=4 LoRA ensemble of SmolLM2 on VADER movie, evaluated under shift")
    _config_args(p, DEMO_CONFIG)
    p.set_defaults(func=_cmd_demo)
    for register in _extra_verbs():
        register(sub)
    return parser


def _extra_verbs() -> list[Callable]:
    """Verbs contributed by other modules (`add_cli(subparsers)` functions)."""
    import importlib

    verbs = []
    for module in ("rayblora.fit", "rayblora.tune", "rayblora.serve.app"):
        try:
            verbs.append(importlib.import_module(module).add_cli)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    return verbs


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from rayblora.artifact import ArtifactError
    from rayblora.assets import AssetError
    from rayblora.data.formats import DataError
    from rayblora.model import ModelError

    try:
        return args.func(args)
    except (ConfigError, DataError, ArtifactError, AssetError, ModelError) as exc:
        print(f"rayblora: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
