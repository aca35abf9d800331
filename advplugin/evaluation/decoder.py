"""The attacker's training: an NbNet-style template -> face decoder, and template -> raw maps.

The decoder network itself (`Decoder`, `DecoderConfig`) is defined in `advplugin.nets.decoder`
(the `advface` scheme runs a frozen copy at inference, and the runtime must not import
evaluation code); it is re-exported here for the harness and tests. It is trained with an L1
pixel loss on ArcFace-aligned crops, so its output is itself an aligned face that an
independent recognition model can score directly. Widths are small so that it trains on two
CPU cores in minutes: the attack must be cheap to be a credible threat, and the harness must
finish.

Optionally (`identity_weight` > 0) the decoder also learns to keep identity: each
reconstruction is warped to dlib's 150x150 chip framing (`IdentityLoss`) and embedded by
dlib's own ResNet run in torch (`advplugin.nets.dlib_resnet`, frozen), and the loss adds
`identity_weight * (1 - cosine(embedding, target raw embedding))` to the L1 loss, as NbNet's
perceptual variant does with the attacked network. With the default 0 nothing of this runs
and training is exactly the L1-only decoder of the committed report.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from advplugin.nets.decoder import Decoder, DecoderConfig

__all__ = [
    "DLIB_CHIP_FROM_ARCFACE",
    "Decoder",
    "DecoderConfig",
    "IdentityLoss",
    "apply_linear_map",
    "apply_mlp_map",
    "fit_linear_map",
    "linear_fit_residual",
    "reconstruct",
    "train_decoder",
    "train_mlp_map",
]


def _unit_scaled(templates: np.ndarray) -> torch.Tensor:
    """Unit-normalise then scale by sqrt(D): entries of order 1 whatever the scheme's scale."""
    t = np.asarray(templates, np.float32)
    t = t / np.linalg.norm(t, axis=1, keepdims=True) * np.float32(np.sqrt(t.shape[1]))
    return torch.from_numpy(np.ascontiguousarray(t, dtype=np.float32))


#: Where dlib's face chip lies in the harness's crops: the 2x3 affine taking a point of the
#: ArcFace-aligned 112x112 crop (`faces.ALIGN_SIZE`; crops at other sizes are scalings of it)
#: to the 150x150 chip dlib cuts for its ResNet (`get_face_chip`, padding 0.25, placed by the
#: 5-point predictor). The two alignments differ (68-point ArcFace template vs dlib's 5-point
#: chip), so this is the mean over real photos: measured on 33 lfw-dev train photos whose
#: ArcFace landmarks fell within 8 px of the median in chip coordinates (eye centres agree to
#: about 1 px, nose and mouth to about 4 px, as the two landmark sets weigh pose differently);
#: `benchmarks/identity_decoder.py` re-measures it (on 100 photos: within 0.4 px). The chip
#: is a 1.47x zoom of the crop shifted up: it spans crop x 5..107, y 21..123, so its top 21
#: rows of forehead are cut and the last 11 rows (16 chip rows, chin/neck) lie below the
#: crop, filled by repeating the crop's border.
DLIB_CHIP_FROM_ARCFACE = np.array([[1.4672, -0.0141, -7.5474], [0.0141, 1.4672, -30.7991]])
_ARCFACE_SIZE = 112


