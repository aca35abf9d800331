"""The answer policy (advplugin.service.answers) over real HTTP: ordinary keys get decisions,
not measurements; exact scores only for a key an admin granted them; budgets that refuse
with 429, are audited and counted in /metrics, survive a restart and hold across replicas.

Synthetic templates with chosen cosines to enrolled ones make weak and strong matches
exactly where the shipped calibration puts them (xnn keeps every cosine), so each budget
rule is tested at its edge; LFW templates check the answers of real people."""

from __future__ import annotations

import json
import re
import time

import httpx
import numpy as np
import pytest
from fastapi.routing import APIRoute
from pydantic import TypeAdapter

from advplugin.cli.main import main
from advplugin.gallery import Gallery
from advplugin.gallery.audit import CLI
from advplugin.gallery.budgets import OperatingPoints
from advplugin.protectors import calibration_for, create_protector
from advplugin.service.answers import BAND_VALUES, operating_point
from advplugin.service.app import create_app
from advplugin.service.deps import get_answers
from advplugin.service.protection import ConfigurationError
from advplugin.settings import AnswerSettings, Settings
from tests.service.conftest import migrated_database
from tests.service.helpers import first_vs_rest, protection_of

CAL = calibration_for("xnn", "dlib")
#: Routes that answer no similarity or decision of their own although they match: the blind
#: identify returns ciphertexts of every score, which only the client's key decrypts; the
#: server decides nothing (docs/blind.md: every blind client is a key holder).
EXEMPT = {("POST", "/blind/identify")}


def _dependencies(dependant) -> set:  # type: ignore[no-untyped-def]
    out = {dependant.call}
    for d in dependant.dependencies:
        out |= _dependencies(d)
    return out


def _answers_similarity(route) -> bool:  # type: ignore[no-untyped-def]
    if route.response_model is None:
        return False
    schema = json.dumps(TypeAdapter(route.response_model).json_schema())
    return '"similarity"' in schema or '"verified"' in schema


