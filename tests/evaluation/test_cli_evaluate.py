"""`advplugin evaluate --quick` end to end: real dlib, real LFW photos, the real scorer."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from advplugin.cli.main import main
from advplugin.evaluation.data import list_images
from advplugin.keys import write_key


@pytest.fixture(scope="module")
def quick_report(
    small_split: dict[str, Path],
    face_data: Path,
    scorer_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, object]:
    tmp = tmp_path_factory.mktemp("evaluate")
    key = write_key(tmp / "k.key")
    out = tmp / "report"
    code = main(
        [
            "evaluate", "--scheme", "xnn", "--key", str(tmp / "k.key"),
            "--train-images", str(small_split["train"]), "--test-images", str(small_split["test"]),
            "--scorer", str(scorer_model), "--embeddings-cache", str(face_data / "lfw-dev-dlib128.npz"),
            "--cache-dir", str(tmp / "cache"), "--out", str(out), "--quick", "--no-progress",
        ]
    )  # fmt: skip
    assert code == 0
    return {"out": out, "key": key, "json": json.loads((out / "report.json").read_text())}


def test_report_files_and_rows(quick_report: dict) -> None:
    out, report = quick_report["out"], quick_report["json"]
    for name in (
        "report.md",
        "roc.png",
        "reconstructions.png",
        "unlinkability.png",
        "key_recovery.png",
    ):
        assert (out / name).stat().st_size > 0
    assert set(report["rows"]) == {"none", "xnn"}
    assert report["scorer"]["name"] == "onnx" and "mobileface" in report["scorer"]["version"]
    md = (out / "report.md").read_text()
    for section in ("Utility", "Reconstruction", "Identification", "Unlinkability", "Key recovery"):
        assert f"## {section}" in md


def test_quick_numbers_behave_as_the_schemes_promise(quick_report: dict) -> None:
    rows = quick_report["json"]["rows"]
    none, xnn = rows["none"], rows["xnn"]
    assert xnn["utility"]["verification_accuracy"] == pytest.approx(
        none["utility"]["verification_accuracy"]
    )
    assert xnn["utility"]["rank1"] == pytest.approx(none["utility"]["rank1"])
    assert xnn["identification"]["naive"] < none["identification"]["naive"]
    assert xnn["unlinkability"]["d_sys"] < none["unlinkability"]["d_sys"]
    assert xnn["key_recovery"]["linear_residual"] < 1e-3
    assert none["reconstruction"]["naive"]["ssim"] == pytest.approx(
        quick_report["json"]["reconstruction_on_raw"]["ssim"]
    )


def test_report_holds_no_vectors_and_no_key(
    quick_report: dict, lfw_cache: dict, small_split: dict
) -> None:
    out = quick_report["out"]
    text = "".join((out / n).read_text() for n in ("report.json", "report.md"))
    index = {str(p): i for i, p in enumerate(lfw_cache["path"])}
    for rel in list_images(small_split["test"]).path[:5]:
        vector = lfw_cache["embedding"][index[str(rel)]]
        # A leaked vector shows all of its values; one 8-character prefix alone can match a
        # full-precision number of the report by chance (seen once: a histogram bin edge).
        found = [f"{value:.6f}"[:8] for value in vector[:8] if f"{value:.6f}"[:8] in text]
        assert len(found) <= 1, found
    key = quick_report["key"]
    assert base64.b64encode(key.secret).decode() not in text
    assert key.key_id in text  # the report names the key by its id only


def test_overlapping_people_are_refused(
    small_split: dict[str, Path], tmp_path: Path, capsys
) -> None:
    code = main(
        ["evaluate", "--scheme", "xnn", "--train-images", str(small_split["test"]),
         "--test-images", str(small_split["test"]), "--out", str(tmp_path), "--quick"]
    )  # fmt: skip
    assert code == 2
    assert "share" in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()
    assert np.all(list_images(small_split["test"]).identity)  # folder untouched


def test_decoder_identity_weight_reaches_both_decoders(
    quick_report: dict, small_split: dict[str, Path], face_data: Path, scorer_model: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--decoder-identity-weight` trains the raw and the adaptive decoders with the identity
    loss against the train photos' raw embeddings (what the attacker can compute); 0 keeps the
    L1-only decoder of the committed reports (the module's quick report: no identity options)."""
    from advplugin.evaluation import harness

    calls: list[dict[str, object]] = []
    real = harness.train_decoder

    def spy(templates, crops, config, **kw):  # type: ignore[no-untyped-def]
        calls.append({"n": len(templates), **kw})
        return real(templates, crops, config, **{k: v for k, v in kw.items() if k in ("desc", "progress")})

    monkeypatch.setattr(harness, "train_decoder", spy)
    tmp = quick_report["out"].parent
    code = main(
        [
            "evaluate", "--scheme", "xnn", "--key", str(tmp / "k.key"),
            "--train-images", str(small_split["train"]), "--test-images", str(small_split["test"]),
            "--scorer", str(scorer_model), "--embeddings-cache", str(face_data / "lfw-dev-dlib128.npz"),
            "--cache-dir", str(tmp / "cache"), "--out", str(tmp / "identity"), "--quick", "--no-progress",
            "--decoder-identity-weight", "0.03",
        ]
    )  # fmt: skip
    assert code == 0
    assert [c["desc"] for c in calls] == ["decoder on raw", "adaptive decoder (xnn)"]
    for c in calls:
        assert c["identity_weight"] == 0.03
        targets = np.asarray(c["identity_targets"])
        assert targets.shape == (c["n"], 128)
    # Both decoders aim at the raw embeddings of the train photos, not at the protected templates.
    assert np.array_equal(calls[0]["identity_targets"], calls[1]["identity_targets"])
    report = json.loads((tmp / "identity" / "report.json").read_text())
    assert "identity loss" in report["decoder"]["architecture"]
    assert "identity loss" not in quick_report["json"]["decoder"]["architecture"]
