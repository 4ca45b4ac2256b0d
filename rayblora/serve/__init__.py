"""HTTP serving of posterior artifacts on Ray Serve (see :mod:`rayblora.serve.app`).

schemas.py   pydantic request/response models with the configured limits
engine.py    the Ray-free core: served posteriors, input checks, batched prediction
generate.py  the Ray-free POST /v1/generate: settings, token checks, decoding off the loop, event stream
api.py       the FastAPI app: routes, error bodies, bearer token
deployment.py  the Serve application: an HTTP ingress (503 + Retry-After when no replica answers) and the
               posterior deployment (multiplexing, dynamic batching, backpressure options)
app.py       build_app / app_builder / start_server and the `rayblora serve` verb
"""
