"""The harness's reconstruction decoder with an identity loss (issue 15, Build 3, first bullet):
does training the decoder to keep identity through dlib's own network (run in torch) make
reconstructions from raw templates pass as the right person more often?

    .venv/bin/python benchmarks/identity_decoder.py            # ~27 min on 2 busy cores
    .venv/bin/python benchmarks/identity_decoder.py --quick    # ~1 min: few people, 1 epoch

The same data, split, scorer and judging as `advplugin evaluate` (docs/evaluation/README.md):
lfw-dev split by the harness's identity hash (`evaluate-split`, folders under --split-dir,
made if missing), the train people's raw dlib embeddings (seeded from the shipped cache) and
ArcFace-aligned 64x64 crops; the 3000 attacked test photos drawn as the harness draws them
(same seed, same order of random draws), judged by the harness's own `_Judge`:

- type II (the independent scorer, `mobileface.onnx`): accepted as the right person at its
  FAR 1e-3 threshold on real test photos, against another photo of that person (same photo
  in brackets), and false accept against someone else - the harness's reconstruction row;
- type I (dlib itself, the system under attack): the same judge with dlib's ResNet in torch
  as the scorer (the reconstruction warped to dlib's chip framing, `IdentityLoss.chips`) and
  the test photos' raw dlib embeddings as references, threshold at dlib's FAR 1e-3 on real
  test pairs (cosine).

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
from advplugin.evaluation.data import (
    FeatureCache,
    identity_in_test,
    limit_images,
    list_images,
    split_identities,
)
from advplugin.evaluation.decoder import (
    DLIB_CHIP_FROM_ARCFACE,
    DecoderConfig,
    IdentityLoss,
    dlib_identity_loss,
    reconstruct,
    train_decoder,
)
from advplugin.evaluation.faces import FaceSet, hash_files, load_face_set
from advplugin.evaluation.harness import FAR, _Judge
from advplugin.images import load_image

COMMAND = ".venv/bin/python benchmarks/identity_decoder.py"


class DlibReconstructionScorer:
    """dlib's ResNet (torch) as a `_Judge` scorer: `embed_aligned` takes ArcFace-aligned crops
    (the judge hands them at 112x112) and embeds them warped to dlib's chip framing."""

    def __init__(self, loss: IdentityLoss, batch: int = 64) -> None:
        self.loss, self.batch, self.dim = loss, batch, 128

    @torch.no_grad()
    def embed_aligned(self, crops: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(crops), self.batch):
            chunk = np.ascontiguousarray(crops[start : start + self.batch].transpose(0, 3, 1, 2))
            out.append(self.loss.embed(torch.from_numpy(chunk).float() / 255.0).numpy())
        return np.concatenate(out).astype(np.float32)


def mirrored_templates(loss: IdentityLoss, crops: np.ndarray) -> np.ndarray:
    """Templates of the mirrored photos: dlib-torch's embeddings of the mirrored crops."""
    return DlibReconstructionScorer(loss).embed_aligned(np.ascontiguousarray(crops[:, :, ::-1]))


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


