"""Train the `xnn-d` weights: teacher head, adversarial noise generator, distilled matcher.

    python -m advplugin.training.xnnd --embeddings /work/shared/data/lfw-dev-dlib128.npz \
        --pairs /work/shared/data/lfw-dev-pairs.txt \
        --generator advplugin/protectors/weights/xnnd-dlib128-v1.npz \
        --out advplugin/protectors/weights/xnnd-dlib128-v2.npz

Only people on the *train* side of the evaluation harness's identity split are used
(`identity_in_test(name, 0.5)`, the hash of `advplugin evaluate-split`); the test people are
held out and the record reports accuracy on their pairs. CPU, two threads, a few minutes.

Stages (after XNN-d; the authors' code trains a copy of the image encoder, here everything
acts on the stored embedding u = x / ||x||):
1. teacher head H on clean u: normalised-softmax (CosFace margin) over the train identities,
   plus a term keeping the pairwise cosines of u, so that it still generalises to people it
   never saw;
2. the game, alternating: surrogate attackers on f = u + G(u) - an identity classifier C
   (cross-entropy over the train identities) and a regressor R back to u (cosine) - take a
   step each on the current f; then G and a student matcher S take a step on
       distil(S(f), H(u)) - 0.7 * min(CE(C(f)), log K) + beta * cos(R(f), u)
   (the paper's -0.7 CE; the cap keeps an unbounded term from swamping the rest, and the
   regressor term is the issue's "regressor back to the raw embedding"). Re-training the
   surrogates every step, as G changes, keeps the game from stalling;
3. with G frozen, the matcher S is distilled: `--student linear` (the default since
   release 2) fits the affine map f -> u in closed form (least squares on the train people;
   the teacher is dlib's own embedding, which generalises to new people better than any head
   trained on 2,368 people); `--student mlp` (release 1) trains a fresh MLP to reproduce H
   (MSE on unit embeddings, plus the teacher's pairwise cosines within the batch). Release 2
   took G from release 1 (`--generator xnnd-dlib128-v1.npz`), so the noise is the same.

`outsourced_training` is XNN's own use: a host that receives only `xnn`-obfuscated embeddings
(and labels) trains a matcher head as well as on raw ones (docs/schemes/xnn-d.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from advplugin.embedding_files import load_embedding_set
from advplugin.keys import Key
from advplugin.protectors.base import file_sha256, l2_normalize
from advplugin.protectors.xnn import XNNProtector
from advplugin.protectors.xnnd import Layers, XNNDNets, load_weights
from advplugin.training.common import pair_accuracy, split_masks


@dataclass(frozen=True)
class TrainConfig:
    hidden: int = 256
    batch: int = 256
    teacher_steps: int = 300
    game_steps: int = 1000
    student_steps: int = 2000
    lr: float = 1e-3
    scale: float = 24.0  # normalised-softmax scale
    margin: float = 0.2  # CosFace margin
    lam_struct: float = 300.0  # weight of the pairwise-cosine term
    adv_ce: float = 0.7  # the paper's weight of the surrogate classifier's CE
    adv_reg: float = 1.0  # weight of the regressor's cosine to u
    student: str = "linear"  # stage 3: "linear" (closed form) or "mlp" (release 1)
    student_target: str = "raw"  # what S reproduces: "raw" (u) or "teacher" (H(u))
    seed: int = 0


def mlp(sizes: list[int]) -> nn.Sequential:
    """ReLU MLP; the numpy twin is `advplugin.protectors.xnnd.mlp`."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def to_layers(model: nn.Sequential) -> Layers:
    return tuple(
        (m.weight.detach().float().numpy().T.copy(), m.bias.detach().float().numpy().copy())
        for m in model
        if isinstance(m, nn.Linear)
    )


def to_numpy_nets(generator: nn.Sequential, matcher: nn.Sequential) -> XNNDNets:
    return XNNDNets(to_layers(generator), to_layers(matcher))


