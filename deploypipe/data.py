"""Data sources and deterministic train / calibration / test splits.

Sources (``DataSpec.source``):
- ``digits``: scikit-learn's bundled 8×8 handwritten digits (1,797 images, offline) — the embedded
  default. No test split ships with it, so a seeded stratified share is held out.
- ``imagefolder:PATH``: ``PATH/train/<class>/*`` and ``PATH/test/<class>/*`` (torchvision's
  ImageFolder layout, e.g. ../shared/data/cifar10). Decoded once into a uint8 array cached under
  ``$DEPLOYPIPE_CACHE`` (default ~/.cache/deploypipe), so an epoch never re-decodes JPEGs.
- ``torchvision:CIFAR10[:ROOT]`` (or CIFAR100, MNIST, FashionMNIST): downloaded by torchvision on
  a machine with internet.

Images are kept in memory as uint8 (or float32 for digits) NCHW tensors and handed out as float32
batches in [0, 1]. Training augmentation (random crop with padding, horizontal flip for natural
images) runs on whole batches, not per sample.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .config import DataSpec
from .errors import InputError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff"}


@dataclass
class ImageSet:
    """Images (N, C, H, W) as uint8 (0..255) or float32 (0..1), and int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor
    names: Optional[list[str]] = None  # each image's file (image folders), for tables a user reads

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "ImageSet":
        index = torch.as_tensor(index, dtype=torch.long)
        names = [self.names[i] for i in index.tolist()] if self.names is not None else None
        return ImageSet(self.images[index], self.labels[index], names)

    def as_float(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()

    def batches(self, batch_size: int, shuffle: bool = False, generator: Optional[torch.Generator] = None,
                augment: Optional["Augment"] = None, with_index: bool = False) -> Iterator[tuple]:
        """(images, labels) batches; with ``with_index`` also each image's index in this set."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            x = self.as_float(self.images[idx])
            if augment is not None:
                x = augment(x, generator)
            yield (x, self.labels[idx], idx) if with_index else (x, self.labels[idx])


@dataclass
class Augment:
    """Standard augmentation on a batch: random crop after zero padding, optional horizontal flip."""

    pad: int
    flip: bool

    def __call__(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        n, _, h, w = x.shape
        if self.pad:
            padded = F.pad(x, (self.pad,) * 4)
            dy = torch.randint(0, 2 * self.pad + 1, (n,), generator=generator)
            dx = torch.randint(0, 2 * self.pad + 1, (n,), generator=generator)
            x = _crop(padded, dy, dx, h, w)
        if self.flip:
            flip = torch.rand(n, generator=generator) < 0.5
            x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
        return x


def _crop(padded: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Per-sample crop of an (N, C, H+2p, W+2p) batch at offsets (dy, dx), by gather."""
    n, c = padded.shape[:2]
    rows = (dy.view(n, 1) + torch.arange(h)).view(n, 1, h, 1).expand(n, c, h, padded.shape[3])
    x = padded.gather(2, rows)
    cols = (dx.view(n, 1) + torch.arange(w)).view(n, 1, 1, w).expand(n, c, h, w)
    return x.gather(3, cols)


@dataclass
class Splits:
    """What every stage sees: train, calibration (a seeded subset of train) and test sets."""

    train: ImageSet
    calib: ImageSet
    test: ImageSet
    classes: list[str]
    augment: Optional[Augment]
    fingerprint: str  # identity of the data (spec + decoded content): part of resume keys
    calib_index: Optional[torch.Tensor] = None  # which train images the calibration set holds

    def held_out(self, count: int, seed: int) -> ImageSet:
        """Up to ``count`` training images outside the calibration set, drawn with ``seed``: data a stage
        may select on (never the test split) without reusing what it calibrated on."""
        used = set(self.calib_index.tolist()) if self.calib_index is not None else set()
        order = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(seed)).tolist()
        return self.train.subset(torch.tensor([i for i in order if i not in used][:count], dtype=torch.long))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the training images in [0, 1] (for zoo normalisation),
        from an evenly strided sample of at most ~10,000 images (folders come sorted by class)."""
        x = self.train.as_float(self.train.images[::max(1, len(self.train) // 10000)])
        return x.mean((0, 2, 3)).tolist(), x.std((0, 2, 3)).clamp_min(1e-3).tolist()


# --------------------------------------------------------------------------- sources
def _digits_file() -> Optional[Path]:
    """scikit-learn's bundled digits table (1,797 rows of 64 pixels in 0..16 and the digit), found
    without importing scikit-learn (whose import would slow every CLI start that uses the embedded data)."""
    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


def _digits() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    path = _digits_file()
    if path is not None:
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)  # numpy reads the .gz itself
        pixels, target = table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    else:  # another scikit-learn layout: its loader
        from sklearn.datasets import load_digits

        d = load_digits()
        pixels, target = d.images.astype(np.float32), d.target.astype(np.int64)
    images = torch.from_numpy(np.ascontiguousarray(pixels) / 16.0).unsqueeze(1)
    return images, torch.from_numpy(target), [str(c) for c in range(10)]


def _list_folder(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    if not root.is_dir():
        raise InputError(f"image folder '{root}' does not exist",
                         f"create {root}/<class>/<image> or check the data path")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = []
    for label, cls in enumerate(classes):
        for entry in sorted(os.scandir(root / cls), key=lambda e: e.name):
            if entry.is_file() and Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
                files.append((entry.path, label))
    if not files:
        raise InputError(f"image folder '{root}' has no images",
                         f"put images in {root}/<class>/ (suffixes {', '.join(sorted(IMAGE_SUFFIXES))})")
    counts = {label: 0 for label in range(len(classes))}
    for _, label in files:
        counts[label] += 1
    empty = [classes[label] for label, n in counts.items() if n == 0]
    if empty:  # a class with no image would train a class the model can never see
        raise InputError(f"image folder '{root}' has class folders without images: {', '.join(empty[:5])}",
                         "put images in them or remove them")
    return classes, files


def _decode(job: tuple[list[str], Optional[int]]) -> list[np.ndarray]:
    from PIL import Image

    paths, size = job
    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
                if size is not None and im.size != (size, size):
                    im = im.resize((size, size), Image.BILINEAR)
                out.append(np.asarray(im, dtype=np.uint8))
        except (OSError, ValueError, SyntaxError) as err:  # truncated, corrupt, or not an image (PIL's errors)
            raise InputError(f"image '{p}' cannot be decoded ({type(err).__name__}: {str(err).splitlines()[0][:80]})",
                             "replace or remove the file") from None
    return out


def cache_dir() -> Path:
    return Path(os.environ.get("DEPLOYPIPE_CACHE", Path.home() / ".cache" / "deploypipe"))


def _decode_folder(root: Path, image_size: Optional[int], workers: int) -> tuple[ImageSet, list[str], str]:
    """Decode an image folder to (N, C, H, W) uint8 once; later calls read the cache (found by the
    files' names, sizes and mtimes). Returns the images (with their files, relative to ``root``),
    class names and a digest of the decoded content: a copy of the folder with new mtimes (a restore,
    a copy without -p) has the same digest, so stages finished on it are still recognised as done."""
    classes, files = _list_folder(root)
    names = [os.path.relpath(p, root) for p, _ in files]
    stat = hashlib.sha256(json.dumps([str(root.resolve()), image_size, classes]).encode())
    for path, _ in files:
        st = os.stat(path)
        stat.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    key = stat.hexdigest()[:24]
    cached = cache_dir() / f"imagefolder-{key}.npz"
    if cached.is_file():
        found = _read_cache(cached, len(files))
        if found is not None:
            images, labels = found
            return (ImageSet(torch.from_numpy(images), torch.from_numpy(labels), names), classes,
                    _content_digest(images, labels, classes))
    paths = [p for p, _ in files]
    chunk = 2000
    jobs = [(paths[i:i + chunk], image_size) for i in range(0, len(paths), chunk)]
    from rich.progress import track

    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(track(pool.map(_decode, jobs), total=len(jobs), description=f"decoding {root}",
                               transient=True))
    else:
        parts = [_decode(j) for j in jobs]
    arrays = [a for part in parts for a in part]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise InputError(f"images under '{root}' have different sizes {sorted(shapes)[:3]}",
                         "set data.image_size (e.g. 32) so they are resized to one size")
    images = np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2))
    labels = np.array([lbl for _, lbl in files], dtype=np.int64)
    _write_cache(cached, images, labels)
    return (ImageSet(torch.from_numpy(images), torch.from_numpy(labels), names), classes,
            _content_digest(images, labels, classes))


def _read_cache(cached: Path, count: int) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """The cached (images, labels), or None when the file is damaged (it is then decoded again)."""
    import zipfile

    from .progress import log

    try:
        with np.load(cached) as z:
            images, labels = z["images"], z["labels"]
        if len(images) == len(labels) == count:
            return images, labels
        problem = f"it holds {len(images)} images for {count} files"
    except PermissionError as err:
        raise InputError(f"cannot read the decoded-image cache {cached}: {err.strerror}",
                         "make it readable, or set DEPLOYPIPE_CACHE to a folder of yours") from None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        problem = f"{type(err).__name__}: {err}"
    log(f"the decoded-image cache {cached} is damaged ({problem}): decoding the images again")
    return None


def _write_cache(cached: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write the cache atomically (a temporary file, then a rename); a folder that cannot be written is
    the user's to fix (exit 2), and no partial file is left."""
    tmp = cached.with_suffix(f".tmp{os.getpid()}.npz")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, images=images, labels=labels)
        os.replace(tmp, cached)
    except OSError as err:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise InputError(f"cannot write the decoded-image cache in {cached.parent}: {err.strerror or err}",
                         "set DEPLOYPIPE_CACHE to a writable folder (the decoded images are kept there)") from None


