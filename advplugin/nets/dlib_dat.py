"""A reader for dlib's serialised DNNs (`dlib/serialize.h`, `dlib/dnn/*.h`), numpy only.

It reads `dlib_face_recognition_resnet_model_v1.dat` (shipped by the PyPI package
`face-recognition-models`) without a dlib C++ build, so that `advplugin.nets.dlib_resnet`
can rebuild the network in torch. It knows the layer kinds that file uses and refuses any
other, rather than guessing at bytes it does not understand.

The format, as dlib writes it (confirmed on the file byte for byte, end included):

- integers: one byte holding the byte count (low nibble) and the sign (0x80), then the
  magnitude's bytes, little-endian (0 is `01 00`); booleans: the characters '1' / '0';
  strings: their length as an integer, then the bytes;
- scalar floats: dlib's portable encoding, mantissa (int64) and exponent (int16), each an
  integer as above, value = mantissa * 2**exponent (exponents 32000-32002 mean inf, -inf
  and nan); tensors (version 2): n, k, nr, nc then raw little-endian float32 values; alias
  tensors (views into a layer's params): version 1 and their four dimensions, no values;
- a network is nested like its C++ type: the loss layer (version, its details), then every
  layer's wrapper version from the outermost to the innermost (2: an ordinary layer,
  3: the layer right above the input, 1: a tag or skip layer, which have no details), the
  input layer, then each ordinary layer's details from the innermost out, each followed by
  three booleans and three (empty) tensors of training state, plus one integer (the sample
  expansion factor) after the innermost layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from advplugin.errors import InvalidInputError

#: dlib's float_details codes for the non-finite values.
_SPECIAL_EXPONENTS = {32000: np.inf, 32001: -np.inf, 32002: np.nan}


class DlibFormatError(InvalidInputError):
    """The bytes are not a dlib network this reader understands; says where and why."""


@dataclass(frozen=True)
class Conv:
    """`con_`: weight [out, in, kh, kw] (cross-correlation, like torch), bias [out]."""

    weight: np.ndarray
    bias: np.ndarray
    stride: tuple[int, int]
    padding: tuple[int, int]


@dataclass(frozen=True)
class Affine:
    """`affine_` in CONV_MODE: y = gamma[c] * x + beta[c] (dlib's frozen batch norm)."""

    gamma: np.ndarray
    beta: np.ndarray


@dataclass(frozen=True)
class Pool:
    """`max_pool_` / `avg_pool_`; a window of 0 x 0 means the whole map (avg_pool_everything)."""

    kind: str
    window: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]


@dataclass(frozen=True)
class Dense:
    """`fc_`: y = x @ weight (+ bias); weight is [inputs, outputs], dlib's own layout."""

    weight: np.ndarray
    bias: np.ndarray | None


@dataclass(frozen=True)
class Marker:
    """Layers with no parameters: `relu_` and `add_prev_` (whose tag is in the C++ type,
    not in the file; the nesting says where the tag layers are)."""

    kind: str


Layer = Conv | Affine | Pool | Dense | Marker


@dataclass(frozen=True)
class DlibNet:
    """A parsed network: `layers` from the input out, `nesting` the wrapper versions from
    the outermost layer in (see the module docstring), the input layer's mean (RGB) and size."""

    loss: str
    input_size: tuple[int, int]
    mean_rgb: np.ndarray
    layers: tuple[Layer, ...]
    nesting: tuple[int, ...] = field(repr=False)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def fail(self, why: str) -> DlibFormatError:
        return DlibFormatError(f"dlib network file, byte {self.pos}: {why}")

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise self.fail("unexpected end of file")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def integer(self) -> int:
        head = self.take(1)[0]
        size = head & 0x0F
        if head & 0x70 or size > 8:
            raise self.fail(f"bad integer header 0x{head:02x}")
        value = int.from_bytes(self.take(size), "little")
        return -value if head & 0x80 else value

    def scalar(self) -> float:
        mantissa, exponent = self.integer(), self.integer()
        if exponent in _SPECIAL_EXPONENTS:
            return float(_SPECIAL_EXPONENTS[exponent])
        return float(mantissa * 2.0**exponent)

    def boolean(self) -> bool:
        c = self.take(1)
        if c not in (b"0", b"1"):
            raise self.fail(f"expected a boolean, got {c!r}")
        return c == b"1"

    def string(self) -> str:
        n = self.integer()
        if not 0 <= n <= 256:
            raise self.fail(f"implausible string length {n}")
        raw = self.take(n)
        if not raw.isascii():
            raise self.fail("non-ASCII layer name")
        return raw.decode()

    def peek_string(self) -> str | None:
        start = self.pos
        try:
            return self.string()
        except DlibFormatError:
            return None
        finally:
            self.pos = start

    def tensor(self) -> np.ndarray:
        version = self.integer()
        if version != 2:
            raise self.fail(f"tensor version {version} (only 2, raw float32, is supported)")
        dims = tuple(self.integer() for _ in range(4))
        if min(dims) < 0:
            raise self.fail(f"negative tensor dimensions {dims}")
        count = int(np.prod(dims))
        values = np.frombuffer(self.take(4 * count), dtype="<f4")
        return values.astype(np.float32).reshape(dims)

    def alias(self) -> tuple[int, int, int, int]:
        if (version := self.integer()) != 1:
            raise self.fail(f"alias tensor version {version}")
        n, k, nr, nc = (self.integer() for _ in range(4))
        return n, k, nr, nc


