"""`report.md` and the PNG figures of an evaluation run (numbers come from `report.json`)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def _pct(x: object) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{100 * float(x):.2f} %"  # type: ignore[arg-type]


def _num(x: object, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{float(x):.{digits}f}"  # type: ignore[arg-type]


def _margin(rate: float, n: int) -> float:
    """rate + 3 binomial standard deviations: what chance alone can reach on n trials."""
    return rate + 3 * math.sqrt(rate * (1 - rate) / max(n, 1))


def _met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "**no**")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return [*lines, ""]


def render_markdown(report: dict) -> str:
    rows: dict[str, dict] = report["rows"]
    far = report["far"]
    data = report["data"]
    scorer = report["scorer"]
    out = [
        f"# Evaluation: scheme `{report['scheme']}` against the `none` baseline",
        "",
        f"- extractor attacked: `{report['extractor']['name']}` {report['extractor']['version']} "
        f"({report['extractor']['dim']}-d); key: {report['key']}",
        f"- data: train {data['train_images']} images / {data['train_identities']} people, "
        f"test {data['test_images']} images / {data['test_identities']} people (disjoint people); "
        f"verification pairs {data['pairs']}",
        "- independent scorer for reconstructions: "
        + (
            f"`{scorer['version']}` ({scorer['dim']}-d, cosine); on real test photos its threshold at "
            f"FAR {far:g} is {_num(report['scorer_on_real_photos']['threshold'])} and its TAR there "
            f"{_pct(report['scorer_on_real_photos']['tar_at_far'])}, the ceiling for any reconstruction"
            if scorer
            else "none given (`--scorer`): reconstructions judged by SSIM/PSNR only"
        ),
        f"- decoder: {report['decoder']['architecture']}, {report['decoder']['size']}x"
        f"{report['decoder']['size']} RGB, widths {report['decoder']['widths']}, "
        f"{report['decoder']['epochs']} epochs"
        + (" (**--quick**: tiny data and decoder)" if report["quick"] else ""),
        "",
        "## Utility (raw = `none` row)",
        "",
    ]
    base = rows["none"]["utility"]
    util_rows = []
    for label, row in rows.items():
        u = row["utility"]
        drop = base["verification_accuracy"] - u["verification_accuracy"]
        tol = float(row["accuracy_tolerance"])
        baseline = label == "none"
        util_rows.append(
            [
                f"`{label}`",
                f"{_pct(u['verification_accuracy'])} ± {_pct(u['verification_accuracy_std'])}",
                _pct(drop),
                _pct(u["tar_at_far_1e-3"]),
                _pct(u["tar_at_far_1e-4"]),
                _pct(u["rank1"]),
                "baseline" if baseline else f"drop ≤ {_pct(tol)} (scheme tolerance)",
                _met(None if baseline else drop <= tol + 1e-12),
            ]
        )
    out += _table(
        [
            "scheme",
            "10-fold accuracy",
            "drop vs raw",
            "TAR@FAR 1e-3",
            "TAR@FAR 1e-4",
            "rank-1",
            "goal",
            "met",
        ],
        util_rows,
    )
    u = base
    out += [
        f"Pairs: {u['pairs']}; TAR over {u['genuine_pairs']} genuine and {u['impostor_pairs']} impostor "
        f"pairs; rank-1 with {u['rank1_gallery']} gallery photos (first of each person, the rest "
        f"distractors) and {u['rank1_probes']} probes. ![ROC](roc.png)",
        "",
        "## Reconstruction attacks",
        "",
        f"A decoder trained on the train people's raw embeddings reconstructs the test people's "
        f"faces. *accepted* = the independent scorer accepts the reconstruction as the right person at "
        f"FAR {far:g} against **another** photo of that person (same photo in brackets); *false "
        f"accept* = against a photo of someone else. Goal for a protecting scheme: no better than "
        f"chance (accepted at most FAR + 3 sd).",
        "",
    ]
    raw = report["reconstruction_on_raw"]
    ref = report["reconstruction_reference"]
    rec_rows = [
        [
            "raw embeddings (attack works?)",
            *_rec_cells(raw),
            "far above FAR",
            _met(_above(raw, far)),
        ]
    ]
    for label, row in rows.items():
        for kind in ("naive", "adaptive"):
            r = row["reconstruction"][kind]
            if r is None:
                rec_rows.append(
                    [f"`{label}` {kind}", "n/a", "", "", "", "", "dimension differs", "n/a"]
                )
                continue
            goal_ok = None if not row["protects"] else _at_chance(r, far)
            rec_rows.append(
                [
                    f"`{label}` {kind}",
                    *_rec_cells(r),
                    "≤ chance" if row["protects"] else "baseline",
                    _met(goal_ok),
                ]
            )
    out += _table(
        [
            "templates → decoder",
            "accepted (same photo)",
            "false accept",
            "SSIM",
            "PSNR dB",
            "images",
            "goal",
            "met",
        ],
        rec_rows,
    )
    out += [
        f"Reference: the train people's mean face scores SSIM {_num(ref['mean_face_ssim'])}, "
        f"PSNR {_num(ref['mean_face_psnr'], 2)} dB against the same photos; a reconstruction no closer "
        "than that carries no more than the average face. Adaptive = decoder trained on "
        "(train photo, protected template) pairs the attacker obtained by enrolling photos "
        "through the black-box API (same key as the leaked gallery).",
        "",
        "![reconstructions](reconstructions.png)",
        "",
        "## Identification of leaked templates",
        "",
        "Rank-1 of each test person's leaked template (first photo) among raw embeddings of all "
        "other test photos; naive = direct comparison, maps learned from black-box train pairs.",
        "",
    ]
    id_rows = []
    for label, row in rows.items():
        i = row["identification"]
        chance = 1.0 / i["identities"]
        limit = _margin(chance, i["probes"])
        worst = max(
            (v for v in (i["naive"], i["linear_map"], i["mlp_map"]) if not math.isnan(v)),
            default=0.0,
        )
        id_rows.append(
            [
                f"`{label}`",
                _pct(i["naive"]),
                _pct(i["linear_map"]),
                _pct(i["mlp_map"]),
                str(i["probes"]),
                f"≤ chance {_pct(chance)} (+3 sd: {_pct(limit)})"
                if row["protects"]
                else "baseline",
                _met(worst <= limit if row["protects"] else None),
            ]
        )
    out += _table(["scheme", "naive", "linear map", "MLP map", "probes", "goal", "met"], id_rows)
    out += [
        "## Unlinkability across two keys",
        "",
        "D_sys of Gomez-Barrero et al. (TIFS 2018), ω = 1: 0 = unlinkable, 1 = fully linkable. "
        "Mated = two different photos of one person under two keys; non-mated = two people.",
        "",
    ]
    link_rows = []
    for label, row in rows.items():
        ul = row["unlinkability"]
        link_rows.append(
            [
                f"`{label}`",
                _num(ul["d_sys"]),
                _num(ul["d_sys_floor"]),
                f"{_num(ul['d_sys_per_subject'])} ({_num(ul['d_sys_per_subject_floor'])})",
                _num(ul["maximal_linkability_per_subject"]),
                f"{ul['mated_mean']:+.4f} / {ul['non_mated_mean']:+.4f}",
                str(ul["mated_pairs"]),
                str(ul["non_mated_pairs"]),
                "< 0.05" if row["protects"] else "baseline",
                _met(ul["d_sys"] < 0.05 if row["protects"] else None),
            ]
        )
    out += _table(
        [
            "scheme",
            "D_sys",
            "estimator floor",
            "D_sys, each person equally (floor)",
            "maximal linkability, each person equally",
            "mean score mated / non-mated",
            "mated",
            "non-mated",
            "goal",
            "met",
        ],
        link_rows,
    )
    out += [
        "The floor is D_sys between two samples of one distribution (non-mated scores) at these "
        "sample counts: a D_sys above it is a real difference between mated and non-mated scores. "
        "Every mated pair counts once in D_sys, so a person with hundreds of photos dominates it; "
        "weighting each person equally (and maximal linkability, Otroshi Shahreza et al., TIFS "
        "2023) shows whether the linkage holds across people. The goal column judges the "
        "every-pair D_sys.",
        "",
    ]
    out += [
        "![unlinkability](unlinkability.png)",
        "",
        "## Key recovery (least squares from n known pairs)",
        "",
    ]
    kr_rows = []
    for label, row in rows.items():
        kr = row["key_recovery"]
        raw_rate = rows["none"]["identification"]["naive"]
        needed = next((s["pairs"] for s in kr["sweep"] if s["rank1"] >= 0.5 * raw_rate), None)
        kr_rows.append(
            [
                f"`{label}`",
                _num(kr["linear_residual"], 4),
                "yes" if kr["linear_residual"] < 1e-3 else "no",
                " / ".join(f"{s['pairs']}: {_pct(s['rank1'])}" for s in kr["sweep"]),
                str(needed) if needed is not None else "more than tried",
            ]
        )
    out += _table(
        [
            "scheme",
            "linear fit residual",
            "linear",
            "rank-1 after recovery (n: rate)",
            "n for half the raw rate",
        ],
        kr_rows,
    )
    out += [
        "A linear scheme is inverted by about `dim` known (raw, template) pairs; its defence is "
        "keeping the key and the black-box queries scarce, and renewing the key after a leak.",
        "",
        "![key recovery](key_recovery.png)",
        "",
        "## Running time (seconds per stage)",
        "",
    ]
    out += _table(["stage", "s"], [[k, f"{v:.1f}"] for k, v in report["seconds"].items()])
    return "\n".join(out)


def _rec_cells(r: dict) -> list[str]:
    if "accepted_other_photo" in r:
        acc = f"{_pct(r['accepted_other_photo'])} ({_pct(r['accepted_same_photo'])})"
        fa = _pct(r["false_accept"])
    else:
        acc, fa = "no scorer", "no scorer"
    return [acc, fa, _num(r["ssim"]), _num(r["psnr"], 2), str(r["images"])]


def _above(r: dict, far: float) -> bool | None:
    if "accepted_other_photo" not in r:
        return None
    return r["accepted_other_photo"] > _margin(far, r["images"])


def _at_chance(r: dict, far: float) -> bool | None:
    if "accepted_other_photo" not in r:
        return None
    return r["accepted_other_photo"] <= _margin(far, r["images"])


def write_report(report: dict, images: dict[str, np.ndarray], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: dict[str, dict] = report["rows"]
    fig, ax = plt.subplots(figsize=(5, 4))
    for label, row in rows.items():
        roc = row["utility"]["roc"]
        ax.semilogx(
            roc["far"],
            roc["tar"],
            label=f"{label} ({'raw' if label == 'none' else 'protected'})",
            linestyle="--" if label == "none" else "-",
        )
    ax.set(xlabel="false accept rate", ylabel="true accept rate", title="ROC on the test people")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=110)
    plt.close(fig)

    names = list(images)
    n = max(len(v) for v in images.values())
    fig, axes = plt.subplots(len(names), n, figsize=(1.2 * n, 1.3 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        for c in range(n):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(images[name]):
                ax.imshow(images[name][c])
        axes[r][0].set_title(name, fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(out / "reconstructions.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(rows), figsize=(4.5 * len(rows), 3.5), squeeze=False)
    for ax, (label, row) in zip(axes[0], rows.items(), strict=True):
        c = row["unlinkability"]["curve"]
        edges = np.array(c["edges"])
        ax.stairs(c["mated"], edges, label="mated", fill=True, alpha=0.5)
        ax.stairs(c["non_mated"], edges, label="non-mated", fill=True, alpha=0.5)
        twin = ax.twinx()
        twin.plot(c["score"], c["local"], color="k", lw=1, label="D↔(s)")
        twin.set_ylim(0, 1.05)
        ax.set(
            title=f"{label}: D_sys = {row['unlinkability']['d_sys']:.3f}",
            xlabel="score across keys",
        )
        ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "unlinkability.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    for label, row in rows.items():
        sweep = row["key_recovery"]["sweep"]
        ax.semilogx([s["pairs"] for s in sweep], [s["rank1"] for s in sweep], "o-", label=label)
    ax.set(
        xlabel="known (raw, template) pairs", ylabel="rank-1 after recovery", title="Key recovery"
    )
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "key_recovery.png", dpi=110)
    plt.close(fig)

    (out / "report.md").write_text(render_markdown(report))
