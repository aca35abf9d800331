"""The `advplugin` command line, run in-process through `main(argv)`."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from advplugin.cli.main import build_parser, main
from advplugin.embedding_files import load_embedding_set


def commands() -> list[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sorted(sub.choices)


@pytest.mark.parametrize("command", commands())
def test_every_command_has_help(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: advplugin {command}") and len(out.splitlines()) > 3


def test_installed_entry_point_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "advplugin.cli.main", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for command in ("embed", "keygen", "protect", "verify-pairs"):
        assert command in out


def test_keygen_prints_key_id_only(tmp_path, capsys) -> None:
    assert main(["keygen", "--out", str(tmp_path / "k.key")]) == 0
    out = capsys.readouterr().out
    assert stat.S_IMODE((tmp_path / "k.key").stat().st_mode) == 0o600
    secret = (tmp_path / "k.key").read_text().split(":", 1)[1].strip()
    assert "key id" in out and secret not in out
    assert main(["keygen", "--out", str(tmp_path / "k.key")]) == 2  # no silent overwrite
    assert "already exists" in capsys.readouterr().err


@pytest.fixture(scope="module")
def small_folder(face_data: Path, lfw_cache, tmp_path_factory) -> Path:
    """Three identities of lfw-dev, linked (not copied) into a temporary folder, plus one
    unreadable file that `embed` must skip."""
    root = tmp_path_factory.mktemp("images")
    names = sorted(set(lfw_cache["identity"]))[10:13]
    for name in names:
        (root / name).symlink_to(face_data / "lfw-dev" / name)
    (root / "Broken_Person").mkdir()
    (root / "Broken_Person" / "Broken_Person_0001.jpg").write_bytes(b"not a jpeg")
    return root


def test_embed_reproduces_the_shipped_cache(
    small_folder: Path, lfw_cache, tmp_path, capsys
) -> None:
    out = tmp_path / "e.npz"
    assert main(["embed", str(small_folder), "--out", str(out), "--workers", "2"]) == 0
    assert (
        "skipped unreadable image Broken_Person/Broken_Person_0001.jpg" in capsys.readouterr().out
    )
    got = load_embedding_set(out)
    index = {p: i for i, p in enumerate(lfw_cache["path"])}
    rows = np.array([index[p] for p in got.path])
    assert len(rows) == sum(1 for _ in small_folder.glob("*/*.jpg")) - 1
    np.testing.assert_array_equal(got.identity, lfw_cache["identity"][rows])
    np.testing.assert_array_equal(got.detected, lfw_cache["detected"][rows])
    # Detected faces and the centre-box fallback (detected=0) both match the cache.
    assert np.abs(got.embedding - lfw_cache["embedding"][rows]).max() < 1e-4


def test_embed_bad_folder(tmp_path, capsys) -> None:
    assert main(["embed", str(tmp_path / "none"), "--out", str(tmp_path / "e.npz")]) == 2
    assert "not found" in capsys.readouterr().err


def verify(args: list[str], capsys) -> dict:
    capsys.readouterr()  # drop what earlier commands printed
    assert main(["verify-pairs", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_protect_and_verify_pairs_keep_accuracy(face_data: Path, tmp_path, capsys) -> None:
    cache = str(face_data / "lfw-dev-dlib128.npz")
    pairs = str(face_data / "lfw-dev-pairs.txt")
    key = str(tmp_path / "k.key")
    main(["keygen", "--out", key])
    raw = verify(["--embeddings", cache, "--pairs", pairs], capsys)
    on_the_fly = verify(
        ["--embeddings", cache, "--pairs", pairs, "--scheme", "xnn", "--key", key], capsys
    )
    assert raw["pairs"] == 6000 and raw["protection"] == {"scheme": "raw"}
    assert abs(raw["accuracy"] - on_the_fly["accuracy"]) <= 0.0005
    assert abs(raw["tar_at_far_1e-3"] - on_the_fly["tar_at_far_1e-3"]) <= 0.001

    protected = tmp_path / "p.npz"
    assert (
        main(["protect", "--scheme", "xnn", "--key", key, "--in", cache, "--out", str(protected)])
        == 0
    )
    stored = load_embedding_set(protected)
    assert stored.protection["scheme"] == "xnn" and "secret" not in json.dumps(stored.protection)
    raw_set = load_embedding_set(cache)
    file_bytes = protected.read_bytes()
    for row in raw_set.embedding[:50]:  # neither the raw vector's bytes nor its direction survive
        assert row[:4].tobytes() not in file_bytes
    unit = raw_set.embedding / np.linalg.norm(raw_set.embedding, axis=1, keepdims=True)
    assert np.abs(np.sum(unit * stored.embedding, axis=1)).max() < 0.6
    from_file = verify(["--embeddings", str(protected), "--pairs", pairs, "--key", key], capsys)
    assert from_file["accuracy"] == on_the_fly["accuracy"]

    # A protected file cannot be protected again, nor scored with the wrong key.
    assert (
        main(
            [
                "protect",
                "--scheme",
                "xnn",
                "--key",
                key,
                "--in",
                str(protected),
                "--out",
                str(tmp_path / "x.npz"),
            ]
        )
        == 2
    )
    other = str(tmp_path / "other.key")
    main(["keygen", "--out", other])
    capsys.readouterr()
    assert (
        main(["verify-pairs", "--embeddings", str(protected), "--pairs", pairs, "--key", other])
        == 2
    )
    assert "does not match" in capsys.readouterr().err


def test_verify_pairs_reports_missing_images(face_data: Path, lfw_cache, tmp_path, capsys) -> None:
    from advplugin.embedding_files import EmbeddingSet, save_embedding_set

    few = tmp_path / "few.npz"
    save_embedding_set(
        few,
        EmbeddingSet(
            lfw_cache["embedding"][:100],
            lfw_cache["path"][:100],
            lfw_cache["identity"][:100],
            lfw_cache["detected"][:100],
        ),
    )
    assert (
        main(
            [
                "verify-pairs",
                "--embeddings",
                str(few),
                "--pairs",
                str(face_data / "lfw-dev-pairs.txt"),
            ]
        )
        == 2
    )
    assert "have no embedding" in capsys.readouterr().err


def test_train_dispatches_to_the_schemes_trainer(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["train", "xnn-d", "--help"])
    assert e.value.code == 0 and "--embeddings" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["train", "xnn"])  # not a learned scheme
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
