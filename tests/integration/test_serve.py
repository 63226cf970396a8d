"""Ray Serve over real HTTP on loopback: every route, bad inputs, a cold item added then
ranked, autoscaling up and down, and a replica killed under load.

The stack is real (ML-100K, SASRec, Stage 1, Stage 2) with a tiny LLM, so requests are fast.
"""

from __future__ import annotations

import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

PORT = 18431
URL = f"http://127.0.0.1:{PORT}"
TOKEN = "test-token-5f2c"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Ray 2.60 deprecates the field it still reads (`_deployment_options`), at every config parse
pytestmark = pytest.mark.filterwarnings(
    "ignore:The `metrics_interval_s` field in AutoscalingConfig is deprecated:DeprecationWarning"
)


def _deployment_options() -> list[dict]:
    return [
        {
            "name": "Ingress",
            "num_replicas": 1,
            # The token reaches the ingress replica through its runtime_env here; on a
            # cluster, set ALLMREC_SERVE_TOKEN on the nodes or in the Serve config.
            "ray_actor_options": {
                "num_cpus": 0.1,
                "runtime_env": {"env_vars": {"ALLMREC_SERVE_TOKEN": TOKEN}},
            },
        },
        # Two recommender replicas: one can be killed while the other answers.
        {"name": "Recommender", "num_replicas": 2, "ray_actor_options": {"num_cpus": 0.1}},
        {
            "name": "LLM",
            "max_ongoing_requests": 4,
            "autoscaling_config": {
                "min_replicas": 1,
                "max_replicas": 2,
                "target_ongoing_requests": 1,
                "upscale_delay_s": 1,
                "downscale_delay_s": 4,
                "look_back_period_s": 2,
                # how often replicas and handles report their load (Ray 2.60 reads this field;
                # its default of 10 s held every scaling decision up to 10 s)
                "metrics_interval_s": 0.5,
            },
            "ray_actor_options": {"num_cpus": 0.25},
        },
    ]


@pytest.fixture(scope="module")
def served(ray_local, stack_run):
    from ray import serve

    from allmrec.distributed.serve_launch import load_serve_config, start

    config = load_serve_config(run_dir=stack_run, port=PORT)
    config["applications"][0]["deployments"] = _deployment_options()
    config["applications"][0]["args"]["max_body_bytes"] = 4096
    # The load tests send thousands of requests: an access line of every replica for each,
    # each tailed by Ray's log monitor and printed by this process: CPU the tests need.
    config["applications"][0]["logging_config"] = {"enable_access_log": False}
    # Generations of the tiny LLM long enough (it rarely draws its EOS) that an LLM replica
    # under load always holds some in flight: the load test kills one mid-generation.
    config["applications"][0]["args"]["max_new_tokens"] = 128
    # Stage 2's dtype (fp32), not the config's auto: the batched answers must equal the
    # single ones to fp32's precision on any machine (a bf16 padded batch differs in the third
    # digit where the CPU takes bf16)
    config["applications"][0]["args"]["llm_dtype"] = "trained"
    start(config, timeout_s=240)
    yield stack_run
    serve.shutdown()


def _post(path: str, body, headers=AUTH, **kwargs) -> requests.Response:
    return requests.post(f"{URL}{path}", json=body, headers=headers, timeout=60, **kwargs)


