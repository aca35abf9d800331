"""The API client's threat (DESIGN.md, fourth tier): enrolled people read back out of answers.

An ordinary identify-scoped client of the service (a kiosk's key) sends photos of people who
are *not* enrolled and reads the answers. It runs the public extractor (dlib) on its own
photos, so it knows each probe's raw embedding, and the default scheme (`xnn`) keeps cosine,
so:

- with **exact similarity scores** every answer `<probe, template>` is a linear equation in
  the enrolled person's raw embedding: least squares over a few hundred answers recovers it;
- with **decisions only** (the subject named above a threshold, top-1), the look-alike probes
  a subject is returned for still point at it, and an attacker that morphs its own photos can
  walk to the decision boundary, whose points lie on `{x : <x, t> = threshold}`.

Everything here is independent of the service: the attacks run against an abstract `Oracle`
(an adapter over the service's HTTP API implements it; the tests use one over dlib
embeddings). Success is measured in ISO/IEC 30136 terms, as the harness reports the other
threats: rank-1 of the recovered embeddings among **other** photos of the enrolled people
(not the enrolled photo), against chance, 1 / number of people; optionally the success attack
rate of faces decoded from the recovered embeddings (`reconstruct`).

`run_score_oracle_threat` returns a JSON-serialisable result; `report.write_oracle_section`
renders it (figure and goal/met table), inside `report.md` when `report.json` holds it under
`score_oracle`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from advplugin.errors import AdvpluginError, RemoteError
from advplugin.evaluation.metrics import threshold_at_far

__all__ = [
    "FMR",
    "GOAL_MARGIN",
    "IDENTIFICATION_MARGIN",
    "QUERY_COUNTS",
    "STRATEGIES",
    "ApiClient",
    "AttackRun",
    "BudgetExhausted",
    "Estimate",
    "Oracle",
    "OracleMatch",
    "OracleService",
    "Snapshot",
    "adaptive_boundary",
    "augment_probes",
    "least_squares",
    "legitimate_identification",
    "lookalike_centroid",
    "rank1_of_recovered",
    "reconstruction_success",
    "run_api_client_threat",
    "run_score_oracle_threat",
]

#: Snapshots of the attacker's estimates after this many queries (one query = one probe).
QUERY_COUNTS = (100, 300, 1_000, 3_000, 10_000)
#: The goal of a policy that protects: rank-1 at the last snapshot at most chance + this.
GOAL_MARGIN = 0.01
#: The operating point at which decoded faces are judged (the harness's first FMR).
FMR = 1e-3
#: The legitimate side's goal (issue 21): enrolled people's other photos identified within
#: this much of the exact-score policy's rate (today's answers) under every other policy.
IDENTIFICATION_MARGIN = 0.01


class BudgetExhausted(RemoteError):
    """The service answered 429: the key is stopped after `queries_done` answered queries."""

    def __init__(self, queries_done: int) -> None:
        super().__init__(f"query budget exhausted after {queries_done} queries (HTTP 429)")
        self.queries_done = int(queries_done)


@dataclass(frozen=True)
class OracleMatch:
    """One subject an answer names, and what the answer discloses of its similarity: the
    exact score, a coarse band's value, or None (a decision alone)."""

    subject: str
    similarity: float | None


class Oracle(Protocol):
    def query(self, probes: np.ndarray) -> list[list[OracleMatch]]:
        """`probes`: the attacker's raw embeddings, float32 [n, d] (what its photos give
        through the public extractor). Returns, per probe, the subjects the answer names
        (possibly none), best first. Raises `BudgetExhausted` once the key is stopped."""
        ...


class OracleService(Protocol):
    """A running service with a gallery enrolled, as the API-client threat sees it: its
    answer policies (one fresh API key per oracle) and the cameras' side."""

    #: policy labels that disclose exact scores (granted explicitly): they show the threat.
    exact_policies: Collection[str]
    #: policy label -> one line on what its answers disclose.
    descriptions: Mapping[str, str]

    def factories(self) -> Mapping[str, Callable[[], Oracle]]:
        """Policy label -> a callable making a fresh oracle (a fresh API key) under it."""
        ...

    def identified(
        self, policy: str, probes: np.ndarray, truth: np.ndarray
    ) -> Mapping[str, object]:
        """A legitimate client (a camera) under `policy` sends `probes` (raw embeddings of
        enrolled people's other photos, `truth` their subjects): `{"probes", "identified"
        (share whose top subject is right), "stopped_at" (None unless a 429 stopped it)}`."""
        ...


class ApiClient(Protocol):
    """What the harness is given to run the API-client threat (composition: the evaluation
    layer imports no service; `advplugin.cli.api_client.InProcessApiClient` is the real one,
    the service app in process)."""

    #: one line on the service under attack, for the report.
    description: str

    def open(self, enrolled: Mapping[str, np.ndarray]) -> AbstractContextManager[OracleService]:
        """A service with `enrolled` (subject -> raw embedding [d]) enrolled; closed after."""
        ...