class Residual(nn.Module):
    """u + body(u): the teacher head starts at the raw embedding (body's last layer at zero)
    and learns only what the identity loss adds, so it keeps generalising to new people."""

    def __init__(self, body: nn.Sequential) -> None:
        super().__init__()
        self.body = body
        last = [m for m in body if isinstance(m, nn.Linear)][-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return u + self.body(u)


class CosineHead(nn.Module):
    """Normalised-softmax classifier: logits = scale * (cos(e, w_c) - margin on the target)."""

    def __init__(self, dim: int, classes: int, scale: float, margin: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(classes, dim) / dim**0.5)
        self.scale, self.margin = scale, margin

    def forward(self, e: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cos = F.normalize(e, dim=1) @ F.normalize(self.w, dim=1).T
        cos = cos - self.margin * F.one_hot(y, cos.shape[1])
        return F.cross_entropy(self.scale * cos, y)


def structure_loss(e: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared change of every pairwise cosine in the batch (e vs target)."""
    a, b = F.normalize(e, dim=1), F.normalize(target, dim=1)
    off = ~torch.eye(len(a), dtype=torch.bool)
    return ((a @ a.T - b @ b.T)[off] ** 2).mean()


class Batches:
    """Batches with two photos each of a quarter of their people (genuine pairs present)."""

    def __init__(self, labels: np.ndarray, batch: int, rng: np.random.Generator) -> None:
        self.labels, self.batch, self.rng = labels, batch, rng
        names, counts = np.unique(labels, return_counts=True)
        self.multi = [np.flatnonzero(labels == k) for k in names[counts >= 2]]

    def __call__(self) -> np.ndarray:
        people = self.rng.choice(
            len(self.multi), min(self.batch // 4, len(self.multi)), replace=False
        )
        pairs = np.concatenate([self.rng.choice(self.multi[p], 2, replace=False) for p in people])
        rest = self.rng.choice(len(self.labels), self.batch - len(pairs), replace=False)
        return np.concatenate([pairs, rest])


def _progress(stage: str, step: int, steps: int, every: int, **values: float) -> None:
    if every and (step % every == 0 or step == steps - 1):
        parts = " ".join(f"{k} {v:.4f}" for k, v in values.items())
        print(f"[{stage} {step + 1:5d}/{steps}] {parts}", flush=True)


def fit_head(
    model: nn.Module,
    u: torch.Tensor,
    y: torch.Tensor,
    classes: int,
    cfg: TrainConfig,
    batches: Batches,
    log: int,
    steps: int,
    stage: str = "teacher",
) -> nn.Module:
    """Train `model` as an embedding head: normalised softmax over `classes`, plus
    `lam_struct` x the change of pairwise cosines from the input's; returned frozen."""
    head = CosineHead(model_out_dim(model), classes, cfg.scale, cfg.margin)
    opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=cfg.lr)
    for step in range(steps):
        idx = torch.from_numpy(batches())
        e = model(u[idx])
        ce = head(e, y[idx])
        st = structure_loss(e, u[idx])
        loss = ce + cfg.lam_struct * st if cfg.lam_struct else ce
        opt.zero_grad()
        loss.backward()
        opt.step()
        _progress(stage, step, steps, log, ce=ce.item(), cos_rmse=st.sqrt().item())
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def model_out_dim(model: nn.Module) -> int:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features


def train_teacher(
    u: torch.Tensor, y: torch.Tensor, classes: int, cfg: TrainConfig, batches: Batches, log: int
) -> nn.Module:
    """Stage 1: the teacher head on clean u (residual, so it starts at raw accuracy)."""
    dim = u.shape[1]
    teacher = Residual(mlp([dim, cfg.hidden, dim]))
    return fit_head(teacher, u, y, classes, cfg, batches, log, cfg.teacher_steps)


def distil_loss(s: torch.Tensor, t: torch.Tensor, lam_struct: float) -> torch.Tensor:
    """MSE between unit student and teacher embeddings, plus their pairwise cosines."""
    mse = ((F.normalize(s, dim=1) - F.normalize(t, dim=1)) ** 2).sum(dim=1).mean()
    return mse + lam_struct * structure_loss(s, t)


def train_game(
    u: torch.Tensor,
    y: torch.Tensor,
    classes: int,
    teacher: nn.Module,
    cfg: TrainConfig,
    batches: Batches,
    log: int,
) -> nn.Sequential:
    """Stage 2: G (with a student) against a surrogate classifier and regressor."""
    dim = u.shape[1]
    generator = mlp([dim, cfg.hidden, cfg.hidden, dim])
    student = mlp([dim, cfg.hidden, dim])
    classifier = mlp([dim, cfg.hidden, classes])
    regressor = mlp([dim, cfg.hidden, dim])
    opt_g = torch.optim.Adam([*generator.parameters(), *student.parameters()], lr=cfg.lr)
    opt_a = torch.optim.Adam([*classifier.parameters(), *regressor.parameters()], lr=cfg.lr)
    cap = float(np.log(classes))
    for step in range(cfg.game_steps):
        idx = torch.from_numpy(batches())
        ub, yb = u[idx], y[idx]
        # surrogates: one step on the current f (retrained as G changes)
        f = (ub + generator(ub)).detach()
        ce_a = F.cross_entropy(classifier(f), yb)
        reg_a = F.cosine_similarity(regressor(f), ub, dim=1).mean()
        opt_a.zero_grad()
        (ce_a - reg_a).backward()
        opt_a.step()
        # generator + student
        f = ub + generator(ub)
        distil = distil_loss(student(f), teacher(ub), cfg.lam_struct)
        ce = F.cross_entropy(classifier(f), yb)
        reg = F.cosine_similarity(regressor(f), ub, dim=1).mean()
        loss = distil - cfg.adv_ce * torch.clamp(ce, max=cap) + cfg.adv_reg * reg
        opt_g.zero_grad()
        loss.backward()
        opt_g.step()
        _progress(
            "game", step, cfg.game_steps, log,
            distil=distil.item(), surrogate_ce=ce.item(), regressor_cos=reg.item(),
        )  # fmt: skip
    generator.eval()
    for p in generator.parameters():
        p.requires_grad_(False)
    return generator


def train_student(
    u: torch.Tensor,
    teacher: nn.Module,
    generator: nn.Sequential,
    cfg: TrainConfig,
    batches: Batches,
    log: int,
) -> nn.Sequential:
    """Stage 3: a fresh matcher S on f = u + G(u) (G frozen) reproducing the teacher on u."""
    dim = u.shape[1]
    student = mlp([dim, cfg.hidden, dim])
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.student_steps)
    for step in range(cfg.student_steps):
        idx = torch.from_numpy(batches())
        ub = u[idx]
        with torch.no_grad():
            f, t = ub + generator(ub), teacher(ub)
        loss = distil_loss(student(f), t, cfg.lam_struct)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        _progress("student", step, cfg.student_steps, log, distil=loss.item())
    student.eval()
    return student


@dataclass
class Trained:
    nets: XNNDNets  # what ships
    teacher: nn.Module  # stage 1's head, kept to report its held-out accuracy
    times: dict[str, float]


def fit_linear_student(f: np.ndarray, target: np.ndarray) -> Layers:
    """Stage 3, closed form: the affine map A f + b nearest to the unit target in least
    squares. On dlib embeddings G is almost an invertible affine map (held-out cosine of
    S(f) to u 0.9999), and an MLP student trained from scratch on 4,814 photos recovered
    less of it (held-out TAR@1e-3 -2 pp, rank-1 -4 pp; docs/schemes/xnn-d.md)."""
    x = np.c_[f.astype(np.float64), np.ones(len(f))]
    w, *_ = np.linalg.lstsq(x, l2_normalize(target, np.float32).astype(np.float64), rcond=None)
    return ((w[:-1].astype(np.float32), w[-1].astype(np.float32)),)


def train(
    train_raw: np.ndarray,
    train_identity: np.ndarray,
    cfg: TrainConfig,
    log_every: int = 100,
    generator_layers: Layers | None = None,
) -> Trained:
    """All three stages on one set of (raw embedding, identity); with `generator_layers`
    (an earlier release's G), the game is skipped and only S is trained for that G."""
    if cfg.student not in ("linear", "mlp") or cfg.student_target not in ("raw", "teacher"):
        raise ValueError("student must be 'linear' or 'mlp', student_target 'raw' or 'teacher'")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    _, labels = np.unique(train_identity, return_inverse=True)
    classes = int(labels.max()) + 1
    u = torch.from_numpy(l2_normalize(train_raw, np.float32))
    y = torch.from_numpy(labels.astype(np.int64))
    batches = Batches(labels, cfg.batch, rng)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    teacher = train_teacher(u, y, classes, cfg, batches, log_every)
    times["seconds_teacher"] = time.perf_counter() - t0
    if generator_layers is None:
        generator = train_game(u, y, classes, teacher, cfg, batches, log_every)
        g_layers = to_layers(generator)
    else:
        generator, g_layers = generator_module(generator_layers), generator_layers
    times["seconds_game"] = time.perf_counter() - t0 - times["seconds_teacher"]
    if cfg.student == "linear":
        f = XNNDNets(g_layers, ()).noisy(u.numpy())
        with torch.no_grad():
            target = u.numpy() if cfg.student_target == "raw" else teacher(u).numpy()
        s_layers = fit_linear_student(f, target)
    else:
        target_net = teacher if cfg.student_target == "teacher" else nn.Identity()
        s_layers = to_layers(train_student(u, target_net, generator, cfg, batches, log_every))
    times["seconds_total"] = time.perf_counter() - t0
    return Trained(
        XNNDNets(g_layers, s_layers), teacher, {k: round(v, 1) for k, v in times.items()}
    )


def generator_module(layers: Layers) -> nn.Sequential:
    """A frozen torch twin of a numpy generator (for training a student on its output)."""
    model = mlp([layers[0][0].shape[0], *(w.shape[1] for w, _ in layers)])
    linears = [m for m in model if isinstance(m, nn.Linear)]
    for m, (w, b) in zip(linears, layers, strict=True):
        m.weight.data = torch.from_numpy(w.T.copy())
        m.bias.data = torch.from_numpy(b.copy())
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def save_weights(path: Path, nets: XNNDNets, record: dict[str, object]) -> None:
    arrays: dict[str, np.ndarray] = {"record": np.array(json.dumps(record))}
    for prefix, layers in (("g", nets.generator), ("s", nets.matcher)):
        arrays[f"{prefix}_layers"] = np.int64(len(layers))
        for i, (w, b) in enumerate(layers):
            arrays[f"{prefix}{i}_w"], arrays[f"{prefix}{i}_b"] = w, b
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)