def _replicas(deployment: str) -> dict:
    from ray import serve

    status = serve.status().applications["allmrec"].deployments[deployment]
    return dict(status.replica_states)


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@pytest.mark.slow
def test_health_ready_and_openapi(served):
    assert requests.get(f"{URL}/healthz", timeout=10).json() == {"status": "ok"}
    ready = requests.get(f"{URL}/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert "projectors:" in ready.json()["model_version"]
    schema = requests.get(f"{URL}/openapi.json", timeout=10).json()
    assert {"/recommend", "/items", "/items/{item_id}", "/healthz", "/readyz"} <= set(
        schema["paths"]
    )
    assert requests.get(f"{URL}/docs", timeout=10).status_code == 200


@pytest.mark.slow
def test_bearer_token_guards_all_but_health(served):
    assert _post("/recommend", {"user_id": "1"}, headers={}).status_code == 401
    wrong = _post("/recommend", {"user_id": "1"}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["field"] == "Authorization"
    assert requests.get(f"{URL}/items/1", timeout=10).status_code == 401
    assert requests.get(f"{URL}/items/1", headers=AUTH, timeout=10).status_code == 200


@pytest.mark.slow
def test_recommend_by_user_by_history_and_by_generation(served):
    by_user = _post("/recommend", {"user_id": "1", "k": 5})
    assert by_user.status_code == 200, by_user.text
    body = by_user.json()
    # The stack's user_item readout scores any item: no candidates, the whole catalogue.
    assert len(body["items"]) == 5 and body["candidates_from"] == "catalogue"
    scores = [item["score"] for item in body["items"]]
    assert scores == sorted(scores, reverse=True)
    assert "+projectors:" in body["model_version"]
    assert body["seconds"] > 0

    candidates = ["50", "100", "181", "258", "7"]
    by_history = _post("/recommend", {"history": ["1", "2", "3"], "candidates": candidates})
    assert by_history.status_code == 200, by_history.text
    ranked = by_history.json()
    assert ranked["candidates_from"] == "request"
    assert sorted(item["item_id"] for item in ranked["items"]) == sorted(candidates)
    assert all(item["title"] for item in ranked["items"])

    generated = _post(
        "/recommend", {"history": ["1", "2"], "candidates": candidates, "mode": "generate"}
    )
    assert generated.status_code == 200, generated.text
    assert isinstance(generated.json()["generated"], str)
    assert len(generated.json()["items"]) == 5


@pytest.mark.slow
def test_rank_mode_answers_with_the_readout(served):
    """The HTTP answer is the readout's: the same order and scores as the trained rank model
    computes in this process for the same request, and a catalogue ranking that leaves the
    user's history out."""
    import torch

    from allmrec.api import RecommendRequest
    from allmrec.serving import StackLLM, StackRecommender

    request = {"history": ["1", "2", "3"], "candidates": ["50", "100", "181", "258", "7"]}
    answer = _post("/recommend", request).json()
    recommender, llm = StackRecommender(served), StackLLM(served)
    assert llm.model.objective == "rank" and recommender.ranks_catalogue
    prepared = recommender.llm_request(RecommendRequest(**request))
    with torch.no_grad():
        (expected,) = llm.answer([prepared])
    assert [i["item_id"] for i in answer["items"]] == [
        recommender.item_ids[i] for i, _ in expected["items"]
    ]
    assert [i["score"] for i in answer["items"]] == pytest.approx(
        [score for _, score in expected["items"]], rel=1e-4, abs=1e-4
    )
    whole = {"history": ["1", "2", "3"], "k": 20}
    catalogue = _post("/recommend", whole).json()
    assert catalogue["candidates_from"] == "catalogue"
    ids = [i["item_id"] for i in catalogue["items"]]
    assert len(ids) == 20 and not {"1", "2", "3"} & set(ids)
    prepared = recommender.llm_request(RecommendRequest(**whole))
    with torch.no_grad():
        (expected,) = llm.answer([prepared])
    top = recommender.catalogue_top(expected["query"], prepared["history_all"], 20)
    assert prepared["history_ids"] == ["1", "2", "3"]
    assert ids == [recommender.item_ids[i] for i, _ in top]
    # The catalogue's keys are kept between requests and follow an added item: the kept
    # ranking equals the readout's own over every item, the new one included.
    from allmrec.api import NewItem
    from allmrec.models.readout import TextInputs

    added, _ = recommender.add_item(NewItem(title="Keys Kept", description="A test item"))
    history = prepared["history_all"]
    everything = len(recommender.item_ids) - 1 - len(history)
    kept = recommender.catalogue_top(expected["query"], history, everything)
    assert recommender.item_index[added.item_id] in [i for i, _ in kept]
    shown = torch.as_tensor(history[-recommender.config.stage2.max_history :])
    counts = torch.tensor(recommender.counts)
    text = TextInputs(recommender.q[shown][None], recommender.q, counts, counts[shown][None])
    with torch.no_grad():
        fresh = recommender.readout.item_scores(
            torch.tensor([expected["query"]]), recommender.z, text
        )[0]
    assert [s for _, s in kept] == pytest.approx(
        [float(fresh[i]) for i, _ in kept], rel=1e-5, abs=1e-5
    )


@pytest.mark.slow
def test_batched_rank_requests_answer_as_one_at_a_time(served):
    """Concurrent rank requests share one padded forward pass of the LLM (@serve.batch); each
    answer equals the same request's answered alone: the same items, the same scores."""
    from ray import serve

    bodies = [{"user_id": str(u), "k": 10} for u in range(11, 19)]
    bodies += [
        {"history": ["1", str(n)], "candidates": ["50", "100", "7", str(n + 1)]} for n in (3, 9)
    ]
    alone = [_post("/recommend", body).json() for body in bodies]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda body: _post("/recommend", body).json(), bodies))
    handle = serve.get_deployment_handle("LLM", app_name="allmrec")
    assert handle.batches.remote().result()["largest_batch"] > 1  # they were batched
    for one, many in zip(alone, together, strict=True):
        assert [i["item_id"] for i in many["items"]] == [i["item_id"] for i in one["items"]]
        assert [i["score"] for i in many["items"]] == pytest.approx(
            [i["score"] for i in one["items"]], rel=1e-4, abs=1e-4
        )


