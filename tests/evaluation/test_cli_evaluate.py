"""`advplugin evaluate --quick` end to end: real dlib, real LFW photos, the real scorer."""

from __future__ import annotations

import base64
import json
import shutil
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
            "evaluate", "--scheme", "xnn", "--scheme", "xnn-d", "--key", str(tmp / "k.key"),
            "--train-images", str(small_split["train"]), "--test-images", str(small_split["test"]),
            "--scorer", str(scorer_model), "--embeddings-cache", str(face_data / "lfw-dev-dlib128.npz"),
            "--cache-dir", str(tmp / "cache"), "--out", str(out), "--quick", "--no-progress",
            "--api-client", "--api-client-queries", "20,50",
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
        "attack_rates.png",
        "unlinkability.png",
        "key_recovery.png",
    ):
        assert (out / name).stat().st_size > 0
    assert list(report["rows"]) == ["none", "xnn", "xnn-d"]  # one row per --scheme, in order
    assert report["pending"] == []
    assert report["scorer"]["name"] == "onnx" and "mobileface" in report["scorer"]["version"]
    md = (out / "report.md").read_text()
    assert "Partial report" not in md
    for section in (
        "Summary",
        "Utility",
        "Threat: reconstruction, type I",
        "Threat: reconstruction, type II",
        "Threat: template inversion",
        "Threat: linkability",
        "Threat: key recovery",
    ):
        assert f"## {section}" in md
    assert md.count("| `xnn-d` |") >= 4  # a row in every per-scheme table


def test_every_attack_is_rated_by_both_judges_at_both_operating_points(
    quick_report: dict,
) -> None:
    """ISO/IEC 30136 terms: success attack rates at FMR 1e-3 and 1e-2, type I (dlib) and
    type II (the scorer), rates between 0 and 1; a lower FMR never has a lower threshold."""
    report = quick_report["json"]
    judged = [report["reconstruction_on_raw"]] + [
        r for row in report["rows"].values() for r in row["reconstruction"].values()
    ]
    for r in judged:
        for judge in ("type_i", "type_ii"):
            assert set(r[judge]) == {"1e-3", "1e-2"}
            for figures in r[judge].values():
                assert set(figures) == {"accepted_other_photo", "accepted_same_photo", "false_accept"}
                assert all(0.0 <= v <= 1.0 for v in figures.values())
    for judge in ("type_i", "type_ii"):
        points = report["judges_on_real_photos"][judge]
        assert points["1e-3"]["threshold"] >= points["1e-2"]["threshold"]
    # type I's references are dlib's own embeddings: its thresholds are the inversion table's.
    assert report["system_thresholds"]["1e-3"] == pytest.approx(
        report["judges_on_real_photos"]["type_i"]["1e-3"]["threshold"]
    )
    none = report["rows"]["none"]["identification"]["verification"]["naive"]
    assert none["1e-2"] >= none["1e-3"] > 0.5  # raw templates pass dlib against another photo


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
    naive_sar = xnn["identification"]["verification"]["naive"]["1e-3"]
    assert naive_sar < none["identification"]["verification"]["naive"]["1e-3"]
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


POLICIES = ["exact (granted)", "decisions-unbudgeted", "default"]
ORACLE_SECTION = "## Threat: an API client (score oracle)"


def _check_oracle_result(oracle: dict) -> None:
    assert oracle["query_counts"] == [20, 50]
    assert oracle["enrolled"] == 8  # the first photo of every test person
    assert list(oracle["policies"]) == POLICIES
    for label, policy in oracle["policies"].items():
        exact = label == "exact (granted)"
        assert policy["exact_scores"] is exact
        assert set(policy["strategies"]) == {"least_squares", "lookalike_centroid", "adaptive_boundary"}
        for row in policy["strategies"].values():
            assert row["curve"] and 0.0 <= row["final_rank1"] <= 1.0
            assert (row["goal"] is None) is exact and (row["met"] is None) is exact
            # every point is judged through the decoder on raw embeddings and dlib
            assert all(0.0 <= p["reconstruction"] <= 1.0 for p in row["curve"])
    # exact scores, granted: the attacker is real (8 people, 50 queries)
    ls = oracle["policies"]["exact (granted)"]["strategies"]["least_squares"]
    assert ls["final_rank1"] > oracle["chance"] + oracle["goal_margin"]
    legit = oracle["legitimate"]
    assert legit["reference"] == "exact (granted)" and list(legit["policies"]) == POLICIES
    for row in legit["policies"].values():
        assert row["probes"] == legit["probes"] == oracle["search_photos"]
        assert 0.0 <= row["identified"] <= 1.0


