"""The request-body byte limit of the endpoint, at the ASGI level (no Ray): 413 before the body is read."""

from __future__ import annotations

import asyncio
import json

import pytest

from rayblora.config import ConfigError, ServeConfig, load_config
from rayblora.serve.api import make_api

CHUNK = 64 * 1024


class EchoService:
    def __init__(self, config):
        self.config = config

    async def predict(self, body):
        self.seen = body.inputs[0].text
        return {"posterior": "x", "method": "map", "version": "0", "created": "", "samples": 1,
                "abstain_threshold": 0.0, "abstain_score": "confidence", "predictions": []}

    async def list_posteriors(self):
        return {"default": "x", "posteriors": []}


def call(app, body: bytes, chunks: int, content_length: bool):
    """POST /v1/predict with `body` repeated over `chunks` messages; returns (status, message, chunks read,
    chunks read before the answer was sent)."""
    read = {"n": 0, "before_answer": None}
    headers = [(b"content-type", b"application/json")]
    if content_length:
        headers.append((b"content-length", str(len(body) * chunks).encode()))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/predict", "raw_path": b"/v1/predict", "query_string": b"",
             "root_path": "", "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    sent = []

    async def receive():
        read["n"] += 1
        if read["n"] > chunks:
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": body, "more_body": read["n"] < chunks}

    async def send(message):
        if message["type"] == "http.response.start":
            read["before_answer"] = read["n"]
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(payload) if payload else {}, min(read["n"], chunks), read["before_answer"]


@pytest.fixture(scope="module")
def service():
    return EchoService(ServeConfig(max_body_bytes=4 * CHUNK, drain_bytes=50 * CHUNK))


@pytest.fixture(scope="module")
def app(service):
    return make_api(service)


def test_content_length_over_the_limit_is_refused_without_reading_then_drained_to_a_bound(app):
    status, body, read, before_answer = call(app, b"x" * CHUNK, 100, content_length=True)
    assert status == 413 and before_answer == 0  # answered before a byte is read
    assert "serve.max_body_bytes" in body["message"] and body["fields"][0]["field"] == "body"
    assert read == 50  # then the rest is read and dropped up to serve.drain_bytes (50 chunks), and no further
    assert call(app, b"x" * CHUNK, 20, content_length=True)[2] == 20  # a shorter upload is drained to its end


def test_chunked_body_over_the_limit_is_refused_once_it_passes_it(app):
    status, _, read, before_answer = call(app, b"x" * CHUNK, 100, content_length=False)
    assert status == 413 and before_answer == 5  # 4 chunks fit; the fifth passes the limit
    assert read == 5 + 50  # then at most serve.drain_bytes more are read and dropped


def test_bodies_within_the_limit_reach_the_application(app, service):
    for with_length in (True, False):
        service.seen = None
        ok = json.dumps({"inputs": [{"text": f"fine film {with_length}"}]}).encode()
        status = call(app, ok, 1, content_length=with_length)[0]
        assert status == 200 and service.seen == f"fine film {with_length}"
    status = call(app, b"{not json", 1, content_length=False)[0]  # still the JSON check behind it
    assert status == 422


def test_default_limit_is_sized_from_the_input_limits():
    cfg = ServeConfig()
    assert cfg.body_limit() == cfg.max_inputs_per_request * cfg.max_tokens_per_input * 64 + 64 * 1024
    assert ServeConfig(max_body_bytes=1000).body_limit() == 1000
    assert cfg.body_limit() < 12 * 1024 * 1024  # the 12 MB body of the fuzz run is refused
    with pytest.raises(ConfigError, match="serve.max_body_bytes"):
        load_config(None, ["serve.max_body_bytes=-1"])