def judged(judge: _Judge, images: np.ndarray) -> dict[str, float]:
    """The judge's figures; SSIM/PSNR only where finite (a real crop against itself is not)."""
    return {k: float(v) for k, v in judge(images).items() if np.isfinite(v)}


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

    # The harness's draws, in its order: attacked photos, then the scorer's judge.
    rng = np.random.default_rng(args.seed)
    attacked, other = attacks.reconstruction_pairs(
        test.folder.identity, args.max_reconstructions, rng
    )
    type2 = _Judge(scorer, test, attacked, other, rng, args.max_impostors)
    loss = dlib_identity_loss()  # judging and mirrored templates: fixed framing, no blur
    dlib_view = FaceSet(test.folder, test.raw, test.detected, test.crops, test.raw)
    type1 = _Judge(
        DlibReconstructionScorer(loss), dlib_view, attacked, other, rng, args.max_impostors
    )

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
        "thresholds": {"type_ii_mobileface": type2.real_photos, "type_i_dlib": type1.real_photos},
        "chip_geometry": chip_geometry(
            sub.files(), hash_files(sub, progress=False), args.cache_dir
        ),
        "real_64px_crops": {  # the ceiling for any 64x64 reconstruction
            "type_ii": judged(type2, test.crops[attacked]),
            "type_i": judged(type1, test.crops[attacked]),
        },
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

    def run(label: str, train_fn: object, options: dict[str, object]) -> None:
        history: list[dict[str, float]] = []

        def on_epoch(epoch: int, model: torch.nn.Module, values: dict[str, float]) -> None:
            values = {"epoch": epoch, "seconds": round(time.perf_counter() - t0, 1), **values}
            history.append(values)
            torch.save(model.state_dict(), args.work / f"{label}-epoch{epoch}.pt")
            print(f"{label} {json.dumps(values)}", flush=True)

        t0 = time.perf_counter()
        model = train_fn(on_epoch)  # type: ignore[operator]
        seconds = time.perf_counter() - t0
        recon = reconstruct(model, test.raw[attacked])
        decoders[label] = {
            **options, "train_seconds": round(seconds, 1), "epochs": history,
            "type_ii": judged(type2, recon), "type_i": judged(type1, recon),
        }  # fmt: skip
        np.save(args.work / f"{label}-recon-first16.npy", recon[:16])
        row = decoders[label]
        print(f"{label}: {json.dumps(row['type_ii'])} {json.dumps(row['type_i'])}", flush=True)
        save()

    run(
        "l1_only",
        lambda cb: train_decoder(train.raw, train.crops, config, progress=False, on_epoch=cb),
        {
            "identity_weight": 0.0,
            "flip": False,
            "early_stopping": False,
            "train_photos": len(train.raw),
        },
    )
    held_out = np.array([identity_in_test(str(n), args.val_fraction, "identity-decoder-val")
                         for n in train.folder.identity])  # fmt: skip
    fit, val = np.flatnonzero(~held_out), np.flatnonzero(held_out)
    flipped = None if args.no_flip else mirrored_templates(loss, train.crops[fit])
    for weight in weights:
        run(
            f"identity_{weight:g}" if weight > 0 else "l1_flip_early_stopping",
            lambda cb, w=weight: train_decoder(
                train.raw[fit], train.crops[fit], config, progress=False,
                identity_weight=w, flipped_templates=flipped,
                identity_loss=dlib_identity_loss(jitter=args.jitter, blur=args.blur),
                validation=(train.raw[val], train.crops[val], None), on_epoch=cb,
            ),
            {
                "identity_weight": weight, "jitter": args.jitter, "blur": args.blur,
                "flip": flipped is not None, "early_stopping": True,
                "train_photos": len(fit), "validation_photos": len(val),
                "validation_people": len(np.unique(train.folder.identity[val])),
            },
        )  # fmt: skip

    base = decoders["l1_only"]
    for d in decoders.values():
        d["train_seconds_vs_l1_only"] = round(d["train_seconds"] / base["train_seconds"], 2)  # type: ignore[operator]
        d["accepted_other_photo_vs_l1_only"] = (
            d["type_ii"]["accepted_other_photo"]
            / max(base["type_ii"]["accepted_other_photo"], 1e-9)  # type: ignore[index]
        )
    figures["seconds"] = round(time.perf_counter() - t_start, 1)
    save()
    pct = "{:.2%}".format
    rows = [
        [label, pct(d["type_ii"]["accepted_other_photo"]), pct(d["type_ii"]["accepted_same_photo"]),
         pct(d["type_ii"]["false_accept"]), pct(d["type_i"]["accepted_other_photo"]),
         pct(d["type_i"]["accepted_same_photo"]), pct(d["type_i"]["false_accept"]),
         f"{d['type_ii']['ssim']:.3f}", d["train_seconds"]]
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
