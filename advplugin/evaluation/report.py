"""`report.md` and the PNG figures of an evaluation run (numbers come from `report.json`)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from advplugin.evaluation.recipe import far_key


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


#: The earlier reports' reconstruction attacker, for the comparison the strong one must beat
#: (issue 15: "at least double"): type-II success rate from raw templates at FMR 1e-3 of the
#: L1-only decoder in the `xnn` report of commit fdc8808 (docs/evaluation/README.md).
L1_DECODER_RAW_TYPE_II = 0.0563

_JUDGES = {
    "type_i": ("type I", "dlib itself, the system under attack: its ResNet in torch on the "
               "reconstruction warped to dlib's chip, dlib's thresholds on real test pairs"),
    "type_ii": ("type II", "an independent recognition model, the scorer"),
}  # fmt: skip


def _fars(report: dict) -> list[str]:
    return [far_key(f) for f in report.get("fars", [report["far"]])]


def _sar_goal(protects: bool, far: str, n: int) -> tuple[str, float | None]:
    """The goal of a protecting scheme: no better than chance, FMR + 3 binomial sd."""
    if not protects:
        return "baseline", None
    limit = _margin(float(far), n)
    return f"≤ {_pct(limit)}", limit


def render_markdown(report: dict) -> str:
    rows: dict[str, dict] = report["rows"]
    data = report["data"]
    scorer = report["scorer"]
    fars = _fars(report)
    schemes = report.get("schemes") or [k for k in rows if k != "none"]
    judges = report.get("judges_on_real_photos", {})
    title = ", ".join(f"`{s}`" for s in schemes)
    out = [
        f"# Evaluation: {title} against the `none` baseline (ISO/IEC 30136 terms)",
        "",
    ]
    if report.get("pending"):
        out += [
            f"**Partial report**: rows still to come: {', '.join(map(str, report['pending']))}.",
            "",
        ]
    if report.get("command"):
        out += ["Regenerate:", "", "```bash", report["command"], "```", ""]
    out += [
        f"- extractor attacked: `{report['extractor']['name']}` {report['extractor']['version']} "
        f"({report['extractor']['dim']}-d); key: {report['key']}",
        f"- data: train {data['train_images']} images / {data['train_identities']} people, "
        f"test {data['test_images']} images / {data['test_identities']} people (disjoint people); "
        f"verification pairs {data['pairs']}",
        "- reconstructions judged "
        + "; ".join(
            f"**{_JUDGES[name][0]}** by {_JUDGES[name][1]}: "
            + ", ".join(
                f"threshold {_num(v['threshold'])} at FMR {k} (real photos' TAR there "
                f"{_pct(v['tar_at_far'])})"
                for k, v in by_far.items()
            )
            for name, by_far in judges.items()
        )
        + (f"; scorer `{scorer['version']}` ({scorer['dim']}-d)" if scorer else ""),
        f"- decoder: {report['decoder']['architecture']}, {report['decoder']['size']}x"
        f"{report['decoder']['size']} RGB, widths {report['decoder']['widths']}, "
        f"{report['decoder']['epochs']} epochs"
        + (" (**--quick**: tiny data and decoder)" if report["quick"] else ""),
        "- *success attack rate* (SAR, ISO/IEC 30136): the share of attacks whose output is "
        "accepted as the right person against **another** real photo of that person at the "
        "judge's threshold for the given false match rate (FMR); a protecting scheme's goal is "
        "chance: at most FMR + 3 binomial standard deviations over the attacks tried.",
        "",
    ]
    out += _summary(report, rows, fars)
    out += _utility(rows)
    out += _reconstruction(report, rows, fars)
    out += _inversion(report, rows, fars)
    out += _linkability(rows)
    out += _key_recovery(rows)
    if report.get("score_oracle"):
        out += oracle_markdown(report["score_oracle"])
    out += [
        "Known-pair curves (linear and MLP maps from n = 16 ... 1,024 enrolments), the attacker "
        "with no known pairs and linkability over several key pairs: "
        "`benchmarks/attack_curves.py`, tables in `docs/evaluation/README.md`.",
        "",
        "## Running time (seconds per stage)",
        "",
    ]
    out += _table(["stage", "s"], [[k, f"{v:.1f}"] for k, v in report["seconds"].items()])
    return "\n".join(out)


def _summary(report: dict, rows: dict[str, dict], fars: list[str]) -> list[str]:
    """One line per threat: is the goal met by each scheme (worst attack, both FMRs)?"""
    schemes = [k for k in rows if k != "none"]
    lines = ["## Summary: goal met per threat (worst attack, every FMR)", ""]
    body = []
    threats = [
        (f"reconstruction, {_JUDGES[j][0]}", j) for j in report.get("judges_on_real_photos", {})
    ]
    for name, judge in threats:
        cells = []
        for label in schemes:
            oks = []
            for kind in ("naive", "adaptive"):
                r = rows[label]["reconstruction"][kind]
                if r is None or judge not in r:
                    continue
                for far in fars:
                    oks.append(
                        r[judge][far]["accepted_other_photo"] <= _margin(float(far), r["images"])
                    )
            cells.append(_met(all(oks)) if oks else "n/a")
        body.append([name, *cells])
    cells = []
    for label in schemes:
        i = rows[label]["identification"]
        v = i.get("verification", {})
        oks = [
            rate <= _margin(float(far), i["probes"])
            for attack in v.values() for far, rate in attack.items() if not math.isnan(rate)
        ]  # fmt: skip
        cells.append(_met(all(oks)) if oks else "n/a")
    body.append(["template inversion to the raw embedding, type I", *cells])
    body.append(
        ["linkability across keys (D_sys < 0.05)",
         *[_met(rows[s]["unlinkability"]["d_sys"] < 0.05) for s in schemes]]
    )  # fmt: skip
    if schemes:
        lines += _table(["threat", *[f"`{s}`" for s in schemes]], body)
    oracle = report.get("score_oracle")
    if oracle:
        verdicts = [
            f"`{label}` {_met(p['met'])}"
            for label, p in oracle["policies"].items()
            if not p["exact_scores"]
        ]
        if verdicts:
            lines += [
                "An API client (score oracle), rank-1 ≤ chance + "
                f"{_pct(oracle['goal_margin'])} at {oracle['query_counts'][-1]:,} queries, per "
                f"service policy: {', '.join(verdicts)} (its own section below).",
                "",
            ]
    raw = report["reconstruction_on_raw"]
    if "type_ii" in raw and "1e-3" in raw["type_ii"]:
        now = raw["type_ii"]["1e-3"]["accepted_other_photo"]
        ratio = now / L1_DECODER_RAW_TYPE_II
        lines += [
            f"Strength of the attacker: its decoder turns **raw** templates into faces the "
            f"independent model accepts in **{_pct(now)}** of cases at FMR 1e-3, {ratio:.1f}x "
            f"the {_pct(L1_DECODER_RAW_TYPE_II)} of the earlier reports' L1-only decoder (issue "
            f"15's goal: at least double: {'met' if ratio >= 2 else '**not met**'})"
            + (
                f"; dlib itself accepts {_pct(raw['type_i']['1e-3']['accepted_other_photo'])}."
                if "type_i" in raw
                else "."
            ),
            "",
        ]
    return lines


def _utility(rows: dict[str, dict]) -> list[str]:
    out = ["## Utility (raw = `none` row)", ""]
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
        ["scheme", "10-fold accuracy", "drop vs raw", "TAR@FMR 1e-3", "TAR@FMR 1e-4", "rank-1",
         "goal", "met"],
        util_rows,
    )  # fmt: skip
    u = base
    return [
        *out,
        f"Pairs: {u['pairs']}; TAR over {u['genuine_pairs']} genuine and {u['impostor_pairs']} "
        f"impostor pairs; rank-1 with {u['rank1_gallery']} gallery photos (first of each person, "
        f"the rest distractors) and {u['rank1_probes']} probes. ![ROC](roc.png)",
        "",
    ]


def _reconstruction(report: dict, rows: dict[str, dict], fars: list[str]) -> list[str]:
    raw = report["reconstruction_on_raw"]
    ref = report["reconstruction_reference"]
    out: list[str] = []
    judges = [j for j in ("type_i", "type_ii") if j in raw]
    for judge in judges:
        name, who = _JUDGES[judge]
        out += [
            f"## Threat: reconstruction, {name}",
            "",
            f"Judged by {who}.",
            "",
            "Attacks: *naive* = the decoder trained on the train people's raw embeddings, applied "
            "to leaked templates; *adaptive* = a decoder trained on (train photo, protected "
            "template) pairs enrolled through the black-box API (same key as the leaked "
            "gallery). SAR against another photo (the same photo in brackets); false accept = "
            "against a photo of someone else.",
            "",
        ]
        header = ["scheme", "attack"]
        for far in fars:
            header += [f"SAR @FMR {far} (same photo)", f"false accept @{far}"]
        header += ["goal", "met"]
        body = []
        for label, row in rows.items():
            for kind in ("naive", "adaptive"):
                r = row["reconstruction"][kind]
                if label == "none" and kind == "adaptive":
                    continue  # the same decoder as naive: templates are raw embeddings
                attack = "from raw templates" if label == "none" else kind
                if r is None or judge not in r:
                    body.append([f"`{label}`", attack, *["n/a"] * (2 * len(fars)), "", "n/a"])
                    continue
                cells, oks, goals = [], [], []
                for far in fars:
                    v = r[judge][far]
                    cells += [
                        f"{_pct(v['accepted_other_photo'])} ({_pct(v['accepted_same_photo'])})",
                        _pct(v["false_accept"]),
                    ]
                    goal, limit = _sar_goal(row["protects"], far, r["images"])
                    goals.append(goal)
                    if limit is not None:
                        oks.append(v["accepted_other_photo"] <= limit)
                body.append(
                    [f"`{label}`", attack, *cells,
                     " / ".join(goals) if row["protects"] else "baseline",
                     _met(all(oks) if oks else None)]
                )  # fmt: skip
        out += _table(header, body)
    out += [
        "| templates → decoder | SSIM | PSNR dB | images |",
        "|---|---|---|---|",
        f"| raw | {_num(raw['ssim'])} | {_num(raw['psnr'], 2)} | {raw['images']} |",
    ]
    for label, row in rows.items():
        for kind in ("naive", "adaptive"):
            r = row["reconstruction"][kind]
            if r is not None and row["protects"]:
                out.append(
                    f"| `{label}` {kind} | {_num(r['ssim'])} | {_num(r['psnr'], 2)} | {r['images']} |"
                )
    out += [
        "",
        f"Reference: the train people's mean face scores SSIM {_num(ref['mean_face_ssim'])}, "
        f"PSNR {_num(ref['mean_face_psnr'], 2)} dB against the same photos; a reconstruction no "
        "closer than that carries no more than the average face.",
        "",
        "![reconstructions](reconstructions.png) ![success attack rates](attack_rates.png)",
        "",
    ]
    return out


def _inversion(report: dict, rows: dict[str, dict], fars: list[str]) -> list[str]:
    out = [
        "## Threat: template inversion to the raw embedding, type I (judged by dlib)",
        "",
        "Each test person's leaked template (first photo) is turned into an estimate of its raw "
        "dlib embedding: *naive* = the template itself; *linear map* / *MLP map* = maps fitted on "
        "(protected, raw) pairs of the train people enrolled through the black-box API. SAR = "
        "the estimate passes dlib's threshold at the FMR against another photo of that person; "
        "rank-1 = it finds that person among the raw embeddings of all other test photos.",
        "",
    ]
    header = ["scheme", "attack"]
    header += [f"SAR @FMR {far}" for far in fars]
    header += ["rank-1", "goal", "met"]
    body = []
    for label, row in rows.items():
        i = row["identification"]
        chance = 1.0 / i["identities"]
        for attack, title in (
            ("naive", "naive"),
            ("linear_map", "linear map"),
            ("mlp_map", "MLP map"),
        ):
            if label == "none" and attack != "naive":
                continue  # maps from raw to raw: the naive row
            sar = i.get("verification", {}).get(attack, {})
            oks = [
                sar[far] <= _margin(float(far), i["probes"])
                for far in fars if far in sar and not math.isnan(sar[far])
            ]  # fmt: skip
            oks.append(i[attack] <= _margin(chance, i["probes"]) or math.isnan(i[attack]))
            body.append(
                [f"`{label}`", title, *[_pct(sar.get(far)) for far in fars], _pct(i[attack]),
                 f"chance: FMR / {_pct(chance)} rank-1 (+3 sd)" if row["protects"] else "baseline",
                 _met(all(oks) if row["protects"] else None)]
            )  # fmt: skip
    probes = next(iter(rows.values()))["identification"]["probes"]
    return [*out, *_table(header, body), f"Probes: {probes} leaked templates.", ""]


def _linkability(rows: dict[str, dict]) -> list[str]:
    out = [
        "## Threat: linkability across two keys",
        "",
        "D_sys of Gomez-Barrero et al. (TIFS 2018, the measure of ISO/IEC 30136), ω = 1: "
        "0 = unlinkable, 1 = fully linkable. Mated = two different photos of one person under "
        "two keys; non-mated = two people. Maximal linkability: Otroshi Shahreza et al. (TIFS "
        "2023), 0 to 1 bit.",
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
                f"{_num(ul['maximal_linkability'])} / "
                f"{_num(ul['maximal_linkability_per_subject'])} "
                f"({_num(ul['maximal_linkability_per_subject_floor'])})",
                f"{ul['mated_mean']:+.4f} / {ul['non_mated_mean']:+.4f}",
                str(ul["mated_pairs"]),
                str(ul["non_mated_pairs"]),
                "< 0.05" if row["protects"] else "baseline",
                _met(ul["d_sys"] < 0.05 if row["protects"] else None),
            ]
        )
    out += _table(
        ["scheme", "D_sys", "estimator floor", "D_sys, each person equally (floor)",
         "maximal linkability, every pair / each person (floor)", "mean score mated / non-mated",
         "mated", "non-mated", "goal", "met"],
        link_rows,
    )  # fmt: skip
    return [
        *out,
        "The floor is D_sys between two samples of one distribution (non-mated scores) at these "
        "sample counts: a D_sys above it is a real difference between mated and non-mated scores. "
        "Every mated pair counts once in D_sys, so a person with hundreds of photos dominates it; "
        "weighting each person equally shows whether the linkage holds across people. The goal "
        "column judges the every-pair D_sys.",
        "",
        "![unlinkability](unlinkability.png)",
        "",
    ]


def _key_recovery(rows: dict[str, dict]) -> list[str]:
    out = ["## Threat: key recovery from known pairs (least squares)", ""]
    kr_rows = []
    raw_rate = rows["none"]["identification"]["naive"]
    for label, row in rows.items():
        kr = row["key_recovery"]
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
        ["scheme", "linear fit residual", "linear", "rank-1 after recovery (n: rate)",
         "n for half the raw rate"],
        kr_rows,
    )  # fmt: skip
    return [
        *out,
        "A linear scheme is inverted by about `dim` known (raw, template) pairs; its defence is "
        "keeping the key and the black-box queries scarce, and renewing the key after a leak.",
        "",
        "![key recovery](key_recovery.png)",
        "",
    ]


def write_report(report: dict, images: dict[str, np.ndarray], out: Path) -> None:
    """The reconstructions figure (from this run's images), then everything `report.json`
    holds (`render_from_json`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    render_from_json(report, out)


def render_from_json(report: dict, out: Path) -> None:
    """report.md and the figures drawn from numbers (ROC, unlinkability, key recovery, attack
    rates): re-runnable on a finished run's report.json after the renderer changes."""
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

    _attack_rates_figure(report, out, plt)
    if report.get("score_oracle"):
        write_oracle_section(report["score_oracle"], out)
    (out / "report.md").write_text(render_markdown(report))


def _attack_rates_figure(report: dict, out: Path, plt: object) -> None:
    """attack_rates.png: reconstruction SAR per scheme and attack, one panel per judge, one
    bar per FMR, with the chance line of the first FMR."""
    rows: dict[str, dict] = report["rows"]
    raw = report["reconstruction_on_raw"]
    judges = [j for j in ("type_i", "type_ii") if j in raw]
    if not judges:
        return
    fars = _fars(report)
    bars = [("raw", raw)] + [
        (f"{label}\n{kind}", row["reconstruction"][kind])
        for label, row in rows.items() if row["protects"] for kind in ("naive", "adaptive")
    ]  # fmt: skip
    fig, axes = plt.subplots(
        1, len(judges), figsize=(max(6.0, 1.0 + 0.8 * len(bars) * len(judges)), 3.6), squeeze=False
    )  # type: ignore[attr-defined]
    width = 0.8 / len(fars)
    for ax, judge in zip(axes[0], judges, strict=True):
        for k, far in enumerate(fars):
            values = [
                100 * r[judge][far]["accepted_other_photo"] if r is not None and judge in r else 0
                for _, r in bars
            ]
            ax.bar(np.arange(len(bars)) + k * width, values, width, label=f"FMR {far}")
        ax.axhline(100 * float(fars[0]), color="k", lw=0.8, ls=":", label=f"chance @{fars[0]}")
        ax.set_xticks(np.arange(len(bars)) + width * (len(fars) - 1) / 2)
        ax.set_xticklabels([b for b, _ in bars], fontsize=7)
        ax.set(
            ylabel="success attack rate (%)",
            title=f"reconstruction, {_JUDGES[judge][0]}",
            ylim=(0, 118),
        )
        ax.legend(fontsize=7, loc="upper center", ncol=len(fars) + 1)
    fig.tight_layout()
    fig.savefig(out / "attack_rates.png", dpi=110)
    plt.close(fig)  # type: ignore[attr-defined]


# -- the API client's threat (advplugin.evaluation.score_oracle) --------------------------------

ORACLE_FIGURE = "score_oracle.png"

_STRATEGY_TITLES = {
    "least_squares": "least squares on the scores",
    "lookalike_centroid": "look-alike centroid",
    "adaptive_boundary": "adaptive: boundary walk",
}


def _strategy_title(name: str) -> str:
    return _STRATEGY_TITLES.get(name, name)


def oracle_markdown(result: dict) -> list[str]:
    """The section "Threat: an API client (score oracle)" of `report.md`, from the result of
    `score_oracle.run_score_oracle_threat` (what `report.json` holds under `score_oracle`)."""
    counts = [int(q) for q in result["query_counts"]]
    chance, raw = result["chance"], result["raw_rank1"]
    margin = result["goal_margin"]
    recon = result.get("reconstruction_threshold") is not None
    out = [
        "## Threat: an API client (score oracle)",
        "",
        "An ordinary identify-scoped API key sends photos of people who are **not** enrolled and "
        "reads the answers; it runs the public extractor on its own photos, so it knows each "
        "probe's raw embedding, and the answers are computed on templates that keep cosine. "
        "Strategies: *least squares on the scores* (every numeric similarity is a linear "
        "equation in the enrolled embedding; bands are used as if exact); *look-alike "
        "centroid* (decisions alone: the mean of the probes a person is returned for, whitened "
        "by the attacker's own probes); *adaptive: boundary walk* (bisection on the path "
        "between a probe that names a person and one that does not, a stand-in for morphing "
        "its own photos, so points on the decision boundary refine the centroid). Each "
        "strategy runs on a fresh key of each service policy; every query counts, a 429 stops "
        "it (*stopped at*).",
        "",
        f"- attacker: {result['attacker_photos']:,} photos of people not enrolled"
        + (
            f", {result['augmented']:,} more probes made from them (perturbations on the sphere "
            "and mixes of two: a stand-in for photo augmentation and morphing)"
            if result.get("augmented")
            else ""
        ),
        f"- success: rank-1 of each enrolled person's recovered embedding among "
        f"{result['search_photos']:,} **other** photos of the {result['scored_subjects']:,} "
        "enrolled people who have one (never the enrolled photo); a person with nothing "
        f"recovered counts as a failure; chance {_pct(chance)}, raw level {_pct(raw)} (the true "
        "enrolled embeddings used as probes the same way)"
        + (
            f"; reconstruction: the recovered embedding decoded to a face and re-embedded, "
            f"accepted against another photo of the person at FMR {far_key(result['reconstruction_fmr'])} "
            f"(threshold {_num(result['reconstruction_threshold'])}), and the false accept "
            "against a photo of someone else (a face close to the average passes both); from "
            f"the true embeddings {_pct(result.get('raw_reconstruction'))} (false accept "
            f"{_pct(result.get('raw_reconstruction_false_accept'))})"
            if recon
            else ""
        ),
        *_run_alone(result),
        f"- goal of a protecting policy (ISO/IEC 30136: no better than chance): rank-1 ≤ chance "
        f"+ {_pct(margin)} = {_pct(chance + margin)} at {counts[-1]:,} queries (or where its key "
        "was stopped), for every strategy; a policy that answers exact scores shows the threat "
        "and has no goal.",
        "",
    ]
    header = ["policy", "strategy", *[f"rank-1 @{q:,}" for q in counts], "stopped at"]
    if recon:
        header.append("reconstruction SAR (false accept), last")
    header += ["of raw level", "goal", "met"]
    body = []
    for label, policy in result["policies"].items():
        exact = policy["exact_scores"]
        for name, row in policy["strategies"].items():
            at = {int(p["queries"]): p for p in row["curve"]}
            stopped = row["stopped_at"] is not None
            cells = [
                _pct(at[q]["rank1"]) if q in at else "stopped" if stopped else "n/a" for q in counts
            ]
            stop = row["stopped_at"]
            stop_cell = "-" if stop is None else f"{stop:,}"
            if stop is not None and stop in at and stop not in counts:
                stop_cell += f" (rank-1 {_pct(at[stop]['rank1'])})"
            line = [f"`{label}`", _strategy_title(name), *cells, stop_cell]
            if recon:
                last = row["curve"][-1] if row["curve"] else {}
                line.append(
                    f"{_pct(last.get('reconstruction'))} "
                    f"({_pct(last.get('reconstruction_false_accept'))})"
                )
            line += [
                _pct(row.get("of_raw_level")),
                f"shows the threat (raw level {_pct(raw)})" if exact else f"≤ {_pct(row['goal'])}",
                _met(row["met"]),
            ]
            body.append(line)
    out += _table(header, body)
    descriptions = [
        f"`{label}`: {p['description']}"
        for label, p in result["policies"].items()
        if p.get("description")
    ]
    if descriptions:
        out += ["Policies: " + "; ".join(descriptions) + ".", ""]
    if result.get("service"):
        out += [f"Service under attack: {result['service']}.", ""]
    out += _legitimate(result.get("legitimate"))
    out += [f"![score oracle]({ORACLE_FIGURE})", ""]
    return out


def _run_alone(result: dict) -> list[str]:
    """A line for a result run on its own (`advplugin evaluate --threats api-client`): its
    command, and how its decoder on raw embeddings compares (`decoder_check`)."""
    check = (result.get("decoder_check") or {}).get("reconstruction_on_raw")
    if not check:
        return []
    judged = [
        f"{_JUDGES[j][0]} {_pct(check[j]['1e-3']['accepted_other_photo'])}"
        for j in ("type_i", "type_ii")
        if j in check and "1e-3" in check[j]
    ]
    return [
        f"- run on its own (`{result.get('command') or 'advplugin evaluate --threats api-client'}`)"
        ", with the same split, seed, decoder recipe and thresholds as a full run; its decoder on "
        "raw embeddings, from raw templates, at FMR 1e-3: " + ", ".join(judged)
    ]


def _legitimate(legit: dict | None) -> list[str]:
    """The cameras' side of the same service: enrolled people's other photos identified
    (top subject right) under each policy, against the reference policy's rate."""
    if not legit:
        return []
    ref, margin = legit["reference"], legit["margin"]
    base = legit["policies"][ref]["identified"]
    out = [
        "**The legitimate clients** of the same service: under each policy a fresh key (a "
        f"camera's) sends the {legit['probes']:,} other photos of the enrolled people, one "
        "identification each; *identified*: the top subject named is the right person. Goal: "
        f"within {100 * margin:g} pp of `{ref}` ({_pct(base)}, today's answers), and no key "
        "stopped.",
        "",
    ]
    body = []
    for label, row in legit["policies"].items():
        own = label == ref
        stop = row.get("stopped_at")
        body.append(
            [
                f"`{label}`",
                _pct(row["identified"]),
                "reference" if own else f"{100 * row['drop']:.2f}",
                "-" if stop is None else f"yes, after {stop:,} probes",
                "reference" if own else f"≥ {_pct(row['goal'])}",
                "-" if own else _met(bool(row["met"]) and stop is None),
            ]
        )
    out += _table(
        ["policy", "identified", f"drop vs `{ref}` (pp)", "stopped?", "goal", "met"], body
    )
    return out


def write_oracle_section(result: dict, out_dir: Path) -> str:
    """Draw `score_oracle.png` (rank-1 against queries, log x, one line per strategy and
    policy, chance and raw level dashed) into `out_dir` and return the section's markdown.

    `render_from_json` calls it when `report.json` holds the result under `score_oracle`; to
    add a separately run result to a committed report without rerunning the harness, put it
    there and re-render: `report = json.load(open("docs/evaluation/report.json"));
    report["score_oracle"] = result; render_from_json(report, Path("docs/evaluation"))`
    (and write the JSON back)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = [int(q) for q in result["query_counts"]]
    fig, ax = plt.subplots(figsize=(9.0, 4.4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", "-.", ":"]
    markers = ["o", "s", "^", "D", "v"]
    for p, (label, policy) in enumerate(result["policies"].items()):
        for k, (name, row) in enumerate(policy["strategies"].items()):
            points = [c for c in row["curve"] if c["queries"] > 0]
            if not points:
                continue
            ax.plot(
                [c["queries"] for c in points],
                [100 * c["rank1"] for c in points],
                color=colours[p % len(colours)],
                linestyle=styles[k % len(styles)] if k else "-",
                marker=markers[k % len(markers)],
                markersize=4,
                label=f"{label}: {_strategy_title(name)}",
            )
            if row["stopped_at"]:
                last = points[-1]
                ax.plot(last["queries"], 100 * last["rank1"], "x", color="k", markersize=8)
    rows = [r for p in result["policies"].values() for r in p["strategies"].values()]
    if any(r["stopped_at"] is not None for r in rows):
        ax.plot([], [], "x", color="k", label="key stopped (429)")
    ax.axhline(100 * result["raw_rank1"], color="0.3", ls="--", lw=1, label="raw embeddings")
    ax.axhline(100 * result["chance"], color="0.5", ls=":", lw=1, label="chance")
    ax.set_xscale("log")
    # A key stopped before the first count (the default policy's budget) still shows.
    reached = [c["queries"] for r in rows for c in r["curve"] if c["queries"] > 0]
    ax.set_xlim(min([*counts, *reached]) / 1.3, max(counts) * 1.3)
    ax.set_ylim(-2, 102)
    ax.set(
        xlabel="queries (probes sent by one API key)",
        ylabel="rank-1 of the recovered people (%)",
        title="An API client (score oracle)",
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(out_dir / ORACLE_FIGURE, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "\n".join(oracle_markdown(result))
