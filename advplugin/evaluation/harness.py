"""`advplugin evaluate`: one harness measuring utility and every attack for any scheme.

Train and test folders hold different people. Everything the attacker learns (decoders,
maps, key-recovery pairs) comes from the train folder; everything is measured on the test
folder. Each run reports every scheme asked for (`SchemeSpec`s, e.g. `xnn`, `advface`,
`advface:version=2`) and the `none` baseline (raw embeddings) side by side, in ISO/IEC
30136 terms: success attack rates at FMR 1e-3 and 1e-2, reconstructions judged type I (by
dlib, the system under attack) and type II (by an independent scorer). The reconstruction
attacker is issue 15's (`reconstruction.AttackRecipe`: identity loss through dlib, flip
augmentation re-embedded, early stopping); report.json is rewritten after every scheme row,
so a run stopped early leaves a partial report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from advplugin.adapters import create_extractor
from advplugin.evaluation import attacks
from advplugin.evaluation.data import generate_pairs, limit_images, list_images, restrict_pairs
from advplugin.evaluation.decoder import (
    Decoder,
    DecoderConfig,
    apply_linear_map,
    apply_mlp_map,
    fit_linear_map,
    linear_fit_residual,
    reconstruct,
    train_mlp_map,
)
from advplugin.evaluation.faces import FaceSet, load_face_set, scorer_embeddings
from advplugin.evaluation.metrics import psnr, read_pairs, ssim
from advplugin.evaluation.reconstruction import (
    FARS,
    AttackRecipe,
    ChipScorer,
    JudgeScorer,
    ReconstructionJudge,
    far_key,
    mirrored_embeddings,
    other_photo,
    train_attack_decoder,
)
from advplugin.evaluation.report import render_from_json, write_oracle_section, write_report
from advplugin.evaluation.score_oracle import ApiClient, run_api_client_threat
from advplugin.keys import Key
from advplugin.protectors import create_protector

FAR = FARS[0]
logger = logging.getLogger(__name__)
#: Extractors whose network the torch port of dlib's ResNet is: the only ones a type-I judge
#: and the identity loss through dlib apply to.
DLIB_EXTRACTORS = ("dlib", "dlib-torch")
QUICK_DECODER = DecoderConfig(size=64, widths=(32, 32, 16, 16, 8), epochs=2, batch_size=16)
#: The API client's query counts under `--quick` (the full run: `score_oracle.QUERY_COUNTS`).
QUICK_QUERY_COUNTS = (20, 50, 100)
#: Bump when what a cached decoder on raw embeddings depends on changes without showing in
#: its key (the training code itself).
DECODER_CACHE_VERSION = 1


@dataclass(frozen=True)
class SchemeSpec:
    """A scheme row of the report: registered name, its options, and the row's label
    (`advface` and `advface:version=2` can stand side by side)."""

    name: str
    options: dict[str, object] = field(default_factory=dict)
    label: str = ""

    def __post_init__(self) -> None:
        if not self.label:
            extra = ",".join(f"{k}={v}" for k, v in self.options.items())
            object.__setattr__(self, "label", self.name + (f":{extra}" if extra else ""))


@dataclass
class EvalConfig:
    #: the schemes attacked, each a row beside the `none` baseline (always first).
    schemes: list[SchemeSpec]
    train_images: Path
    test_images: Path
    out: Path
    key: Key | None = None
    pairs: Path | None = None
    extractor: str = "dlib"
    scorer: Path | None = None
    scorer_mean: float = 0.0
    scorer_std: float = 1.0
    cache_dir: Path | None = None
    seed_embeddings: Path | None = None
    quick: bool = False
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    #: how the reconstruction attacker trains (issue 15's strong attacker by default;
    #: `AttackRecipe.l1_only()` reproduces the committed reports' L1 decoder).
    recipe: AttackRecipe = field(default_factory=AttackRecipe)
    max_impostors: int = 5_000_000
    max_reconstructions: int = 3000
    mlp_epochs: int = 20
    seed: int = 0
    threads: int = 2
    progress: bool = True
    #: the command line that ran this evaluation, quoted in the report (regeneration).
    command: str | None = None
    #: the API client's threat (issue 21), run when given: a service the attacker queries
    #: (`score_oracle.ApiClient`, injected, since evaluation imports no service; the CLI's
    #: `--api-client` passes the real app in process). Its result is `score_oracle`.
    api_client: ApiClient | None = None
    #: that threat's query counts (None: `score_oracle.QUERY_COUNTS`; --quick: the quick ones).
    api_client_queries: tuple[int, ...] | None = None


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


@dataclass
class _Shared:
    """What every threat shares: the face sets, the judges' thresholds and the decoder
    trained on raw embeddings of the train people (`_prepare`)."""

    train: FaceSet
    test: FaceSet
    extractor: object
    scorer: object | None
    chip: ChipScorer | None
    mirrored_raw: np.ndarray | None
    decoder_for: Callable[[Callable[[np.ndarray], np.ndarray], str], object]
    decoder_raw: object
    attacked: np.ndarray
    other: np.ndarray
    judge: ReconstructionJudge
    system_thresholds: dict[str, float]


def _quick(config: EvalConfig) -> EvalConfig:
    if config.quick:
        return replace(config, decoder=QUICK_DECODER, max_impostors=200_000, mlp_epochs=10)
    return config


def _prepare(config: EvalConfig, rng: np.random.Generator, stages: Stages) -> _Shared:
    """Face sets, the decoder on raw embeddings, the judges and dlib's system thresholds, in
    the order (and with the draws from `rng`) of every run, so that a run of one threat
    (`run_api_client_only`) gets the full run's numbers."""
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
    dlib_family = config.extractor in DLIB_EXTRACTORS
    if config.recipe.needs_dlib_torch and not dlib_family:
        raise ValueError(
            f"the identity loss and flip re-embedding run dlib's ResNet; extractor "
            f"{config.extractor!r} needs `--decoder-identity-weight 0` (the L1-only decoder)"
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

    chip = ChipScorer() if dlib_family else None
    # The attacker knows the raw embeddings of its own (train) photos, mirrored ones too:
    # dlib is public.
    mirrored_raw = mirrored_embeddings(chip, train.crops) if config.recipe.flip and chip else None
    stages.done("mirrored train photos embedded")

    def decoder_for(protect: Callable[[np.ndarray], np.ndarray], desc: str) -> object:
        return train_attack_decoder(
            protect(train.raw),
            train.raw,
            train.crops,
            train.folder.identity,
            config.decoder,
            config.recipe,
            mirrored_templates=None if mirrored_raw is None else protect(mirrored_raw),
            mirrored_raw=mirrored_raw,
            desc=desc,
            progress=config.progress,
        )

    baseline = create_protector("none", dim=extractor.dim)  # templates = raw embeddings
    decoder_raw = _cached_decoder_on_raw(config, train, mirrored_raw, decoder_for, baseline.protect)
    stages.done("decoder on raw embeddings")
    attacked, other = attacks.reconstruction_pairs(
        test.folder.identity, config.max_reconstructions, rng
    )
    judges: list[JudgeScorer] = []
    if chip is not None:  # type I: the system under attack, dlib itself
        judges.append(JudgeScorer("type_i", lambda c: scorer_embeddings(chip, c), test.raw))  # type: ignore[arg-type]
    if scorer is not None and test.scorer is not None:  # type II: an independent model
        judges.append(JudgeScorer("type_ii", lambda c: scorer_embeddings(scorer, c), test.scorer))
    judge = ReconstructionJudge(
        test.crops, test.folder.identity, attacked, other, judges, rng, config.max_impostors
    )
    # dlib's own thresholds on real test pairs: where a template-inversion attack's estimate
    # of the raw embedding must land to be accepted (type I for the map attacks).
    system_thresholds = {
        far_key(far): attacks.scorer_threshold(
            test.raw, test.folder.identity, far, rng, config.max_impostors
        )[0]
        for far in FARS
    }
    return _Shared(
        train, test, extractor, scorer, chip, mirrored_raw, decoder_for, decoder_raw,
        attacked, other, judge, system_thresholds,
    )  # fmt: skip


def _cached_decoder_on_raw(
    config: EvalConfig,
    train: FaceSet,
    mirrored_raw: np.ndarray | None,
    decoder_for: Callable[[Callable[[np.ndarray], np.ndarray], str], object],
    protect: Callable[[np.ndarray], np.ndarray],
) -> object:
    """The decoder on raw embeddings, trained once per set of inputs: its weights are kept in
    the content-hash cache (`decoders/raw-<sha256>.pt`), keyed by the train photos' raw
    embeddings, crops, mirrored embeddings and names, the decoder's config and recipe,
    torch's version and thread count (results differ in the last bits across thread counts)
    and `DECODER_CACHE_VERSION`. Without a cache folder it is trained every time."""
    if config.cache_dir is None:
        return decoder_for(protect, "decoder on raw")
    h = hashlib.sha256()
    for array in (train.raw, train.crops, mirrored_raw):
        if array is not None:
            h.update(np.ascontiguousarray(array).tobytes())
    h.update("\n".join(map(str, train.folder.identity)).encode())
    recipe = (config.decoder, config.recipe, torch.__version__, torch.get_num_threads())
    h.update(repr((*recipe, DECODER_CACHE_VERSION)).encode())
    path = Path(config.cache_dir) / "decoders" / f"raw-{h.hexdigest()[:32]}.pt"
    if path.exists():
        model = Decoder(train.raw.shape[1], config.decoder)
        model.load_state_dict(torch.load(path, weights_only=True))
        model.eval()
        logger.info("decoder on raw embeddings loaded from %s", path)
        return model
    model = decoder_for(protect, "decoder on raw")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".part")
    torch.save(model.state_dict(), partial)  # type: ignore[attr-defined]
    partial.replace(path)
    return model


