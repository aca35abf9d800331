"""dlib's face-recognition ResNet (`dlib_face_recognition_resnet_model_v1.dat`) in torch.

The network is `anet_type` of dlib's `dnn_face_recognition_ex.cpp`: a 7x7/2 convolution to
32 maps, 3x3/2 max-pool, residual blocks (two 3x3 convolutions, each followed by `affine`,
dlib's frozen batch norm), global average pool and a 128-d linear layer without bias. The
weights and every stride, padding and width come from the `.dat` file itself
(`advplugin.nets.dlib_dat`); the block structure is recognised from the layer sequence and
checked against the file's nesting (where the tag and skip layers sit).

Why a port: it makes image -> dlib descriptor differentiable (identity losses, the AdvFace
shadow loop) and batched. Two dlib conventions matter for identical outputs:
- a convolution or pool with stride > 1 has no padding (dlib's default), so sizes shrink
  150 -> 72 -> 35 -> 17 -> 8 -> 3/4 -> 1/2 and the two branches of the last two down-sampling
  blocks differ in size;
- `add_prev` then adds tensors of different shapes by zero-padding the smaller one at the
  end of each dimension (channels, rows, columns), as dlib's `tt::add` does.
`affine` is folded into the preceding convolution (same function, one op fewer).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from advplugin.nets.dlib_dat import Affine, Conv, Dense, DlibNet, Layer, Marker, Pool, read_dlib_net

#: input_rgb_image's scaling: (pixel - mean) / 256, a constant of its C++ code, not stored.
INPUT_SCALE = 256.0


@dataclass(frozen=True)
class Block:
    """One residual block; `down` is the average pool of the shortcut (ares_down), or None."""

    conv1: Conv
    affine1: Affine
    conv2: Conv
    affine2: Affine
    down: Pool | None


@dataclass(frozen=True)
class Structure:
    stem: tuple[Conv, Affine, Pool]
    blocks: tuple[Block, ...]
    head: tuple[Pool, Dense]


def _is(layer: Layer, kind: type, name: str | None = None) -> bool:
    if not isinstance(layer, kind):
        return False
    return name is None or getattr(layer, "kind", None) == name


def _expected_nesting(blocks: tuple[Block, ...]) -> tuple[int, ...]:
    """Wrapper versions, outermost first, of dlib's residual templates (1: tag/skip)."""
    out = [2, 2]  # fc, avg_pool_everything
    for b in reversed(blocks):
        if b.down is None:  # relu<add_prev1<affine<con<relu<affine<con<tag1<...
            out += [2] * 7 + [1]
        else:  # relu<add_prev2<avg_pool<skip1<tag2<affine<con<relu<affine<con<tag1<...
            out += [2, 2, 2, 1, 1, 2, 2, 2, 2, 2, 1]
    return (*out, 2, 2, 2, 3)  # max_pool, relu, affine, con over the input


def resnet_structure(net: DlibNet) -> Structure:
    """Recognise stem, residual blocks and head in the parsed layers; refuse anything else."""
    layers = net.layers
    if not (
        len(layers) >= 6
        and _is(layers[0], Conv)
        and _is(layers[1], Affine)
        and _is(layers[2], Marker, "relu")
        and _is(layers[3], Pool, "max")
        and _is(layers[-2], Pool, "avg")
        and layers[-2].window == (0, 0)  # type: ignore[union-attr]
        and _is(layers[-1], Dense)
    ):
        raise ValueError("not a dlib ResNet: expected con, affine, relu, max_pool ... avg_pool, fc")
    blocks: list[Block] = []
    i, end = 4, len(layers) - 2
    while i < end:
        part = layers[i : i + 8]
        down = len(part) == 8 and _is(part[5], Pool, "avg")
        kinds = [Conv, Affine, Marker, Conv, Affine] + ([Pool] if down else []) + [Marker, Marker]
        part = layers[i : i + len(kinds)]
        if len(part) != len(kinds) or not all(_is(x, k) for x, k in zip(part, kinds, strict=True)):
            raise ValueError(f"unexpected layer sequence in residual block at layer {i}")
        if [m.kind for m in part if isinstance(m, Marker)] != ["relu", "add_prev", "relu"]:
            raise ValueError(f"residual block at layer {i} is not relu ... add_prev, relu")
        blocks.append(Block(part[0], part[1], part[3], part[4], part[5] if down else None))  # type: ignore[arg-type]
        i += len(kinds)
    structure = Structure(
        (layers[0], layers[1], layers[3]),  # type: ignore[arg-type]
        tuple(blocks),
        (layers[-2], layers[-1]),  # type: ignore[arg-type]
    )
    if net.nesting != _expected_nesting(structure.blocks):
        raise ValueError("the file's tag/skip layers are not where dlib's residual blocks put them")
    return structure


def _folded(conv: Conv, affine: Affine) -> nn.Conv2d:
    """conv followed by affine as one convolution: w * gamma, b * gamma + beta."""
    out_c, in_c, kh, kw = conv.weight.shape
    layer = nn.Conv2d(in_c, out_c, (kh, kw), conv.stride, conv.padding, bias=True)
    gamma = affine.gamma.astype(np.float64)
    weight = conv.weight.astype(np.float64) * gamma[:, None, None, None]
    bias = conv.bias.astype(np.float64) * gamma + affine.beta
    layer.weight.data = torch.from_numpy(weight.astype(np.float32))
    layer.bias.data = torch.from_numpy(bias.astype(np.float32))
    return layer


