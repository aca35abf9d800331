"""dlib's face ResNet in torch: the `.dat` reader, the architecture it finds, and the
network's output against dlib's own on real lfw-dev face chips."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from advplugin.adapters.dlib_adapter import model_dir, resnet_model_path
from advplugin.images import load_image
from advplugin.nets.dlib_dat import DlibFormatError, parse_dlib_net, read_dlib_net
from advplugin.nets.dlib_resnet import ChipEmbedder, add_prev, load_dlib_resnet, resnet_structure


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dat_bytes() -> bytes:
    return resnet_model_path().read_bytes()


def test_parsed_architecture_is_dlibs_anet_type(dat_bytes: bytes) -> None:
    """The widths and strides that dnn_face_recognition_ex.cpp's `anet_type` declares."""
    net = parse_dlib_net(dat_bytes)
    # input_rgb_image_sized<150>'s default channel means, written in dlib's source.
    assert net.input_size == (150, 150)
    np.testing.assert_allclose(net.mean_rgb, [122.782, 117.001, 104.298], atol=1e-4)
    s = resnet_structure(net)
    conv, _, pool = s.stem
    assert conv.weight.shape == (32, 3, 7, 7) and conv.stride == (2, 2) and conv.padding == (0, 0)
    assert pool.kind == "max" and pool.window == (3, 3) and pool.stride == (2, 2)
    widths = [b.conv1.weight.shape[0] for b in s.blocks]
    assert widths == [32] * 3 + [64] * 4 + [128] * 3 + [256] * 3 + [256]
    down = [i for i, b in enumerate(s.blocks) if b.down is not None]
    assert down == [3, 7, 10, 13]  # ares_down opens levels 3, 2, 1 and is all of level 0
    for i, b in enumerate(s.blocks):
        stride = 2 if i in down else 1
        assert b.conv1.stride == (stride, stride) and b.conv2.stride == (1, 1)
        assert b.conv1.padding == ((0, 0) if stride == 2 else (1, 1))
    dense = s.head[1]
    assert dense.weight.shape == (256, 128) and dense.bias is None


def test_reader_refuses_what_it_does_not_understand(dat_bytes: bytes, tmp_path: Path) -> None:
    with pytest.raises(DlibFormatError, match="end of file"):
        parse_dlib_net(dat_bytes[: len(dat_bytes) // 2])
    with pytest.raises(DlibFormatError, match="bytes left"):
        parse_dlib_net(dat_bytes + b"\x01\x00")
    renamed = dat_bytes.replace(b"relu_", b"relv_", 1)
    with pytest.raises(DlibFormatError, match="unsupported layer 'relv_'"):
        parse_dlib_net(renamed)
    # Another dlib network (the 5-point shape predictor is not a DNN at all).
    with pytest.raises(DlibFormatError):
        read_dlib_net(model_dir() / "shape_predictor_5_face_landmarks.dat")


def test_add_prev_zero_pads_the_smaller_tensor_at_the_end() -> None:
    """dlib's tt::add over tensors of different shapes: the sum over the larger shape, the
    smaller one's missing channels, rows and columns read as zero (top-left aligned)."""
    a = torch.arange(1 * 2 * 3 * 3, dtype=torch.float32).reshape(1, 2, 3, 3)
    b = torch.ones(1, 4, 4, 4)
    out = add_prev(a, b)
    assert out.shape == (1, 4, 4, 4)
    expected = b.clone()
    expected[:, :2, :3, :3] += a
    assert torch.equal(out, expected)
    assert torch.equal(add_prev(b, a), expected)


@pytest.fixture(scope="module")
def lfw_chips(face_data: Path) -> np.ndarray:
    """64 aligned chips of different lfw-dev people, cut by dlib.get_face_chip (150 x 150,
    padding 0.25: compute_face_descriptor's own alignment) from the 5-point landmarks
    found in the central box of each photo."""
    import dlib

    shapes = dlib.shape_predictor(str(model_dir() / "shape_predictor_5_face_landmarks.dat"))
    paths = sorted((face_data / "lfw-dev").glob("*/*.jpg"))[::61][:64]
    chips = []
    for p in paths:
        image = load_image(p)
        h, w = image.shape[:2]
        box = dlib.rectangle(int(0.3 * w), int(0.3 * h), int(0.7 * w), int(0.7 * h))
        chips.append(dlib.get_face_chip(image, shapes(image, box), size=150, padding=0.25))
    return np.stack(chips)


def test_matches_dlib_on_lfw_chips(lfw_chips: np.ndarray) -> None:
    import dlib

    net = dlib.face_recognition_model_v1(str(resnet_model_path()))
    expected = np.array([np.asarray(v) for v in net.compute_face_descriptor(list(lfw_chips))])
    got = ChipEmbedder(resnet_model_path(), batch_size=32)(lfw_chips)
    assert got.shape == (len(lfw_chips), 128) and got.dtype == np.float32
    assert np.abs(got - expected).max() < 1e-4
    # The faces differ: a constant output would not pass for the wrong reason.
    assert np.linalg.norm(expected - expected.mean(0), axis=1).min() > 0.2
    # Batching does not change a face's descriptor.
    one = ChipEmbedder(resnet_model_path(), batch_size=1)(lfw_chips[:3])
    assert np.abs(one - got[:3]).max() < 1e-5


def test_network_is_differentiable_and_frozen(lfw_chips: np.ndarray) -> None:
    model = load_dlib_resnet(resnet_model_path())
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    images = torch.from_numpy(lfw_chips[:2]).permute(0, 3, 1, 2).float().requires_grad_(True)
    model(images).pow(2).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_chip_embedder_checks_its_input() -> None:
    embed = ChipEmbedder(resnet_model_path())
    with pytest.raises(ValueError, match=r"uint8 \[N, 150, 150, 3\]"):
        embed(np.zeros((2, 112, 112, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        embed(np.zeros((2, 150, 150, 3), np.float32))
    assert embed(np.zeros((0, 150, 150, 3), np.uint8)).shape == (0, 128)
    with pytest.raises(ValueError, match="batch_size"):
        ChipEmbedder(resnet_model_path(), batch_size=0)
