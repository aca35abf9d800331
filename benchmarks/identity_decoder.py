"""The harness's reconstruction decoder with an identity loss (issue 15, Build 3, first bullet):
does training the decoder to keep identity through dlib's own network (run in torch) make
reconstructions from raw templates pass as the right person more often?

    .venv/bin/python benchmarks/identity_decoder.py            # ~27 min on 2 busy cores
    .venv/bin/python benchmarks/identity_decoder.py --quick    # ~1 min: few people, 1 epoch

The same data, split, scorer and judging as `advplugin evaluate` (docs/evaluation/README.md):
lfw-dev split by the harness's identity hash (`evaluate-split`, folders under --split-dir,
made if missing), the train people's raw dlib embeddings (seeded from the shipped cache) and
ArcFace-aligned 64x64 crops; the 3000 attacked test photos drawn as the harness draws them
(same seed, same order of random draws), judged by the harness's own
`reconstruction.ReconstructionJudge` at FAR 1e-3 and 1e-2:

- type II (the independent scorer, `mobileface.onnx`): accepted as the right person at its
  FAR threshold on real test photos, against another photo of that person (same photo
  in brackets), and false accept against someone else - the harness's reconstruction row;
- type I (dlib itself, the system under attack): the same judge with dlib's ResNet in torch
  as the scorer (`reconstruction.ChipScorer`: the reconstruction warped to dlib's chip
  framing, `IdentityLoss.chips`) and the test photos' raw dlib embeddings as references,
  threshold at dlib's FAR on real test pairs (cosine).

The decoders are the harness's (`reconstruction.train_attack_decoder` with an
`AttackRecipe`); this script only picks the recipes to compare and measures where the crop
lies in dlib's chip.

Decoders, trained in this run with the same epochs: (a) today's decoder (L1 only, all train
people, `identity_weight` 0: the committed report's configuration); (b) for each
`--identity-weights` value, L1 + weight * (1 - cosine(dlib(reconstruction), raw embedding)),
the chip framing jittered by +-5 % (`--jitter`), with flip augmentation (the mirrored photo's
template is dlib-torch's embedding of the mirrored crop warped to the chip) and early
stopping on a validation split of train people (`--val-fraction` of them, by a hash of the
name). Each epoch is checkpointed under --work. The weights are small on purpose: in short
pilots (2 epochs, 1,200 train photos, 800 held-out) weights 0.1 to 5 raised dlib's cosine
(0.88 -> 0.92-0.93) with checkerboard textures that lowered mobileface's (0.056 -> 0.015-0.06);
0.03 raised both (0.92, 0.079); a blur before the loss (`--blur`) made the textures coarser,
not fewer.
Also measured: real 64x64 crops judged the same way (the ceiling for a 64x64 decoder), and
where the harness's ArcFace crop lies in dlib's chip (`DLIB_CHIP_FROM_ARCFACE`, re-measured).
Writes benchmarks/results/identity_decoder.json (rewritten after each decoder).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FACE_DATA, REPO, table, write_results

from advplugin.adapters import create_extractor
from advplugin.adapters.align import ARCFACE_TEMPLATE, similarity_transform
from advplugin.evaluation import attacks
from advplugin.evaluation.data import FeatureCache, limit_images, list_images, split_identities
from advplugin.evaluation.decoder import DLIB_CHIP_FROM_ARCFACE, DecoderConfig, reconstruct
from advplugin.evaluation.faces import hash_files, load_face_set, scorer_embeddings
from advplugin.evaluation.reconstruction import (
    FARS,
    AttackRecipe,
    ChipScorer,
    JudgeScorer,
    ReconstructionJudge,
    mirrored_embeddings,
    train_attack_decoder,
    validation_split,
)
from advplugin.images import load_image

COMMAND = ".venv/bin/python benchmarks/identity_decoder.py"
FAR = FARS[0]


def chip_geometry(
    folder_files: list[Path], digests: list[str], cache_dir: Path
) -> dict[str, object]:
    """Where the harness's ArcFace crop lands in dlib's chip, on real photos: dlib's own chip
    placement (`get_face_chip_details`, 5-point shape, padding 0.25) against the harness's
    cached ArcFace landmarks; the same estimate as `DLIB_CHIP_FROM_ARCFACE`'s."""
    import dlib

    from advplugin.adapters.base import Detections

    cache = FeatureCache(
        cache_dir / "align-dlib68-up0-onnx-mobileface-435e25e1ce92.npz",
        {"landmarks": (5, 2), "found": ()},
    )
    extractor = create_extractor("dlib")
    points = []
    for file, digest in zip(folder_files, digests, strict=True):
        if digest not in cache:
            continue
        image = load_image(file)
        det = extractor.detect(image)
        if len(det.boxes) == 0:
            continue
        centre = np.array([image.shape[1] / 2, image.shape[0] / 2])
        k = int(np.argmin((((det.boxes[:, :2] + det.boxes[:, 2:]) / 2 - centre) ** 2).sum(1)))
        one = Detections(det.boxes[k : k + 1], det.landmarks[k : k + 1], det.scores[k : k + 1])
        chip = dlib.get_face_chip_details(extractor.face_shapes(image, one)[0], 150, 0.25)
        r, c, s = chip.rect, np.cos(chip.angle), np.sin(chip.angle)
        scale = (r.width() - 1) / 149.0  # chip pixel -> image, dlib's convention
        to_image = np.array([[c * scale, -s * scale], [s * scale, c * scale]])
        shift = np.array([(r.left() + r.right()) / 2, (r.top() + r.bottom()) / 2])
        shift = shift - to_image @ np.array([74.5, 74.5])
        p = cache.get(digest)["landmarks"].astype(np.float64)
        points.append((np.linalg.inv(to_image) @ (p - shift).T).T)
    if not points:
        return {"photos": 0}
    pts = np.array(points)
    near = np.abs(pts - np.median(pts, 0)).max(axis=(1, 2)) < 8
    measured = similarity_transform(ARCFACE_TEMPLATE, pts[near].mean(0))
    corners = np.array([[0, 0, 1], [111, 0, 1], [0, 111, 1], [111, 111, 1]], np.float64)
    return {
        "photos": len(pts),
        "photos_near_median": int(near.sum()),
        "landmark_sd_in_chip_px": pts[near].std(0).round(2).tolist(),
        "measured_chip_from_arcface": measured.round(4).tolist(),
        "max_corner_shift_vs_constant_px": float(
            np.abs(corners @ measured.T - corners @ DLIB_CHIP_FROM_ARCFACE.T).max()
        ),
    }


