"""A migration stopped by Ctrl-C, then killed with SIGKILL, then re-run: the gallery ends up
with exactly the source's rows, no duplicate, and a passing verify."""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from advplugin.bulk.verify import job_items
from advplugin.gallery import Gallery
from tests.bulk.conftest import fill_table

CHUNK = 200


def _committed(engine: sa.Engine) -> tuple[int, int, int]:
    """(job rows, rows its chunk records hold, template rows) as committed in the gallery."""
    with engine.connect() as conn:
        job = conn.exec_driver_sql("SELECT coalesce(max(rows), 0) FROM migration_jobs").scalar()
        items = conn.exec_driver_sql("SELECT coalesce(sum(rows), 0) FROM migration_chunks").scalar()
        templates = conn.exec_driver_sql("SELECT count(*) FROM templates").scalar()
    return int(job), int(items), int(templates)


@contextlib.contextmanager
def _source_blocked(src_url: str) -> Iterator[None]:
    """Hold the migration's source reads back (an EXCLUSIVE lock on the SQLite source, whose
    rollback journal lets a waiting writer in ahead of new readers): a migration of the whole
    source takes well under a second on a quiet machine, faster than a poll between two
    chunks, so the signal is sent while it waits for its next chunk and lands mid-run
    whatever the machine's speed. (A lock on the gallery would not do: SQLite's WAL lets the
    migration's back-to-back write transactions starve a waiting writer.)"""
    conn = sqlite3.connect(sa.make_url(src_url).database, isolation_level=None, timeout=60)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        yield
        conn.execute("ROLLBACK")
    finally:
        conn.close()


def _run_until(
    cmd: list[str], engine: sa.Engine, src_url: str, rows: int, sig: int
) -> subprocess.CompletedProcess:
    """Start the migration and send `sig` once at least `rows` rows are committed, while
    its further reads of the source are held back."""
    # SIGINT at its default in the child: a shell's background job (`pytest ... &`) runs
    # with it ignored, and Python then keeps ignoring Ctrl-C instead of raising
    # KeyboardInterrupt.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline:
        if _committed(engine)[0] >= rows:
            with _source_blocked(src_url):
                proc.send_signal(sig)
                time.sleep(0.5)  # the signal is delivered; Python runs its handler once the wait ends
            break
        time.sleep(0.02)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.parametrize("target", ["sqlite", "postgresql"])
def test_interrupt_and_sigkill_then_rerun_gives_exactly_the_source(
    lfw_rows, database_url, key_files, target: str
) -> None:
    n = len(lfw_rows)
    src_url = database_url("sqlite", "src")
    fill_table(src_url, lfw_rows)
    gallery_url = database_url(target, "gallery")
    Gallery.open(gallery_url, upgrade=True).close()
    cmd = [
        sys.executable, "-m", "advplugin.cli.main", "migrate", "--from", src_url,
        "--table", "faces", "--subject-column", "person", "--vector-column", "vec",
        "--to", gallery_url, "--scheme", "xnn", "--key", str(key_files[0]),
        "--extractor", "dlib", "--chunk-size", str(CHUNK), "--workers", "1", "--no-progress",
    ]  # fmt: skip
    engine = sa.create_engine(gallery_url)
    try:
        # Ctrl-C: a clean stop that says how far it got.
        first = _run_until(cmd, engine, src_url, 1000, signal.SIGINT)
        assert first.returncode == 130, first.stderr
        assert "rows are committed; re-run the same command to continue" in first.stderr
        after_int = _committed(engine)
        assert after_int[0] == after_int[1] == after_int[2]
        assert 0 < after_int[0] < n and after_int[0] % CHUNK == 0

        # SIGKILL: no chance to clean up; whatever chunk was open must vanish entirely.
        second = _run_until(cmd, engine, src_url, after_int[0] + 1000, signal.SIGKILL)
        assert second.returncode == -signal.SIGKILL
        assert f"{after_int[0]} rows in" in second.stdout  # it resumed, not restarted
        after_kill = _committed(engine)
        assert after_kill[0] == after_kill[1] == after_kill[2]
        assert after_int[0] < after_kill[0] < n and after_kill[0] % CHUNK == 0

        final = subprocess.run(
            [*cmd, "--verify", "--verify-samples", "800"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert final.returncode == 0, final.stderr
        assert f"{after_kill[0]} rows in" in final.stdout
        assert f"migrated: {n - after_kill[0]} rows" in final.stdout
        assert "verify: PASSED" in final.stdout
        assert _committed(engine) == (n, n, n)
        gallery = Gallery.open(gallery_url)
        try:
            with engine.connect() as conn:
                job_id = conn.exec_driver_sql("SELECT id FROM migration_jobs").scalar()
            items = job_items(gallery, int(job_id))
        finally:
            gallery.close()
        assert sorted(int(i) for i in items) == lfw_rows.ids
        assert len(set(items.values())) == n
        with engine.connect() as conn:
            per_subject = dict(
                conn.exec_driver_sql(
                    "SELECT s.name, count(*) FROM templates t JOIN subjects s "
                    "ON s.id = t.subject_id GROUP BY s.name"
                ).all()
            )
        assert per_subject == dict(Counter(lfw_rows.subjects))
    finally:
        engine.dispose()
