"""Serve posterior artifacts over HTTP: `rayblora serve`, `serve run jobs/serve_config.yaml`, `serve deploy`.

    rayblora serve --posterior runs/demo/posterior                       # one posterior, named "posterior"
    rayblora serve --posterior movie=runs/a --posterior tweets=runs/b --port 8000 serve.num_replicas=2

Routes (see /docs): POST /v1/predict, POST /v1/generate, GET /v1/posteriors, GET /healthz, /openapi.json,
/docs. The endpoint binds 127.0.0.1 unless `serve.host` says otherwise; a bearer token (`serve.auth_token`, or
the variable named by `serve.auth_token_env`) guards every route but /healthz. Artifacts are read only by the
verified loader. The deployments themselves (an HTTP ingress in front of the PosteriorServer replicas) are in
:mod:`rayblora.serve.deployment`, imported lazily: Ray Serve is slow to import and the CLI builds every verb's
parser.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

from rayblora.artifact import load_posterior
from rayblora.config import ConfigError, ServeConfig, load_config
from rayblora.manifest import open_artifact
from rayblora.serve.engine import PosteriorEntry
from rayblora.serve.schemas import NAME_PATTERN

APP_NAME = "rayblora"
BUILDER_ARGS = ("posteriors", "config", "overrides")
"""Keys of `args` understood by :func:`app_builder` (the `applications[].args` of a Serve config file)."""
PosteriorSource = Union[str, os.PathLike, PosteriorEntry]
"""A posterior to serve: its artifact directory, or its entry from :func:`check_posteriors`."""


def parse_posterior_specs(specs: Sequence[str]) -> dict[str, str]:
    """`["DIR", "name=DIR", ...]` -> {name: DIR}; a bare DIR is named after its folder."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not re.match(NAME_PATTERN, name):
            name, path = Path(spec.rstrip("/")).name, spec
        if name in out:
            raise ConfigError(f"--posterior {spec}: the name {name!r} is given twice; use name=DIR")
        out[name] = path
    return out


def check_posteriors(posteriors: Mapping[str, PosteriorSource]) -> dict[str, PosteriorEntry]:
    """The entries of the posteriors to serve, before anything is deployed: names validated, each artifact
    directory opened once (manifest, every checksum: ArtifactError naming the directory); an entry given is one
    checked before and passes as it is. Each replica reads its artifacts again when it loads them (another
    process, possibly another node)."""
    if not posteriors:
        raise ConfigError("serve: give at least one posterior (--posterior DIR or --posterior name=DIR)")
    out = {}
    for name, source in posteriors.items():
        if not isinstance(name, str) or not re.match(NAME_PATTERN, name):
            raise ConfigError(f"serve posterior name {name!r}: use letters, digits, '.', '_', '-' "
                              "(at most 64 characters)")
        out[name] = source if isinstance(source, PosteriorEntry) else PosteriorEntry.from_artifact(
            name, open_artifact(source))
    return out


def resolve_token(cfg: ServeConfig) -> str:
    """The bearer token: `serve.auth_token`, else the environment variable `serve.auth_token_env`."""
    if cfg.auth_token:
        return cfg.auth_token
    return os.environ.get(cfg.auth_token_env, "") if cfg.auth_token_env else ""


def build_app(serve_config: ServeConfig, posteriors: Mapping[str, PosteriorSource], loader=None):
    """The Serve application (``Deployment.bind``) serving `posteriors` (name -> artifact directory, or its entry
    from :func:`check_posteriors`).

    `loader(path, scorer=None) -> Posterior` defaults to the verified :func:`rayblora.artifact.load_posterior`.
    """
    from rayblora.serve.deployment import (PosteriorIngress, PosteriorServer,  # deferred: imports Ray Serve
                                           deployment_options)

    entries = check_posteriors(posteriors)
    model = PosteriorServer.options(**deployment_options(serve_config)).bind(entries, serve_config,
                                                                              loader or load_posterior)
    return PosteriorIngress.bind(model, serve_config, resolve_token(serve_config))


def app_builder(args: dict[str, Any]):
    """Application builder for Serve config files (`import_path: rayblora.serve.app:app_builder`).

    args: `posteriors` ({name: DIR} or a list of "name=DIR" / "DIR"), optional `config` (a rayblora YAML whose
    `serve` section applies) and `overrides` (dotted, e.g. ["serve.max_posteriors_per_replica=2"]).
    """
    unknown = sorted(set(args) - set(BUILDER_ARGS))
    if unknown:
        raise ConfigError(f"serve application args: unknown key {unknown[0]!r}; known keys: {list(BUILDER_ARGS)}")
    posteriors = args.get("posteriors")
    if isinstance(posteriors, str):
        posteriors = [posteriors]
    if isinstance(posteriors, (list, tuple)):
        posteriors = parse_posterior_specs([str(p) for p in posteriors])
    if not isinstance(posteriors, dict):
        raise ConfigError("serve application args.posteriors: give {name: DIR} or a list of name=DIR")
    overrides = args.get("overrides") or []
    if isinstance(overrides, str):
        overrides = [overrides]
    cfg = load_config(args.get("config"), overrides)
    return build_app(cfg.serve, posteriors)


def base_url(cfg: ServeConfig, route_prefix: str = "/") -> str:
    """URL a local client uses (a wildcard bind address is reached through loopback)."""
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{cfg.port}{route_prefix.rstrip('/')}"


def start_server(serve_config: ServeConfig, posteriors: Mapping[str, PosteriorSource], loader=None,
                 name: str = APP_NAME, route_prefix: str = "/") -> str:
    """Deploy on the connected Ray (starting Serve's HTTP proxy on `serve.host:serve.port` if Serve is not
    running yet); returns the application's base URL once it is healthy."""
    from ray import serve  # deferred: Ray Serve takes seconds to import; only a deployment needs it

    app = build_app(serve_config, posteriors, loader)
    serve.start(http_options={"host": serve_config.host, "port": serve_config.port})
    serve.run(app, name=name, route_prefix=route_prefix)
    return base_url(serve_config, route_prefix)


def serve_until_stopped(serve_config: ServeConfig, posteriors: Mapping[str, PosteriorSource],
                        on_ready: Callable[[str], object] = print) -> None:
    """Deploy `posteriors` on the connected Ray, call `on_ready(base_url)`, and block until Ctrl-C or SIGTERM,
    then shut Serve down (`rayblora serve`)."""
    on_ready(start_server(serve_config, posteriors))
    _wait_for_interrupt()


def _wait_for_interrupt() -> None:
    """Block until Ctrl-C or SIGTERM, then shut Serve down."""
    from ray import serve  # deferred, as in start_server

    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)  # also when started in the background (SIGINT ignored there)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("rayblora: shutting down", flush=True)
    finally:
        serve.shutdown()