BAD_INPUTS = [
    ({"user_id": "no-such-user"}, 404, "user_id"),
    ({"history": ["1", "no-such-item"]}, 404, "history[1]"),
    ({"history": []}, 422, "history"),
    ({"history": [str(i) for i in range(1, 202)]}, 422, "history"),
    ({"history": ["1"], "candidates": [str(i) for i in range(2, 60)]}, 422, "candidates"),
    ({"history": ["1"], "candidates": ["2", "2"]}, 422, "candidates"),
    ({"history": ["1"], "k": "ten"}, 422, "k"),
    ({"history": ["1"], "k": 0}, 422, "k"),
    ({"history": ["1"], "mode": "dream"}, 422, "mode"),
    ({"history": "1,2,3"}, 422, "history"),
    ({"history": ["1"], "surprise": True}, 422, "surprise"),
    ({}, 422, "user_id"),
    ({"user_id": "1", "history": ["1"]}, 422, "user_id"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("body", "status", "field"), BAD_INPUTS)
def test_bad_input_is_a_4xx_naming_the_field(served, body, status, field):
    response = _post("/recommend", body)
    assert response.status_code == status, response.text
    assert response.json()["field"] == field, response.json()


@pytest.mark.slow
def test_malformed_json_oversized_body_and_unknown_item(served):
    malformed = requests.post(
        f"{URL}/recommend",
        data=b'{"user_id": "1",',
        headers={**AUTH, "Content-Type": "application/json"},
        timeout=10,
    )
    assert malformed.status_code == 422 and malformed.json()["field"] in ("body", "0", "16")
    oversized = _post("/recommend", {"history": ["1"] * 3000})
    assert oversized.status_code == 413 and oversized.json()["field"] == "body"
    unknown = requests.get(f"{URL}/items/no-such-item", headers=AUTH, timeout=10)
    assert unknown.status_code == 404 and unknown.json()["field"] == "item_id"
    empty_title = _post("/items", {"title": ""})
    assert empty_title.status_code == 422 and empty_title.json()["field"] == "title"
    # nothing died of it
    assert requests.get(f"{URL}/readyz", timeout=10).json()["status"] == "ready"
    assert _post("/recommend", {"user_id": "2"}).status_code == 200


@pytest.mark.slow
def test_a_cold_item_added_at_run_time_is_ranked(served):
    added = _post(
        "/items",
        {"title": "The Quiet Orbit", "description": "A lighthouse keeper on a space station"},
    )
    assert added.status_code == 201, added.text
    item = added.json()
    assert item["source"] == "added" and item["train_interactions"] == 0
    fetched = requests.get(f"{URL}/items/{item['item_id']}", headers=AUTH, timeout=10)
    assert fetched.json()["title"] == "The Quiet Orbit"
    duplicate = _post("/items", {"title": "Again", "item_id": item["item_id"]})
    assert duplicate.status_code == 409 and duplicate.json()["field"] == "item_id"
    # Several requests, so both recommender replicas answer at least once (each replays the
    # log of added items): the new item is ranked among the candidates every time.
    for _ in range(6):
        response = _post(
            "/recommend", {"history": ["1", "2"], "candidates": [item["item_id"], "50", "100"]}
        )
        assert response.status_code == 200, response.text
        ranked = [i["item_id"] for i in response.json()["items"]]
        assert item["item_id"] in ranked and len(ranked) == 3
    # Its joint embedding is enc_T(q) of its text, Stage 1's cold-item route, and every
    # recommender replica holds the same one (each replays the log of added items).
    import torch
    from ray import serve
    from safetensors.torch import load_file

    from allmrec.models.alignment import Autoencoder
    from allmrec.text_encoder import load_sentence_encoder

    stage1 = served / "stage1"
    # The stack's template is "{title} ({release_year}), {class}"; a new item has a title only.
    text = "The Quiet Orbit (),"
    q = load_sentence_encoder(str(stage1 / "text_encoder")).encode([text], convert_to_tensor=True)
    weights = load_file(str(stage1 / "text_autoencoder.safetensors"))
    latent, dim = weights["encoder.0.weight"].shape
    text_ae = Autoencoder(dim, latent)
    text_ae.load_state_dict(weights)
    with torch.no_grad():
        expected = text_ae.eval().encode(q.float().cpu())[0]
    handle = serve.get_deployment_handle("Recommender", app_name="allmrec")
    held = {}
    for _ in range(60):
        answer = handle.item_embedding.remote(item["item_id"]).result()["ok"]
        held[answer["replica"]] = torch.tensor(answer["z"])
        if len(held) == 2:
            break
    assert len(held) == 2, f"only replica(s) {list(held)} answered"
    for replica, z in held.items():
        assert torch.allclose(z, expected, atol=1e-5), replica


@pytest.mark.slow
def test_the_client_and_allmrec_recommend_against_the_service(served, capsys):
    from allmrec.cli import main
    from allmrec.client import Client, ServeError
    from allmrec.console import shown_on_terminal

    client = Client(URL, token=TOKEN, timeout_s=60)
    assert client.ready()
    direct = _post("/recommend", {"user_id": "1", "k": 4}).json()
    answer = client.recommend(user_id="1", k=4)  # typed: an allmrec.api.RecommendResponse
    assert [i.item_id for i in answer.items] == [i["item_id"] for i in direct["items"]]
    assert answer.candidates_from == "catalogue" and answer.model_version == direct["model_version"]
    ranked = client.recommend(history=["1", "2"], candidates=["50", "100", "7"], k=3)
    assert sorted(i.item_id for i in ranked.items) == ["100", "50", "7"]

    added = client.add_item("The Client's Film", "a film added through allmrec.client")
    assert client.item(added.item_id).title == "The Client's Film"
    with pytest.raises(ServeError) as err:  # the service's own 404, its field named
        client.recommend(user_id="no-such-user")
    assert err.value.status == 404 and err.value.field == "user_id"
    with pytest.raises(ServeError) as err:
        Client(URL, token=None).item("1")  # no token: refused by the service
    assert err.value.status == 401
    assert not Client("http://127.0.0.1:9", retries=1, backoff_s=0.01).ready()
    with pytest.raises(ConnectionError):  # nothing listens: retried, then a clear error
        Client("http://127.0.0.1:9", retries=1, backoff_s=0.01).recommend(user_id="1")

    import os

    os.environ["ALLMREC_SERVE_TOKEN"] = TOKEN
    try:
        assert main(["recommend", "--url", URL, "--user", "1", "--k", "4"]) == 0
    finally:
        del os.environ["ALLMREC_SERVE_TOKEN"]
    table = capsys.readouterr().out
    assert table.startswith("| rank | item | title | score |")
    for rank, item in enumerate(answer.items, 1):
        assert f"| {rank} | {item.item_id} | {item.title} |" in table
    assert main(["recommend", "--url", URL, "--user", "no-such-user"]) == 2  # one error line
    # The last line a terminal shows: a replica's line that Ray forwards can land after
    # main() returned, past the command's filter (the session's Ray outlives the command).
    last = [line for line in capsys.readouterr().err.splitlines() if shown_on_terminal(line)][-1]
    assert last.startswith("allmrec: error: HTTP 401 (Authorization)"), last


def _load(stop: threading.Event, results: list, body: dict) -> None:
    while not stop.is_set():
        try:
            response = _post("/recommend", body)
            results.append(response.status_code)
        except requests.RequestException as exc:
            results.append(type(exc).__name__)


@pytest.mark.slow
def test_llm_replicas_scale_up_survive_a_kill_under_load_and_scale_back(served):
    """One window of load: generations scale the LLM deployment from one replica to two; an
    LLM replica killed while it holds generations in flight costs no client its answer,
    because the ingress retried the lost calls on the other replica; when the load stops, the
    deployment scales back to one replica. (One window instead of two: each ramp of load and
    each scale-down costs tens of seconds here.)"""
    import ray

    def retried() -> int:
        return requests.get(f"{URL}/readyz", timeout=10).json()["retried_calls"]

    # at rest first: the earlier tests' requests can leave an upscale decision in flight
    _wait_for(lambda: _replicas("LLM") == {"RUNNING": 1}, 90, "the LLM deployment at rest")
    before = retried()
    stop, results = threading.Event(), []
    with ThreadPoolExecutor(8) as pool:
        # 8 clients of generations against at most 4 in flight per replica: the autoscaler's
        # target of 1 ongoing request asks for a second replica, and once there are two,
        # each one always holds work.
        for _ in range(8):
            pool.submit(_load, stop, results, {"user_id": "3", "mode": "generate"})
        try:
            started = time.monotonic()
            _wait_for(lambda: _replicas("LLM").get("RUNNING", 0) == 2, 90, "2 LLM replicas")
            scaled_up_after, scaled_up_s = len(results), time.monotonic() - started
            # Serve's router itself re-routes a request that had not reached the replica yet,
            # so a kill that finds no generation in flight costs no retry of ours: up to three
            # kills, each once two replicas run again.
            kills = 0
            while kills < 3 and retried() == before:
                _wait_for(lambda: _replicas("LLM").get("RUNNING", 0) == 2, 90, "2 LLM replicas")
                time.sleep(2)
                names = [
                    a["name"]
                    for a in ray.util.list_named_actors(all_namespaces=True)
                    if "#LLM#" in a["name"] and a["namespace"] == "serve"
                ]
                assert len(names) == 2, names
                in_flight = len(results)
                ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
                kills += 1
                # until the ingress retried lost calls and requests went on, at most 8 s
                deadline = time.monotonic() + 8
                while time.monotonic() < deadline and (
                    retried() == before or len(results) <= in_flight + 4
                ):
                    time.sleep(0.5)
        finally:
            stop.set()
    failures = [r for r in results if r != 200]
    print(
        f"\nload: scaled up after {scaled_up_after} requests, {scaled_up_s:.1f} s; {kills} "
        f"kill(s), {len(results)} requests, {len(failures)} failed, retried {retried() - before}"
    )
    assert len(results) > in_flight + 4  # requests went on after the last kill
    assert failures == []  # through the scale-up and every kill
    assert retried() > before  # a kill cost calls in flight, and the ingress retried them
    # The load is gone: back to exactly one running replica (and none starting or stopping).
    _wait_for(lambda: _replicas("LLM") == {"RUNNING": 1}, 90, "back to 1 LLM replica")
    assert _post("/recommend", {"user_id": "5", "mode": "generate"}).status_code == 200


@pytest.mark.slow
def test_sigterm_stops_allmrec_serve_and_every_process_of_its_ray(stack_run, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    import psutil

    from allmrec.client import Client

    port = PORT + 7
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # A Ray of its own, beside the session's (a short path: Ray's sockets live under it)
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="ar", dir="/tmp")
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - read after the process ends
    proc = subprocess.Popen(
        [sys.executable, "-m", "allmrec.cli", "serve", "--config", "configs/ml-100k-cpu.yaml"]
        + ["--run-dir", str(stack_run), "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        serving = tmp_path / "serve.log"
        _wait_for(lambda: "stops it" in serving.read_text(), 300, "allmrec serve to be serving")
        assert Client(f"http://127.0.0.1:{port}").ready()
        started = psutil.Process(proc.pid).children(recursive=True)
        names = {" ".join(p.cmdline()) for p in started}
        assert any("raylet" in n for n in names) and any("dashboard" in n for n in names)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()

    def alive(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    _wait_for(lambda: not any(alive(p) for p in started), 30, "the Ray processes to stop")


@pytest.mark.slow
def test_concurrent_adds_and_reads_keep_every_item_its_own(served):
    """Concurrent `POST /items`, `GET /items/{id}` and `POST /recommend` over real HTTP, two
    recommender replicas: every answer is about its own request's item; every added item keeps
    its own id, title and embedding (enc_T of its own text) on every replica; the catalogue
    holds exactly the items added, none lost or twice; a retried add is answered as such;
    requests that rank the whole catalogue while it grows (its readout keys kept until an
    add) answer with items of the catalogue, as many as asked."""
    import torch
    from ray import serve

    n_items = 32
    titles = [f"Concurrent Film {n:02d}" for n in range(n_items)]
    answers: dict[int, requests.Response] = {}
    reads: list[tuple[str, str, requests.Response]] = []
    wholes: list[requests.Response] = []  # the whole catalogue ranked during the adds

    def add(n: int) -> None:
        answers[n] = _post("/items", {"title": titles[n], "description": f"plot number {n}"})
        if answers[n].status_code == 201:
            item_id = answers[n].json()["item_id"]
            # read it back at once, by id and among a request's candidates
            got = requests.get(f"{URL}/items/{item_id}", headers=AUTH, timeout=60)
            reads.append((item_id, titles[n], got))
            ranked = _post(
                "/recommend", {"history": ["1", "2"], "candidates": [item_id, "50"], "k": 2}
            )
            reads.append((item_id, titles[n], ranked))
        wholes.append(_post("/recommend", {"history": ["1", "2"], "k": 5}))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(add, range(n_items)))

    statuses = sorted({r.status_code for r in answers.values()})
    assert statuses == [201], [r.text for r in answers.values() if r.status_code != 201][:3]
    ids = {n: r.json()["item_id"] for n, r in answers.items()}
    for n, response in answers.items():  # each answer names its own request's item
        assert response.json()["title"] == titles[n], (n, response.json())
    assert len(set(ids.values())) == n_items, "two adds were answered with the same id"
    for item_id, title, response in reads:
        assert response.status_code == 200, response.text
        body = response.json()
        if "items" in body:  # a recommendation: the added item under its own title
            named = {i["item_id"]: i["title"] for i in body["items"]}
            assert named.get(item_id) == title, (item_id, title, body["items"])
        else:
            assert (body["item_id"], body["title"]) == (item_id, title)

    known = set(ids.values())
    for response in wholes:
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["candidates_from"] == "catalogue" and len(body["items"]) == 5, body
        for item in body["items"]:  # a catalogue item, or one added here under its title
            assert item["item_id"] not in ("1", "2"), body  # the history is left out
            if item["item_id"] in known:
                assert item["title"] in titles, item

    # Every replica: the same added items, each with its own title and z = enc_T(q(text)).
    handle = serve.get_deployment_handle("Recommender", app_name="allmrec")
    catalogues = {}
    for _ in range(80):
        answer = handle.added_items.remote().result()
        catalogues[answer["replica"]] = answer
        if len(catalogues) == 2:
            break
    assert len(catalogues) == 2, f"only replica(s) {list(catalogues)} answered"
    expected_z = _enc_t(served, [f"{titles[n]} (),".strip() for n in range(n_items)])
    for replica, answer in catalogues.items():
        held = answer["items"]  # [(item_id, title, z)] of every item added at run time
        held_ids = [item_id for item_id, _, _ in held]
        assert len(held_ids) == len(set(held_ids)), f"{replica}: an item added twice"
        by_id = {item_id: (title, z) for item_id, title, z in held}
        for n, item_id in ids.items():
            title, z = by_id[item_id]
            assert title == titles[n], (replica, item_id, title)
            assert torch.allclose(torch.tensor(z), expected_z[n], atol=1e-5), (replica, n)
    first, second = catalogues.values()
    assert sorted(i for i, _, _ in first["items"]) == sorted(i for i, _, _ in second["items"])

    # A retried add (same item_id, same item) is answered as the item that exists, stored
    # once; the same id for another item is refused.
    item_id = ids[0]
    again = _post(
        "/items", {"title": titles[0], "description": "plot number 0", "item_id": item_id}
    )
    assert again.status_code == 200 and again.json()["item_id"] == item_id, again.text
    other = _post("/items", {"title": "Another Film", "item_id": item_id})
    assert other.status_code == 409 and other.json()["field"] == "item_id"
    answer = handle.added_items.remote().result()
    assert [i for i, _, _ in answer["items"]].count(item_id) == 1


def _enc_t(stack, texts: list[str]):
    """enc_T(q) of `texts` through the stack's own Sentence-BERT and text encoder."""
    import torch
    from safetensors.torch import load_file

    from allmrec.models.alignment import Autoencoder
    from allmrec.text_encoder import load_sentence_encoder

    stage1 = stack / "stage1"
    q = load_sentence_encoder(str(stage1 / "text_encoder")).encode(texts, convert_to_tensor=True)
    weights = load_file(str(stage1 / "text_autoencoder.safetensors"))
    latent, dim = weights["encoder.0.weight"].shape
    text_ae = Autoencoder(dim, latent)
    text_ae.load_state_dict(weights)
    with torch.no_grad():
        return text_ae.eval().encode(q.float().cpu())