def _api_routes(routes):  # type: ignore[no-untyped-def]
    """Every API route of the app with its full path, dependencies and response model: the
    app's own, and those of included routers (FastAPI >= 0.165 keeps those behind
    `_IncludedRouter`s, whose effective contexts carry the same fields)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif hasattr(route, "effective_route_contexts"):
            yield from route.effective_route_contexts()


def test_every_route_that_answers_a_similarity_takes_the_policy() -> None:
    """Structural: a new route answering a similarity or a decision without `AnswersFor`
    fails here; so does a matching route with a binary answer that is not a known exception."""
    app = create_app(Settings())
    found = set()
    for route in _api_routes(app.routes):
        for method in route.methods:
            if _answers_similarity(route):
                found.add((method, route.path))
                assert get_answers in _dependencies(route.dependant), f"{method} {route.path} bypasses the answer policy"
            elif route.response_model is None and method == "POST" and "identify" in route.path:
                assert (method, route.path) in EXEMPT, f"{method} {route.path}: an identify route without a schema"
    # The detection itself must see the routes the issue names (else this test proves nothing).
    assert {("POST", "/identify"), ("POST", "/verify"), ("POST", "/identify/templates"),
            ("POST", "/api/v1/recognition/recognize"), ("POST", "/api/v1/recognition/faces/{image_id}/verify"),
            ("POST", "/api/v1/verification/verify")} <= found


# -- a template-mode service --------------------------------------------------------------------------
def _env(url: str, tmp_path, key, **answers: str) -> dict[str, str]:
    return {
        "ADVPLUGIN_DATABASE_URL": url, "ADVPLUGIN_DATA_DIR": str(tmp_path / "data"),
        "ADVPLUGIN_MODE": "templates", "ADVPLUGIN_SCHEME": "xnn",
        "ADVPLUGIN_TEMPLATE_KEY_ID": key.key_id, "ADVPLUGIN_TEMPLATE_DIM": "128",
        "ADVPLUGIN_API_KEY_EXACT_SCORES": "true",
        **{f"ADVPLUGIN_ANSWERS__{k.upper()}": v for k, v in answers.items()},
    }


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def _at_cosine(target: np.ndarray, cos: float, rng: np.random.Generator) -> np.ndarray:
    """A unit vector whose cosine to the unit vector `target` is exactly `cos`."""
    r = rng.normal(size=target.shape)
    r -= (r @ target) * target
    return _unit(cos * target + np.sqrt(1 - cos**2) * _unit(r))


class Gal:
    """Synthetic enrolled people `P0..`, probes at chosen cosines, keys made in SQL."""

    def __init__(self, server, url: str, key, n: int = 12) -> None:
        self.server, self.url = server, url
        self.protector = create_protector("xnn", key=key, dim=128)
        self.prot = protection_of(self.protector)
        self.rng = np.random.default_rng(7)
        self.raw = _unit(self.rng.normal(size=(n, 128)))
        with server.client() as c:
            r = c.post("/enroll/templates", json={"protection": self.prot, "items": [
                {"subject": f"P{i}", "template": t.tolist()} for i, t in enumerate(self.protector.protect(self.raw))]})
            assert r.status_code == 201, r.text

    def key(self, name: str, **budgets: int) -> str:
        with Gallery.open(self.url) as g:
            api_key = g.create_api_key(name, scope="identify")
            if budgets:
                g.configure_api_key(name, **budgets)
        return wait_for_key(self.server, api_key)

    def probe(self, who: int | None, cos: float = 0.99) -> list[float]:
        raw = _unit(self.rng.normal(size=128)) if who is None else _at_cosine(self.raw[who], cos, self.rng)
        return self.protector.protect(raw[None, :])[0].tolist()

    def ask(self, api_key: str, probes: list[list[float]], server=None, **extra) -> httpx.Response:  # type: ignore[no-untyped-def]
        with (server or self.server).client(api_key) as c:
            return c.post("/identify/templates", json={"protection": self.prot, "templates": probes, **extra})


def wait_for_key(server, api_key: str) -> str:  # type: ignore[no-untyped-def]
    """A key made in SQL is seen by the service within a second (auth re-reads on a miss)."""
    for _ in range(50):
        with server.client(api_key) as c:
            if c.get("/status").status_code != 401:
                return api_key
        time.sleep(0.1)
    raise AssertionError("the service never saw the new key")


WEAK = (CAL.thresholds[1e-3] + CAL.thresholds[1e-4]) / 2  # a match at FMR 1e-3, not 1e-4
STRONG = 0.995  # above the strong band (FMR 1e-5)


@pytest.fixture
def gal(tmp_path, key, make_server, request) -> Gal:
    url = migrated_database("sqlite", tmp_path, request)
    return Gal(make_server(_env(url, tmp_path, key)), url, key)


def test_an_ordinary_key_gets_decisions_and_bands(gal: Gal) -> None:
    k = gal.key("camera")
    probes = [gal.probe(0, STRONG), gal.probe(1, WEAK), gal.probe(None)]
    exact = gal.ask(gal.server.api_key, probes, prediction_count=5).json()["result"]
    answer = gal.ask(k, probes, prediction_count=5).json()["result"]
    # The granted key: five subjects each, exact similarities (those of the chosen cosines).
    assert [len(r["subjects"]) for r in exact] == [5, 5, 5]
    assert exact[0]["subjects"][0]["similarity"] == pytest.approx(STRONG, abs=1e-4)
    # The ordinary key: the match only, as a band; nothing for the stranger.
    assert [[s["subject"] for s in r["subjects"]] for r in answer] == [["P0"], ["P1"], []]
    assert answer[0]["subjects"][0]["similarity"] == BAND_VALUES[1e-5]
    assert answer[1]["subjects"][0]["similarity"] == BAND_VALUES[1e-3]
    # The stranger (cosine ~0 to everyone) is named as no one at any operating point.
    # A client threshold compares with the band: 0.95 keeps the strong match only.
    kept = gal.ask(k, probes[:2], threshold=0.95).json()["result"]
    assert [[s["subject"] for s in r["subjects"]] for r in kept] == [["P0"], []]


def test_lookalikes_are_budgeted_and_strong_matches_earn_credit(gal: Gal) -> None:
    """Two new weak matches use up a budget of 2 (repeats of a subject already named are
    free); then the key is refused whatever it sends. Another key earns 2 x credit per subject it
    matches strongly."""
    k = gal.key("lookalike", budget_lookalikes=2)
    for who in (0, 0, 0, 1):  # two new subjects, two repeats
        r = gal.ask(k, [gal.probe(who, WEAK)])
        assert r.status_code == 200 and r.json()["result"][0]["subjects"][0]["subject"] == f"P{who}"
    refused = gal.ask(k, [gal.probe(2, STRONG)])  # even a strong match: the refusal says nothing of the probe
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "budget_exceeded"
    assert int(refused.headers["retry-after"]) > 0

    c = gal.key("door", budget_lookalikes=1)
    assert gal.ask(c, [gal.probe(3, STRONG)]).status_code == 200  # allowance 1 + 2 x 1
    for who in (4, 5, 6):
        assert gal.ask(c, [gal.probe(who, WEAK)]).status_code == 200
    assert gal.ask(c, [gal.probe(7, WEAK)]).status_code == 429


def test_unmatched_budget_refuses_audits_counts_and_survives_a_restart(gal: Gal) -> None:
    k = gal.key("prober", budget_unmatched=3)
    codes = [gal.ask(k, [gal.probe(None)]).status_code for _ in range(5)]
    assert codes == [200, 200, 200, 429, 429]
    # The granted key is not budgeted; other keys are not affected.
    assert gal.ask(gal.server.api_key, [gal.probe(None)]).status_code == 200
    assert gal.ask(gal.key("other"), [gal.probe(0)]).status_code == 200
    with Gallery.open(gal.url) as g:
        key_id = next(x.id for x in g.list_api_keys() if x.name == "prober")
        events = [e for e in g.audit_events() if e.action == "budget_exceeded"]
    assert [(e.api_key_id, e.subject) for e in events] == [(key_id, "unmatched")]  # once, not per refusal
    with gal.server.client() as c:
        metrics = c.get("/metrics").text
    refusals = [ln for ln in metrics.splitlines() if ln.startswith("advplugin_answer_budget_refusals_total")]
    assert refusals and float(refusals[0].split()[-1]) == 2
    gal.server.restart()
    assert gal.ask(k, [gal.probe(0)]).status_code == 429


def test_replicas_share_one_budget_on_postgresql(tmp_path, key, make_server, request) -> None:
    """One key's probes alternate between two service processes on one PostgreSQL gallery:
    together they answer exactly the budget, then both refuse; a restart changes nothing."""
    url = migrated_database("postgresql", tmp_path, request)
    a = make_server(_env(url, tmp_path / "a", key), tmp_path / "a")
    b = make_server(_env(url, tmp_path / "b", key) | {"ADVPLUGIN_API_KEY": a.api_key}, tmp_path / "b")
    gal = Gal(a, url, key)
    k = gal.key("spread", budget_unmatched=6)
    codes = [gal.ask(k, [gal.probe(None)], server=(a, b)[i % 2]).status_code for i in range(10)]
    assert codes.count(200) == 6 and codes[6:] == [429] * 4
    b.restart()
    assert gal.ask(k, [gal.probe(0)], server=b).status_code == 429
    assert gal.ask(k, [gal.probe(0)], server=a).status_code == 429


def test_lfw_people_are_still_identified_by_an_ordinary_key(lfw_cache, tmp_path, key, make_server, request) -> None:
    """Real people: every enrolled person's other photo that the granted key finds at the
    top above the operating point is named the same to an ordinary key, and nothing else is."""
    url = migrated_database("sqlite", tmp_path, request)
    server = make_server(_env(url, tmp_path, key))
    emb = lfw_cache["embedding"]
    gallery, probes = first_vs_rest(lfw_cache["identity"], lfw_cache["path"], max_identities=150, max_images=3)
    protector = create_protector("xnn", key=key, dim=128)
    prot = protection_of(protector)
    names = [str(lfw_cache["identity"][i]) for i in gallery]
    with server.client() as c:
        assert c.post("/enroll/templates", json={"protection": prot, "items": [
            {"subject": n, "template": t.tolist()} for n, t in zip(names, protector.protect(emb[gallery]), strict=True)
        ]}).status_code == 201
    with Gallery.open(url) as g:
        camera = wait_for_key(server, g.create_api_key("camera", scope="identify"))
    t = protector.protect(emb[probes]).tolist()
    body = {"protection": prot, "templates": t, "prediction_count": 3}
    with server.client() as c:
        exact = c.post("/identify/templates", json=body).json()["result"]
    with server.client(camera) as c:
        answer = c.post("/identify/templates", json=body).json()["result"]
    threshold = CAL.thresholds[Settings().answers.decision_fmr]
    expected = [[r["subjects"][0]["subject"]] if r["subjects"][0]["similarity"] >= threshold else [] for r in exact]
    assert [[s["subject"] for s in r["subjects"]] for r in answer] == expected
    right = [e == [str(lfw_cache["identity"][p])] for e, p in zip(expected, probes, strict=True)]
    assert np.mean(right) > 0.8  # real people are still recognised under the default operating point


# -- what an admin changes ----------------------------------------------------------------------------
def test_cli_sets_exact_scores_budgets_and_operating_point_audited(tmp_path, capsys) -> None:
    url = f"sqlite:///{tmp_path / 'g.db'}"
    assert main(["db", "upgrade", "--database-url", url]) == 0
    assert main(["db", "api-key", "create", "--database-url", url, "--scope", "identify", "--name", "cam"]) == 0
    base = ["db", "api-key", "set", "--database-url", url, "--name", "cam"]
    assert main([*base, "--exact-scores", "--budget-unmatched", "50"]) == 0
    with Gallery.open(url) as g:
        k = next(x for x in g.active_api_keys() if x.scope == "identify")
    assert (k.exact_scores, k.budget_unmatched, k.budget_lookalikes) == (True, 50, None)
    # Only what is given changes; `default` puts a budget back to the service's.
    assert main([*base, "--no-exact-scores", "--budget-lookalikes", "7"]) == 0
    assert main([*base, "--budget-unmatched", "default"]) == 0
    with Gallery.open(url) as g:
        k = next(x for x in g.active_api_keys() if x.scope == "identify")
    assert (k.exact_scores, k.budget_unmatched, k.budget_lookalikes) == (False, None, 7)
    assert main(["db", "api-key", "list", "--database-url", url]) == 0
    assert "budget_lookalikes=7" in capsys.readouterr().out
    # Clear failures: nothing to set, an unknown key, a bad budget.
    assert main(base) == 2 and "nothing to set" in capsys.readouterr().err
    assert main([*base[:-1], "ghost", "--exact-scores"]) == 4 and "no active API key" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--budget-unmatched", "-1"])
    assert main(["db", "collection", "set", "--database-url", url, "--fmr", "1e-4"]) == 0
    with Gallery.open(url) as g:
        assert OperatingPoints(g).get("default") == pytest.approx(1e-4)
        actions = [(e.action, e.subject) for e in g.audit_events() if e.action in ("set_api_key", "operating_point")]
    assert actions == [("set_api_key", "cam: exact_scores=True, budget_unmatched=50"),
                       ("set_api_key", "cam: exact_scores=False, budget_lookalikes=7"),
                       ("set_api_key", "cam: budget_unmatched=None"), ("operating_point", "fmr=0.0001")]


def test_a_collection_operating_point_moves_the_decision(gal: Gal) -> None:
    """A weak match at FMR 1e-3 is named at the default operating point and not once the
    collection decides at 1e-4; an operating point the scheme is not calibrated at answers
    503 with the calibrated ones, not a silent default."""
    k = gal.key("camera")
    weak = gal.probe(1, WEAK)
    assert [s["subject"] for s in gal.ask(k, [weak]).json()["result"][0]["subjects"]] == ["P1"]
    with Gallery.open(gal.url) as g:
        OperatingPoints(g).set("default", 1e-4, actor=CLI)
    time.sleep(5.5)  # the service re-reads a collection's operating point within 5 s
    assert gal.ask(k, [weak]).json()["result"][0]["subjects"] == []
    with Gallery.open(gal.url) as g:
        OperatingPoints(g).set("default", 3e-3, actor=CLI)
    time.sleep(5.5)
    r = gal.ask(k, [weak])
    assert r.status_code == 503 and "1e-05, 0.0001, 0.001, 0.01" in r.json()["error"]["message"]


def test_operating_points_come_from_the_calibration_or_an_explicit_threshold() -> None:
    """Bands rise with the score; an FMR without a calibrated threshold is refused naming the
    calibrated ones; a scheme and extractor without calibration need an explicit threshold."""
    point = operating_point(CAL, 1e-2, AnswerSettings())
    assert point.threshold == CAL.thresholds[1e-2] and point.strong == CAL.thresholds[1e-5]
    scores = [CAL.thresholds[f] for f in (1e-2, 1e-3, 1e-4, 1e-5)]
    assert [point.band(s) for s in scores] == [BAND_VALUES[f] for f in (1e-2, 1e-3, 1e-4, 1e-5)]
    assert point.band(np.nextafter(CAL.thresholds[1e-3], 0)) == BAND_VALUES[1e-2]
    with pytest.raises(ConfigurationError, match=re.escape("calibrated: 1e-05, 0.0001, 0.001, 0.01")):
        operating_point(CAL, 3e-3, AnswerSettings())
    with pytest.raises(ConfigurationError, match="DECISION_THRESHOLD"):
        operating_point(None, 1e-2, AnswerSettings())
    custom = operating_point(None, 1e-2, AnswerSettings(decision_threshold=0.5))
    assert custom.threshold == 0.5 and custom.strong == float("inf") and len(custom.bands) == 1


def test_images_verify_answers_the_decision_to_an_ordinary_key(face_data, key_file, tmp_path, make_server, request) -> None:
    """Images mode, real dlib: `/verify` tells an ordinary key the decision and the band of a
    match, null for a non-match; the exact-scores key gets the similarity."""
    kpath, _ = key_file
    url = migrated_database("sqlite", tmp_path, request)
    server = make_server({"ADVPLUGIN_DATABASE_URL": url, "ADVPLUGIN_DATA_DIR": str(tmp_path / "data"),
                          "ADVPLUGIN_KEY_FILE": str(kpath), "ADVPLUGIN_SCHEME": "xnn"})
    photos = {n: sorted((face_data / "lfw-dev" / n).glob("*.jpg")) for n in ("Aaron_Peirsol", "Abdullah_Gul")}
    with server.client() as c:
        for name, files in photos.items():
            assert c.post("/enroll", files={"file": files[0].read_bytes()}, data={"subject": name}).status_code == 201
    with Gallery.open(url) as g:
        camera = wait_for_key(server, g.create_api_key("camera", scope="identify"))
    probe = {"file": photos["Aaron_Peirsol"][1].read_bytes()}
    with server.client(camera) as c:
        same = c.post("/verify", files=probe, data={"subject": "Aaron_Peirsol"}).json()
        other = c.post("/verify", files=probe, data={"subject": "Abdullah_Gul"}).json()
    with server.client() as c:
        exact = c.post("/verify", files=probe, data={"subject": "Aaron_Peirsol"}).json()
    assert same["verified"] is True and same["similarity"] in BAND_VALUES.values()
    assert other["verified"] is False and other["similarity"] is None
    assert exact["verified"] is True and exact["similarity"] not in BAND_VALUES.values() and exact["similarity"] > 0.9
