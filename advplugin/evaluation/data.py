"""Image folders, identity splits, generated pairs, and the content-hash feature cache.

The harness takes folders laid out `<identity>/<image>`. Train and test folders must hold
disjoint identities: every attack is trained on people other than those it attacks, so
`split_identities` writes such a pair of folders as symlinks (LFW itself is never copied).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from advplugin.evaluation.metrics import PairsProtocol

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


@dataclass(frozen=True)
class ImageFolder:
    """The images of a `<identity>/<image>` folder, sorted by identity then file name."""

    root: Path
    path: np.ndarray  # relative paths `<identity>/<image>`
    identity: np.ndarray

    def __len__(self) -> int:
        return len(self.path)

    def files(self) -> list[Path]:
        return [self.root / p for p in self.path]

    def subset(self, index: np.ndarray) -> ImageFolder:
        return ImageFolder(self.root, self.path[index], self.identity[index])


def list_images(root: str | os.PathLike[str]) -> ImageFolder:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} not found")
    paths, ids = [], []
    for person in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(person.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                paths.append(f"{person.name}/{f.name}")
                ids.append(person.name)
    if not paths:
        raise ValueError(f"{root} holds no images laid out as <identity>/<image>")
    return ImageFolder(root, np.array(paths), np.array(ids))


def limit_images(
    folder: ImageFolder, *, max_identities: int | None, max_per_identity: int | None
) -> ImageFolder:
    """A deterministic smaller folder (for `--quick`): the first identities with two or more
    images (so every metric has genuine pairs), at most `max_per_identity` images each."""
    names, counts = np.unique(folder.identity, return_counts=True)
    keep_names = [n for n, c in zip(names, counts, strict=True) if c >= 2][:max_identities]
    keep = []
    for name in keep_names:
        keep.extend(np.flatnonzero(folder.identity == name)[:max_per_identity].tolist())
    return folder.subset(np.array(sorted(keep), dtype=np.int64))


def identity_in_test(identity: str, test_fraction: float, salt: str = "advplugin-eval") -> bool:
    """Stable split by a hash of the name: the same person always lands on the same side."""
    digest = hashlib.sha256(f"{salt}/{identity}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < test_fraction


def split_identities(
    images: str | os.PathLike[str], out: str | os.PathLike[str], *, test_fraction: float = 0.5
) -> dict[str, int]:
    """Write `out/train` and `out/test` as folders of symlinks to `images`, split by identity."""
    if not 0 < test_fraction < 1:
        raise ValueError("test fraction must be between 0 and 1")
    source = list_images(images)
    out = Path(out)
    counts = {"train_identities": 0, "test_identities": 0, "train_images": 0, "test_images": 0}
    for name in np.unique(source.identity):
        side = "test" if identity_in_test(str(name), test_fraction) else "train"
        person = out / side / str(name)
        person.mkdir(parents=True, exist_ok=True)
        counts[f"{side}_identities"] += 1
        for rel in source.path[source.identity == name]:
            link = out / side / str(rel)
            if not link.exists():
                link.symlink_to((source.root / str(rel)).resolve())
            counts[f"{side}_images"] += 1
    return counts


def generate_pairs(
    folder: ImageFolder, *, n_folds: int = 10, per_fold: int = 300, seed: int = 0
) -> PairsProtocol:
    """Pairs in LFW's protocol: identity-disjoint folds, each with up to `per_fold` matched and
    as many mismatched pairs, no pair twice."""
    rng = np.random.default_rng(seed)
    names = np.unique(folder.identity)
    rng.shuffle(names)
    n_folds = max(2, min(n_folds, len(names) // 4))  # small folders: fewer, fuller folds
    by_name = {str(n): np.flatnonzero(folder.identity == n) for n in names}
    left: list[str] = []
    right: list[str] = []
    same: list[bool] = []
    fold: list[int] = []
    for f in range(n_folds):
        fold_names = [str(n) for n in names[f::n_folds]]
        multi = [n for n in fold_names if len(by_name[n]) >= 2]
        possible_matched = sum(len(by_name[n]) * (len(by_name[n]) - 1) // 2 for n in multi)
        n_pairs = min(per_fold, possible_matched, len(fold_names) * (len(fold_names) - 1) // 2)
        seen: set[tuple[int, int]] = set()
        for want_same in (True, False):
            made, tries = 0, 0
            while made < n_pairs and tries < 100 * per_fold:
                tries += 1
                if want_same:
                    idx = by_name[multi[rng.integers(len(multi))]]
                    a, b = rng.choice(idx, 2, replace=False)
                else:
                    n1, n2 = rng.choice(len(fold_names), 2, replace=False)
                    a = rng.choice(by_name[fold_names[n1]])
                    b = rng.choice(by_name[fold_names[n2]])
                pair = (int(min(a, b)), int(max(a, b)))
                if pair in seen:
                    continue
                seen.add(pair)
                left.append(str(folder.path[pair[0]]))
                right.append(str(folder.path[pair[1]]))
                same.append(want_same)
                fold.append(f)
                made += 1
    if not left:
        raise ValueError("too few identities with two images to generate verification pairs")
    return PairsProtocol(left, right, np.array(same), np.array(fold), n_folds)


def restrict_pairs(protocol: PairsProtocol, available: set[str]) -> PairsProtocol:
    """The pairs of a protocol whose two images are both in `available` (the test folder)."""
    keep = [
        k
        for k, (a, b) in enumerate(zip(protocol.left, protocol.right, strict=True))
        if a in available and b in available
    ]
    if not keep:
        raise ValueError("no pair of the pairs file has both images in the test folder")
    idx = np.array(keep)
    return PairsProtocol(
        [protocol.left[k] for k in keep],
        [protocol.right[k] for k in keep],
        protocol.same[idx],
        protocol.fold[idx],
        protocol.n_folds,
    )


def file_sha256(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class FeatureCache:
    """Per-image arrays keyed by the SHA-256 of the image file, in one `.npz` per model.

    Keyed by content, not by path, so a renamed or re-split folder still hits the cache and an
    edited image never returns a stale vector. The cache holds embeddings of benchmark photos
    for evaluation only (the service never reads or writes it); files are created mode 0600.
    """

    def __init__(
        self, path: str | os.PathLike[str] | None, fields: dict[str, tuple[int, ...]]
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.fields = fields
        self._rows: dict[str, int] = {}
        self._arrays: dict[str, list[np.ndarray]] = {name: [] for name in fields}
        self._dirty = False
        if self.path is not None and self.path.is_file():
            with np.load(self.path, allow_pickle=False) as data:
                if set(fields) - set(data.files):
                    return  # written by another version of the harness: start afresh
                for name in fields:
                    self._arrays[name] = list(data[name])
                self._rows = {str(h): i for i, h in enumerate(data["sha256"])}

    def __contains__(self, digest: str) -> bool:
        return digest in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, digest: str) -> dict[str, np.ndarray]:
        row = self._rows[digest]
        return {name: self._arrays[name][row] for name in self.fields}

    def put(self, digest: str, values: dict[str, np.ndarray]) -> None:
        row = self._rows.setdefault(digest, len(self._rows))
        for name, shape in self.fields.items():
            value = np.asarray(values[name], np.float32).reshape(shape)
            if row == len(self._arrays[name]):
                self._arrays[name].append(value)
            else:
                self._arrays[name][row] = value
        self._dirty = True

    def save(self) -> None:
        """Atomic write (temp file + rename), readable by the owner only."""
        if self.path is None or not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_name(self.path.name + ".tmp.npz")
        digests = sorted(self._rows, key=self._rows.__getitem__)
        arrays = {
            name: np.stack(self._arrays[name]).astype(np.float32)
            if digests
            else np.zeros((0, *shape))
            for name, shape in self.fields.items()
        }
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, sha256=np.array(digests), **arrays)
        os.replace(tmp, self.path)
        self._dirty = False