@dataclass
class Snapshot:
    """The attacker's estimates after `queries` queries: subject -> unit raw embedding.

    `recovered` is what it identifies people with; `faces`, where that is not itself a
    face's embedding (a discriminant direction), the face-like version it would decode
    (None: `recovered` is one)."""

    queries: int
    recovered: dict[str, np.ndarray]
    faces: dict[str, np.ndarray] | None = None

    @property
    def to_decode(self) -> dict[str, np.ndarray]:
        return self.recovered if self.faces is None else self.faces


@dataclass
class AttackRun:
    """One strategy's run against one oracle: snapshots at the query counts reached (and one
    where a 429 stopped it), and `stopped_at` (None if the budget never ran out)."""

    strategy: str
    snapshots: list[Snapshot] = field(default_factory=list)
    stopped_at: int | None = None

    @property
    def final(self) -> dict[str, np.ndarray]:
        return self.snapshots[-1].recovered if self.snapshots else {}


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# -- the attacker's probes ------------------------------------------------------------------


def augment_probes(raw: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` probe embeddings from the attacker's own raw embeddings `raw` [m, d]: all of them
    (in a random order; a random `n` of them if there are more), then made-up ones.

    A stand-in for photo augmentation and morphing, which would need the images: half are
    small random perturbations on the sphere (a rotation by 0.10-0.30 rad towards a random
    direction, about what a second photo of the same face moves dlib's embedding: cosine
    0.96-0.995), half convex mixes of two of its own photos (weights 0.25-0.75, a morph of
    two people). Rows keep the originals' mean norm; float32."""
    raw = np.asarray(raw, np.float32)
    if raw.ndim != 2 or len(raw) == 0:
        raise ValueError("augment_probes needs a non-empty [m, d] array of raw embeddings")
    if n <= len(raw):
        return raw[rng.permutation(len(raw))[:n]].copy()
    scale = float(np.linalg.norm(raw, axis=1).mean())
    u = _unit(raw)
    extra = n - len(raw)
    n_mix = extra // 2 if len(raw) >= 2 else 0
    n_turn = extra - n_mix
    base = u[rng.integers(len(u), size=n_turn)]
    direction = rng.standard_normal(base.shape)
    direction = _unit(direction - np.sum(direction * base, axis=1, keepdims=True) * base)
    angle = rng.uniform(0.10, 0.30, size=(n_turn, 1))
    turned = np.cos(angle) * base + np.sin(angle) * direction
    a = rng.integers(len(u), size=n_mix)
    b = (a + rng.integers(1, len(u), size=n_mix)) % len(u)  # another photo, never the same
    w = rng.uniform(0.25, 0.75, size=(n_mix, 1))
    mixed = _unit(w * u[a] + (1 - w) * u[b])
    made = np.concatenate([turned, mixed])[rng.permutation(extra)]
    out = np.concatenate([raw[rng.permutation(len(raw))], (scale * made).astype(np.float32)])
    return out.astype(np.float32)


# -- the ledger of answers, and the budgeted session ----------------------------------------


class _Ledger:
    """Every probe sent (unit rows) and every (probe, subject, rank, similarity) answered."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._points: list[np.ndarray] = []
        self._rows: list[np.ndarray] = []  # per batch: probe, subject id, rank
        self._sims: list[np.ndarray] = []
        self._fresh: list[np.ndarray] = []
        self.subjects: list[str] = []
        self._ids: dict[str, int] = {}
        self.count = 0

    def add(self, points: np.ndarray, answers: list[list[OracleMatch]], fresh: bool) -> None:
        """Record a batch; `fresh`: the attacker's own probes (not points it made up to
        measure something), which alone stand for the probe population."""
        if len(answers) != len(points):
            raise ValueError(f"the oracle answered {len(answers)} of {len(points)} probes")
        rows, sims = [], []
        for i, matches in enumerate(answers):
            for rank, m in enumerate(matches):
                sid = self._ids.setdefault(m.subject, len(self.subjects))
                if sid == len(self.subjects):
                    self.subjects.append(m.subject)
                rows.append((self.count + i, sid, rank))
                sims.append(np.nan if m.similarity is None else float(m.similarity))
        self._points.append(_unit(points))
        self._rows.append(np.array(rows, np.int64).reshape(-1, 3))
        self._sims.append(np.array(sims, np.float64))
        self._fresh.append(np.full(len(points), fresh))
        self.count += len(points)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(points [n, d], rows [r, 3] probe/subject/rank, similarities [r] with NaN)."""
        if not self._points:
            return np.zeros((0, self.dim)), np.zeros((0, 3), np.int64), np.zeros(0)
        if len(self._points) > 1:  # consolidate, so repeated calls stay cheap
            self._points = [np.concatenate(self._points)]
            self._rows = [np.concatenate(self._rows)]
            self._sims = [np.concatenate(self._sims)]
            self._fresh = [np.concatenate(self._fresh)]
        return self._points[0], self._rows[0], self._sims[0]

    def fresh(self) -> np.ndarray:
        """Which points are the attacker's own probes (bool [n])."""
        self.arrays()
        return self._fresh[0] if self._fresh else np.zeros(0, bool)


#: What an estimator returns: (recovered, faces or None), as in `Snapshot`.
Estimate = tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]


class _Stopped(AdvpluginError):
    pass


class _Session:
    """The attacker's side of one API key: sends probes in chunks that never cross a multiple
    of `batch` nor a snapshot count (so a budget that is a multiple of `batch` stops it
    exactly there), records answers in the ledger, and snapshots estimates."""

    def __init__(
        self,
        oracle: Oracle,
        dim: int,
        budget: int,
        query_counts: Sequence[int],
        batch: int,
        estimate: Callable[[_Ledger], Estimate],
        run: AttackRun,
    ) -> None:
        self.oracle, self.budget, self.batch = oracle, int(budget), max(1, int(batch))
        self.marks = sorted({int(q) for q in query_counts if 0 < q < budget} | {self.budget})
        self.ledger = _Ledger(dim)
        self.estimate, self.run = estimate, run

    @property
    def left(self) -> int:
        return self.budget - self.ledger.count

    def next_mark(self) -> int:
        return next((m for m in self.marks if m > self.ledger.count), self.budget)

    def send(self, points: np.ndarray, *, fresh: bool = True) -> list[list[OracleMatch]]:
        """Answers for `points` (at most `left` of them are sent); raises _Stopped on a 429."""
        points = np.asarray(points, np.float32)[: self.left]
        answers: list[list[OracleMatch]] = []
        start = 0
        while start < len(points):
            done = self.ledger.count
            edge = min((done // self.batch + 1) * self.batch, self.next_mark())
            chunk = points[start : start + edge - done]
            try:
                got = self.oracle.query(chunk)
            except BudgetExhausted as stop:
                self.run.stopped_at = stop.queries_done
                self._snapshot(stop.queries_done)
                raise _Stopped from stop
            self.ledger.add(chunk, got, fresh)
            answers.extend(got)
            start += len(chunk)
            if self.ledger.count in self.marks:
                self._snapshot(self.ledger.count)
        return answers

    def _snapshot(self, queries: int) -> None:
        if self.run.snapshots and self.run.snapshots[-1].queries == queries:
            return
        recovered, faces = self.estimate(self.ledger)
        self.run.snapshots.append(Snapshot(queries, recovered, faces))


def _attack(
    name: str,
    oracle: Oracle,
    probes: np.ndarray,
    budget: int,
    query_counts: Sequence[int],
    batch: int,
    estimate: Callable[[_Ledger], Estimate],
    plan: Callable[[_Session, np.ndarray], None],
) -> AttackRun:
    probes = np.asarray(probes, np.float32)
    if probes.ndim != 2 or len(probes) == 0:
        raise ValueError("the attacker needs a non-empty [n, d] array of probe embeddings")
    run = AttackRun(name)
    session = _Session(oracle, probes.shape[1], budget, query_counts, batch, estimate, run)
    try:
        plan(session, probes)
    except _Stopped:
        pass
    return run


def _fresh(probes: np.ndarray, start: int, n: int) -> np.ndarray:
    """Probes start .. start + n, wrapping round when the attacker's photos run out."""
    return probes[np.arange(start, start + n) % len(probes)]


def _plain_plan(session: _Session, probes: np.ndarray) -> None:
    """Send fresh probes until the budget is spent."""
    while session.left > 0:
        session.send(
            _fresh(probes, session.ledger.count, session.next_mark() - session.ledger.count)
        )


# -- the estimators --------------------------------------------------------------------------


def _by_subject(rows: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(subject id, indices into rows) for every subject named at least once."""
    if len(rows) == 0:
        return []
    order = np.argsort(rows[:, 1], kind="stable")
    ids, starts = np.unique(rows[order, 1], return_index=True)
    return list(zip(ids.tolist(), np.split(order, starts[1:]), strict=True))


def _least_squares_estimate(ledger: _Ledger, ridge: float = 1e-5) -> Estimate:
    """Per subject: t minimising sum (<p_i, t> - s_i)^2 + ridge * n * |t|^2 over the answers
    that carried a number for it, normalised."""
    points, rows, sims = ledger.arrays()
    out: dict[str, np.ndarray] = {}
    for sid, idx in _by_subject(rows):
        idx = idx[~np.isnan(sims[idx])]
        if len(idx) == 0:
            continue
        p, s = points[rows[idx, 0]], sims[idx]
        gram = p.T @ p + ridge * max(len(idx), 1) * np.eye(p.shape[1])
        t = np.linalg.solve(gram, p.T @ s)
        if np.linalg.norm(t) > 1e-12:
            out[ledger.subjects[sid]] = _unit(t).astype(np.float32)
    return out, None


def _probe_moments(points: np.ndarray, ridge: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """The mean and the ridge-regularised inverse covariance of the attacker's probes (the
    population its look-alikes were drawn from), from its own queries."""
    mu = points.mean(0)
    cov = np.cov(points, rowvar=False) if len(points) > 1 else np.zeros((points.shape[1],) * 2)
    scale = max(float(np.trace(cov)) / points.shape[1], 1e-8)
    return mu, np.linalg.inv(cov + ridge * scale * np.eye(points.shape[1]))


def _centroids(ledger: _Ledger) -> dict[int, np.ndarray]:
    """Per subject: the mean of the probes it was named for, each weighted 1 / (rank + 1)."""
    points, rows, _ = ledger.arrays()
    rows = rows[ledger.fresh()[rows[:, 0]]]
    out = {}
    for sid, idx in _by_subject(rows):
        w = 1.0 / (rows[idx, 2] + 1.0)
        out[sid] = (w[:, None] * points[rows[idx, 0]]).sum(0) / w.sum()
    return out


def _lookalike_estimate(ledger: _Ledger) -> Estimate:
    """Per subject: the direction its look-alikes lean, relative to the attacker's probes.

    For probes x of mean mu and covariance C, selected because <x, t> is high, the mean of
    the selected is mu + c C t (c > 0), so t ~ C^-1 (centroid - mu): the whitened shift of
    the look-alikes' mean (linear discriminant analysis; the attacker knows mu and C from
    its own probes). C is regularised by 3 x its mean variance (`_probe_moments`), the best
    of 0.05-10 on lfw-dev at 1,000-10,000 queries; the plain centroid, which leans towards
    the mean face that every face embedding shares, identified worse at every count.

    That direction identifies but is no face's embedding; the faces to decode put it at a
    typical face's distance from the probes' mean face (`_face_like`)."""
    points = ledger.arrays()[0][ledger.fresh()]
    if len(points) == 0:
        return {}, {}
    mu, inv = _probe_moments(points)
    spread = float(np.sqrt(np.mean(np.sum((points - mu) ** 2, axis=1))))
    recovered, faces = {}, {}
    for sid, c in _centroids(ledger).items():
        direction = _unit(inv @ (c - mu))
        recovered[ledger.subjects[sid]] = direction.astype(np.float32)
        faces[ledger.subjects[sid]] = _face_like(direction, mu, spread)
    return recovered, faces


def _face_like(direction: np.ndarray, mu: np.ndarray, spread: float) -> np.ndarray:
    """unit(mu + spread * d), d the unit part of `direction` off the mean face `mu`: an
    embedding as far from the mean face as the attacker's own photos are on average."""
    axis = _unit(mu)
    off = _unit(direction - float(direction @ axis) * axis)
    return _unit(mu + spread * off).astype(np.float32)


# -- the three strategies --------------------------------------------------------------------


def least_squares(
    oracle: Oracle,
    probes: np.ndarray,
    budget: int = QUERY_COUNTS[-1],
    *,
    query_counts: Sequence[int] = QUERY_COUNTS,
    batch: int = 50,
) -> AttackRun:
    """Send the attacker's own probes; per subject, solve `<probe_i, t> = s_i` over the
    probes whose answer carried a number for it (ridge least squares), normalise. Exact
    scores make this exact once a subject has about `dim` answers; with coarse bands it
    still tries (that is what is measured); with decisions alone it recovers nothing."""
    return _attack(
        "least_squares", oracle, probes, budget, query_counts, batch,
        _least_squares_estimate, _plain_plan,
    )  # fmt: skip


def lookalike_centroid(
    oracle: Oracle,
    probes: np.ndarray,
    budget: int = QUERY_COUNTS[-1],
    *,
    query_counts: Sequence[int] = QUERY_COUNTS,
    batch: int = 50,
) -> AttackRun:
    """Decisions alone: per subject, the mean of the probes it was returned for (weighted
    1 / (rank + 1) where answers name several), whitened by the attacker's own probe
    population (`_lookalike_estimate`)."""
    return _attack(
        "lookalike_centroid", oracle, probes, budget, query_counts, batch,
        _lookalike_estimate, _plain_plan,
    )  # fmt: skip


class _BoundaryPoints:
    """The adaptive attacker's boundary points, per subject id of the ledger: points b where
    the answer stops naming the subject, so <b, t> = tau, a linear equation <b, w> = 1 in
    w = t / tau (t the enrolled embedding, tau the decision threshold)."""

    #: how strongly the look-alikes' mean holds the directions the boundary points leave open.
    shrink = 0.01

    def __init__(self) -> None:
        self.points: dict[int, list[np.ndarray]] = {}

    def estimate(self, ledger: _Ledger) -> Estimate:
        """Subjects with boundary points: least squares on <b, w> = 1, the component of w off
        the line of the look-alikes' mean shrunk (ridge `shrink` per point), so directions
        the points never measured stay as that mean has them (a face's embedding, to
        identify with and to decode); the others: the look-alike estimate
        (`_lookalike_estimate`)."""
        recovered, faces = _lookalike_estimate(ledger)
        faces = dict(faces or {})
        centroids = _centroids(ledger)
        for sid, found in self.points.items():
            if sid not in centroids or not found:
                continue
            b = np.asarray(found)
            c = _unit(centroids[sid])
            off_line = np.eye(b.shape[1]) - np.outer(c, c)
            gram = b.T @ b + self.shrink * len(b) * off_line + 1e-9 * np.eye(b.shape[1])
            w = np.linalg.solve(gram, b.sum(0))
            if float(w @ c) > 0:
                name = ledger.subjects[sid]
                recovered[name] = faces[name] = _unit(w).astype(np.float32)
        return recovered, faces


def adaptive_boundary(
    oracle: Oracle,
    probes: np.ndarray,
    budget: int = QUERY_COUNTS[-1],
    *,
    query_counts: Sequence[int] = QUERY_COUNTS,
    batch: int = 50,
    steps: int = 5,
    share: float = 0.25,
    rng: np.random.Generator | None = None,
) -> AttackRun:
    """Walks to the decision boundary between its own photos. Each stretch between two
    snapshots spends `share` of its queries on bisection, the rest on fresh probes: for a
    subject s named for probe x and a probe y that did not name s, `steps` bisection queries
    on the great-circle path from x to y (normalised interpolation: a stand-in for morphing
    its own photos, generous to the attacker) find the point b where the answer stops naming
    s. Such points lie on {<b, t_s> = tau}: with the look-alikes' mean they give t_s
    (`_BoundaryPoints.estimate`). Every query, bisection included, counts against the same
    budget.

    Measured on lfw-dev (200 and 500 enrolled people, top-1 at FMR 1e-3): the walk did not
    beat spending the same queries on fresh look-alikes (`lookalike_centroid`): by 10,000
    queries a person has a few boundary points, far fewer than the ~dim an exact solve needs
    (a quarter of the budget, `share`, was the least costly of 0.25 and 0.5). Where answers
    list many subjects without a threshold (exact top-k), it finds the edge of the list, not
    {<b, t> = tau}: least squares is the attack there."""
    if not 0 <= share < 1:
        raise ValueError("share must be in [0, 1)")
    rng = rng or np.random.default_rng(0)
    state = _BoundaryPoints()

    def plan(session: _Session, probes: np.ndarray) -> None:
        sent = 0  # fresh probes used so far

        def fresh(n: int) -> None:
            nonlocal sent
            session.send(_fresh(probes, sent, n))
            sent += n

        while session.left > 0:
            target = session.next_mark()
            stretch = target - session.ledger.count
            first = session.ledger.count == 0  # nothing named yet: nothing to walk from
            fresh(stretch if first else stretch - int(share * stretch))
            n = (target - session.ledger.count) // steps
            if n > 0:
                _bisect(session, state, _boundary_pairs(session.ledger, n, rng), steps)
            if target > session.ledger.count:
                fresh(target - session.ledger.count)

    return _attack(
        "adaptive_boundary", oracle, probes, budget, query_counts, batch, state.estimate, plan
    )


def _boundary_pairs(
    ledger: _Ledger, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Up to `n` pairs (subject id, x, y): subjects in a random order, taken in turn; x a
    probe that named the subject, y a random fresh probe that did not."""
    points, rows, _ = ledger.arrays()
    own = np.flatnonzero(ledger.fresh())
    groups = _by_subject(rows)
    sids: list[int] = []
    xs, ys = [], []
    for k in np.resize(rng.permutation(len(groups)), n if groups else 0):
        sid, idx = groups[k]
        inside = np.unique(rows[idx, 0])
        outside = own[~np.isin(own, inside)]
        if len(outside) == 0:
            continue
        sids.append(sid)
        xs.append(points[inside[rng.integers(len(inside))]])
        ys.append(points[outside[rng.integers(len(outside))]])
    empty = np.zeros((0, ledger.dim))
    if not sids:
        return np.zeros(0, np.int64), empty, empty
    return np.asarray(sids), np.asarray(xs), np.asarray(ys)


def _bisect(
    session: _Session,
    state: _BoundaryPoints,
    pairs: tuple[np.ndarray, np.ndarray, np.ndarray],
    steps: int,
) -> None:
    """`steps` rounds of bisection on each path x -> y of `pairs` (x named its subject, y did
    not); the midpoint of the last bracket is a boundary point of that subject."""
    sids, x, y = pairs
    if len(sids) == 0:
        return
    names = session.ledger.subjects
    wanted = [names[s] for s in sids]
    lo, hi = np.zeros(len(sids)), np.ones(len(sids))
    for _ in range(steps):
        mid = (lo + hi) / 2
        answers = session.send(_unit((1 - mid)[:, None] * x + mid[:, None] * y), fresh=False)
        inside = np.array(
            [any(m.subject == w for m in a) for a, w in zip(answers, wanted, strict=True)]
        )
        lo = np.where(inside, mid, lo)
        hi = np.where(inside, hi, mid)
    mid = (lo + hi) / 2
    for sid, b in zip(sids, _unit((1 - mid)[:, None] * x + mid[:, None] * y), strict=True):
        state.points.setdefault(int(sid), []).append(b)


#: name -> strategy, each `(oracle, probes, budget, *, query_counts, batch) -> AttackRun`.
STRATEGIES: dict[str, Callable[..., AttackRun]] = {
    "least_squares": least_squares,
    "lookalike_centroid": lookalike_centroid,
    "adaptive_boundary": adaptive_boundary,
}


# -- success measures ------------------------------------------------------------------------


def rank1_of_recovered(
    recovered: Mapping[str, np.ndarray],
    subjects: Sequence[str],
    search: np.ndarray,
    search_identity: np.ndarray,
) -> float:
    """The share of `subjects` whose recovered embedding, used as a probe, finds that person
    first among `search` (other photos of the enrolled people, never the enrolled one);
    a subject with nothing recovered counts as a failure."""
    if not subjects:
        return float("nan")
    have = [s for s in subjects if s in recovered]
    if not have:
        return 0.0
    est = _unit(np.stack([np.asarray(recovered[s], np.float64) for s in have]))
    best = np.argmax(est @ _unit(search).T, axis=1)
    return float(np.sum(search_identity[best] == np.array(have)) / len(subjects))


def reconstruction_success(
    faces: Mapping[str, np.ndarray],
    subjects: Sequence[str],
    references: Mapping[str, np.ndarray],
    impostors: Mapping[str, np.ndarray],
    reconstruct: Callable[[np.ndarray], np.ndarray],
    threshold: float,
) -> tuple[float, float]:
    """(success attack rate, false accept) of faces decoded from the recovered embeddings
    and re-embedded (`reconstruct`): the share of `subjects` accepted at `threshold`
    (cosine) against another photo of that person (`references`), and against a photo of
    someone else (`impostors`: an estimate close to the mean face passes both). Nothing
    recovered counts as a failure."""
    if not subjects:
        return float("nan"), float("nan")
    have = [s for s in subjects if s in faces]
    if not have:
        return 0.0, 0.0
    again = _unit(reconstruct(np.stack([faces[s] for s in have]).astype(np.float32)))
    ref = _unit(np.stack([references[s] for s in have]))
    other = _unit(np.stack([impostors[s] for s in have]))
    n = len(subjects)
    return (
        float(np.sum(np.sum(again * ref, axis=1) > threshold) / n),
        float(np.sum(np.sum(again * other, axis=1) > threshold) / n),
    )


# -- the runner ------------------------------------------------------------------------------


def run_score_oracle_threat(
    oracle_factory: Mapping[str, Callable[[], Oracle]] | Callable[[], Oracle],
    attacker_probes: np.ndarray,
    enrolled: Mapping[str, np.ndarray],
    other_photos: Mapping[str, np.ndarray],
    *,
    exact_policies: Collection[str] = (),
    descriptions: Mapping[str, str] | None = None,
    query_counts: Sequence[int] = QUERY_COUNTS,
    strategies: Sequence[str] = tuple(STRATEGIES),
    reconstruct: Callable[[np.ndarray], np.ndarray] | None = None,
    reconstruction_threshold: float | None = None,
    batch: int = 50,
    seed: int = 0,
) -> dict[str, object]:
    """Every strategy against every policy, each on a fresh oracle (a fresh API key).

    - `oracle_factory`: policy label -> a callable making a fresh oracle under that policy
      (a bare callable is the policy `default`);
    - `attacker_probes`: raw embeddings of the attacker's own photos, people not enrolled,
      augmented (`augment_probes`) to the largest query count where there are fewer;
    - `enrolled`: subject -> raw embedding of its enrolled photo [d] (the raw level: these
      used as probes the same way);
    - `other_photos`: subject -> raw embeddings [k, d] of its other photos, the search set
      of the rank-1 measure (subjects without any are enrolled but not scored);
    - `exact_policies`: labels of policies that disclose exact scores: their rows show how
      close the attacker comes to the raw level, with no goal; every other policy's goal is
      rank-1 <= chance + 1 % at the last query count;
    - `reconstruct`: embeddings [n, d] -> dlib embeddings of the faces decoded from them
      (decoder, then re-embedding); with it, each point also has the share of enrolled
      people whose face is accepted against another photo of them at FMR 1e-3
      (`reconstruction_threshold`, by default dlib's on impostor pairs of these photos), and
      the false accept against a photo of someone else.

    The result (JSON-serialisable; `report.json` holds it under `score_oracle`):
    `{"threat", "query_counts", "strategies", "enrolled", "scored_subjects", "search_photos",
    "attacker_photos", "attacker_probes", "augmented", "chance", "goal_margin", "raw_rank1",
    "raw_reconstruction", "raw_reconstruction_false_accept", "reconstruction_fmr",
    "reconstruction_threshold", "policies": {label: {"exact_scores", "description", "met",
    "strategies": {name: {"curve": [{"queries", "rank1", "recovered", "reconstruction",
    "reconstruction_false_accept"}], "stopped_at", "final_queries", "final_rank1", "goal",
    "met", "of_raw_level"}}}}}`; `goal` and `met` are None for exact-score policies; a run
    stopped by a 429 ends with a point at `stopped_at`.
    """
    factories = {"default": oracle_factory} if callable(oracle_factory) else dict(oracle_factory)
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"unknown strategies {unknown}; known: {sorted(STRATEGIES)}")
    if set(exact_policies) - set(factories):
        raise ValueError(
            f"exact_policies {sorted(set(exact_policies) - set(factories))} name no policy"
        )
    counts = sorted({int(q) for q in query_counts})
    budget = counts[-1]
    rng = np.random.default_rng(seed)
    own = np.asarray(attacker_probes, np.float32)
    probes = augment_probes(own, max(budget, len(own)), rng)

    photos = {s: np.atleast_2d(np.asarray(v, np.float32)) for s, v in other_photos.items()}
    subjects = [s for s in enrolled if s in photos and len(photos[s]) > 0]
    if not subjects:
        raise ValueError("no enrolled subject has another photo to be identified against")
    search = np.concatenate([photos[s] for s in subjects])
    search_identity = np.array([s for s in subjects for _ in range(len(photos[s]))])
    chance = 1.0 / len(subjects)
    raw = {s: np.asarray(enrolled[s], np.float32).reshape(-1) for s in subjects}
    references = {s: photos[s][0] for s in subjects}
    impostors = {s: photos[subjects[(i + 1) % len(subjects)]][0] for i, s in enumerate(subjects)}
    threshold = reconstruction_threshold
    if reconstruct is not None and threshold is None:
        threshold = _impostor_threshold(search, search_identity, FMR, rng)

    def measure(recovered: Mapping[str, np.ndarray], faces: Mapping[str, np.ndarray]) -> dict:
        point: dict[str, object] = {
            "rank1": rank1_of_recovered(recovered, subjects, search, search_identity),
            "recovered": sum(s in recovered for s in subjects),
            "reconstruction": None,
            "reconstruction_false_accept": None,
        }
        if reconstruct is not None and threshold is not None:
            point["reconstruction"], point["reconstruction_false_accept"] = reconstruction_success(
                faces, subjects, references, impostors, reconstruct, threshold
            )
        return point

    raw_level = measure(raw, raw)
    raw_rank1 = float(raw_level["rank1"])  # type: ignore[arg-type]
    policies: dict[str, object] = {}
    for label, make in factories.items():
        exact = label in exact_policies
        rows: dict[str, object] = {}
        for name in strategies:
            run = STRATEGIES[name](make(), probes, budget, query_counts=counts, batch=batch)
            curve = [
                {"queries": snap.queries, **measure(snap.recovered, snap.to_decode)}
                for snap in run.snapshots
            ]
            final = float(curve[-1]["rank1"]) if curve else 0.0  # type: ignore[arg-type]
            rows[name] = {
                "curve": curve,
                "stopped_at": run.stopped_at,
                "final_queries": curve[-1]["queries"] if curve else 0,
                "final_rank1": final,
                "goal": None if exact else chance + GOAL_MARGIN,
                "met": None if exact else bool(final <= chance + GOAL_MARGIN),
                "of_raw_level": final / raw_rank1 if raw_rank1 else None,
            }
        mets = [r["met"] for r in rows.values()]  # type: ignore[index]
        policies[label] = {
            "exact_scores": exact,
            "description": (descriptions or {}).get(label, ""),
            "strategies": rows,
            "met": None if exact else all(mets),
        }
    return {
        "threat": "API client (score oracle)",
        "query_counts": counts,
        "strategies": list(strategies),
        "enrolled": len(enrolled),
        "scored_subjects": len(subjects),
        "search_photos": len(search),
        "attacker_photos": len(own),
        "attacker_probes": len(probes),
        "augmented": max(0, len(probes) - len(own)),
        "chance": chance,
        "goal_margin": GOAL_MARGIN,
        "raw_rank1": raw_rank1,
        "raw_reconstruction": raw_level["reconstruction"],
        "raw_reconstruction_false_accept": raw_level["reconstruction_false_accept"],
        "reconstruction_fmr": FMR if reconstruct is not None else None,
        "reconstruction_threshold": threshold,
        "policies": policies,
    }


def _impostor_threshold(
    emb: np.ndarray, identity: np.ndarray, fmr: float, rng: np.random.Generator,
    pairs: int = 1_000_000, chunk: int = 100_000,
) -> float:  # fmt: skip
    """dlib's cosine threshold at `fmr` on impostor pairs of these photos (a uniform sample
    of `pairs` ordered pairs, scored in chunks)."""
    u = _unit(emb).astype(np.float32)
    scores = []
    for start in range(0, pairs, chunk):
        a = rng.integers(len(u), size=min(chunk, pairs - start))
        b = rng.integers(len(u), size=len(a))
        keep = identity[a] != identity[b]
        scores.append(np.einsum("ij,ij->i", u[a[keep]], u[b[keep]]))
    impostor = np.concatenate(scores)
    return threshold_at_far(impostor, fmr) if len(impostor) else float("inf")


# -- the threat against a service, with the legitimate side ---------------------------------


def legitimate_identification(
    service: OracleService,
    policies: Sequence[str],
    other_photos: Mapping[str, np.ndarray],
    reference: str | None = None,
) -> dict[str, object]:
    """The cameras' side: under each policy, a fresh key sends every other photo of the
    enrolled people (`other_photos`: subject -> raw [k, d]) and the share whose top subject
    is right is measured. `reference` (by default the first exact-score policy: today's
    answers) is the rate the others are compared with; goal: at most `IDENTIFICATION_MARGIN`
    below it. `{"reference", "margin", "probes", "policies": {label: {"probes", "identified",
    "stopped_at", "drop", "goal", "met"}}}` (drop and goal in rate units, not pp)."""
    subjects = [s for s, v in other_photos.items() if len(np.atleast_2d(v)) and np.size(v)]
    probes = np.concatenate(
        [np.atleast_2d(np.asarray(other_photos[s], np.float32)) for s in subjects]
    )
    truth = np.array([s for s in subjects for _ in range(len(np.atleast_2d(other_photos[s])))])
    if reference is None:
        exact = [p for p in policies if p in set(service.exact_policies)]
        reference = exact[0] if exact else policies[0]
    rows: dict[str, dict[str, object]] = {}
    for label in policies:
        got = dict(service.identified(label, probes, truth))
        rows[label] = {
            "probes": int(got["probes"]),  # type: ignore[call-overload]
            "identified": float(got["identified"]),  # type: ignore[arg-type]
            "stopped_at": got.get("stopped_at"),
        }
    base = float(rows[reference]["identified"])  # type: ignore[arg-type]
    for label, row in rows.items():
        drop = base - float(row["identified"])  # type: ignore[arg-type]
        own = label == reference
        row["drop"] = 0.0 if own else drop
        row["goal"] = None if own else base - IDENTIFICATION_MARGIN
        row["met"] = None if own else bool(drop <= IDENTIFICATION_MARGIN + 1e-12)
    return {
        "reference": reference,
        "margin": IDENTIFICATION_MARGIN,
        "probes": len(probes),
        "policies": rows,
    }


def run_api_client_threat(
    api_client: ApiClient,
    attacker_probes: np.ndarray,
    enrolled: Mapping[str, np.ndarray],
    other_photos: Mapping[str, np.ndarray],
    **options: object,
) -> dict[str, object]:
    """`run_score_oracle_threat` against the service `api_client` opens with `enrolled`, then
    the legitimate side (`legitimate_identification`) on the same service: the result gains
    `"service"` (its description) and `"legitimate"`. `options` go to
    `run_score_oracle_threat` (query counts, strategies, reconstruct, threshold, seed)."""
    with api_client.open(enrolled) as service:
        factories = dict(service.factories())
        result = run_score_oracle_threat(
            factories,
            attacker_probes,
            enrolled,
            other_photos,
            exact_policies=[p for p in factories if p in set(service.exact_policies)],
            descriptions=service.descriptions,
            **options,  # type: ignore[arg-type]
        )
        scored = {
            s: other_photos[s] for s in enrolled if s in other_photos and np.size(other_photos[s])
        }
        result["legitimate"] = legitimate_identification(service, list(factories), scored)
    result["service"] = api_client.description
    return result
