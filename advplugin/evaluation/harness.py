"""`advplugin evaluate`: one harness measuring utility and every attack for any scheme.

Train and test folders hold different people. Everything the attacker learns (decoders,
maps, key-recovery pairs) comes from the train folder; everything is measured on the test
folder. Each run reports the scheme and the `none` baseline (raw embeddings) side by side.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from advplugin.adapters import create_extractor
from advplugin.evaluation import attacks
from advplugin.evaluation.data import generate_pairs, limit_images, list_images, restrict_pairs
from advplugin.evaluation.decoder import (
    DecoderConfig,
    apply_linear_map,
    apply_mlp_map,
    fit_linear_map,
    linear_fit_residual,
    reconstruct,
    train_decoder,
    train_mlp_map,
)
from advplugin.evaluation.faces import FaceSet, load_face_set, scorer_embeddings
from advplugin.evaluation.metrics import psnr, read_pairs, ssim
from advplugin.evaluation.report import write_report
from advplugin.keys import Key
from advplugin.protectors import create_protector
from advplugin.protectors.base import l2_normalize

FAR = 1e-3
QUICK_DECODER = DecoderConfig(size=64, widths=(32, 32, 16, 16, 8), epochs=2, batch_size=16)


@dataclass
class EvalConfig:
    scheme: str
    train_images: Path
    test_images: Path
    out: Path
    key: Key | None = None
    scheme_options: dict[str, object] = field(default_factory=dict)
    pairs: Path | None = None
    extractor: str = "dlib"
    scorer: Path | None = None
    scorer_mean: float = 0.0
    scorer_std: float = 1.0
    cache_dir: Path | None = None
    seed_embeddings: Path | None = None
    quick: bool = False
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    #: > 0: the decoders also keep identity (issue 15): + weight x (1 - cosine) between dlib's
    #: embedding of the reconstruction (its ResNet in torch) and the photo's raw embedding.
    #: 0 (default): the L1-only decoder of the committed reports.
    decoder_identity_weight: float = 0.0
    max_impostors: int = 5_000_000
    max_reconstructions: int = 3000
    mlp_epochs: int = 20
    seed: int = 0
    threads: int = 2
    progress: bool = True


class Stages:
    """Wall-clock seconds per stage, reported so that slow stages are visible."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._t, 2)
        self._t = now