def _conv(r: _Reader, name: str) -> Conv:
    params = r.tensor().reshape(-1)
    filters, nr, nc, sy, sx, py, px = (r.integer() for _ in range(7))
    shape, bias_shape = r.alias(), r.alias()
    for _ in range(4):  # learning-rate and weight-decay multipliers: training only
        r.scalar()
    use_bias = r.boolean() if name == "con_5" else True
    n_weight = int(np.prod(shape))
    if shape[0] != filters or shape[2:] != (nr, nc):
        raise r.fail(f"convolution filters {shape} disagree with {filters}x{nr}x{nc}")
    if params.size != n_weight + (filters if use_bias else 0) or bias_shape[1] != filters:
        raise r.fail("convolution parameter count does not match its shape")
    bias = params[n_weight:] if use_bias else np.zeros(filters, np.float32)
    return Conv(params[:n_weight].reshape(shape), bias, (sy, sx), (py, px))


def _affine(r: _Reader) -> Affine:
    params = r.tensor().reshape(-1)
    gamma, beta = r.alias(), r.alias()
    if (mode := r.integer()) != 0:
        raise r.fail(f"affine layer in mode {mode} (only CONV_MODE, 0, is supported)")
    channels = gamma[1]
    if params.size != 2 * channels or beta[1] != channels:
        raise r.fail("affine parameter count does not match its shape")
    return Affine(params[:channels].copy(), params[channels:].copy())


def _pool(r: _Reader, kind: str) -> Pool:
    nr, nc, sy, sx, py, px = (r.integer() for _ in range(6))
    return Pool(kind, (nr, nc), (sy, sx), (py, px))


def _dense(r: _Reader) -> Dense:
    outputs, inputs = r.integer(), r.integer()
    params = r.tensor().reshape(-1)
    r.alias(), r.alias()
    bias_mode = r.integer()  # FC_HAS_BIAS = 0, FC_NO_BIAS = 1
    for _ in range(4):
        r.scalar()
    n_weight = inputs * outputs
    if params.size != n_weight + (outputs if bias_mode == 0 else 0):
        raise r.fail("fully connected parameter count does not match its shape")
    bias = params[n_weight:] if bias_mode == 0 else None
    return Dense(params[:n_weight].reshape(inputs, outputs), bias)


def _layer(r: _Reader) -> Layer:
    name = r.string()
    if name in ("con_4", "con_5"):
        return _conv(r, name)
    if name == "affine_":
        return _affine(r)
    if name in ("max_pool_2", "avg_pool_2"):
        return _pool(r, name[:3])
    if name == "fc_2":
        return _dense(r)
    if name in ("relu_", "add_prev_"):
        return Marker(name.rstrip("_"))
    raise r.fail(f"unsupported layer {name!r}")


def parse_dlib_net(data: bytes) -> DlibNet:
    """Parse a serialised dlib DNN with an `input_rgb_image_sized` input (see module doc)."""
    r = _Reader(data)
    if (version := r.integer()) != 1:
        raise r.fail(f"loss layer version {version}")
    loss = r.string()
    if loss != "loss_metric_2":
        raise r.fail(f"unsupported loss layer {loss!r}")
    r.scalar(), r.scalar()  # margin and distance threshold: training only
    nesting: list[int] = []
    while r.peek_string() != "input_rgb_image_sized":
        if (v := r.integer()) not in (1, 2, 3):
            raise r.fail(f"unexpected layer wrapper version {v}")
        nesting.append(v)
    r.string()
    mean = np.array([r.scalar() for _ in range(3)], np.float32)
    size = (r.integer(), r.integer())
    n_layers = sum(v != 1 for v in nesting)
    layers: list[Layer] = []
    for i in range(n_layers):
        layers.append(_layer(r))
        for _ in range(3):
            r.boolean()
        for _ in range(3):
            r.tensor()
        if i == 0:
            r.integer()  # the sample expansion factor, after the layer above the input
    if r.pos != len(data):
        raise r.fail(f"{len(data) - r.pos} bytes left after the last layer")
    return DlibNet(loss, size, mean, tuple(layers), tuple(nesting))


def read_dlib_net(path: str | Path) -> DlibNet:
    return parse_dlib_net(Path(path).read_bytes())