def _content_digest(images: np.ndarray, labels: np.ndarray, classes: list[str]) -> str:
    """sha256 of decoded images, labels and class names."""
    h = hashlib.sha256(json.dumps([classes, list(images.shape)]).encode())
    h.update(np.ascontiguousarray(images).data)
    h.update(np.ascontiguousarray(labels, dtype=np.int64).data)
    return h.hexdigest()


def _torchvision(name: str, root: Optional[str]) -> tuple[tuple, tuple, list[str]]:
    import torchvision

    known = {"CIFAR10", "CIFAR100", "MNIST", "FashionMNIST"}
    if name not in known:
        raise InputError(f"unknown torchvision dataset '{name}'", f"use one of {', '.join(sorted(known))}")
    root = root or str(cache_dir() / "torchvision")
    cls = getattr(torchvision.datasets, name)
    try:
        sets = [cls(root, train=t, download=True) for t in (True, False)]
    except Exception as err:  # no internet, bad root
        raise InputError(f"could not load torchvision:{name} into {root}: {err}",
                         "run once on a machine with internet, or use imagefolder:PATH") from None

    def arrays(ds) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.as_tensor(np.asarray(ds.data), dtype=torch.uint8)
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        return x.contiguous(), torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)

    return arrays(sets[0]), arrays(sets[1]), list(sets[0].classes)