def _run(config: EvalConfig) -> dict[str, object]:
    rng = np.random.default_rng(config.seed)
    stages = Stages()
    config = _quick(config)
    labels = [spec.label for spec in config.schemes]
    if "none" in labels or len(set(labels)) != len(labels):
        raise ValueError(f"scheme rows must be distinct and not `none` (always added): {labels}")
    shared = _prepare(config, rng, stages)
    train, test, extractor, scorer = shared.train, shared.test, shared.extractor, shared.scorer
    decoder_for, decoder_raw, judge = shared.decoder_for, shared.decoder_raw, shared.judge
    attacked, system_thresholds = shared.attacked, shared.system_thresholds

    if config.pairs is not None:
        protocol = restrict_pairs(read_pairs(str(config.pairs)), set(map(str, test.folder.path)))
        pairs_source = f"{config.pairs} (pairs with both images in the test folder)"
    else:
        protocol = generate_pairs(test.folder, per_fold=300, seed=config.seed)
        pairs_source = "generated in LFW's format from the test folder (10 identity-disjoint folds)"

    ephemeral = config.key is None
    key = config.key or Key.generate()
    dim = extractor.dim  # type: ignore[attr-defined]
    baseline = create_protector("none", dim=dim)
    plans = [("none", baseline, baseline)] + [
        (
            spec.label,
            create_protector(spec.name, key=key, dim=dim, **spec.options),
            create_protector(spec.name, key=Key.generate(), dim=dim, **spec.options),
        )
        for spec in config.schemes
    ]
    raw_recon = reconstruct(decoder_raw, test.raw[attacked])  # type: ignore[arg-type]
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
    probes, _ = attacks.leak_probes(test.folder.identity)
    probe_other = other_photo(test.folder.identity, probes)
    report: dict[str, object] = {
        "command": config.command,
        "schemes": labels,
        "scheme_specs": [
            {"label": s.label, "name": s.name, "options": s.options} for s in config.schemes
        ],
        "key": "ephemeral (generated for this run)" if ephemeral else f"key id {key.key_id}",
        "extractor": extractor.description,  # type: ignore[attr-defined]
        "scorer": scorer.description if scorer is not None else None,  # type: ignore[attr-defined]
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
            "architecture": "NbNet-style: FC to 4x4, stride-2 transposed convolutions, "
            + config.recipe.description,
            "recipe": config.recipe.__dict__,
            **{k: v for k, v in config.decoder.__dict__.items()},
        },
        "far": FAR,
        "fars": list(FARS),
        "system_thresholds": system_thresholds,
        "reconstruction_on_raw": attack_on_raw,
        "reconstruction_reference": reference,
        "judges_on_real_photos": judge.real_photos,
        "rows": rows,
        "seconds": stages.seconds,
    }
    config.out.mkdir(parents=True, exist_ok=True)
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
        naive = (
            reconstruct(decoder_raw, t_test[attacked]) if t_test.shape[1] == dim else None  # type: ignore[arg-type]
        )
        if protector.protects:
            decoder_adaptive = decoder_for(protector.protect, f"adaptive decoder ({label})")
            adaptive = reconstruct(decoder_adaptive, t_test[attacked])  # type: ignore[arg-type]
        else:  # templates are the raw embeddings: the adaptive attacker is the naive one
            adaptive = raw_recon
        row["reconstruction"] = {  # the baseline's are the raw row: not judged again
            "naive": (judge(naive) if protector.protects else attack_on_raw)
            if naive is not None
            else None,
            "adaptive": judge(adaptive) if protector.protects else attack_on_raw,
        }
        if protector.protects:  # the baseline's rows would repeat the raw row
            # The same eight people as the "original photo" row.
            figures[f"{label} naive"] = (
                naive[shown] if naive is not None else np.zeros_like(raw_recon[shown])
            )
            figures[f"{label} adaptive"] = adaptive[shown]
        stages.done(f"{label}: reconstruction attacks")
        linear = fit_linear_map(t_train, train.raw)
        mlp = train_mlp_map(
            t_train, train.raw, epochs=config.mlp_epochs, seed=config.seed, progress=config.progress
        )
        estimates = {
            "naive": t_test[probes],
            "linear_map": apply_linear_map(linear, t_test[probes]),
            "mlp_map": apply_mlp_map(mlp, t_test[probes]),
        }
        row["identification"] = {
            **{
                name: attacks.identification_rate(est, test.raw, test.folder.identity)
                for name, est in estimates.items()
            },
            # Type-I success rate of the estimates: accepted by dlib's threshold against
            # another photo of the person.
            "verification": {
                name: attacks.verification_success(est, test.raw[probe_other], system_thresholds)
                for name, est in estimates.items()
            },
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
        # A partial report after every row: a long run that is stopped still leaves one.
        report["pending"] = [lb for lb, _, _ in plans if lb not in rows]
        _write(report, figures, config.out)
    if config.api_client is not None:
        report["score_oracle"] = _api_client_threat(config, shared)
        stages.done("API client (score oracle)")
    stages.done("report")
    _write(report, figures, config.out)
    return report


def _api_client_threat(config: EvalConfig, shared: _Shared) -> dict[str, object]:
    """Issue 21's API client against `config.api_client`: the first photo of every test
    person enrolled (a real gallery of people no attacker was trained on), their other photos
    the search set and the cameras' probes, the train people's photos the attacker's probes
    (augmented to the largest query count); recovered embeddings decoded by the decoder on
    raw embeddings and re-embedded by dlib, judged at dlib's system threshold at FMR 1e-3."""
    assert config.api_client is not None
    test, train = shared.test, shared.train
    enrolled: dict[str, np.ndarray] = {}
    others: dict[str, list[np.ndarray]] = {}
    for name, vector in zip(test.folder.identity, test.raw, strict=True):
        if str(name) in enrolled:
            others[str(name)].append(vector)
        else:
            enrolled[str(name)], others[str(name)] = vector, []
    other_photos = {s: np.stack(v) for s, v in others.items() if v}
    options: dict[str, object] = {"seed": config.seed}
    counts = config.api_client_queries or (QUICK_QUERY_COUNTS if config.quick else None)
    if counts is not None:
        options["query_counts"] = tuple(counts)
    chip = shared.chip
    if chip is not None:
        decoder = shared.decoder_raw

        def again(embeddings: np.ndarray) -> np.ndarray:
            faces = reconstruct(decoder, embeddings)  # type: ignore[arg-type]
            return scorer_embeddings(chip, faces)  # type: ignore[arg-type]

        options["reconstruct"] = again
        options["reconstruction_threshold"] = shared.system_thresholds[far_key(FAR)]
    result = run_api_client_threat(config.api_client, train.raw, enrolled, other_photos, **options)
    result["reconstruction_by"] = (
        "the harness's decoder on raw embeddings (issue 15's recipe, trained on the train "
        "people), re-embedded by dlib's ResNet in torch (type I), at dlib's system threshold "
        "at FMR 1e-3 on real test pairs"
        if chip is not None
        else None
    )
    result["command"] = config.command
    return result


def run_api_client_only(config: EvalConfig) -> dict[str, object]:
    """The API client's threat alone (`advplugin evaluate --threats api-client`): the shared
    parts it needs are computed as a full run computes them (face sets, the decoder on raw
    embeddings with the same recipe and seed, dlib's system thresholds), the threat is run,
    and its result is written to `config.out`'s report.json under `score_oracle`, merged
    into a report already there (which is re-rendered: report.md and figures); without one,
    report.json holds the result alone and report.md its section."""
    if config.api_client is None:
        raise ValueError("the API client's threat needs an api_client (`--api-client`)")
    before = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        rng = np.random.default_rng(config.seed)
        stages = Stages()
        config = _quick(config)
        shared = _prepare(config, rng, stages)
        stages.done("judges and system thresholds")
        # The full run's "reconstruction from raw" row, from this run's decoder: equal to the
        # report's when the decoder is the same (a check that these are the harness's numbers).
        check = shared.judge(reconstruct(shared.decoder_raw, shared.test.raw[shared.attacked]))  # type: ignore[arg-type]
        stages.done("decoder check: reconstruction from raw")
        result = _api_client_threat(config, shared)
        result["decoder_check"] = {
            "reconstruction_on_raw": check,
            "system_thresholds": shared.system_thresholds,
        }
        stages.done("API client (score oracle)")
        result["seconds"] = stages.seconds
    finally:
        torch.set_num_threads(before)
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    report["score_oracle"] = result
    path.write_text(json.dumps(report, indent=2, default=_jsonable))
    report = json.loads(path.read_text())
    if "rows" in report:
        render_from_json(report, out)
    else:
        text = write_oracle_section(report["score_oracle"], out)
        (out / "report.md").write_text(f"# Evaluation report: the API client's threat\n\n{text}\n")
    return report


def _write(report: dict[str, object], figures: dict[str, np.ndarray], out: Path) -> None:
    """report.json first: the markdown and figures can be rendered again from it
    (`report.render_from_json`), the reconstructions figure only from this run."""
    (out / "report.json").write_text(json.dumps(report, indent=2, default=_jsonable))
    try:
        write_report(json.loads((out / "report.json").read_text()), figures, out)
    except Exception as error:  # the numbers are saved; a figure must not lose them
        logger.warning("report.md/figures not written (%s); report.json is complete", error)


def _jsonable(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to the report")


def _key_recovery_sizes(dim: int, available: int) -> list[int]:
    sizes = sorted({max(2, int(dim * f)) for f in (0.125, 0.25, 0.5, 0.75, 1, 1.5, 2, 4, 8)})
    return [n for n in sizes if n <= available]
