"""The Ray Serve application: an HTTP ingress in front of the deployment that holds the posteriors.

Per request, in the ingress (:class:`PosteriorIngress`, FastAPI): the body limit (413), the bearer token (401),
schema validation (422); then one call through a deployment handle to a :class:`PosteriorServer` replica: the
posterior by name (404 if unknown) from Serve's model multiplexing (an LRU of `serve.max_posteriors_per_replica`
loaded posteriors) -> per-posterior checks (422) -> dynamic batching across requests (``@serve.batch``, batch
size counted in inputs) -> one forward per posterior and batch, run on one worker thread so the event loop keeps
answering. POST /v1/generate (:mod:`rayblora.serve.generate`) resolves its posterior the same way and decodes on
that same thread, one request at a time (not batched across requests).

Why two deployments (Serve's model composition): the ingress outlives the model replicas. When a replica cannot
answer — beyond `max_ongoing_requests` per replica plus `max_queued_requests` (predict and generate together, a
stream until its last event), killed (out of memory, a lost node), or silent past `serve.request_timeout_s` —
the client gets 503 with `Retry-After: serve.retry_after_s`, never a 500 or a hang, and Serve starts a new
replica behind the same ingress.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator

import torch
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from starlette.exceptions import HTTPException

from rayblora.config import ServeConfig
from rayblora.manifest import ArtifactError
from rayblora.predictive import Predictive
from rayblora.serve.api import make_api
from rayblora.serve.engine import (InputError, Job, LoadedPosterior, Loader, PosteriorEntry, PosteriorPool,
                                   UnknownPosterior, check_abstain_score, count_inputs, predict_jobs, predictions)
from rayblora.serve.generate import Generating
from rayblora.serve.schemas import generate_request_model, request_model

DEPLOYMENT_NAME = "PosteriorServer"
INGRESS_NAME = "PosteriorIngress"
UNAVAILABLE = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError, BackPressureError)
"""What a handle call raises when no replica can answer it: answered 503 + Retry-After."""
PASSED_ON = (InputError, UnknownPosterior, ArtifactError, HTTPException)
"""Errors a replica raises about the request, answered by the ingress as if raised there (422, 404, 500)."""


@serve.deployment(name=DEPLOYMENT_NAME)
class PosteriorServer:
    """A replica holding the posteriors; called by :class:`PosteriorIngress` with validated bodies as dicts.

    Args:
        posteriors: posterior name -> its entry (:func:`rayblora.serve.app.check_posteriors`; the first is the
            default).
        config: the `serve` config section (limits, batching, LRU bound, threads).
        loader: `loader(path, scorer=None)` -> Posterior; the verified :func:`rayblora.artifact.load_posterior`
            unless a test swaps it.
    """

    def __init__(self, posteriors: dict[str, PosteriorEntry], config: ServeConfig, loader: Loader):
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.config = config
        self._bodies = {"predict": request_model(config), "generate": generate_request_model(config)}
        self._pool = PosteriorPool(posteriors, loader)
        self._forward = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rayblora-forward")
        self._generating = Generating(self._forward, config.max_tokens_per_input)

        async def load_named(name: str):
            return await asyncio.get_running_loop().run_in_executor(self._forward, self._pool.load, name)

        self._posterior = serve.multiplexed(max_num_models_per_replica=config.max_posteriors_per_replica)(
            load_named)
        self._predict_batched.set_max_batch_size(config.batch_max_size)
        self._predict_batched.set_batch_wait_timeout_s(config.batch_wait_timeout_s)

    def list_posteriors(self) -> dict[str, Any]:
        return self._pool.describe()

    async def _loaded(self, requested: str | None) -> LoadedPosterior:
        """The posterior named in the body, else by the `serve_multiplexed_model_id` header, else the default."""
        name = requested or serve.get_multiplexed_model_id() or self._pool.default
        self._pool.entry(name)  # UnknownPosterior (404) before anything is loaded
        return await self._posterior(name)

    async def predict(self, fields: dict[str, Any]) -> dict[str, Any]:
        """The POST /v1/predict answer for a validated body (the fields of a `schemas.request_model`)."""
        body = self._bodies["predict"].model_validate(fields)
        loaded = await self._loaded(body.posterior)
        job = loaded.rows(body.inputs, self.config.max_tokens_per_input)
        check_abstain_score(loaded.posterior, body.abstain_score)
        pred = await self._predict_batched(job)
        num_choices = job.num_choices
        threshold = self.config.abstain_threshold if body.abstain_threshold is None else body.abstain_threshold
        entry, density = loaded.entry, loaded.posterior.density
        return {"posterior": entry.name, "method": entry.method, "version": entry.version,
                "created": entry.created, "samples": loaded.posterior.num_samples,
                "abstain_threshold": threshold, "abstain_score": body.abstain_score,
                "density_threshold": None if density is None else density.threshold,
                "predictions": predictions(loaded.spec, pred, num_choices, threshold, body.abstain_score)}

    async def generate(self, fields: dict[str, Any]) -> dict[str, Any]:
        """The POST /v1/generate answer for a validated body (the fields of a `schemas.generate_request_model`)."""
        body = self._bodies["generate"].model_validate(fields)
        return await self._generating.answer(await self._loaded(body.posterior), body)

    async def generate_stream(self, fields: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The events of a streamed POST /v1/generate answer (`"stream": true`), called with `stream=True`."""
        body = self._bodies["generate"].model_validate(fields)
        events = await self._generating.stream(await self._loaded(body.posterior), body)
        async for event in events:
            yield event

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=count_inputs)
    async def _predict_batched(self, jobs: list[Job]) -> list[Predictive]:
        """Jobs of several requests -> their predictives, computed on the forward thread."""
        return await asyncio.get_running_loop().run_in_executor(self._forward, predict_jobs, jobs)