def judged(judge: ReconstructionJudge, images: np.ndarray) -> dict[str, object]:
    """The judge's figures; SSIM/PSNR only where finite (a real crop against itself is not)."""
    return {
        k: v for k, v in judge(images).items() if not isinstance(v, float) or np.isfinite(v)
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=FACE_DATA)
    ap.add_argument("--split-dir", type=Path, default=Path("/tmp/evalsplit/lfw"))
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/evalcache"))
    ap.add_argument("--scorer", type=Path, default=REPO.parent / "shared/models/mobileface.onnx")
    ap.add_argument("--work", type=Path, default=Path("/tmp/identity_decoder"))
    ap.add_argument("--epochs", type=int, default=DecoderConfig().epochs)
    ap.add_argument(
        "--identity-weights",
        default="0.03,0.1",
        help="comma-separated; 0 = the same recipe (flip, early stopping) without identity loss",
    )
    ap.add_argument("--results-name", default="identity_decoder")
    ap.add_argument("--no-flip", action="store_true")
    ap.add_argument("--jitter", type=float, default=0.05, help="IdentityLoss framing jitter")
    ap.add_argument("--blur", type=float, default=0.0, help="IdentityLoss blur sigma (pixels)")
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--max-reconstructions", type=int, default=3000)
    ap.add_argument("--max-impostors", type=int, default=5_000_000)
    ap.add_argument("--geometry-photos", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="40 + 30 people, 1 epoch")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    if args.quick:
        args.epochs, args.max_reconstructions, args.geometry_photos = 1, 200, 10
    weights = [float(w) for w in args.identity_weights.split(",")]
    if any(w < 0 for w in weights):
        ap.error("identity weights must be >= 0")
    if not (args.split_dir / "train").is_dir():
        split_identities(args.data / "lfw-dev", args.split_dir, test_fraction=0.5)
    train_folder = list_images(args.split_dir / "train")
    test_folder = list_images(args.split_dir / "test")
    if args.quick:
        train_folder = limit_images(train_folder, max_identities=40, max_per_identity=4)
        test_folder = limit_images(test_folder, max_identities=30, max_per_identity=4)
    scorer = create_extractor("onnx", model_path=args.scorer, mean=0.0, std=1.0, threads=1)
    load = {
        "crop_size": DecoderConfig().size, "scorer": scorer, "cache_dir": args.cache_dir,
        "seed_file": args.data / "lfw-dev-dlib128.npz", "progress": False,
    }  # fmt: skip
    train = load_face_set(train_folder, create_extractor("dlib"), **load)  # type: ignore[arg-type]
    test = load_face_set(test_folder, create_extractor("dlib"), **load)  # type: ignore[arg-type]
    print(f"loaded {len(train.raw)} train / {len(test.raw)} test photos", flush=True)

    # The harness's draws, in its order: attacked photos, then the judge.
    rng = np.random.default_rng(args.seed)
    attacked, other = attacks.reconstruction_pairs(
        test.folder.identity, args.max_reconstructions, rng
    )
    chip = ChipScorer()  # judging and mirrored templates: fixed framing, no blur
    judge = ReconstructionJudge(
        test.crops, test.folder.identity, attacked, other,
        [JudgeScorer("type_i", lambda c: scorer_embeddings(chip, c), test.raw),  # type: ignore[arg-type]
         JudgeScorer("type_ii", lambda c: scorer_embeddings(scorer, c), test.scorer)],  # type: ignore[arg-type]
        rng, args.max_impostors,
    )  # fmt: skip

    sample = np.random.default_rng(args.seed).choice(
        len(train.raw), min(args.geometry_photos, len(train.raw)), replace=False
    )
    sub = train.folder.subset(np.sort(sample))
    figures: dict[str, object] = {
        "far": FAR,
        "data": {
            "train_images": len(train.raw), "train_people": len(np.unique(train.folder.identity)),
            "test_images": len(test.raw), "test_people": len(np.unique(test.folder.identity)),
            "attacked": len(attacked), "quick": args.quick,
        },
        "thresholds": judge.real_photos,
        "chip_geometry": chip_geometry(
            sub.files(), hash_files(sub, progress=False), args.cache_dir
        ),
        "real_64px_crops": judged(judge, test.crops[attacked]),  # the ceiling at 64x64
        "decoders": {},
    }  # fmt: skip
    print(json.dumps(figures["chip_geometry"]), flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    config = DecoderConfig(epochs=args.epochs, seed=args.seed)
    decoders: dict[str, dict[str, object]] = figures["decoders"]  # type: ignore[assignment]

    def save() -> None:
        write_results(
            args.results_name, figures, command=" ".join([COMMAND, *(argv or sys.argv[1:])])
        )

    def run(label: str, recipe: AttackRecipe, options: dict[str, object]) -> None:
        history: list[dict[str, float]] = []

        def on_epoch(epoch: int, model: torch.nn.Module, values: dict[str, float]) -> None:
            values = {"epoch": epoch, "seconds": round(time.perf_counter() - t0, 1), **values}
            history.append(values)
            torch.save(model.state_dict(), args.work / f"{label}-epoch{epoch}.pt")
            print(f"{label} {json.dumps(values)}", flush=True)

        t0 = time.perf_counter()
        model = train_attack_decoder(
            train.raw, train.raw, train.crops, train.folder.identity, config, recipe,
            mirrored_templates=flipped, mirrored_raw=flipped, progress=False, on_epoch=on_epoch,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        recon = reconstruct(model, test.raw[attacked])
        fit, val = validation_split(train.folder.identity, recipe.val_fraction)
        decoders[label] = {
            **options, **recipe.__dict__, "train_photos": len(fit), "validation_photos": len(val),
            "validation_people": len(np.unique(train.folder.identity[val])),
            "train_seconds": round(seconds, 1), "epochs": history, **judged(judge, recon),
        }  # fmt: skip
        np.save(args.work / f"{label}-recon-first16.npy", recon[:16])
        row = decoders[label]
        print(f"{label}: {json.dumps(row['type_ii'])} {json.dumps(row['type_i'])}", flush=True)
        save()

    flipped = None if args.no_flip else mirrored_embeddings(chip, train.crops)
    run("l1_only", AttackRecipe.l1_only(), {"early_stopping": False})
    for weight in weights:
        recipe = AttackRecipe(
            identity_weight=weight, flip=flipped is not None, val_fraction=args.val_fraction,
            jitter=args.jitter, blur=args.blur,
        )  # fmt: skip
        label = f"identity_{weight:g}" if weight > 0 else "l1_flip_early_stopping"
        run(label, recipe, {"early_stopping": True})

    base = decoders["l1_only"]
    for d in decoders.values():
        d["train_seconds_vs_l1_only"] = round(d["train_seconds"] / base["train_seconds"], 2)  # type: ignore[operator]
        d["accepted_other_photo_vs_l1_only"] = (
            d["type_ii"]["1e-3"]["accepted_other_photo"]  # type: ignore[index]
            / max(base["type_ii"]["1e-3"]["accepted_other_photo"], 1e-9)  # type: ignore[index]
        )
    figures["seconds"] = round(time.perf_counter() - t_start, 1)
    save()
    pct = "{:.2%}".format
    rows = [
        [label, pct(d["type_ii"]["1e-3"]["accepted_other_photo"]),
         pct(d["type_ii"]["1e-3"]["accepted_same_photo"]), pct(d["type_ii"]["1e-3"]["false_accept"]),
         pct(d["type_i"]["1e-3"]["accepted_other_photo"]), pct(d["type_i"]["1e-3"]["accepted_same_photo"]),
         pct(d["type_i"]["1e-3"]["false_accept"]), f"{d.get('ssim', float('nan')):.3f}", d["train_seconds"]]
        for label, d in [*decoders.items(), ("real 64x64 crops", {**figures["real_64px_crops"], "train_seconds": "-"})]  # type: ignore[dict-item]
    ]  # fmt: skip
    table(
        f"Reconstructions from raw test templates, accepted at FAR {FAR:g} (type II: mobileface; type I: dlib)",
        ["decoder", "II other photo", "II same photo", "II false accept", "I other photo",
         "I same photo", "I false accept", "SSIM", "train s"],
        rows,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
