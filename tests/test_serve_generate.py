"""POST /v1/generate: the FastAPI app in process over a Ray-free service (tiny posterior artifacts), and one
end-to-end run through Ray Serve's proxy (non-streamed and streamed answers)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from conftest import delete_serve_apps

httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402  (needs httpx)

from rayblora.config import ServeConfig  # noqa: E402
from rayblora.generation.decode import DecodingSettings  # noqa: E402
from rayblora.serve.api import make_api  # noqa: E402
from rayblora.serve.app import check_posteriors  # noqa: E402
from rayblora.serve.engine import PosteriorPool  # noqa: E402
from rayblora.serve.generate import Generating  # noqa: E402
from rayblora.serve.schemas import generate_request_model  # noqa: E402

PROMPTS = ["the film was good and", "awful dull story"]
TOKEN = "generate-token-0123"
CONFIG = ServeConfig(max_inputs_per_request=2, max_tokens_per_input=32, max_new_tokens=8, batch_max_size=2,
                     auth_token_env="")


class LocalService:
    """The deployment's generate path without Ray: a posterior pool, one forward thread, :class:`Generating`
    (the deployment resolves the posterior through Serve's multiplexing instead of `_loaded`)."""

    def __init__(self, config: ServeConfig, paths: dict[str, str]):
        from rayblora.artifact import load_posterior

        self.config = config
        self.pool = PosteriorPool(check_posteriors(paths), load_posterior)
        self.forward = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rayblora-forward")
        self.generating = Generating(self.forward, config.max_tokens_per_input)
        self.resident: dict = {}

    def loaded(self, name: str | None):
        name = name or self.pool.default
        self.pool.entry(name)
        if name not in self.resident:
            self.resident[name] = self.pool.load(name)
        return self.resident[name]

    async def predict(self, body):
        raise NotImplementedError

    async def list_posteriors(self):
        return self.pool.describe()

    async def generate(self, body):
        return await self.generating.answer(self.loaded(body.posterior), body)

    async def generate_stream(self, body):
        return await self.generating.stream(self.loaded(body.posterior), body)


@pytest.fixture(scope="module")
def artifacts(trained_members, tiny_data, tiny_session_config, tmp_path_factory):
    """name -> (in-memory posterior, artifact dir): a K=2 ensemble (the default), its temperature-scaled
    view, a family without a generative form, and the ensemble with a feature density."""
    from rayblora.artifact import save_posterior
    from rayblora.registry import get_posterior_class

    scorer, states, infos = trained_members
    cfg, root = tiny_session_config, tmp_path_factory.mktemp("generate-artifacts")
    made = {name: get_posterior_class(method).build(scorer, states, infos, data=tiny_data, config=cfg)
            for name, method in (("ens", "ensemble"), ("temp", "temperature"), ("dens", "ensemble"))}
    made["dens"].fit_density(tiny_data.train, tiny_data.validation)
    return {name: (post, save_posterior(post, root / name, model_config=cfg.model, adapter_config=cfg.adapter))
            for name, post in made.items()}


@pytest.fixture(scope="module")
def service(artifacts):
    svc = LocalService(CONFIG, {name: str(path) for name, (_, path) in artifacts.items()})
    yield svc
    svc.forward.shutdown()


@pytest.fixture(scope="module")
def client(service):
    with TestClient(make_api(service)) as c:
        yield c


def events_of(lines) -> list[dict]:
    """The JSON payloads of a text/event-stream's `data:` lines."""
    return [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: ")]


def test_generations_carry_per_token_uncertainty(client, artifacts):
    body = {"prompts": PROMPTS, "max_new_tokens": 6, "stop": []}
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert (answer["posterior"], answer["method"]) == ("ens", "ensemble")
    expected = artifacts["ens"][0].generate(PROMPTS, DecodingSettings(max_new_tokens=6, stop=()))
    assert len(answer["generations"]) == 2
    for row, gen in zip(answer["generations"], expected):
        assert (row["text"], row["tokens"]) == (gen.text, gen.tokens) and 1 <= len(row["tokens"]) <= 6
        assert row["mutual_information"] == pytest.approx(gen.mutual_information, abs=1e-5)
        assert len(row["entropy"]) == len(row["aleatoric"]) == len(row["log_prob"]) == len(row["tokens"])
        assert all(mi >= -1e-6 for mi in row["mutual_information"])
        assert row["entropy"] == pytest.approx([a + m for a, m in zip(row["aleatoric"], row["mutual_information"])],
                                               abs=1e-5)
        assert row["scores"]["mean_token_mi"] == pytest.approx(gen.scores["mean_token_mi"], abs=1e-5)
        assert row["abstained"] is False and row["samples"] == []
    assert max(max(row["mutual_information"]) for row in answer["generations"]) > 0, "two members must differ"


def test_streamed_pieces_concatenate_to_the_answer(client):
    body = {"prompts": PROMPTS[:1], "max_new_tokens": 8, "stop": [], "abstain_threshold": 0.0}
    whole = client.post("/v1/generate", json=body).json()["generations"][0]
    with client.stream("POST", "/v1/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = events_of(r.iter_lines())
    tokens, done = events[:-1], events[-1]
    assert [e["event"] for e in tokens] == ["token"] * len(whole["tokens"]) and done["event"] == "done"
    assert "".join(e["text"] for e in tokens) == whole["text"] == done["text"]
    assert [e["token"] for e in tokens] == whole["tokens"] == done["tokens"]
    assert [e["index"] for e in tokens] == list(range(len(tokens)))
    for name in ("entropy", "aleatoric", "mutual_information", "log_prob"):
        assert [e[name] for e in tokens] == pytest.approx(whole[name], abs=1e-5)
    assert done["scores"] == pytest.approx(whole["scores"], abs=1e-5)
    assert done["abstained"] is whole["abstained"] is (whole["scores"]["mean_token_mi"] > 0.0)


def test_decoding_runs_on_the_forward_thread(client, service, monkeypatch):
    """Neither the batch decode nor the token generator runs on the event loop's thread."""
    posterior = service.loaded("ens").posterior
    seen: list[str] = []
    generate, generate_stream = posterior.generate, posterior.generate_stream

    def spy_generate(*args, **kwargs):
        seen.append(threading.current_thread().name)
        return generate(*args, **kwargs)

    def spy_stream(*args, **kwargs):
        for event in generate_stream(*args, **kwargs):
            seen.append(threading.current_thread().name)
            yield event

    monkeypatch.setattr(posterior, "generate", spy_generate)
    monkeypatch.setattr(posterior, "generate_stream", spy_stream)
    body = {"prompts": PROMPTS[:1], "max_new_tokens": 3}
    assert client.post("/v1/generate", json=body).status_code == 200
    with client.stream("POST", "/v1/generate", json={**body, "stream": True}) as r:
        assert events_of(r.iter_lines())[-1]["event"] == "done"
    assert len(seen) >= 2 and all(name.startswith("rayblora-forward") for name in seen), seen


def test_abstain_flag_follows_the_threshold(client):
    body = {"prompts": PROMPTS, "max_new_tokens": 4, "stop": []}

    def flags(**extra):
        rows = client.post("/v1/generate", json={**body, **extra}).json()["generations"]
        return [row["abstained"] for row in rows], rows

    never, rows = flags()
    mi = [row["scores"]["mean_token_mi"] for row in rows]
    assert never == [False, False] and mi[0] != mi[1]
    assert flags(abstain_threshold=0.0)[0] == [m > 0 for m in mi]
    assert flags(abstain_threshold=sum(mi) / 2)[0] == [m > sum(mi) / 2 for m in mi]
    assert flags(abstain_threshold=max(mi) + 1)[0] == [False, False]
    nll = [row["scores"]["sequence_nll"] for row in rows]
    assert flags(abstain_threshold=min(nll) - 1e-3, abstain_score="sequence_nll")[0] == [True, True]
    groups, rows = flags(mode="per_state", abstain_threshold=0.0, abstain_score="group_entropy")
    assert groups == [row["scores"]["group_entropy"] > 0 for row in rows]
    assert all(len(row["samples"]) == 2 for row in rows)


def test_generations_carry_the_prompts_feature_density(client, artifacts):
    from test_density import FAR_TEXT

    body = {"posterior": "dens", "prompts": ["good film\nSentiment:", FAR_TEXT], "max_new_tokens": 2, "stop": []}
    rows = client.post("/v1/generate", json=body).json()["generations"]
    distances = [row["scores"]["feature_distance"] for row in rows]
    post = artifacts["dens"][0]
    expected = post.generate(body["prompts"], DecodingSettings(max_new_tokens=2, stop=()))
    assert distances == pytest.approx([a.scores["feature_distance"] for a in expected], rel=1e-5)
    assert [row["in_distribution"] for row in rows] == [True, False]
    cut = sum(distances) / 2
    flagged = client.post("/v1/generate", json={**body, "abstain_threshold": cut,
                                                "abstain_score": "feature_distance"}).json()["generations"]
    assert [row["abstained"] for row in flagged] == [False, True]
    plain = client.post("/v1/generate", json={**body, "posterior": "ens"}).json()["generations"]
    assert plain[0]["in_distribution"] is None and "feature_distance" not in plain[0]["scores"]
    refused = client.post("/v1/generate", json={**body, "posterior": "ens", "abstain_threshold": 1.0,
                                                "abstain_score": "feature_distance"})
    assert refused.status_code == 422 and refused.json()["fields"][0]["field"] == "abstain_score"


BAD_REQUESTS = [
    ("max_new_tokens 0", {"prompts": ["good"], "max_new_tokens": 0}, 422, "max_new_tokens"),
    ("max_new_tokens over the cap", {"prompts": ["good"], "max_new_tokens": 9}, 422, "max_new_tokens"),
    ("max_new_tokens a string", {"prompts": ["good"], "max_new_tokens": "4"}, 422, "max_new_tokens"),
    ("empty prompt", {"prompts": [""]}, 422, "prompts[0]"),
    ("blank prompt", {"prompts": ["good", "   "]}, 422, "prompts[1]"),
    ("prompt over the token limit", {"prompts": ["good", "x" * 40]}, 422, "prompts[1]"),
    ("too many prompts", {"prompts": ["a", "b", "c"]}, 422, "prompts"),
    ("no prompts", {"prompts": []}, 422, "prompts"),
    ("prompts missing", {"max_new_tokens": 2}, 422, "prompts"),
    ("bad mode", {"prompts": ["good"], "mode": "beam"}, 422, "mode"),
    ("temperature 0", {"prompts": ["good"], "do_sample": True, "temperature": 0}, 422, "temperature"),
    ("do_sample not a bool", {"prompts": ["good"], "do_sample": "yes"}, 422, "do_sample"),
    ("negative seed", {"prompts": ["good"], "seed": -1}, 422, "seed"),
    ("empty stop string", {"prompts": ["good"], "stop": [""]}, 422, "stop[0]"),
    ("stream with two prompts", {"prompts": ["a", "b"], "stream": True}, 422, "stream"),
    ("stream per state", {"prompts": ["a"], "mode": "per_state", "stream": True}, 422, "stream"),
    ("negative threshold", {"prompts": ["good"], "abstain_threshold": -0.1}, 422, "abstain_threshold"),
    ("unknown score", {"prompts": ["good"], "abstain_score": "vibes"}, 422, "abstain_score"),
    ("score of the other mode", {"prompts": ["good"], "mode": "per_state", "abstain_threshold": 0.1}, 422,
     "abstain_score"),
    ("unknown field", {"prompts": ["good"], "inputs": []}, 422, "inputs"),
    ("malformed JSON", b'{"prompts": ["good"]', 422, "body"),
    ("unknown posterior", {"posterior": "nope", "prompts": ["good"]}, 404, "posterior"),
    ("posterior without a generative form", {"posterior": "temp", "prompts": ["good"]}, 422, "posterior"),
    ("body over the byte limit", b'{"prompts": ["' + b"x" * 100_000 + b'"]}', 413, "body"),
]


@pytest.mark.parametrize("case,body,status,field", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_is_4xx_naming_the_field(client, case, body, status, field):
    if isinstance(body, bytes):
        r = client.post("/v1/generate", content=body, headers={"content-type": "application/json"})
    else:
        r = client.post("/v1/generate", json=body)
    assert r.status_code == status, r.text
    answer = r.json()
    assert answer["message"] and field in [f["field"] for f in answer["fields"]], answer


def test_streamed_request_refused_before_the_first_event_is_an_http_error(client):
    r = client.post("/v1/generate", json={"posterior": "temp", "prompts": ["good"], "stream": True})
    assert r.status_code == 422 and r.headers["content-type"] == "application/json"
    assert "temperature" in r.json()["fields"][0]["message"]


def test_bearer_token_guards_generate(service):
    with TestClient(make_api(service, auth_token=TOKEN)) as secure:
        body = {"prompts": ["good"], "max_new_tokens": 1}
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = secure.post("/v1/generate", json=body, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
        ok = secure.post("/v1/generate", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200 and len(ok.json()["generations"]) == 1


def test_openapi_documents_generate(client):
    spec = client.get("/openapi.json").json()
    route = spec["paths"]["/v1/generate"]["post"]
    assert {"200", "401", "404", "413", "422", "503"} <= set(route["responses"])
    assert "text/event-stream" in route["responses"]["200"]["content"]
    request = spec["components"]["schemas"]["GenerateRequest"]
    assert request["additionalProperties"] is False
    assert request["properties"]["max_new_tokens"]["maximum"] == CONFIG.max_new_tokens


def test_a_stream_left_early_stops_its_producer():
    """A client that goes away after one event: the generator stops after its current event and is closed on
    the forward thread, which is then free again."""
    produced, closed_on = [], []

    def slow(prompt, settings):
        try:
            for i in range(1000):
                time.sleep(0.005)
                produced.append(i)
                yield {"event": "token", "index": i, "text": "x"}
        finally:
            closed_on.append(threading.current_thread().name)

    loaded = SimpleNamespace(prompt_token_counts=lambda prompts: [1] * len(prompts),
                             posterior=SimpleNamespace(generate_stream=slow, generative=True))
    body = generate_request_model(CONFIG).model_validate({"prompts": ["hi"], "stream": True})

    async def leave_after_one_event(pool):
        events = await Generating(pool, 32).stream(loaded, body)
        assert (await anext(events))["index"] == 0
        await events.aclose()
        return await asyncio.get_running_loop().run_in_executor(pool, threading.current_thread)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rayblora-forward") as pool:
        asyncio.run(leave_after_one_event(pool))
    assert closed_on and closed_on[0].startswith("rayblora-forward") and len(produced) < 100, len(produced)


def test_serve_config_caps_new_tokens():
    from rayblora.config import ConfigError, load_config

    assert load_config(None, ["serve.max_new_tokens=16"]).serve.max_new_tokens == 16
    for bad in ("0", "4097"):
        with pytest.raises(ConfigError, match="serve.max_new_tokens"):
            load_config(None, [f"serve.max_new_tokens={bad}"])


# --- through Ray Serve ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_generate_through_ray_serve(serve_port, artifacts):
    """The deployment's generate path over real HTTP: the posterior by header, a stream through the proxy."""
    from rayblora.serve.app import start_server

    cfg = ServeConfig(port=serve_port, max_inputs_per_request=2, max_tokens_per_input=32, max_new_tokens=8,
                      batch_max_size=2, replica_cpus=1.0, torch_threads=1, auth_token_env="")
    body = {"prompts": PROMPTS[:1], "max_new_tokens": 6, "stop": []}
    try:
        url = start_server(cfg, {"ens": artifacts["ens"][1]}, name="test-generate", route_prefix="/gen")
        with httpx.Client(timeout=120.0) as c:
            whole = c.post(f"{url}/v1/generate", json=body, headers={"serve_multiplexed_model_id": "ens"})
            assert whole.status_code == 200, whole.text
            with c.stream("POST", f"{url}/v1/generate", json={**body, "stream": True}) as r:
                assert r.headers["content-type"].startswith("text/event-stream")
                events = events_of(r.iter_lines())
            unknown = c.post(f"{url}/v1/generate", json=body, headers={"serve_multiplexed_model_id": "nope"})
    finally:
        delete_serve_apps(["test-generate"])
    text = whole.json()["generations"][0]["text"]
    assert "".join(e["text"] for e in events[:-1]) == text == events[-1]["text"]
    assert events[-1]["event"] == "done" and events[-1]["abstained"] is False
    assert unknown.status_code == 404 and "nope" in unknown.json()["message"]