# -- XNN's outsourced training -------------------------------------------------------------------


def train_matcher_head(
    features: np.ndarray, identity: np.ndarray, *, steps: int, seed: int, hidden: int = 256
) -> nn.Module:
    """A matcher head (MLP, normalised softmax) trained on whatever features it is given: what
    an outsourced training host runs. It never needs to know what the features are."""
    torch.manual_seed(seed)
    cfg = TrainConfig(hidden=hidden, seed=seed, lam_struct=0.0)
    _, labels = np.unique(identity, return_inverse=True)
    x = torch.from_numpy(l2_normalize(features, np.float32))
    y = torch.from_numpy(labels.astype(np.int64))
    batches = Batches(labels, cfg.batch, np.random.default_rng(seed))
    # A plain MLP from scratch (no residual start at the input): the head must learn.
    model = mlp([x.shape[1], hidden, x.shape[1]])
    return fit_head(model, x, y, int(labels.max()) + 1, cfg, batches, log=0, steps=steps)


def outsourced_training(
    raw: np.ndarray,
    identity: np.ndarray,
    paths: np.ndarray,
    pairs_file: Path,
    *,
    key: Key,
    steps: int = 600,
    seed: int = 0,
    test_fraction: float = 0.5,
) -> dict[str, float]:
    """XNN (training phase) on embeddings: the data owner obfuscates the train people's
    embeddings with `xnn` under `key` and ships only those (and labels); the host trains a
    matcher head on them and returns it; the owner applies it to test people obfuscated under
    the same key. Compared with the same head trained on raw embeddings, on the held-out
    people's pairs. The host's code path gets no key: only `train_matcher_head(features)`."""
    train_mask, test_mask = split_masks(identity, test_fraction)
    xnn = XNNProtector(dim=raw.shape[1], key=key)
    out: dict[str, float] = {}
    for name, transform in (("raw", partial(l2_normalize, dtype=np.float32)), ("xnn", xnn.protect)):
        shipped = transform(raw[train_mask])  # what the host receives
        head = train_matcher_head(shipped, identity[train_mask], steps=steps, seed=seed)
        with torch.no_grad():
            emb = head(torch.from_numpy(transform(raw[test_mask]))).numpy()
        out[f"heldout_accuracy_head_on_{name}"], n = pair_accuracy(
            emb, paths[test_mask], pairs_file
        )
    out["heldout_accuracy_cosine_raw"], n = pair_accuracy(
        raw[test_mask], paths[test_mask], pairs_file
    )
    out["heldout_pairs"] = n
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--embeddings", type=Path, required=True, help="raw embedding set (.npz)")
    p.add_argument("--pairs", type=Path, help="LFW-format pairs to report held-out accuracy")
    p.add_argument("--out", type=Path, help="weights .npz to write")
    p.add_argument("--test-fraction", type=float, default=0.5, help="the evaluation's split")
    p.add_argument("--threads", type=int, default=1, help="1 is fastest on a busy machine")
    p.add_argument("--outsourced", action="store_true", help="run the outsourced-training demo")
    p.add_argument(
        "--generator", type=Path,
        help="take G from this weights file and train only S (a new release, same noise)",
    )  # fmt: skip
    for name, value in vars(TrainConfig()).items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(**{k: getattr(args, k) for k in vars(TrainConfig())})
    data = load_embedding_set(args.embeddings)
    raw, identity, paths = data.embedding.astype(np.float32), data.identity, data.path
    if args.outsourced:
        if args.pairs is None:
            p.error("--outsourced needs --pairs")
        result = outsourced_training(
            raw, identity, paths, args.pairs, key=Key.generate(), steps=cfg.teacher_steps,
            seed=cfg.seed, test_fraction=args.test_fraction,
        )  # fmt: skip
        print(json.dumps(result, indent=2))
        return 0
    if args.out is None:
        p.error("--out is required")
    train_mask, test_mask = split_masks(identity, args.test_fraction)
    generator = None
    if args.generator is not None:
        generator = load_weights(args.generator)[0].generator
        if generator[0][0].shape[0] != raw.shape[1]:
            p.error(f"--generator {args.generator.name} is not for dimension {raw.shape[1]}")
    trained = train(raw[train_mask], identity[train_mask], cfg, generator_layers=generator)
    nets, times = trained.nets, trained.times
    record: dict[str, object] = {
        **vars(cfg),
        "dim": nets.dim,
        "command": "python -m advplugin.training.xnnd " + " ".join(argv or sys.argv[1:]),
        "split": f"train side of evaluate-split (identity hash, test fraction {args.test_fraction})",
        "train_images": int(train_mask.sum()),
        "train_identities": len(np.unique(identity[train_mask])),
        "torch": torch.__version__,
        "threads": args.threads,
        "generator_from": None
        if args.generator is None
        else {"file": args.generator.name, "sha256": file_sha256(args.generator)},
        **times,
    }
    if args.pairs is not None:
        test_u = l2_normalize(raw[test_mask], np.float32)
        f = nets.noisy(test_u)
        record["heldout_images"] = int(test_mask.sum())
        record["heldout_accuracy_raw"], record["heldout_pairs"] = pair_accuracy(
            test_u, paths[test_mask], args.pairs
        )
        with torch.no_grad():
            teacher_e = trained.teacher(torch.from_numpy(test_u)).numpy()
        record["heldout_accuracy_teacher"], _ = pair_accuracy(
            teacher_e, paths[test_mask], args.pairs
        )
        record["heldout_accuracy_noisy_cosine"], _ = pair_accuracy(f, paths[test_mask], args.pairs)
        record["heldout_accuracy_matcher"], _ = pair_accuracy(
            nets.match_features(f), paths[test_mask], args.pairs
        )
        record["heldout_cosine_u_f_mean"] = float(
            np.mean(np.sum(test_u * l2_normalize(f, np.float32), axis=1))
        )
    save_weights(args.out, nets, record)
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