def add_prev(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's add_prev: the sum over the larger shape, the smaller zero-padded at the end."""
    if a.shape == b.shape:
        return a + b
    shape = [max(x, y) for x, y in zip(a.shape[1:], b.shape[1:], strict=True)]

    def pad(t: torch.Tensor) -> torch.Tensor:
        c, h, w = t.shape[1:]
        return F.pad(t, (0, shape[2] - w, 0, shape[1] - h, 0, shape[0] - c))

    return pad(a) + pad(b)


def _pool_args(pool: Pool) -> dict[str, tuple[int, int]]:
    if pool.padding != (0, 0):
        # dlib pads max pools with -inf and averages only inside pixels; the model has none.
        raise ValueError("padded pooling layers are not supported")
    return {"kernel_size": pool.window, "stride": pool.stride}


class _Residual(nn.Module):
    def __init__(self, block: Block) -> None:
        super().__init__()
        self.conv1 = _folded(block.conv1, block.affine1)
        self.conv2 = _folded(block.conv2, block.affine2)
        self.down = _pool_args(block.down) if block.down is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(F.relu(self.conv1(x)))
        shortcut = F.avg_pool2d(x, **self.down) if self.down is not None else x
        return F.relu(add_prev(y, shortcut))


class DlibResNet(nn.Module):
    """RGB images [N, 3, H, W], float 0..255 (150 x 150 dlib face chips) -> [N, 128].

    Differentiable with respect to the images; the normalisation is inside the module."""

    def __init__(self, net: DlibNet) -> None:
        super().__init__()
        structure = resnet_structure(net)
        self.input_size = net.input_size
        conv, affine, pool = structure.stem
        self.register_buffer("mean", torch.from_numpy(net.mean_rgb.reshape(1, 3, 1, 1).copy()))
        self.stem = _folded(conv, affine)
        self.stem_pool = _pool_args(pool)
        self.blocks = nn.ModuleList(_Residual(b) for b in structure.blocks)
        dense = structure.head[1]
        self.fc = nn.Linear(*dense.weight.shape, bias=dense.bias is not None)
        self.fc.weight.data = torch.from_numpy(np.ascontiguousarray(dense.weight.T))
        if dense.bias is not None:
            self.fc.bias.data = torch.from_numpy(dense.bias.copy())
        self.dim = dense.weight.shape[1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - self.mean) / INPUT_SCALE
        x = F.max_pool2d(F.relu(self.stem(x)), **self.stem_pool)
        for block in self.blocks:
            x = block(x)
        return self.fc(x.mean(dim=(2, 3)))


@cache
def _parsed(path: str) -> DlibNet:
    return read_dlib_net(path)


def load_dlib_resnet(path: str | Path) -> DlibResNet:
    """The network of a dlib `.dat` file, in eval mode with frozen parameters.

    A new module per call (0.1 s; the parsed file is cached per process), so a caller may
    move it to a GPU or unfreeze it without touching anyone else's copy."""
    # channels_last: about 20 % faster on CPUs (oneDNN's preferred layout); chips arrive in
    # it anyway, HWC arrays seen through a permute. Inputs in either layout give the same result.
    model = DlibResNet(_parsed(str(Path(path).resolve()))).to(memory_format=torch.channels_last)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def torch_device(name: str = "auto") -> torch.device:
    """"auto": the first CUDA device when this torch build sees one, else the CPU (the GPU
    path is chosen by what is installed, never required). Anything else is checked: a clear
    error for a device this machine does not have, instead of torch's at the first batch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown torch device {name!r}: use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and (
        not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()
    ):
        raise ValueError(f"device {name!r} requested but this torch build sees no such GPU")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported torch device {name!r}: use auto, cpu, cuda or cuda:N")
    return device


class ChipEmbedder:
    """uint8 face chips [N, 150, 150, 3] (dlib.get_face_chip's alignment) -> float32 [N, 128].

    `threads` > 0 sets torch's intra-op threads for the whole process (torch has no
    per-model setting); 0 leaves them as they are. `device`: "auto" (CUDA when this torch
    build sees a GPU, else the CPU: the same descriptors within float tolerance), "cpu",
    "cuda" or "cuda:N" (an error when there is no such device)."""

    def __init__(
        self, path: str | Path, *, threads: int = 0, batch_size: int = 64, device: str = "auto"
    ) -> None:
        if threads < 0 or batch_size < 1:
            raise ValueError("threads must be >= 0 and batch_size >= 1")
        if threads:
            torch.set_num_threads(threads)
        self.device = torch_device(device)
        self.model = load_dlib_resnet(path).to(self.device)
        self.batch_size = batch_size
        self.dim = self.model.dim

    def __call__(self, chips: np.ndarray) -> np.ndarray:
        chips = np.asarray(chips)
        size = self.model.input_size
        if chips.dtype != np.uint8 or chips.ndim != 4 or chips.shape[1:] != (*size, 3):
            raise ValueError(
                f"chips must be uint8 [N, {size[0]}, {size[1]}, 3], got {chips.dtype} {list(chips.shape)}"
            )
        out = np.empty((len(chips), self.dim), np.float32)
        with torch.inference_mode():
            for start in range(0, len(chips), self.batch_size):
                batch = torch.from_numpy(chips[start : start + self.batch_size]).to(self.device)
                x = batch.permute(0, 3, 1, 2).float()
                out[start : start + len(batch)] = self.model(x).cpu().numpy()
        return out
