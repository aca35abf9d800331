"""`advplugin` catches advplugin's errors once (`cli.main`): one line on stderr, no
traceback, and the exit code of the error's kind, as `advplugin --help` lists them."""

from __future__ import annotations

import pytest

import advplugin.cli.db
from advplugin.cli.main import EXIT_CODES, main
from advplugin.errors import (
    AdvpluginError,
    InvalidInputError,
    KeyMaterialError,
    NotFoundError,
    RemoteError,
)
from advplugin.gallery import SubjectNotFound
from advplugin.gallery.sealing import ErasedError, MasterKeyError
from advplugin.he.client import BlindServiceError
from advplugin.service.protection import ConfigurationError


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return code, err


def test_real_errors_of_each_kind(tmp_path, capsys) -> None:
    url = f"sqlite:///{tmp_path / 'g.db'}"
    # invalid input: an argument
    assert run(["db", "seal", "--database-url", url, "--chunk-size", "0"], capsys)[0] == 2
    # configuration: a database without the schema (this was a traceback before)
    code, err = run(["db", "status", "--database-url", url], capsys)
    assert code == 3 and "advplugin db upgrade" in err
    # not found: a collection named on the command line
    assert main(["db", "upgrade", "--database-url", url]) == 0
    code, err = run(["db", "audit", "--database-url", url, "--collection", "ghost"], capsys)
    assert code == 4 and "no collection named 'ghost'" in err
    # configuration: a master key file others can read (`db rewrap --new-master-key`)
    loose = tmp_path / "loose.key"
    loose.write_bytes(b"x" * 32)
    loose.chmod(0o644)
    code, err = run(["db", "rewrap", "--database-url", url, "--new-master-key", str(loose)], capsys)
    assert code == 3 and "chmod 600" in err


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidInputError("bad"), 2),
        (ValueError("bad"), 2),
        (ConfigurationError("set ADVPLUGIN_X"), 3),
        (MasterKeyError("wrong master key"), 3),  # a configuration error before key material
        (NotFoundError("no such thing"), 4),
        (SubjectNotFound("no subject 'x'"), 4),
        (KeyMaterialError("tampered"), 5),
        (ErasedError("erased"), 5),
        (RemoteError("503 busy"), 6),
        (BlindServiceError(503, "busy", "retry"), 6),
        (AdvpluginError("other"), 1),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_each_kind_has_its_documented_code(error: Exception, code: int, capsys, monkeypatch) -> None:
    def fail(_args: object) -> int:
        raise error

    monkeypatch.setattr(advplugin.cli.db, "run_status", fail)
    got, err = run(["db", "status"], capsys)
    assert got == code and err.startswith("advplugin db: error: ") and str(error) in err
    assert code in {c for _, c, _ in EXIT_CODES}


def test_a_bug_keeps_its_traceback(monkeypatch) -> None:
    def fail(_args: object) -> int:
        raise RuntimeError("a bug")

    monkeypatch.setattr(advplugin.cli.db, "run_status", fail)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["db", "status"])


def test_help_lists_the_exit_codes(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for _, code, what in EXIT_CODES:
        assert f"{code} " in out and what in out
