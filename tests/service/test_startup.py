"""`advplugin serve` refuses to start on an un-migrated database, saying what to run."""

from __future__ import annotations

import subprocess
import sys

from sqlalchemy import create_engine, text


def test_unmigrated_database_is_refused(tmp_path) -> None:
    db = tmp_path / "old.db"
    engine = create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:  # an existing database without the advplugin schema
        conn.execute(text("CREATE TABLE something (x INTEGER)"))
    engine.dispose()
    r = subprocess.run(
        [sys.executable, "-m", "advplugin.service", "--database-url", f"sqlite:///{db}",
         "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 2
    assert "advplugin db upgrade" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "advplugin.cli.main", "db", "upgrade", "--database-url", f"sqlite:///{db}"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    from advplugin.gallery import Gallery

    Gallery.open(f"sqlite:///{db}").close()  # now migrated
