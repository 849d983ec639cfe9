"""Data sources, deterministic splits, the decode cache and batch augmentation."""

import os
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from deploypipe.config import DataSpec
from deploypipe.data import Augment, ImageSet, load_data
from deploypipe.errors import InputError


def test_digits_splits_are_deterministic_disjoint_and_stratified():
    a = load_data(DataSpec(source="digits", calib_size=100, seed=3))
    b = load_data(DataSpec(source="digits", calib_size=100, seed=3))
    c = load_data(DataSpec(source="digits", calib_size=100, seed=4))
    assert torch.equal(a.test.images, b.test.images) and torch.equal(a.calib.labels, b.calib.labels)
    assert not torch.equal(a.test.labels, c.test.labels)
    assert len(a.train) + len(a.test) == 1797 and len(a.calib) == 100
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10
    assert 0.0 <= float(a.train.images.min()) and float(a.train.images.max()) <= 1.0
    train_set = {tuple(x.flatten().tolist()) for x in a.train.images}
    calib_in_train = all(tuple(x.flatten().tolist()) in train_set for x in a.calib.images)
    assert calib_in_train  # calibration images come from the train split, never the test split
    counts = torch.bincount(a.test.labels, minlength=10).float()
    assert counts.min() / counts.max() > 0.9  # stratified hold-out



def test_embedded_digits_are_scikit_learns_and_load_without_importing_it():
    # the bundled table is read directly (no ~1.5 s scikit-learn import per CLI start); the result must
    # be exactly what scikit-learn's own loader gives, and the loader must really skip the import
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from deploypipe.data import _digits

    images, labels, classes = _digits()
    ref = load_digits()
    assert torch.equal(images, torch.from_numpy(ref.images.astype(np.float32) / 16.0).unsqueeze(1))
    assert torch.equal(labels, torch.from_numpy(ref.target.astype(np.int64)))
    assert classes == [str(c) for c in ref.target_names]
    probe = subprocess.run([sys.executable, "-c", "import sys; from deploypipe.data import _digits; _digits(); "
                            "print('sklearn' in sys.modules)"], capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0 and probe.stdout.strip() == "False", probe.stderr[-2000:]

def make_folder(root, sizes=(("train", 6), ("test", 3)), classes=("cat", "dog"), size=8):
    rng = np.random.default_rng(0)
    for split, n in sizes:
        for cls in classes:
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def test_imagefolder_decodes_exactly_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPLOYPIPE_CACHE", str(tmp_path / "cache"))
    root = make_folder(tmp_path / "data")
    s = load_data(DataSpec(source=f"imagefolder:{root}", calib_size=4))
    assert s.classes == ["cat", "dog"] and len(s.train) == 12 and len(s.test) == 6 and s.input_shape == (3, 8, 8)
    ref = np.array(Image.open(root / "train" / "dog" / "2.png")).transpose(2, 0, 1).copy()
    assert torch.equal(s.train.images[6 + 2], torch.from_numpy(ref))  # sorted classes, sorted files
    assert s.train.labels.tolist() == [0] * 6 + [1] * 6
    cached = list((tmp_path / "cache").glob("imagefolder-*.npz"))
    assert len(cached) == 2
    # second load reads the cache, not the files: break a file and the cache still answers
    mtimes = [p.stat().st_mtime_ns for p in cached]
    s2 = load_data(DataSpec(source=f"imagefolder:{root}", calib_size=4))
    assert torch.equal(s2.train.images, s.train.images)
    assert [p.stat().st_mtime_ns for p in cached] == mtimes
    # new mtimes (a restored or copied folder): decoded again, but the same data to resume keys
    for f in root.rglob("*.png"):
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    assert load_data(DataSpec(source=f"imagefolder:{root}", calib_size=4)).fingerprint == s.fingerprint
    # a changed file changes the key: decoded again, and other data
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "train" / "cat" / "0.png")
    s3 = load_data(DataSpec(source=f"imagefolder:{root}", calib_size=4))
    assert int(s3.train.images[0].sum()) == 0 and s3.fingerprint != s.fingerprint
    assert s.augment.flip and s.augment.pad == 1


def test_imagefolder_without_test_holds_out(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPLOYPIPE_CACHE", str(tmp_path / "cache"))
    root = make_folder(tmp_path / "data", sizes=(("train", 8),))
    s = load_data(DataSpec(source=f"imagefolder:{root}", test_fraction=0.25))
    assert len(s.test) == 4 and len(s.train) == 12


def test_mixed_sizes_need_image_size(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPLOYPIPE_CACHE", str(tmp_path / "cache"))
    root = make_folder(tmp_path / "data", sizes=(("train", 2),))
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(root / "train" / "cat" / "big.png")
    with pytest.raises(InputError, match="image_size"):
        load_data(DataSpec(source=f"imagefolder:{root}"))
    s = load_data(DataSpec(source=f"imagefolder:{root}", image_size=8))
    assert s.input_shape == (3, 8, 8)


@pytest.mark.parametrize("make, match", [
    (lambda r: None, "does not exist"),
    (lambda r: r.mkdir(), "no train/ subfolder"),
    (lambda r: (r / "train" / "cat").mkdir(parents=True), "has no images"),
])
def test_bad_folders(tmp_path, make, match):
    root = tmp_path / "d"
    make(root)
    with pytest.raises(InputError, match=match):
        load_data(DataSpec(source=f"imagefolder:{root}"))


def test_unknown_source():
    with pytest.raises(InputError, match="unknown data source"):
        load_data(DataSpec(source="mnist"))


def test_augment_crop_matches_slicing_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 8, 8)
    aug = Augment(pad=2, flip=True)
    out = aug(x, torch.Generator().manual_seed(5))
    # reference: replay the same random draws and crop/flip one image at a time by slicing
    g = torch.Generator().manual_seed(5)
    dy = torch.randint(0, 5, (16,), generator=g)
    dx = torch.randint(0, 5, (16,), generator=g)
    flip = torch.rand(16, generator=g) < 0.5
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(16):
        ref = padded[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8]
        if flip[i]:
            ref = ref.flip(2)
        assert torch.equal(out[i], ref)


def test_batches_cover_every_image_once_and_scale_uint8():
    s = ImageSet(torch.randint(0, 256, (10, 1, 2, 2), dtype=torch.uint8), torch.arange(10))
    seen = torch.cat([y for _, y in s.batches(3, shuffle=True, generator=torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == list(range(10))
    x, y = next(s.batches(10))
    torch.testing.assert_close(x, s.images.float() / 255)
