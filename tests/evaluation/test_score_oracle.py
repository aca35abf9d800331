"""The API client's threat (advplugin.evaluation.score_oracle) against in-test oracles over
real dlib embeddings of LFW (the shipped cache): exact scores give the enrolled people away,
decisions at a high threshold much less, a budget stops every strategy where it says."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from advplugin.evaluation import score_oracle as so
from advplugin.evaluation.metrics import threshold_at_far
from advplugin.evaluation.report import oracle_markdown, render_markdown, write_oracle_section
from tests.conftest import FACE_DATA, REPO

CACHE = FACE_DATA / "lfw-dev-dlib128.npz"
COUNTS = (100, 300, 1000)
BUDGET = 500  # the stopped key's limit: between two snapshots, a multiple of the batch (50)


class GalleryOracle:
    """The service as the attacker sees it, over the enrolled people's raw embeddings (the
    default scheme keeps cosine, so this is what protected templates answer): the `top_k`
    best subjects at or above `threshold`, with their exact similarity or none; after
    `limit` answered probes it answers 429 (a batch that would pass the limit is refused)."""

    def __init__(
        self,
        gallery: dict[str, np.ndarray],
        *,
        top_k: int,
        threshold: float = -1.0,
        scores: bool = True,
        limit: int | None = None,
    ) -> None:
        self.names = list(gallery)
        g = np.stack([gallery[n] for n in self.names]).astype(np.float64)
        self.unit = g / np.linalg.norm(g, axis=1, keepdims=True)
        self.top_k, self.threshold, self.scores, self.limit = top_k, threshold, scores, limit
        self.answered = 0

    def query(self, probes: np.ndarray) -> list[list[so.OracleMatch]]:
        if self.limit is not None and self.answered + len(probes) > self.limit:
            raise so.BudgetExhausted(self.answered)
        self.answered += len(probes)
        p = np.asarray(probes, np.float64)
        s = (p / np.linalg.norm(p, axis=1, keepdims=True)) @ self.unit.T
        best = np.argsort(-s, axis=1)[:, : self.top_k]
        return [
            [
                so.OracleMatch(self.names[j], float(s[i, j]) if self.scores else None)
                for j in best[i]
                if s[i, j] >= self.threshold
            ]
            for i in range(len(p))
        ]


@pytest.fixture(scope="module")
def people() -> dict[str, object]:
    """200 enrolled people (first photo enrolled, the others searched), and the attacker's
    photos: 3,000 photos of people who are not enrolled."""
    if not CACHE.is_file():
        pytest.skip(f"dlib embeddings of lfw-dev not found at {CACHE} (set ADVPLUGIN_FACE_DATA)")
    with np.load(CACHE) as data:
        emb, ids = data["embedding"].astype(np.float32), data["identity"].astype(str)
    names, counts = np.unique(ids, return_counts=True)
    rng = np.random.default_rng(7)
    chosen = rng.choice(names[counts >= 2], 200, replace=False)
    enrolled, other = {}, {}
    for name in chosen:
        rows = np.flatnonzero(ids == name)
        enrolled[str(name)], other[str(name)] = emb[rows[0]], emb[rows[1:]]
    mine = rng.choice(np.flatnonzero(~np.isin(ids, chosen)), 3000, replace=False)
    attacker = emb[mine]
    # A high, calibrated threshold: FMR 1e-3 on impostor pairs of the attacker's own photos.
    u = attacker / np.linalg.norm(attacker, axis=1, keepdims=True)
    a, b = rng.integers(len(u), size=(2, 300_000))
    keep = ids[mine][a] != ids[mine][b]
    threshold = threshold_at_far(np.sum(u[a[keep]] * u[b[keep]], axis=1), 1e-3)
    return {"enrolled": enrolled, "other": other, "attacker": attacker, "threshold": threshold}


@pytest.fixture(scope="module")
def result(people: dict[str, object]) -> dict:
    """One run of every strategy against three policies: exact scores (top-100), decisions
    only (top-1 above the threshold), and exact scores with a key stopped after 500 probes."""
    gallery = people["enrolled"]
    tau = people["threshold"]
    factories = {
        "exact": lambda: GalleryOracle(gallery, top_k=100),  # type: ignore[arg-type]
        "decisions": lambda: GalleryOracle(gallery, top_k=1, threshold=tau, scores=False),  # type: ignore[arg-type]
        "budget": lambda: GalleryOracle(gallery, top_k=100, limit=BUDGET),  # type: ignore[arg-type]
    }
    return so.run_score_oracle_threat(
        factories,
        people["attacker"],  # type: ignore[arg-type]
        gallery,  # type: ignore[arg-type]
        people["other"],  # type: ignore[arg-type]
        exact_policies={"exact"},
        descriptions={"exact": "top-100 with exact scores", "decisions": "top-1 decision"},
        query_counts=COUNTS,
        # The re-embedded reconstruction of an embedding is the embedding itself: a perfect
        # decoder, so the plumbing is tested without training one.
        reconstruct=lambda e: e,
    )


def _point(row: dict, queries: int) -> dict:
    return next(p for p in row["curve"] if p["queries"] == queries)


def test_exact_scores_give_the_enrolled_people_away(result: dict) -> None:
    """Least squares on exact scores: far above chance within 1,000 queries, close to what
    the true enrolled embeddings reach."""
    ls = result["policies"]["exact"]["strategies"]["least_squares"]
    at_1000 = _point(ls, 1000)
    assert at_1000["rank1"] > 0.5
    assert at_1000["rank1"] > 50 * result["chance"]
    assert at_1000["rank1"] > result["raw_rank1"] - 0.1
    assert at_1000["recovered"] == result["scored_subjects"]
    assert at_1000["reconstruction"] > 0.5  # the perfect decoder: accepted like the photo
    assert ls["stopped_at"] is None and [p["queries"] for p in ls["curve"]] == list(COUNTS)
    assert result["policies"]["exact"]["met"] is None  # the threat, no goal
    assert ls["of_raw_level"] == pytest.approx(at_1000["rank1"] / result["raw_rank1"])


def test_decisions_at_a_high_threshold_leak_much_less(result: dict) -> None:
    exact = _point(result["policies"]["exact"]["strategies"]["least_squares"], 1000)["rank1"]
    decisions = result["policies"]["decisions"]["strategies"]
    # No numbers in the answers: least squares has nothing to solve.
    assert _point(decisions["least_squares"], 1000)["recovered"] == 0
    assert _point(decisions["least_squares"], 1000)["rank1"] == 0.0
    best = max(_point(row, 1000)["rank1"] for row in decisions.values())
    assert best < exact / 2
    # ... but look-alikes still point somewhere: never below chance on average.
    assert _point(decisions["lookalike_centroid"], 1000)["recovered"] > 0
    goal = result["chance"] + so.GOAL_MARGIN
    for row in decisions.values():
        assert row["goal"] == pytest.approx(goal)
        assert row["met"] == (row["final_rank1"] <= goal)


def test_a_stopped_key_stops_every_strategy_where_it_says(result: dict) -> None:
    for name, row in result["policies"]["budget"]["strategies"].items():
        assert row["stopped_at"] == BUDGET, name
        assert max(p["queries"] for p in row["curve"]) == BUDGET, name
        assert [p["queries"] for p in row["curve"]] == [100, 300, BUDGET], name
    # Unstopped runs reach the last count.
    for row in result["policies"]["exact"]["strategies"].values():
        assert row["stopped_at"] is None and row["final_queries"] == COUNTS[-1]


def test_a_key_stopped_at_once_stops_every_strategy_at_zero(
    people: dict[str, object],
) -> None:
    """A 429 on the first query: every strategy, called alone, stops at 0 with nothing."""
    gallery = people["enrolled"]
    for name, strategy in so.STRATEGIES.items():
        oracle = GalleryOracle(gallery, top_k=1, limit=0)  # type: ignore[arg-type]
        run = strategy(oracle, people["attacker"], 300, query_counts=(100, 300))
        assert run.stopped_at == 0, name
        assert [s.queries for s in run.snapshots] == [0] and run.final == {}, name


def test_result_is_json_and_the_report_section_renders(result: dict, tmp_path: Path) -> None:
    saved = json.loads(json.dumps(result))  # what report.json holds
    markdown = write_oracle_section(saved, tmp_path)
    assert (tmp_path / "score_oracle.png").stat().st_size > 5_000
    assert markdown.startswith("## Threat: an API client (score oracle)")
    header = next(line for line in markdown.splitlines() if line.startswith("| policy"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells[-2:] == ["goal", "met"]
    assert "rank-1 @1,000" in cells and "stopped at" in cells
    rows = [line for line in markdown.splitlines() if line.startswith("| `")]
    assert len(rows) == 3 * 3  # policies x strategies
    assert any("shows the threat" in r for r in rows if r.startswith("| `exact`"))
    assert all("| stopped |" in r for r in rows if r.startswith("| `budget`"))
    assert markdown == "\n".join(oracle_markdown(saved))


def test_the_committed_report_takes_the_section(result: dict) -> None:
    """Added to the committed report.json, the section and a summary line appear in
    report.md (what re-rendering docs/evaluation does)."""
    committed = REPO / "docs" / "evaluation" / "report.json"
    if not committed.is_file():
        pytest.skip("no committed evaluation report")
    report = json.loads(committed.read_text())
    report["score_oracle"] = json.loads(json.dumps(result))
    md = render_markdown(report)
    assert "## Threat: an API client (score oracle)" in md
    assert "An API client (score oracle)" in md.split("## Utility")[0]  # the summary line
    bare = json.loads(committed.read_text())
    bare.pop("score_oracle", None)  # a report without the threat renders without its section
    assert "## Threat: an API client" not in render_markdown(bare)


def test_augment_probes_keeps_the_originals_and_stays_near_them() -> None:
    rng = np.random.default_rng(0)
    raw = rng.standard_normal((40, 16)).astype(np.float32) + 3.0
    out = so.augment_probes(raw, 200, np.random.default_rng(1))
    assert out.shape == (200, 16) and out.dtype == np.float32
    assert np.isclose(out[:40][np.lexsort(out[:40].T)], raw[np.lexsort(raw.T)]).all()
    made = out[40:] / np.linalg.norm(out[40:], axis=1, keepdims=True)
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    nearest = (made @ unit.T).max(axis=1)
    assert (nearest > np.cos(0.31)).mean() > 0.45  # the perturbations, at least
    assert not np.isclose(nearest, 1.0).any()  # none is a copy
    assert so.augment_probes(raw, 10, rng).shape == (10, 16)
