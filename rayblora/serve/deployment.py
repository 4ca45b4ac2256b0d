"""The Ray Serve deployment: one replica serves several posteriors behind a FastAPI ingress.

Per request: schema validation (FastAPI + pydantic, 422) -> the posterior by name (404 if unknown) from Serve's
model multiplexing (an LRU of `serve.max_posteriors_per_replica` loaded posteriors) -> per-posterior checks
(422) -> dynamic batching across requests (``@serve.batch``, batch size counted in inputs) -> one forward per
posterior and batch, run on one worker thread so the event loop keeps answering. POST /v1/generate
(:mod:`rayblora.serve.generate`) resolves its posterior the same way and decodes on that same thread, one
request at a time (not batched across requests). Overload never reaches a replica: beyond
`max_ongoing_requests` per replica plus `max_queued_requests` (predict and generate requests together, a stream
until its last event), the proxy answers 503.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator

import torch
from ray import serve

from rayblora.config import ServeConfig
from rayblora.predictive import Predictive
from rayblora.serve.api import make_api
from rayblora.serve.engine import (Job, LoadedPosterior, Loader, PosteriorPool, count_inputs, predict_jobs,
                                   predictions)
from rayblora.serve.generate import Generating

DEPLOYMENT_NAME = "PosteriorServer"


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class PosteriorServer:
    """A replica of the endpoint.

    Args:
        posteriors: posterior name -> artifact directory (absolute; the first is the default).
        config: the `serve` config section (limits, batching, LRU bound, threads).
        loader: `loader(path, scorer=None)` -> Posterior; the verified :func:`rayblora.artifact.load_posterior`
            unless a test swaps it.
        auth_token: bearer token required on every route but /healthz ("" = none).
    """

    def __init__(self, posteriors: dict[str, str], config: ServeConfig, loader: Loader, auth_token: str = ""):
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.config = config
        self._auth_token = auth_token
        self._pool = PosteriorPool(posteriors, loader)
        self._forward = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rayblora-forward")
        self._generating = Generating(self._forward, config.max_tokens_per_input)

        async def load_named(name: str):
            return await asyncio.get_running_loop().run_in_executor(self._forward, self._pool.load, name)

        self._posterior = serve.multiplexed(max_num_models_per_replica=config.max_posteriors_per_replica)(
            load_named)
        self._predict_batched.set_max_batch_size(config.batch_max_size)
        self._predict_batched.set_batch_wait_timeout_s(config.batch_wait_timeout_s)

    def __serve_build_asgi_app__(self):
        return make_api(self, self._auth_token)

    def list_posteriors(self) -> dict[str, Any]:
        return self._pool.describe()

    async def _loaded(self, requested: str | None) -> LoadedPosterior:
        """The posterior named in the body, else by the `serve_multiplexed_model_id` header, else the default."""
        name = requested or serve.get_multiplexed_model_id() or self._pool.default
        self._pool.entry(name)  # UnknownPosterior (404) before anything is loaded
        return await self._posterior(name)

    async def predict(self, body: Any) -> dict[str, Any]:
        """The POST /v1/predict answer for a validated body (a `schemas.request_model` instance)."""
        loaded = await self._loaded(body.posterior)
        job = loaded.rows(body.inputs, self.config.max_tokens_per_input)
        pred = await self._predict_batched(job)
        num_choices = job.num_choices
        threshold = self.config.abstain_threshold if body.abstain_threshold is None else body.abstain_threshold
        entry = loaded.entry
        return {"posterior": entry.name, "method": entry.method, "version": entry.version,
                "created": entry.created, "samples": loaded.posterior.num_samples,
                "abstain_threshold": threshold,
                "predictions": predictions(loaded.spec, pred, num_choices, threshold)}

    async def generate(self, body: Any) -> dict[str, Any]:
        """The POST /v1/generate answer for a validated body (a `schemas.generate_request_model` instance)."""
        return await self._generating.answer(await self._loaded(body.posterior), body)

    async def generate_stream(self, body: Any) -> AsyncIterator[dict[str, Any]]:
        """The events of a streamed POST /v1/generate answer (`"stream": true`)."""
        return await self._generating.stream(await self._loaded(body.posterior), body)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=count_inputs)
    async def _predict_batched(self, jobs: list[Job]) -> list[Predictive]:
        """Jobs of several requests -> their predictives, computed on the forward thread."""
        return await asyncio.get_running_loop().run_in_executor(self._forward, predict_jobs, jobs)


def deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """`Deployment.options` from the serve config: replicas or autoscaling, backpressure, CPUs."""
    options: dict[str, Any] = {"max_ongoing_requests": cfg.max_ongoing_requests,
                               "max_queued_requests": cfg.max_queued_requests,
                               "ray_actor_options": {"num_cpus": cfg.replica_cpus}}
    if cfg.autoscaling_max_replicas:
        options["autoscaling_config"] = {"min_replicas": cfg.autoscaling_min_replicas,
                                         "max_replicas": cfg.autoscaling_max_replicas,
                                         "target_ongoing_requests": cfg.autoscaling_target_ongoing_requests}
    else:
        options["num_replicas"] = cfg.num_replicas
    return options