def _stratified_holdout(labels: torch.Tensor, fraction: float,
                        generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    train, test = [], []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        k = max(1, round(len(idx) * fraction))
        test.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def load_data(spec: DataSpec, workers: int = 2) -> Splits:
    """Build the splits of a data spec: deterministic given ``spec.seed``."""
    source, _, arg = spec.source.partition(":")
    g = torch.Generator().manual_seed(spec.seed)
    natural = True  # horizontal flips keep the label (not so for digits)
    keys: list[str] = []
    if source == "digits":
        if arg:
            raise InputError(f"data source 'digits' takes no argument (got '{spec.source}')", "use 'digits'")
        images, labels, classes = _digits()
        tr, te = _stratified_holdout(labels, spec.test_fraction, g)
        train, test = ImageSet(images[tr], labels[tr]), ImageSet(images[te], labels[te])
        natural = False
    elif source == "imagefolder":
        if not arg:
            raise InputError("data source 'imagefolder' needs a path", "use imagefolder:PATH with PATH/train and "
                                                                       "PATH/test")
        root = Path(arg).expanduser()
        if not root.is_dir():
            raise InputError(f"data folder '{root}' does not exist", "check the path given after 'imagefolder:'")
        if not (root / "train").is_dir():
            raise InputError(f"data folder '{root}' has no train/ subfolder",
                             f"lay it out as {root}/train/<class>/* and {root}/test/<class>/*")
        whole, classes, key = _decode_folder(root / "train", spec.image_size, workers)
        keys.append(key)
        if (root / "test").is_dir():
            test, test_classes, key = _decode_folder(root / "test", spec.image_size, workers)
            keys.append(key)
            if test_classes != classes:
                raise InputError(f"{root}/test classes {test_classes[:5]} differ from train classes {classes[:5]}",
                                 "use the same class folders in train/ and test/")
            train = whole
        else:
            tr, te = _stratified_holdout(whole.labels, spec.test_fraction, g)
            train, test = whole.subset(tr), whole.subset(te)
    elif source == "torchvision":
        name, _, root = arg.partition(":")
        (xtr, ytr), (xte, yte), classes = _torchvision(name, root or None)
        train, test = ImageSet(xtr, ytr), ImageSet(xte, yte)
        natural = name.startswith("CIFAR")
    else:
        raise InputError(f"unknown data source '{spec.source}'",
                         "use digits, imagefolder:PATH or torchvision:CIFAR10")
    if spec.limit_train:
        train = train.subset(torch.randperm(len(train), generator=g)[:spec.limit_train].sort().values)
    if spec.limit_test:
        test = test.subset(torch.randperm(len(test), generator=g)[:spec.limit_test].sort().values)
    calib_index = torch.randperm(len(train), generator=g)[:min(spec.calib_size, len(train))].sort().values
    h = train.images.shape[2]
    augment = None
    if spec.augment == "standard":
        augment = Augment(pad=max(1, h // 8), flip=natural)
    fingerprint = hashlib.sha256(json.dumps([spec.model_dump(mode="json"), keys]).encode()).hexdigest()
    return Splits(train=train, calib=train.subset(calib_index), test=test, classes=classes,
                  augment=augment, fingerprint=fingerprint, calib_index=calib_index)


# --------------------------------------------------------------------------- DRS half-images
def half_image_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The C x H x W/2 shape of ``diagonal_split``'s halves (the shape itself when W is odd: the
    stages say why they cannot split it)."""
    return (*shape[:-1], shape[-1] // 2) if shape[-1] % 2 == 0 else tuple(shape)


def diagonal_split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., C, H, W) -> two (..., C, H, W/2): per 2x2 block, the main diagonal left, the anti-diagonal
    right (each row alternates which pixel of a horizontal pair goes where). W must be even. The
    split of dual randomized smoothing (Xia et al. 2024): the train stage fits one base classifier
    per side, the certify stage smooths each side."""
    w = x.shape[-1]
    if w % 2:
        raise ValueError(f"DRS needs an even image width, got {w}")
    rows = torch.arange(x.shape[-2], device=x.device) % 2  # 0 on even rows, 1 on odd
    cols = torch.arange(0, w, 2, device=x.device)
    left_idx = cols[None, :] + rows[:, None]       # even rows: even columns; odd rows: odd columns
    right_idx = cols[None, :] + 1 - rows[:, None]
    shape = x.shape[:-1] + (w // 2,)
    left = torch.gather(x, -1, left_idx.expand(shape))
    right = torch.gather(x, -1, right_idx.expand(shape))
    return left, right


def diagonal_merge(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """The inverse of ``diagonal_split``."""
    h, half = left.shape[-2], left.shape[-1]
    rows = torch.arange(h, device=left.device) % 2
    cols = torch.arange(0, 2 * half, 2, device=left.device)
    out = left.new_empty(left.shape[:-1] + (2 * half,))
    out.scatter_(-1, (cols[None, :] + rows[:, None]).expand(left.shape), left)
    out.scatter_(-1, (cols[None, :] + 1 - rows[:, None]).expand(right.shape), right)
    return out