def _check_oracle_markdown(md: str) -> None:
    section = md[md.index(ORACLE_SECTION) :]
    assert "| goal | met |" in section  # the attack table
    assert "| `default` | least squares on the scores |" in section
    assert "| policy | identified | drop vs `exact (granted)` (pp) | stopped? | goal | met |" in section
    assert "![score oracle](score_oracle.png)" in section


def test_api_client_threat_runs_through_the_service(quick_report: dict) -> None:
    """`--api-client`: issue 21's attacker against the real service app in process, per
    policy, and the cameras' identification on the same service, in report.json and
    report.md (a summary line and its own section, with goal and met columns)."""
    out, report = quick_report["out"], quick_report["json"]
    _check_oracle_result(report["score_oracle"])
    assert report["score_oracle"]["reconstruction_threshold"] == pytest.approx(
        report["system_thresholds"]["1e-3"]
    )
    md = (out / "report.md").read_text()
    assert "An API client (score oracle), rank-1" in md  # the summary's line
    _check_oracle_markdown(md)
    assert (out / "score_oracle.png").stat().st_size > 0


def test_api_client_threat_alone_merges_into_a_finished_report(
    quick_report: dict, small_split: dict[str, Path], face_data: Path, scorer_model: Path,
) -> None:
    """`--threats api-client` on a finished report's folder: no scheme rows are rerun, the
    shared parts are the full run's (the decoder on raw embeddings from the cache gives the
    same reconstructions, the same thresholds), and the result is merged and rendered."""
    tmp = quick_report["out"].parent
    out = tmp / "merged"
    shutil.copytree(quick_report["out"], out)
    before = json.loads((out / "report.json").read_text())
    del before["score_oracle"]
    (out / "report.json").write_text(json.dumps(before))
    (out / "score_oracle.png").unlink()
    code = main(
        [
            "evaluate", "--threats", "api-client", "--api-client-queries", "20,50",
            "--train-images", str(small_split["train"]), "--test-images", str(small_split["test"]),
            "--scorer", str(scorer_model), "--embeddings-cache", str(face_data / "lfw-dev-dlib128.npz"),
            "--cache-dir", str(tmp / "cache"), "--out", str(out), "--quick", "--no-progress",
        ]
    )  # fmt: skip
    assert code == 0
    assert list((tmp / "cache" / "decoders").glob("raw-*.pt"))
    after = json.loads((out / "report.json").read_text())
    assert {k: v for k, v in after.items() if k != "score_oracle"} == before
    oracle = after["score_oracle"]
    _check_oracle_result(oracle)
    check = oracle["decoder_check"]
    assert check["reconstruction_on_raw"] == before["reconstruction_on_raw"]
    assert check["system_thresholds"] == before["system_thresholds"]
    assert "--threats api-client" in oracle["command"] or "in process" in oracle["command"]
    md = (out / "report.md").read_text()
    assert "## Utility" in md  # the whole report, re-rendered
    _check_oracle_markdown(md)
    assert (out / "score_oracle.png").stat().st_size > 0


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