def run_evaluation(config: EvalConfig) -> dict[str, object]:
    """Run every measurement and write the report; torch's thread count is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _run(config)
    finally:
        torch.set_num_threads(before)


def _run(config: EvalConfig) -> dict[str, object]:
    rng = np.random.default_rng(config.seed)
    stages = Stages()
    if config.quick:
        config = replace(config, decoder=QUICK_DECODER, max_impostors=200_000, mlp_epochs=10)
    train_folder, test_folder = list_images(config.train_images), list_images(config.test_images)
    if config.quick:
        train_folder = limit_images(train_folder, max_identities=16, max_per_identity=4)
        test_folder = limit_images(test_folder, max_identities=12, max_per_identity=4)
    shared = set(train_folder.identity) & set(test_folder.identity)
    if shared:
        raise ValueError(
            f"train and test folders share {len(shared)} identities; attacks must be trained "
            "on other people (use `advplugin evaluate-split`)"
        )
    extractor = create_extractor(config.extractor)
    scorer = None
    if config.scorer is not None:
        scorer = create_extractor(
            "onnx",
            model_path=config.scorer,
            mean=config.scorer_mean,
            std=config.scorer_std,
            threads=config.threads,
        )
    load = {
        "crop_size": config.decoder.size,
        "scorer": scorer,
        "cache_dir": config.cache_dir,
        "seed_file": config.seed_embeddings,
        "progress": config.progress,
    }
    train = load_face_set(train_folder, extractor, **load)  # type: ignore[arg-type]
    test = load_face_set(test_folder, extractor, **load)  # type: ignore[arg-type]
    stages.done("embeddings and alignment")

    if config.pairs is not None:
        protocol = restrict_pairs(read_pairs(str(config.pairs)), set(map(str, test.folder.path)))
        pairs_source = f"{config.pairs} (pairs with both images in the test folder)"
    else:
        protocol = generate_pairs(test.folder, per_fold=300, seed=config.seed)
        pairs_source = "generated in LFW's format from the test folder (10 identity-disjoint folds)"

    ephemeral = config.key is None
    key = config.key or Key.generate()
    dim = extractor.dim
    scheme = create_protector(config.scheme, key=key, dim=dim, **config.scheme_options)
    baseline = create_protector("none", dim=dim)
    second = create_protector(config.scheme, key=Key.generate(), dim=dim, **config.scheme_options)

    # The attacker knows the raw embeddings of its own (train) photos: dlib is public.
    identity: dict[str, object] = (
        {"identity_weight": config.decoder_identity_weight, "identity_targets": train.raw}
        if config.decoder_identity_weight > 0 else {}
    )
    decoder_raw = train_decoder(
        train.raw, train.crops, config.decoder, desc="decoder on raw", progress=config.progress, **identity  # type: ignore[arg-type]
    )
    stages.done("decoder on raw embeddings")
    attacked, other = attacks.reconstruction_pairs(
        test.folder.identity, config.max_reconstructions, rng
    )
    judge = _Judge(scorer, test, attacked, other, rng, config.max_impostors)
    raw_recon = reconstruct(decoder_raw, test.raw[attacked])
    attack_on_raw = judge(raw_recon)
    mean_face = np.repeat(train.crops.mean(0, keepdims=True), len(attacked), 0)
    reference = {
        "mean_face_ssim": float(ssim(test.crops[attacked], mean_face).mean()),
        "mean_face_psnr": float(psnr(test.crops[attacked], mean_face).mean()),
    }
    stages.done("reconstruction from raw")

    rows: dict[str, dict[str, object]] = {}
    _, first_of_person = np.unique(test.folder.identity[attacked], return_index=True)
    shown = np.sort(first_of_person)[:8]  # eight different people
    figures: dict[str, np.ndarray] = {
        "original photo": test.crops[attacked[shown]],
        "from raw embedding": raw_recon[shown],
    }
    pairs_to_try = _key_recovery_sizes(dim, len(train.raw))
    plans = [("none", baseline, baseline)]
    if config.scheme != "none":
        plans.append((config.scheme, scheme, second))
    for label, protector, protector2 in plans:
        row: dict[str, object] = {
            "metadata": protector.metadata.as_dict(),
            "protects": protector.protects,
            "accuracy_tolerance": protector.accuracy_tolerance,
        }
        t_train, t_test = protector.protect(train.raw), protector.protect(test.raw)
        row["utility"] = attacks.utility(
            protector.score,
            t_test,
            test.folder.identity,
            test.folder.path,
            protocol,
            max_impostors=config.max_impostors,
            rng=rng,
        )
        stages.done(f"{label}: utility")
        naive = reconstruct(decoder_raw, t_test[attacked]) if t_test.shape[1] == dim else None
        if protector.protects:
            decoder_adaptive = train_decoder(
                t_train,
                train.crops,
                config.decoder,
                desc=f"adaptive decoder ({label})",
                progress=config.progress,
                **identity,  # type: ignore[arg-type]
            )
            adaptive = reconstruct(decoder_adaptive, t_test[attacked])
        else:  # templates are the raw embeddings: the adaptive attacker is the naive one
            adaptive = raw_recon
        row["reconstruction"] = {
            "naive": judge(naive) if naive is not None else None,
            "adaptive": judge(adaptive),
        }
        if protector.protects:  # the baseline's rows would repeat the raw row
            # The same eight people as the "original photo" row.
            figures[f"{label} naive"] = (
                naive[shown] if naive is not None else np.zeros_like(raw_recon[shown])
            )
            figures[f"{label} adaptive"] = adaptive[shown]
        stages.done(f"{label}: reconstruction attacks")
        probes, _ = attacks.leak_probes(test.folder.identity)
        linear = fit_linear_map(t_train, train.raw)
        mlp = train_mlp_map(
            t_train, train.raw, epochs=config.mlp_epochs, seed=config.seed, progress=config.progress
        )
        row["identification"] = {
            "naive": attacks.identification_rate(t_test[probes], test.raw, test.folder.identity),
            "linear_map": attacks.identification_rate(
                apply_linear_map(linear, t_test[probes]), test.raw, test.folder.identity
            ),
            "mlp_map": attacks.identification_rate(
                apply_mlp_map(mlp, t_test[probes]), test.raw, test.folder.identity
            ),
            "probes": len(probes),
            "identities": len(np.unique(test.folder.identity)),
        }
        stages.done(f"{label}: identification attacks")
        row["unlinkability"] = attacks.unlinkability(
            protector.score,
            t_test,
            protector2.protect(test.raw),
            test.folder.identity,
            max_impostors=min(config.max_impostors, 1_000_000),
            rng=rng,
        )
        row["key_recovery"] = {
            "linear_residual": linear_fit_residual(t_train, train.raw),
            "sweep": attacks.key_recovery(
                t_train, train.raw, t_test, test.raw, test.folder.identity, pairs_to_try, rng
            ),
        }
        stages.done(f"{label}: unlinkability and key recovery")
        rows[label] = row

    report: dict[str, object] = {
        "scheme": config.scheme,
        "scheme_options": config.scheme_options,
        "key": "ephemeral (generated for this run)" if ephemeral else f"key id {key.key_id}",
        "extractor": extractor.description,
        "scorer": scorer.description if scorer is not None else None,
        "quick": config.quick,
        "data": {
            "train_folder": str(config.train_images),
            "test_folder": str(config.test_images),
            "train_images": len(train.raw),
            "train_identities": len(np.unique(train.folder.identity)),
            "test_images": len(test.raw),
            "test_identities": len(np.unique(test.folder.identity)),
            "test_detected": float(test.detected.mean()),
            "pairs": pairs_source,
        },
        "decoder": {
            "architecture": "NbNet-style: FC to 4x4, stride-2 transposed convolutions, L1 loss"
            + (f" + {config.decoder_identity_weight:g} x identity loss (dlib's ResNet in torch)"
               if config.decoder_identity_weight > 0 else ""),
            **{k: v for k, v in config.decoder.__dict__.items()},
        },
        "far": FAR,
        "reconstruction_on_raw": attack_on_raw,
        "reconstruction_reference": reference,
        "scorer_on_real_photos": judge.real_photos,
        "rows": rows,
        "seconds": stages.seconds,
    }
    config.out.mkdir(parents=True, exist_ok=True)
    write_report(report, figures, config.out)
    stages.done("report")
    report["seconds"] = stages.seconds
    (config.out / "report.json").write_text(json.dumps(report, indent=2, default=_jsonable))
    return report


def _jsonable(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to the report")


def _key_recovery_sizes(dim: int, available: int) -> list[int]:
    sizes = sorted({max(2, int(dim * f)) for f in (0.125, 0.25, 0.5, 0.75, 1, 1.5, 2, 4, 8)})
    return [n for n in sizes if n <= available]


class _Judge:
    """Scores reconstructions: accepted as the right person by the independent scorer (against
    another real photo of that person) at its FAR threshold on real photos; SSIM and PSNR
    against the attacked photo's aligned crop."""

    def __init__(
        self,
        scorer: object | None,
        test: FaceSet,
        attacked: np.ndarray,
        other: np.ndarray,
        rng: np.random.Generator,
        max_impostors: int,
    ) -> None:
        self.scorer, self.test, self.attacked, self.other = scorer, test, attacked, other
        self.real_photos: dict[str, float] | None = None
        if scorer is not None and test.scorer is not None:
            self.threshold, tar = attacks.scorer_threshold(
                test.scorer, test.folder.identity, FAR, rng, max_impostors
            )
            # Impostor references for the reconstructions' own false-accept rate.
            ids = test.folder.identity
            self.impostor = np.array(
                [rng.choice(np.flatnonzero(ids != ids[a])) for a in attacked], np.int64
            )
            self.real_photos = {"threshold": self.threshold, "tar_at_far": tar}

    def __call__(self, images: np.ndarray) -> dict[str, float]:
        originals = self.test.crops[self.attacked]
        out: dict[str, float] = {
            "images": len(images),
            "ssim": float(ssim(originals, images).mean()),
            "psnr": float(psnr(originals, images).mean()),
        }
        if self.real_photos is not None and self.test.scorer is not None:
            emb = l2_normalize(scorer_embeddings(self.scorer, images))  # type: ignore[arg-type]
            ref = self.test.scorer
            other = np.sum(emb * l2_normalize(ref[self.other]), axis=1)
            same = np.sum(emb * l2_normalize(ref[self.attacked]), axis=1)
            wrong = np.sum(emb * l2_normalize(ref[self.impostor]), axis=1)
            out["accepted_other_photo"] = float((other > self.threshold).mean())
            out["accepted_same_photo"] = float((same > self.threshold).mean())
            out["false_accept"] = float((wrong > self.threshold).mean())
        return out