class IdentityLoss(nn.Module):
    """1 - cosine between the recognition network's embedding of a reconstruction and a
    target embedding; differentiable with respect to the reconstruction.

    `network` takes RGB chips [N, 3, C, C], float 0..255 (dlib's ResNet:
    `advplugin.nets.dlib_resnet.load_dlib_resnet`, frozen); reconstructions [N, 3, S, S] in
    0..1 are ArcFace-aligned crops of any size S, warped to the chip by `chip_from_arcface`
    (bilinear, `grid_sample`), so the network sees the face framed as it was trained.

    `jitter` > 0: in training mode the loss (not `chips`/`embed`) frames each image with a
    random shift of up to `jitter` of the chip's half-width and a scale within 1 +- `jitter`,
    so the decoder cannot satisfy the network with pixel-exact patterns that a slightly
    different framing (or another recognition model) would not see. `blur` > 0: the loss
    sees the reconstruction through a Gaussian blur of that many of its pixels (sigma), for
    the same reason: without it the decoder learns high-frequency textures (checkerboards)
    that raise dlib's cosine but are not a face to anyone else."""

    def __init__(
        self,
        network: nn.Module,
        *,
        chip_size: int = 150,
        chip_from_arcface: np.ndarray = DLIB_CHIP_FROM_ARCFACE,
        jitter: float = 0.0,
        blur: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.network = network
        self.chip_size = chip_size
        self.jitter, self.blur = jitter, blur
        self._generator = torch.Generator().manual_seed(seed)
        # normalised chip coords (align_corners=False) -> chip pixels -> 112-crop pixels ->
        # normalised crop coords; pixel centres at integers as in cv2 and dlib, and the
        # normalised crop coordinates do not depend on the crop's size.
        to_pixels = np.array(
            [
                [chip_size / 2, 0, (chip_size - 1) / 2],
                [0, chip_size / 2, (chip_size - 1) / 2],
                [0, 0, 1],
            ]
        )
        forward = np.vstack([np.asarray(chip_from_arcface, np.float64), [0, 0, 1]])
        to_normal = np.array(
            [
                [2 / _ARCFACE_SIZE, 0, 1 / _ARCFACE_SIZE - 1],
                [0, 2 / _ARCFACE_SIZE, 1 / _ARCFACE_SIZE - 1],
                [0, 0, 1],
            ]
        )
        theta = to_normal @ np.linalg.inv(forward) @ to_pixels
        self.register_buffer("theta", torch.tensor(theta[:2], dtype=torch.float32)[None])

    def chips(self, images: torch.Tensor, theta: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstructions [N, 3, S, S] in 0..1 -> chips [N, 3, C, C] in 0..255."""
        grid = F.affine_grid(
            self.theta.expand(len(images), 2, 3) if theta is None else theta,
            [len(images), 3, self.chip_size, self.chip_size],
            align_corners=False,
        )
        return F.grid_sample(
            images * 255.0, grid, mode="bilinear", padding_mode="border", align_corners=False
        )

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(self.chips(images))

    def _jittered(self, n: int) -> torch.Tensor:
        """Per-image chip framings: a random scale and shift in chip coordinates, then the
        fixed map to the crop."""
        r = (torch.rand(n, 3, generator=self._generator) * 2 - 1) * self.jitter
        local = torch.zeros(n, 3, 3)
        local[:, 0, 0] = local[:, 1, 1] = 1 + r[:, 0]
        local[:, :2, 2] = r[:, 1:]
        local[:, 2, 2] = 1
        full = torch.cat([self.theta[0], torch.tensor([[0.0, 0.0, 1.0]])])
        return (full @ local)[:, :2]

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-image 1 - cosine [N]."""
        theta = self._jittered(len(images)) if self.training and self.jitter > 0 else None
        if self.training and self.blur > 0:
            images = _gaussian_blur(images, self.blur)
        embedding = self.network(self.chips(images, theta))
        return 1.0 - F.cosine_similarity(embedding, targets, dim=1)


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur per channel, edges replicated."""
    radius = max(1, math.ceil(2 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1.0) / sigma) ** 2)
    k = (k / k.sum()).to(images.dtype)
    c = images.shape[1]
    x = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def dlib_identity_loss(*, jitter: float = 0.0, blur: float = 0.0) -> IdentityLoss:
    """`IdentityLoss` through dlib's ResNet (the `dlib` extractor's weights, run in torch)."""
    from advplugin.adapters.dlib_adapter import resnet_model_path
    from advplugin.nets.dlib_resnet import load_dlib_resnet

    return IdentityLoss(load_dlib_resnet(resnet_model_path()), jitter=jitter, blur=blur)


#: Called after each epoch with (epoch from 1, the model, that epoch's figures); the model is
#: in eval mode during the call (a checkpoint may be saved from it).
EpochCallback = Callable[[int, "Decoder", dict[str, float]], None]


def train_decoder(
    templates: np.ndarray,
    crops: np.ndarray,
    config: DecoderConfig,
    *,
    desc: str = "decoder",
    progress: bool = True,
    identity_weight: float = 0.0,
    identity_loss: IdentityLoss | None = None,
    identity_targets: np.ndarray | None = None,
    flipped_templates: np.ndarray | None = None,
    flipped_targets: np.ndarray | None = None,
    validation: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None,
    patience: int | None = None,
    on_epoch: EpochCallback | None = None,
) -> Decoder:
    """Fit a decoder from templates [N, D] to aligned crops [N, S, S, 3] uint8.

    The defaults train with the L1 pixel loss alone, exactly as the harness always has. The
    options make the stronger attacker of issue 15:

    - `identity_weight` > 0 adds `identity_weight * (1 - cosine)` between the embedding of
      the reconstruction (`identity_loss`, by default dlib's ResNet in torch) and
      `identity_targets` (raw embeddings of the photos; by default the templates, right
      when they are raw embeddings);
    - `flipped_templates` [N, D]: the templates of the mirrored photos; each sample is then
      mirrored with probability 1/2 (crop mirrored, its template and identity target
      swapped for the mirrored photo's: `flipped_targets`, by default the mirrored
      templates, right when they are raw embeddings), twice the faces for the same photos;
    - `validation` = (templates, crops, identity targets or None) of held-out people: the
      same loss is measured on them after each epoch and the best epoch's weights are kept
      (early stopping; `patience` epochs without improvement end training early).
    """
    torch.manual_seed(config.seed)
    x = _unit_scaled(templates)
    y = torch.from_numpy(
        np.ascontiguousarray(crops.transpose(0, 3, 1, 2))
    )  # uint8, scaled per batch
    if identity_weight > 0:
        identity_loss = identity_loss or dlib_identity_loss()
        targets = torch.from_numpy(
            np.asarray(templates if identity_targets is None else identity_targets, np.float32)
        )
    x_flip = _unit_scaled(flipped_templates) if flipped_templates is not None else None
    if x_flip is not None and identity_weight > 0:
        flip_targets = torch.from_numpy(
            np.asarray(flipped_templates if flipped_targets is None else flipped_targets, np.float32)
        )
    model = Decoder(x.shape[1], config)
    opt = torch.optim.Adam(model.parameters(), lr=config.learning_rate, betas=(0.5, 0.999))
    steps = config.epochs * math.ceil(len(x) / config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, config.learning_rate, total_steps=max(steps, 1)
    )
    generator = torch.Generator().manual_seed(config.seed)
    flip_generator = torch.Generator().manual_seed(config.seed + 1)  # keeps the order unchanged
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    stale = 0
    model.train()
    bar = tqdm(total=steps, desc=desc, disable=not progress)
    for epoch in range(config.epochs):
        order = torch.randperm(len(x), generator=generator)
        totals = {"l1": 0.0, "identity": 0.0, "batches": 0.0}
        for start in range(0, len(x), config.batch_size):
            idx = order[start : start + config.batch_size]
            if len(idx) < 2:  # batch norm needs two samples
                continue
            inputs, target = x[idx], y[idx].float() / 255.0
            if identity_weight > 0:
                wanted = targets[idx]
            if x_flip is not None:
                mirror = torch.rand(len(idx), generator=flip_generator) < 0.5
                inputs = torch.where(mirror[:, None], x_flip[idx], inputs)
                target = torch.where(mirror[:, None, None, None], target.flip(3), target)
                if identity_weight > 0:
                    wanted = torch.where(mirror[:, None], flip_targets[idx], wanted)
            out = model(inputs)
            loss = (out - target).abs().mean()
            totals["l1"] += loss.item()
            if identity_weight > 0:
                ident = identity_loss(out, wanted).mean()  # type: ignore[misc]
                totals["identity"] += ident.item()
                loss = loss + identity_weight * ident
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            totals["batches"] += 1
            bar.update()
            bar.set_postfix(l1=f"{totals['l1'] / totals['batches']:.3f}", refresh=False)
        if validation is None and on_epoch is None:
            continue
        model.eval()
        figures = {k: v / max(totals["batches"], 1) for k, v in totals.items() if k != "batches"}
        if validation is not None:
            figures.update(
                _validation_loss(model, validation, identity_weight, identity_loss, config)
            )
            if best is None or figures["val_loss"] < best[0]:
                best, stale = (figures["val_loss"], copy.deepcopy(model.state_dict())), 0
            else:
                stale += 1
        if on_epoch is not None:
            on_epoch(epoch + 1, model, figures)
        model.train()
        if patience is not None and stale >= patience:
            break
    bar.close()
    if best is not None:
        model.load_state_dict(best[1])
    model.eval()
    return model


@torch.no_grad()
def _validation_loss(
    model: Decoder,
    validation: tuple[np.ndarray, np.ndarray, np.ndarray | None],
    identity_weight: float,
    identity_loss: IdentityLoss | None,
    config: DecoderConfig,
) -> dict[str, float]:
    """The training loss on held-out people (model in eval mode): L1, 1 - cosine, total."""
    templates, crops, targets = validation
    x = _unit_scaled(templates)
    if identity_loss is not None:
        identity_loss.training = False  # the fixed framing: no jitter when measuring
    l1, ident = [], []
    for start in range(0, len(x), config.batch_size):
        out = model(x[start : start + config.batch_size])
        target = (
            torch.from_numpy(
                np.ascontiguousarray(crops[start : start + len(out)].transpose(0, 3, 1, 2))
            ).float()
            / 255.0
        )
        l1.append((out - target).abs().mean(dim=(1, 2, 3)))
        if identity_weight > 0 and identity_loss is not None:
            wanted = templates if targets is None else targets
            ident.append(
                identity_loss(
                    out, torch.from_numpy(np.asarray(wanted[start : start + len(out)], np.float32))
                )
            )
    if identity_loss is not None:
        identity_loss.training = True
    figures = {"val_l1": float(torch.cat(l1).mean())}
    figures["val_identity"] = float(torch.cat(ident).mean()) if ident else float("nan")
    figures["val_loss"] = figures["val_l1"] + (
        identity_weight * figures["val_identity"] if ident else 0.0
    )
    return figures


@torch.no_grad()
def reconstruct(model: Decoder, templates: np.ndarray, batch: int = 256) -> np.ndarray:
    """Decoder outputs as uint8 images [N, S, S, 3]."""
    x = _unit_scaled(templates)
    out = [model(x[i : i + batch]) for i in range(0, len(x), batch)]
    img = torch.cat(out).permute(0, 2, 3, 1).numpy() * 255.0
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def fit_linear_map(source: np.ndarray, target: np.ndarray, ridge: float = 1e-6) -> np.ndarray:
    """Least-squares W with source @ W ~ target (unit-normalised rows; minimum-norm when
    there are fewer pairs than dimensions)."""
    s = _unit_scaled(source).double().numpy()
    t = _unit_scaled(target).double().numpy()
    if len(s) <= s.shape[1]:
        return np.linalg.lstsq(s, t, rcond=None)[0]
    return np.linalg.solve(s.T @ s + ridge * len(s) * np.eye(s.shape[1]), s.T @ t)


def apply_linear_map(w: np.ndarray, source: np.ndarray) -> np.ndarray:
    return (_unit_scaled(source).double().numpy() @ w).astype(np.float32)


def linear_fit_residual(source: np.ndarray, target: np.ndarray) -> float:
    """1 - mean cosine between targets and their best linear prediction from the sources:
    ~0 for schemes whose template direction is a linear function of the embedding's (cosine
    ignores the per-template normalisation every scheme applies)."""
    w = fit_linear_map(source, target)
    pred = _unit_scaled(source).double().numpy() @ w
    t = np.asarray(target, np.float64)
    cos = np.sum(pred * t, axis=1) / (np.linalg.norm(pred, axis=1) * np.linalg.norm(t, axis=1))
    return float(1.0 - cos.mean())


def train_mlp_map(
    source: np.ndarray,
    target: np.ndarray,
    *,
    epochs: int = 40,
    hidden: int = 512,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = True,
) -> nn.Module:
    """A two-layer MLP from protected templates to raw embeddings, trained on cosine loss."""
    torch.manual_seed(seed)
    x, y = _unit_scaled(source), _unit_scaled(target)
    model = nn.Sequential(nn.Linear(x.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, y.shape[1]))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-5)
    generator = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc="MLP map", disable=not progress):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            loss = 1 - nn.functional.cosine_similarity(model(x[idx]), y[idx]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model


@torch.no_grad()
def apply_mlp_map(model: nn.Module, source: np.ndarray) -> np.ndarray:
    return model(_unit_scaled(source)).numpy().astype(np.float32)