def _spy_run(
    monkeypatch: pytest.MonkeyPatch, small_split: dict[str, Path], face_data: Path,
    scorer_model: Path, out: Path, cache: Path, extra: list[str],
) -> tuple[list[dict[str, object]], dict[str, object]]:
    """A quick run whose decoder training calls are recorded (and trained for one epoch)."""
    from advplugin.evaluation import reconstruction

    calls: list[dict[str, object]] = []
    real = reconstruction.train_decoder

    def spy(templates, crops, config, **kw):  # type: ignore[no-untyped-def]
        calls.append({"templates": templates, **kw})
        return real(templates, crops, config, desc=kw["desc"], progress=False)

    monkeypatch.setattr(reconstruction, "train_decoder", spy)
    shutil.rmtree(cache / "decoders", ignore_errors=True)  # train the raw decoder, not load it
    code = main(
        [
            "evaluate", "--scheme", "xnn",
            "--train-images", str(small_split["train"]), "--test-images", str(small_split["test"]),
            "--scorer", str(scorer_model), "--embeddings-cache", str(face_data / "lfw-dev-dlib128.npz"),
            "--cache-dir", str(cache), "--out", str(out), "--quick", "--no-progress", *extra,
        ]
    )  # fmt: skip
    assert code == 0
    return calls, json.loads((out / "report.json").read_text())


def test_default_attacker_keeps_identity_flips_and_stops_early(
    quick_report: dict, small_split: dict[str, Path], face_data: Path, scorer_model: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 15's attacker by default: both decoders (raw and adaptive) train with the identity
    loss aimed at the train photos' raw embeddings, on mirrored photos whose templates are
    re-embedded (protected for the adaptive one), and validate on held-out train people."""
    tmp = quick_report["out"].parent
    calls, report = _spy_run(
        monkeypatch, small_split, face_data, scorer_model, tmp / "spy", tmp / "cache", []
    )
    assert [c["desc"] for c in calls] == ["decoder on raw", "adaptive decoder (xnn)"]
    raw, adaptive = calls
    for c in calls:
        assert c["identity_weight"] == pytest.approx(0.03)
        assert np.asarray(c["identity_targets"]).shape == np.asarray(c["templates"]).shape
        assert np.asarray(c["flipped_templates"]).shape == np.asarray(c["templates"]).shape
    # The raw decoder's templates are its identity targets; the adaptive one's are not, but
    # both aim at the same raw embeddings (of the photo and of its mirror image).
    assert np.array_equal(raw["templates"], raw["identity_targets"])
    assert not np.allclose(adaptive["templates"], adaptive["identity_targets"])
    assert np.array_equal(raw["identity_targets"], adaptive["identity_targets"])
    assert np.array_equal(raw["flipped_targets"], adaptive["flipped_targets"])
    assert np.array_equal(raw["flipped_templates"], raw["flipped_targets"])
    # The mirror image is another photo: its embedding is near the photo's, not equal to it.
    cos = np.sum(
        _unit(raw["flipped_targets"]) * _unit(raw["identity_targets"]), axis=1  # type: ignore[arg-type]
    )
    assert 0.8 < cos.mean() < 0.9999
    architecture = report["decoder"]["architecture"]
    assert "identity loss" in architecture and "flip" in architecture


def test_identity_weight_zero_is_the_earlier_l1_decoder(
    quick_report: dict, small_split: dict[str, Path], face_data: Path, scorer_model: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--decoder-identity-weight 0` reproduces the earlier reports' attacker: L1 loss on every
    train photo, no mirrored photos, no validation split."""
    tmp = quick_report["out"].parent
    calls, report = _spy_run(
        monkeypatch, small_split, face_data, scorer_model, tmp / "l1", tmp / "cache",
        ["--decoder-identity-weight", "0"],
    )  # fmt: skip
    n_train = report["data"]["train_images"]
    for c in calls:
        assert len(c["templates"]) == n_train  # type: ignore[arg-type]
        assert not {"identity_weight", "flipped_templates", "validation"} & set(c)
    assert "identity loss" not in report["decoder"]["architecture"]


def _unit(x: object) -> np.ndarray:
    a = np.asarray(x, np.float64)
    return a / np.linalg.norm(a, axis=1, keepdims=True)