@serve.deployment(name=INGRESS_NAME, max_ongoing_requests=10_000, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class PosteriorIngress:
    """The HTTP front of the endpoint (:func:`rayblora.serve.api.make_api`): validates requests and passes them to
    a :class:`PosteriorServer` replica through `model`, a deployment handle, answering 503 + Retry-After when no
    replica can (:data:`UNAVAILABLE`, or no answer within `serve.request_timeout_s`).

    Args:
        model: the handle of the PosteriorServer deployment.
        config: the `serve` config section.
        auth_token: bearer token required on every route but /healthz ("" = none).
    """

    def __init__(self, model, config: ServeConfig, auth_token: str = ""):
        self.config, self._model, self._auth_token = config, model, auth_token

    def __serve_build_asgi_app__(self):
        return make_api(self, self._auth_token)

    def _handle(self, posterior: str | None, **options):
        """The model handle, routed by the posterior's name (the body's, else the multiplexing header's)."""
        name = posterior or serve.get_multiplexed_model_id()
        if name:
            options["multiplexed_model_id"] = name
        return self._model.options(**options) if options else self._model

    def _unavailable(self, why: str) -> HTTPException:
        return HTTPException(503, f"no posterior replica can answer now ({why}); retry after "
                                  f"{self.config.retry_after_s:g} s",
                             headers={"Retry-After": str(max(1, round(self.config.retry_after_s)))})

    async def _answer(self, call):
        """Await a handle call's answer, translating what the replica side raised."""
        try:
            return await asyncio.wait_for(call, self.config.request_timeout_s)
        except asyncio.TimeoutError:
            raise self._unavailable(f"no answer within serve.request_timeout_s = {self.config.request_timeout_s:g} "
                                    "s") from None
        except UNAVAILABLE as exc:
            raise self._unavailable(type(exc).__name__) from None
        except RayTaskError as exc:
            if isinstance(exc.cause, PASSED_ON):
                raise exc.cause from None
            raise

    async def list_posteriors(self) -> dict[str, Any]:
        return await self._answer(self._handle(None).list_posteriors.remote())

    async def predict(self, body: Any) -> dict[str, Any]:
        return await self._answer(self._handle(body.posterior).predict.remote(body.model_dump()))

    async def generate(self, body: Any) -> dict[str, Any]:
        return await self._answer(self._handle(body.posterior).generate.remote(body.model_dump()))

    async def generate_stream(self, body: Any) -> AsyncIterator[dict[str, Any]]:
        """The stream's events; a refusal before its first event is still an HTTP error (raised here)."""
        events = self._handle(body.posterior, stream=True).generate_stream.remote(body.model_dump())
        try:
            first = await self._answer(events.__anext__())
        except BaseException:
            events.cancel()
            raise
        return self._rest_of_stream(first, events)

    async def _rest_of_stream(self, first: dict[str, Any], events) -> AsyncIterator[dict[str, Any]]:
        try:
            yield first
            async for event in events:
                yield event
        except UNAVAILABLE as exc:
            yield {"event": "error", "message": f"the replica decoding this answer stopped ({type(exc).__name__}); "
                                                "retry the request"}
        finally:
            events.cancel()


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
