"""CompreFace's rename (`PUT /api/v1/recognition/subjects/{X}` with `{"subject": Y}`) raced
against a delete of X, another rename of X and an enrolment into X, over real HTTP on both
databases (issue 22, item 1). Requests of a round start together (a barrier); after each round
the gallery itself is read and checked:

- a subject whose DELETE answered 200 has no template left under any name;
- no template is duplicated or lost: the collection holds exactly what was enrolled minus
  what was deleted (a rename moves templates, it never copies or drops one);
- a rename answered `{"updated": true}` is visible: the new name exists and holds the
  templates.

Each round uses its own names, so the rounds are independent. Violations are collected over
all rounds and reported together: 50 rounds per kind and database, as the issue asks.

Template mode (no detector): the client protects synthetic vectors with an xnn key and
enrols them with `/enroll/templates`; the CompreFace routes then work on those subjects."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import httpx
import numpy as np
import pytest

from advplugin.gallery import Gallery, SubjectNotFound
from advplugin.protectors import create_protector
from tests.service.conftest import migrated_database
from tests.service.helpers import protection_of

ROUNDS = 50  # per kind and database
PER_SUBJECT = 2  # templates of X before each race
CF = "/api/v1/recognition/subjects"


class Race:
    """A live service in template mode, its gallery opened alongside, and a protector."""

    def __init__(self, server, url: str, key) -> None:  # type: ignore[no-untyped-def]
        self.server = server
        self.gallery = Gallery.open(url)
        self.protector = create_protector("xnn", key=key, dim=128)
        self.prot = protection_of(self.protector)
        self.rng = np.random.default_rng(22)
        self.expected = 0  # templates the collection should hold
        self.violations: list[str] = []

    def templates(self, n: int) -> list[list[float]]:
        raw = self.rng.normal(size=(n, 128))
        raw /= np.linalg.norm(raw, axis=1, keepdims=True)
        return self.protector.protect(raw.astype(np.float32)).tolist()

    def enrol(self, c: httpx.Client, subject: str, n: int) -> httpx.Response:
        return c.post("/enroll/templates", json={
            "protection": self.prot, "items": [{"subject": subject, "template": t} for t in self.templates(n)],
        })

    def setup(self, subject: str) -> None:
        with self.server.client() as c:
            r = self.enrol(c, subject, PER_SUBJECT)
        assert r.status_code == 201, r.text
        self.expected += PER_SUBJECT

    def race(self, *calls: Callable[[httpx.Client], httpx.Response]) -> list[httpx.Response]:
        """Run the calls at once, each in its own thread with its own connection."""
        barrier = threading.Barrier(len(calls))
        out: list[httpx.Response | BaseException | None] = [None] * len(calls)
        clients = [self.server.client() for _ in calls]

        def run(i: int) -> None:
            try:
                barrier.wait(30)
                out[i] = calls[i](clients[i])
            except BaseException as e:  # reported below, on the test's thread
                out[i] = e

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for c in clients:
            c.close()
        for r in out:
            if not isinstance(r, httpx.Response):
                raise AssertionError(f"a racing request failed: {r!r}")
            assert r.status_code in (200, 201, 404), r.text  # never a 500 or a lock timeout
        return out  # type: ignore[return-value]

    def count(self, subject: str) -> int | None:
        """Templates of a subject (None: no such subject)."""
        try:
            return self.gallery.get_subject(subject, collection="default").template_count
        except SubjectNotFound:
            return None

    def check(self, rnd: int, what: str, ok: bool) -> None:
        if not ok:
            self.violations.append(f"round {rnd}: {what}")

    def check_total(self, rnd: int) -> None:
        n = self.gallery.count_templates(collection="default")
        self.check(rnd, f"collection holds {n} templates, expected {self.expected} (duplicated or lost)",
                   n == self.expected)
        self.expected = n  # one violation is reported once, not again every later round


def rename(old: str, new: str) -> Callable[[httpx.Client], httpx.Response]:
    return lambda c: c.put(f"{CF}/{old}", json={"subject": new})


def updated(r: httpx.Response) -> bool:
    return r.status_code == 200 and r.json() == {"updated": True}


@pytest.fixture(params=["sqlite", "postgresql"])
def race(request, tmp_path, key, make_server) -> Iterator[Race]:  # type: ignore[no-untyped-def]
    url = migrated_database(request.param, tmp_path, request)
    server = make_server({
        "ADVPLUGIN_DATABASE_URL": url, "ADVPLUGIN_DATA_DIR": str(tmp_path / "data"),
        "ADVPLUGIN_MODE": "templates", "ADVPLUGIN_SCHEME": "xnn",
        "ADVPLUGIN_TEMPLATE_KEY_ID": key.key_id, "ADVPLUGIN_TEMPLATE_DIM": "128",
    })
    r = Race(server, url, key)
    yield r
    r.gallery.close()


def test_rename_racing_delete_never_keeps_the_deleted_face(race: Race) -> None:
    for rnd in range(ROUNDS):
        x, y = f"X{rnd}", f"Y{rnd}"
        race.setup(x)
        ren, dele = race.race(rename(x, y), lambda c, x=x: c.delete(f"{CF}/{x}"))
        deleted = dele.status_code == 200
        if deleted:
            race.expected -= PER_SUBJECT
        under_y, under_x = race.count(y), race.count(x)
        race.check(rnd, f"X still exists ({under_x} templates)", under_x is None)
        if deleted:
            race.check(rnd, f"DELETE X answered 200 but Y holds {under_y} templates", not under_y)
        if updated(ren):
            race.check(rnd, f"rename answered updated but Y holds {under_y} templates", under_y == PER_SUBJECT)
        race.check(rnd, f"both answered success (rename {ren.status_code}, delete {dele.status_code})",
                   not (deleted and updated(ren)))
        race.check_total(rnd)
    assert not race.violations, f"{len(race.violations)} violations in {ROUNDS} rounds:\n" + "\n".join(race.violations)


def test_concurrent_renames_never_duplicate(race: Race) -> None:
    """Even rounds: X->Y twice; odd rounds: X->Y with X->Z."""
    for rnd in range(ROUNDS):
        x, y = f"X{rnd}", f"Y{rnd}"
        z = y if rnd % 2 == 0 else f"Z{rnd}"
        race.setup(x)
        a, b = race.race(rename(x, y), rename(x, z))
        counts = {n: race.count(n) for n in {y, z}}
        race.check(rnd, "X still exists", race.count(x) is None)
        race.check(rnd, f"both renames answered updated (targets {y}, {z})", not (updated(a) and updated(b)))
        race.check(rnd, f"neither rename answered updated ({a.status_code}, {b.status_code})", updated(a) or updated(b))
        for r, target in ((a, y), (b, z)):
            if updated(r):
                race.check(rnd, f"rename to {target} answered updated but it holds {counts[target]}",
                           counts[target] == PER_SUBJECT)
        race.check(rnd, f"templates under the new names: {counts}", sum(n or 0 for n in counts.values()) == PER_SUBJECT)
        race.check_total(rnd)
    assert not race.violations, f"{len(race.violations)} violations in {ROUNDS} rounds:\n" + "\n".join(race.violations)


def test_rename_racing_enrol_loses_and_copies_nothing(race: Race) -> None:
    for rnd in range(ROUNDS):
        x, y = f"X{rnd}", f"Y{rnd}"
        race.setup(x)
        ren, enr = race.race(rename(x, y), lambda c, x=x: race.enrol(c, x, 1))
        if enr.status_code == 201:
            race.expected += 1
        under_x, under_y = race.count(x) or 0, race.count(y)
        race.check(rnd, f"enrolment answered {enr.status_code}", enr.status_code == 201)
        if updated(ren):
            race.check(rnd, f"rename answered updated but Y holds {under_y}", (under_y or 0) >= PER_SUBJECT)
        race.check(rnd, f"X {under_x} + Y {under_y} templates, expected {PER_SUBJECT + 1}",
                   under_x + (under_y or 0) == PER_SUBJECT + 1)
        race.check_total(rnd)
    assert not race.violations, f"{len(race.violations)} violations in {ROUNDS} rounds:\n" + "\n".join(race.violations)
