"""The Serve endpoint over real HTTP on loopback: tiny posterior artifacts, one Serve instance per module.

Three applications share one Serve start: the main one (three posteriors, LRU bound 2), one behind a bearer
token, and one whose posterior is slowed down (a test loader) to fill the queue and see 503s.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import sys
import threading
import time

import pytest
import torch

from conftest import delete_serve_apps

httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.slow

TEXTS = ["good film the plot", "awful story was dull and weak", "the actors", "superb lovely fine great film"]
QUESTION = {"question": "Which word is positive?", "choices": ["awful", "superb", "dull"]}
SLOW_FORWARD_S = 1.5
DIE_TIMEOUT_S, RETRY_AFTER_S = 60.0, 2
TOKEN = "test-token-0123"


class SlowPosterior:
    """Test double: a loaded posterior whose every forward first sleeps, so a burst fills the queue."""

    def __init__(self, posterior):
        self._posterior = posterior

    def __getattr__(self, name):
        return getattr(self._posterior, name)

    def predict_scored(self, batch):
        time.sleep(SLOW_FORWARD_S)
        return self._posterior.predict_scored(batch)

    def generate(self, prompts, settings):
        time.sleep(SLOW_FORWARD_S)
        return self._posterior.generate(prompts, settings)


def slow_loader(path, scorer=None):
    from rayblora.artifact import load_posterior

    return SlowPosterior(load_posterior(path, scorer=scorer))


class DyingPosterior(SlowPosterior):
    """Test double: a posterior whose forward kills its replica's process (as an out-of-memory kill or a bad
    kernel would) once the file `flag` exists (removing it), and otherwise predicts after a short pause."""

    def __init__(self, posterior, flag: str):
        super().__init__(posterior)
        self._flag = flag

    def predict_scored(self, batch):
        if os.path.exists(self._flag):
            os.remove(self._flag)
            os._exit(1)
        time.sleep(0.2)
        return self._posterior.predict_scored(batch)


def dying_loader(path, scorer=None, flag: str = ""):
    from rayblora.artifact import load_posterior

    return DyingPosterior(load_posterior(path, scorer=scorer), flag)


@pytest.fixture(scope="module")
def posteriors(trained_members, tiny_session_config, tiny_data, tmp_path_factory):
    """name -> (in-memory posterior, artifact dir): a K=2 and a K=1 ensemble and two 3-way multiple-choice ones
    (scored by letter and by option likelihood), and the K=2 ensemble with a feature density ("dens").

    The scorers read 128 tokens so that the whole review reaches the model (predictions differ per text)."""
    from rayblora.artifact import save_posterior
    from rayblora.data.formats import multiple_choice_spec
    from rayblora.posteriors.ensemble import EnsemblePosterior
    from rayblora.scoring import build_scorer

    trained_scorer, states, infos = trained_members
    cfg, root = tiny_session_config, tmp_path_factory.mktemp("serve-artifacts")
    text = build_scorer(cfg.model, cfg.adapter, trained_scorer.spec, 128)
    choice = build_scorer(cfg.model, cfg.adapter, multiple_choice_spec(3, "letter"), 128)
    likelihood = build_scorer(cfg.model, cfg.adapter, multiple_choice_spec(3), 128)
    made = {"ens": EnsemblePosterior(text, states, infos), "solo": EnsemblePosterior(text, states[1:], infos[1:]),
            "mc": EnsemblePosterior(choice, states, infos), "mcl": EnsemblePosterior(likelihood, states, infos),
            "dens": EnsemblePosterior(text, states, infos)}
    made["dens"].fit_density(tiny_data.train, tiny_data.validation)
    return {name: (post, save_posterior(post, root / name, model_config=cfg.model, adapter_config=cfg.adapter))
            for name, post in made.items()}


@pytest.fixture(scope="module")
def server(serve_port, posteriors, tmp_path_factory):
    """Base URLs of the four applications, deleted afterwards."""
    from ray.cloudpickle import register_pickle_by_value

    from rayblora.config import ServeConfig
    from rayblora.serve.app import start_server

    register_pickle_by_value(sys.modules[__name__])  # the test loader travels to the replica by value
    cfg = ServeConfig(port=serve_port, max_inputs_per_request=4, max_tokens_per_input=160, max_choices=4,
                      batch_max_size=8, batch_wait_timeout_s=0.05, max_posteriors_per_replica=2,
                      replica_cpus=1.0, torch_threads=1, auth_token_env="")
    paths = {name: path for name, (_, path) in posteriors.items()}
    paths["broken"] = shutil.copytree(paths["ens"], paths["ens"].with_name("broken"))
    die_flag = tmp_path_factory.mktemp("die") / "flag"
    ens = {"ens": paths["ens"]}
    apps = {"main": (cfg, paths, {}),  # served as "test-<key>" at "/<key>" ("/" for main)
            "secure": (dataclasses.replace(cfg, auth_token=TOKEN), ens, {}),
            "slow": (dataclasses.replace(cfg, max_ongoing_requests=1, max_queued_requests=1), ens,
                     {"loader": slow_loader}),
            "die": (dataclasses.replace(cfg, request_timeout_s=DIE_TIMEOUT_S, retry_after_s=RETRY_AFTER_S), ens,
                    {"loader": functools.partial(dying_loader, flag=str(die_flag))})}
    try:
        urls = {key: start_server(app_cfg, app_paths, name=f"test-{key}", route_prefix="/" if key == "main"
                                  else f"/{key}", **loader) for key, (app_cfg, app_paths, loader) in apps.items()}
        urls["die_flag"] = die_flag
        member = paths["broken"] / "members" / "0" / "adapter_model.safetensors"
        member.write_bytes(member.read_bytes()[:-1] + b"\0")  # tampered after deployment
        urls["broken_dir"] = paths["broken"]
        yield urls
    finally:
        delete_serve_apps([f"test-{key}" for key in apps])


@pytest.fixture(scope="module")
def client():
    with httpx.Client(timeout=60.0) as c:
        yield c


def predict(client, url, body, **kw):
    return client.post(f"{url}/v1/predict", json=body, **kw)


def prompts_of(post, texts):
    from rayblora.data.formats import format_classification

    return [format_classification(t, post.scorer.spec.prompt_template) for t in texts]


def assert_matches(rows, expected, label_names):
    """HTTP prediction rows equal an in-process Predictive (same inputs, same order)."""
    assert len(rows) == expected.probs.shape[0]
    for i, row in enumerate(rows):
        width = len(row["probs"])  # a row's own options; the in-process row has 0 beyond them
        assert row["probs"] == pytest.approx(expected.probs[i, :width].tolist(), abs=1e-5)
        assert torch.all(expected.probs[i, width:] == 0)
        assert row["entropy"] == pytest.approx(float(expected.entropy[i]), abs=1e-5)
        assert row["aleatoric"] == pytest.approx(float(expected.aleatoric[i]), abs=1e-5)
        assert row["mutual_information"] == pytest.approx(float(expected.mutual_information[i]), abs=1e-5)
        assert row["confidence"] == pytest.approx(float(expected.confidence[i]), abs=1e-5)
        assert row["label"] == label_names[int(expected.label[i])]


def test_predictions_equal_posterior_predict(server, client, posteriors):
    post, path = posteriors["ens"]
    r = predict(client, server["main"], {"posterior": "ens", "inputs": [{"text": t} for t in TEXTS]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert_matches(body["predictions"], post.predict(prompts_of(post, TEXTS)), post.scorer.spec.label_names)
    manifest = json.loads((path / "manifest.json").read_text())
    assert (body["posterior"], body["method"], body["samples"]) == ("ens", "ensemble", 2)
    assert body["created"] == manifest["created"] and len(body["version"]) == 12
    assert len({round(row["probs"][0], 6) for row in body["predictions"]}) > 1, "inputs must matter"


def test_concurrent_requests_are_batched_and_correct(server, client, posteriors):
    """Requests in flight together (two posteriors, one input each) each get their own posterior's answer."""
    jobs = [(name, text) for text in TEXTS for name in ("ens", "solo")]
    results: dict[int, httpx.Response] = {}

    def send(i, name, text):
        with httpx.Client(timeout=60.0) as c:
            results[i] = predict(c, server["main"], {"posterior": name, "inputs": [{"text": text}]})

    threads = [threading.Thread(target=send, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (name, text) in enumerate(jobs):
        post = posteriors[name][0]
        assert results[i].status_code == 200, results[i].text
        assert_matches(results[i].json()["predictions"], post.predict(prompts_of(post, [text])),
                       post.scorer.spec.label_names)


def test_abstain_flag_follows_threshold(server, client):
    inputs = [{"text": t} for t in TEXTS]
    default = predict(client, server["main"], {"inputs": inputs}).json()
    assert default["posterior"] == "ens" and default["abstain_threshold"] == 0.0
    assert not any(row["abstained"] for row in default["predictions"])
    confidences = sorted(row["confidence"] for row in default["predictions"])
    cut = (confidences[1] + confidences[2]) / 2
    r = predict(client, server["main"], {"inputs": inputs, "abstain_threshold": cut}).json()
    assert r["abstain_threshold"] == cut
    assert [row["abstained"] for row in r["predictions"]] == [row["confidence"] < cut for row in r["predictions"]]
    assert sum(row["abstained"] for row in r["predictions"]) == 2
    everything = predict(client, server["main"], {"inputs": inputs, "abstain_threshold": 1.0}).json()
    assert all(row["abstained"] for row in everything["predictions"])


def test_far_text_is_flagged_and_a_review_is_not(server, client, posteriors):
    """The feature density over real HTTP: a served posterior with one returns distance, log-density and
    in_distribution per input, as the in-process predictive does; far text is outside, a review inside; the
    density may abstain; a posterior without one answers null and refuses the density as abstain score (422)."""
    from test_density import FAR_TEXT

    inputs = [{"text": TEXTS[0]}, {"text": FAR_TEXT}]
    r = predict(client, server["main"], {"posterior": "dens", "inputs": inputs})
    assert r.status_code == 200, r.text
    body = r.json()
    review, far = body["predictions"]
    assert review["in_distribution"] is True and far["in_distribution"] is False
    assert far["distance"] > body["density_threshold"] >= review["distance"]
    post = posteriors["dens"][0]
    expected = post.predict(prompts_of(post, [TEXTS[0], FAR_TEXT]))
    assert [row["distance"] for row in body["predictions"]] == pytest.approx(expected.distance.tolist(), rel=1e-5)
    assert [row["log_density"] for row in body["predictions"]] == pytest.approx(expected.log_density.tolist(),
                                                                                rel=1e-5)
    abstaining = predict(client, server["main"], {"posterior": "dens", "inputs": inputs,
                                                  "abstain_score": "density"}).json()
    assert [row["abstained"] for row in abstaining["predictions"]] == [False, True]
    plain = predict(client, server["main"], {"posterior": "ens", "inputs": inputs}).json()
    assert plain["density_threshold"] is None and plain["predictions"][1]["in_distribution"] is None
    refused = predict(client, server["main"], {"posterior": "ens", "inputs": inputs, "abstain_score": "either"})
    assert refused.status_code == 422 and "abstain_score" in refused.text


def test_multiple_choice_posterior(server, client, posteriors):
    post = posteriors["mc"][0]
    from rayblora.data.formats import format_multiple_choice

    full = {"question": "Pick one", "choices": ["good", "bad", "fine"]}
    r = predict(client, server["main"], {"posterior": "mc", "inputs": [full, {**QUESTION, "choices": ["x", "y"]}]})
    assert r.status_code == 200, r.text
    rows = r.json()["predictions"]
    expected = post.predict([format_multiple_choice(full["question"], full["choices"])])
    assert_matches(rows[:1], expected, ("A", "B", "C"))
    assert len(rows[1]["probs"]) == 2 and sum(rows[1]["probs"]) == pytest.approx(1.0, abs=1e-5)
    assert rows[1]["label"] in ("A", "B")


def test_option_likelihood_posterior_equals_posterior_predict_on_ragged_rows(server, client, posteriors):
    from rayblora.data.formats import choice_example

    post = posteriors["mcl"][0]
    inputs = [{"question": "Pick one", "choices": ["good", "bad", "fine"]},
              {"question": "Which is nicer?", "choices": ["a sunny day", "rain"]}]
    r = predict(client, server["main"], {"posterior": "mcl", "inputs": inputs})
    assert r.status_code == 200, r.text
    rows = [choice_example(i["question"], i["choices"], post.scorer.spec, "test") for i in inputs]
    expected = post.predict([e["prompt"] for e in rows], choices=[e["choices"] for e in rows])
    predictions = r.json()["predictions"]
    assert [len(p["probs"]) for p in predictions] == [3, 2]
    assert_matches(predictions, expected, ("A", "B", "C"))
    too_many = {"question": "q", "choices": ["a", "b", "c", "d"]}
    r = predict(client, server["main"], {"posterior": "mcl", "inputs": [too_many]})
    assert r.status_code == 422 and "inputs[0].choices" in r.text and "at most 3" in r.text


def test_posteriors_are_multiplexed_with_an_lru_bound(server, client, posteriors):
    """Five posteriors, at most two resident: after using ens, solo, mc the least recent (ens) is unloaded."""
    for name in ("ens", "solo", "mc"):
        body = {"inputs": [QUESTION if name == "mc" else {"text": TEXTS[0]}]}
        r = predict(client, server["main"], body, headers={"serve_multiplexed_model_id": name})
        assert r.status_code == 200 and r.json()["posterior"] == name, r.text
    listing = client.get(f"{server['main']}/v1/posteriors").json()
    rows = {row["name"]: row for row in listing["posteriors"]}
    assert listing["default"] == "ens" and set(rows) == {"ens", "solo", "mc", "mcl", "dens", "broken"}
    assert [rows[n]["loaded"] for n in ("ens", "solo", "mc")] == [False, True, True]
    assert (rows["solo"]["samples"], rows["mc"]["task"], rows["mc"]["labels"]) == (1, "multiple_choice",
                                                                                   ["A", "B", "C"])
    again = predict(client, server["main"], {"posterior": "ens", "inputs": [{"text": TEXTS[1]}]})
    post = posteriors["ens"][0]
    assert_matches(again.json()["predictions"], post.predict(prompts_of(post, TEXTS[1:2])),
                   post.scorer.spec.label_names)


def test_unknown_posterior_is_404(server, client):
    r = predict(client, server["main"], {"posterior": "nope", "inputs": [{"text": "good"}]})
    assert r.status_code == 404
    assert "nope" in r.json()["message"] and "ens" in r.json()["message"]


def test_tampered_artifact_is_refused_by_the_verified_loader(server, client):
    """A file changed after deployment: the replica's loader refuses it (500 naming the file), and a fresh
    deployment would refuse it before starting."""
    from rayblora.artifact import ArtifactError
    from rayblora.serve.app import check_posteriors

    r = predict(client, server["main"], {"posterior": "broken", "inputs": [{"text": "good"}]})
    assert r.status_code == 500 and "checksum mismatch" in r.json()["message"], r.text
    assert client.get(f"{server['main']}/healthz").status_code == 200
    assert predict(client, server["main"], {"inputs": [{"text": "good"}]}).status_code == 200
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        check_posteriors({"broken": server["broken_dir"]})


LONG_TOKENS = "x" * 300  # under the character bound (160 * 16), over 160 tokens
BAD_REQUESTS = [
    ("malformed JSON", b'{"inputs": [{"text": "good"}', 422, "body"),
    ("body not an object", b"[1, 2]", 422, "body"),
    ("inputs missing", {}, 422, "inputs"),
    ("inputs not a list", {"inputs": "good"}, 422, "inputs"),
    ("empty inputs", {"inputs": []}, 422, "inputs"),
    ("too many inputs", {"inputs": [{"text": "good"}] * 5}, 422, "inputs"),
    ("text of the wrong type", {"inputs": [{"text": 5}]}, 422, "inputs[0].text"),
    ("blank text", {"inputs": [{"text": "   "}]}, 422, "inputs[0].text"),
    ("text over the character bound", {"inputs": [{"text": "good " * 600}]}, 422, "inputs[0].text"),
    ("text over the token limit", {"inputs": [{"text": LONG_TOKENS}]}, 422, "inputs[0].text"),
    ("unknown top-level field", {"inputs": [{"text": "good"}], "temperature": 1}, 422, "temperature"),
    ("unknown input field", {"inputs": [{"text": "good", "label": 1}]}, 422, "inputs[0].label"),
    ("input of no known shape", {"inputs": [{"prompt": "good"}]}, 422, "inputs[0]"),
    ("input not an object", {"inputs": ["good"]}, 422, "inputs[0]"),
    ("too many choices for the endpoint", {"posterior": "mc", "inputs": [{"question": "q", "choices": list("abcde")}]},
     422, "inputs[0].choices"),
    ("too many choices for the posterior", {"posterior": "mc", "inputs": [{"question": "q", "choices": list("abcd")}]},
     422, "inputs[0].choices"),
    ("one choice", {"posterior": "mc", "inputs": [{"question": "q", "choices": ["a"]}]}, 422, "inputs[0].choices"),
    ("question to a text posterior", {"inputs": [QUESTION]}, 422, "inputs[0]"),
    ("text to a question posterior", {"posterior": "mc", "inputs": [{"text": "good"}]}, 422, "inputs[0]"),
    ("threshold out of range", {"inputs": [{"text": "good"}], "abstain_threshold": 1.5}, 422, "abstain_threshold"),
    ("threshold as a string", {"inputs": [{"text": "good"}], "abstain_threshold": "0.5"}, 422, "abstain_threshold"),
    ("posterior of the wrong type", {"posterior": 3, "inputs": [{"text": "good"}]}, 422, "posterior"),
]


@pytest.mark.parametrize("case,body,status,field", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_is_4xx_naming_the_field(server, client, case, body, status, field):
    url = f"{server['main']}/v1/predict"
    if isinstance(body, bytes):
        r = client.post(url, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(url, json=body)
    assert r.status_code == status, r.text
    answer = r.json()
    assert answer["message"] and field in [f["field"] for f in answer["fields"]], answer
    assert client.get(f"{server['main']}/healthz").status_code == 200


def test_wrong_method_and_route_are_4xx(server, client):
    assert client.get(f"{server['main']}/v1/predict").status_code == 405
    assert client.get(f"{server['main']}/v2/nothing").status_code == 404


def test_oversized_bodies_are_413_with_and_without_content_length(server, client):
    """The limit (serve.max_body_bytes, here sized from the fixture's input limits: 106 496 bytes) is enforced
    over real HTTP through the Serve proxy; a chunked body is refused once it passes the limit."""
    big = b'{"inputs": [{"text": "' + b"x" * 3_000_000 + b'"}]}'
    r = client.post(f"{server['main']}/v1/predict", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "serve.max_body_bytes" in r.json()["message"]

    def chunks():
        for _ in range(50):
            yield b"x" * 65536

    r = client.post(f"{server['main']}/v1/predict", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_oversized_uploads_from_eight_concurrent_clients_all_read_their_413(server, client):
    """Over-limit uploads mixed with predictions, 8 clients at once: every upload (12 MB bodies, and a request of
    100 000 inputs) is answered 413 and the client reads it (the refused body is drained, not cut off under a
    client still sending, however slowly the shared proxy passes it on)."""
    big = b'{"inputs": [{"text": "' + b"x" * 12_000_000 + b'"}]}'
    many = json.dumps({"inputs": [{"text": "a"}] * 100_000}).encode()
    outcomes: list[tuple[str, object]] = []

    def client_session(index: int) -> None:
        with httpx.Client(timeout=300.0) as c:
            for turn in range(2):
                upload = (index + turn) % 2 == 0
                try:
                    r = (c.post(f"{server['main']}/v1/predict", content=many if index == 0 else big,
                                headers={"content-type": "application/json"}) if upload else
                         predict(c, server["main"], {"inputs": [{"text": TEXTS[index % len(TEXTS)]}]}))
                    outcomes.append(("upload" if upload else "predict", r.status_code))
                except httpx.HTTPError as exc:
                    outcomes.append(("upload" if upload else "predict", type(exc).__name__))

    threads = [threading.Thread(target=client_session, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    uploads = [code for kind, code in outcomes if kind == "upload"]
    assert len(outcomes) == 16 and len(uploads) == 8
    assert uploads == [413] * 8, outcomes
    assert {code for kind, code in outcomes if kind == "predict"} == {200}, outcomes


def test_server_still_answers_after_bad_requests(server, client):
    r = predict(client, server["main"], {"inputs": [{"text": TEXTS[0]}]})
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] in ("negative", "positive")


def test_openapi_and_docs(server, client):
    spec = client.get(f"{server['main']}/openapi.json").json()
    assert {"/v1/predict", "/v1/posteriors", "/healthz"} <= set(spec["paths"])
    assert spec["components"]["schemas"]["PredictRequest"]["additionalProperties"] is False
    assert {"distance", "log_density", "in_distribution"} <= set(
        spec["components"]["schemas"]["InputPrediction"]["properties"])
    assert client.get(f"{server['main']}/docs").status_code == 200


def test_bearer_token(server, client):
    url = server["secure"]
    assert client.get(f"{url}/healthz").status_code == 200
    body = {"inputs": [{"text": "good"}]}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        r = predict(client, url, body, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
        assert client.get(f"{url}/v1/posteriors", headers=headers).status_code == 401
        assert client.get(f"{url}/openapi.json", headers=headers).status_code == 401
    ok = {"Authorization": f"Bearer {TOKEN}"}
    assert predict(client, url, body, headers=ok).status_code == 200
    assert client.get(f"{url}/v1/posteriors", headers=ok).status_code == 200
    assert predict(client, server["main"], body).status_code == 200, "no token configured: open"


@pytest.mark.parametrize("route, body", [("predict", {"inputs": [{"text": "good"}]}),
                                         ("generate", {"prompts": ["the film was"], "max_new_tokens": 2})])
def test_overload_is_503_quickly_and_recovers(server, client, route, body):
    """One ongoing + one queued request fit; the rest of a burst is refused at once, then service resumes."""
    url = server["slow"]
    assert client.post(f"{url}/v1/{route}", json=body).status_code == 200  # loads the posterior
    answers: list[tuple[int, float]] = []

    def send():
        start = time.perf_counter()
        with httpx.Client(timeout=60.0) as c:
            code = c.post(f"{url}/v1/{route}", json=body).status_code
        answers.append((code, time.perf_counter() - start))

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refused = [s for code, s in answers if code == 503]
    assert sorted({code for code, _ in answers}) == [200, 503], answers
    assert len(refused) >= 5 and max(refused) < SLOW_FORWARD_S, answers
    assert client.get(f"{url}/healthz").status_code == 200
    assert client.post(f"{url}/v1/{route}", json=body).status_code == 200


def test_a_replica_killed_under_load_answers_503_with_retry_after_and_serves_again(server):
    """8 clients send predictions; the replica's process dies inside a forward. Every request is answered 200
    or 503 + Retry-After (never a 500, never past serve.request_timeout_s), and Serve's restarted replica
    serves again behind the same ingress."""
    url, body, flag = server["die"], {"inputs": [{"text": "good"}]}, server["die_flag"]
    answers: list[tuple[float, int, str | None, float]] = []  # (sent at, status, Retry-After, seconds)
    stop, t0 = threading.Event(), time.perf_counter()

    def client_loop():
        with httpx.Client(timeout=DIE_TIMEOUT_S + 60) as c:
            while not stop.is_set():
                sent = time.perf_counter()
                r = predict(c, url, body)
                answers.append((sent - t0, r.status_code, r.headers.get("retry-after"), time.perf_counter() - sent))

    threads = [threading.Thread(target=client_loop) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        deadline = time.perf_counter() + 600
        while len(answers) < 16 and time.perf_counter() < deadline:  # under load before the kill
            time.sleep(0.05)
        flag.write_text("die")
        killed = time.perf_counter() - t0
        while time.perf_counter() < deadline and not (not flag.exists() and any(
                sent > killed and code == 200 for sent, code, _, _ in answers[-8:])):
            time.sleep(0.05)  # until the kill happened and requests sent after it are answered 200 again
    finally:
        stop.set()
        for t in threads:
            t.join()
    codes = sorted({code for _, code, _, _ in answers})
    refused = [(sent, wait) for sent, code, _, wait in answers if code == 503]
    healthy = min(sent + wait for sent, code, _, wait in answers if code == 200 and sent > killed)
    figures = {"requests": len(answers), "codes": {c: sum(a[1] == c for a in answers) for c in codes},
               "longest_wait_s": round(max(a[3] for a in answers), 2),
               "healthy_after_kill_s": round(healthy - killed, 2)}
    print("replica death:", json.dumps(figures))
    assert not flag.exists() and set(codes) <= {200, 503} and refused, figures  # the replica died, seen as 503
    assert all(after == str(RETRY_AFTER_S) for _, code, after, _ in answers if code == 503), answers
    assert figures["longest_wait_s"] < DIE_TIMEOUT_S + 30, figures


def test_served_probabilities_are_a_distribution(server, client):
    rows = predict(client, server["main"], {"inputs": [{"text": t} for t in TEXTS]}).json()["predictions"]
    probs = torch.tensor([row["probs"] for row in rows])
    assert torch.allclose(probs.sum(-1), torch.ones(len(rows)), atol=1e-5)
    assert all(row["entropy"] == pytest.approx(row["aleatoric"] + row["mutual_information"], abs=1e-5)
               for row in rows)


# --- without a running Serve ---------------------------------------------------------------------------------

def test_one_forward_per_posterior_per_batch_on_a_shared_scorer(posteriors):
    """A dynamic batch of jobs for two posteriors costs one predict call per posterior, and the answers equal
    each posterior's own predictive; posteriors of one base model share one scorer."""
    from rayblora.artifact import load_posterior
    from rayblora.config import ServeConfig
    from rayblora.serve.app import check_posteriors
    from rayblora.serve.engine import PosteriorPool, predict_jobs
    from rayblora.serve.schemas import request_model

    pool = PosteriorPool(check_posteriors({name: path for name, (_, path) in posteriors.items()}), load_posterior)
    ens, solo = pool.load("ens"), pool.load("solo")
    assert ens.posterior.scorer is solo.posterior.scorer
    calls = []
    for loaded in (ens, solo):
        original = loaded.predict
        loaded.predict = lambda p, n, c, original=original: calls.append(len(p)) or original(p, n, c)
    groups = [(ens, TEXTS[:1]), (solo, TEXTS[1:2]), (ens, TEXTS[2:])]
    body = request_model(ServeConfig())
    inputs = [body.model_validate({"inputs": [{"text": t} for t in texts]}).inputs for _, texts in groups]
    jobs = [loaded.rows(items, 1000) for (loaded, _), items in zip(groups, inputs)]
    out = predict_jobs(jobs)
    assert sorted(calls) == [1, 3]
    for (loaded, texts), pred in zip(groups, out):
        post = posteriors[loaded.entry.name][0]
        torch.testing.assert_close(pred.probs, post.predict(prompts_of(post, texts)).probs, atol=1e-5, rtol=0)


def test_serve_config_section_is_validated():
    import re

    from rayblora.config import ConfigError, load_config

    cfg = load_config(None, ["serve.port=9000", "serve.max_posteriors_per_replica=2"])
    assert (cfg.serve.host, cfg.serve.port, cfg.serve.max_posteriors_per_replica) == ("127.0.0.1", 9000, 2)
    for override, field in [("serve.port=0", "serve.port"), ("serve.batch_max_size=4", "serve.batch_max_size"),
                            ("serve.max_choices=1", "serve.max_choices"),
                            ("serve.abstain_threshold=2", "serve.abstain_threshold"),
                            ("serve.max_queued_requests=0", "serve.max_queued_requests"),
                            ("serve.autoscaling_max_replicas=2", "serve.autoscaling_min_replicas"),
                            ("serve.bogus=1", "serve.bogus")]:
        overrides = [override] + (["serve.autoscaling_min_replicas=3"] if "autoscaling" in override else [])
        with pytest.raises(ConfigError, match=re.escape(field)):
            load_config(None, overrides)


def test_posterior_arguments(tmp_path, capsys):
    from rayblora.cli import main
    from rayblora.config import ConfigError
    from rayblora.serve.app import parse_posterior_specs

    assert parse_posterior_specs(["a=/x/y", "/runs/demo/posterior/"]) == {"a": "/x/y",
                                                                         "posterior": "/runs/demo/posterior/"}
    with pytest.raises(ConfigError, match="twice"):
        parse_posterior_specs(["a=/x", "a=/y"])
    assert main(["serve", "--posterior", f"x={tmp_path}"]) == 2  # fails before any Ray start
    assert "not a posterior artifact" in capsys.readouterr().err


def test_serve_config_file_builds_the_application(posteriors):
    """jobs/serve_config.yaml is a valid Serve config whose builder makes the application from its args."""
    import importlib
    from pathlib import Path

    import yaml
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from rayblora.config import ConfigError

    path = Path(__file__).resolve().parents[1] / "jobs" / "serve_config.yaml"
    text = path.read_text()
    assert text.startswith("# Ray Serve config") and "serve run jobs/serve_config.yaml" in text
    schema = ServeDeploySchema.model_validate(yaml.safe_load(text))
    assert schema.http_options.host == "127.0.0.1"
    app_cfg = schema.applications[0]
    module, attr = app_cfg.import_path.split(":")
    builder = getattr(importlib.import_module(module), attr)
    args = {**app_cfg.args, "posteriors": {"demo": str(posteriors["ens"][1])}}
    assert isinstance(builder(args), Application)
    with pytest.raises(ConfigError, match="unknown key 'posterior'"):
        builder({"posterior": "x"})
