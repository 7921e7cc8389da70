"""Quick checks of bom_vs_beta.py: scores and metrics at hand-computed points, the squeeze rule,
the shared training loop, calibration, the data path on tiny IDX files, the CLI and its errors.
No network and no real MNIST: a fixture writes its own IDX files and goes through torchvision's loader."""
import ast
import hashlib
import json
import linecache
import math
import os
import re
import runpy
import shlex
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import types

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from torchvision import datasets, transforms

import bom_vs_beta as bvb


# ----------------------------------------------------------------------------- fixtures and shared helpers


HERE = os.path.dirname(os.path.abspath(__file__))
N_TRAIN, N_TEST = 96, 40


def write_idx(raw, name, array):
    """IDX: magic (0, 0, uint8 type 0x08, ndim), big-endian dims, then the bytes."""
    with open(os.path.join(raw, name), "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 0x08, array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def fake_digits(n, rng):
    """Bright random strokes on black, like MNIST: a few filled rectangles per 28x28 image."""
    images = np.zeros((n, 28, 28), np.uint8)
    for img in images:
        for _ in range(3):
            r, c = rng.integers(4, 20, size=2)
            img[r:r + rng.integers(2, 8), c:c + rng.integers(2, 8)] = rng.integers(128, 256)
    return images


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    write_idx(raw, "train-images-idx3-ubyte", fake_digits(N_TRAIN, rng))
    write_idx(raw, "train-labels-idx1-ubyte", rng.integers(0, 10, N_TRAIN))
    write_idx(raw, "t10k-images-idx3-ubyte", fake_digits(N_TEST, rng))
    write_idx(raw, "t10k-labels-idx1-ubyte", rng.integers(0, 10, N_TEST))
    return str(root)


CACHE = tempfile.mkdtemp(prefix="bom_vs_beta_classifiers_")


def run_args(data_dir, out, *extra):
    """Tiny real runs: 80 training, 16 validation and 40 test images, 3 importance samples; the feature
    classifier is cached for the whole session in CACHE, not in the user's cache."""
    return ["--data-dir", data_dir, "--out", str(out), "--batch-size", "32", "--device", "cpu",
            "--val-size", "16", "--iw-samples", "3", "--cache-dir", CACHE,
            "--no-progress", *extra]


def script(*argv):
    return [sys.executable, os.path.join(HERE, "bom_vs_beta.py"), *argv]


def tree(root):
    """Every folder and file under root, files with their bytes: equal trees mean nothing was written."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        out[rel + os.sep] = None
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                out[os.path.join(rel, name)] = f.read()
    return out


def copy_of(shared_out, tmp_path):
    dest = tmp_path / "out"
    shutil.copytree(shared_out, dest)
    return dest


def tiny_args(**kw):
    base = dict(seed=0, latent_dim=16, lr=1e-3, batch_size=32, epochs=1, no_progress=True, amp=False, compile=False,
                val_size=0, **{dest: default for _, dest, default, _ in bvb.knob_flags()})
    base.update(kw)
    return types.SimpleNamespace(**base)


@pytest.fixture(scope="module")
def train_images(data_dir):
    return bvb.load_mnist(data_dir, train=True)[0]


# BOM knobs that differ from every default; with 80 training images of batch 32, 2 calibration batches
# read 64 images (the default 50 would read all three batches).
BOM_FLAGS = ["--bom-kl-scale", "2", "--bom-squeeze-k", "0.25", "--bom-squeeze-start", "2",
             "--bom-calib-batches", "2", "--bom-mse-floor-mult", "3", "--bom-kl-low-mult", "0.2",
             "--bom-kl-high-mult", "10"]
SHARED = ["--methods", "beta:0.0001,bom", "--epochs", "1", "--latent-dim", "16", *BOM_FLAGS]


@pytest.fixture(scope="module")
def shared_out(data_dir, tmp_path_factory):
    """One tiny real run with figures through the command line (`python bom_vs_beta.py ...`, its output kept in
    cli.json beside it), shared read-only; tests that change it work on a copy."""
    out = tmp_path_factory.mktemp("shared") / "out"
    proc = subprocess.run(script(*run_args(data_dir, out, *SHARED)), capture_output=True, text=True, timeout=300)
    (out.parent / "cli.json").write_text(json.dumps({"returncode": proc.returncode, "stdout": proc.stdout,
                                                     "stderr": proc.stderr}))
    return out


SMALL = ["--epochs", "3", "--latent-dim", "16", "--methods", "beta:0.001,bom", "--no-plots"]


@pytest.fixture(scope="module")
def small_out(data_dir, tmp_path_factory):
    """The SMALL run (with its checkpoints), trained once; tests that change it work on a copy."""
    out = tmp_path_factory.mktemp("small") / "out"
    bvb.main(run_args(data_dir, out, *SMALL))
    return out


def summary_metrics(out):
    rows = json.loads((out / "summary.json").read_text())["runs"]
    return [(r["method"], r["test_mse"], r["test_kl"], r["test_sharp"], r["status"]) for r in rows]


# file: (figsize in inches as the script sets it, least share of coloured pixels: curves, markers); the shared run's
# 2 methods give 3 rows of reconstructions (originals + 2 models), 2 rows of samples; grids use the gray colormap
FIGURES = {
    "training_comparison.png": ((15, 4), 0.002), "rate_distortion.png": ((12, 6.5), 0.0001),
    "reconstructions_comparison.png": ((16, 2 * 3), 0.0), "samples_comparison.png": ((16, 2 * 2), 0.0)}


def assert_drawn(path):
    """A figure of the width the script sets (at 150 dpi) with real content on it, whatever its row count."""
    image = mpimg.imread(path)[..., :3].mean(-1)
    assert image.shape[1] == FIGURES[path.name][0][0] * 150 and image.std() > 0.05, path.name


# ----------------------------------------------------------------------------- data


def test_load_mnist_matches_seed_pil_resize(data_dir):
    images, labels = bvb.load_mnist(data_dir, train=False)
    assert images.shape == (N_TEST, 1, 64, 64) and images.dtype == torch.uint8
    seed_pipeline = datasets.MNIST(data_dir, train=False, download=False,
                                   transform=transforms.Compose([transforms.Resize(64), transforms.ToTensor()]))
    reference = torch.stack([seed_pipeline[i][0] for i in range(N_TEST)])
    assert torch.equal(images.float() / 255, reference)
    assert labels.tolist() == [seed_pipeline[i][1] for i in range(N_TEST)]


def test_splits_hold_out_the_last_training_images_for_validation(data_dir):
    full, labels = bvb.load_mnist(data_dir, train=True)
    args = types.SimpleNamespace(data_dir=data_dir, val_size=16, train_subset=10, test_subset=8, quick=False)
    splits = bvb.load_splits(args, torch.device("cpu"))
    assert torch.equal(splits["train"][0], full[:10]) and torch.equal(splits["val"][0], full[80:])
    assert torch.equal(splits["classifier"][0], full[:80]) and torch.equal(splits["val"][1], labels[80:])
    assert splits["test"][0].shape[0] == 8
    args.val_size, args.train_subset = 0, 0
    splits = bvb.load_splits(args, torch.device("cpu"))
    assert splits["train"][0].shape[0] == N_TRAIN and splits["val"][0].shape[0] == 0
    with pytest.MonkeyPatch.context() as patch:                  # --quick trains the classifier on a slice
        patch.setattr(bvb, "QUICK_CLASSIFIER_IMAGES", 50)
        splits = bvb.load_splits(types.SimpleNamespace(**dict(vars(args), quick=True)), torch.device("cpu"))
        assert torch.equal(splits["classifier"][0], full[:50])


def test_batches_cover_every_image_once_with_a_short_last_batch():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1)
    got = list(bvb.batches(images, 4, torch.Generator().manual_seed(0)))
    assert [b.shape[0] for b in got] == [4, 4, 2]
    assert sorted((torch.cat(got) * 255).round().flatten().tolist()) == list(range(10))


def test_each_data_file_is_moved_to_the_device_once_and_the_splits_are_views_of_it(data_dir):
    args = bvb.parse_args(run_args(data_dir, "unused", "--train-subset", "48"))
    splits = bvb.load_splits(args, torch.device("meta"))        # a copy per split would leave each without a base
    train_file = splits["train"][0]._base
    assert train_file is not None and train_file.shape[0] == N_TRAIN
    assert splits["val"][0]._base is train_file and splits["classifier"][0]._base is train_file
    assert splits["test"][0]._base.shape[0] == N_TEST


def test_truncated_data_file_is_reported_as_unreadable(data_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(data_dir, broken)
    images = broken / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])
    with pytest.raises(SystemExit) as exit_info:
        bvb.main(["--data-dir", str(broken), "--out", str(tmp_path / "out"), "--device", "cpu", "--val-size", "16"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert "could not read MNIST from" in err and not (tmp_path / "out").exists()


def test_missing_data_that_cannot_be_downloaded_names_folder_and_files(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])   # refused at once, no network
    with pytest.raises(SystemExit) as exit_info:
        bvb.main(["--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert os.path.join("nowhere", "MNIST", "raw") in err
    assert all(name in err for name in bvb.MNIST_RAW_FILES)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- metrics


def test_kl_is_zero_for_standard_normal_posterior_and_matches_formula():
    x = torch.zeros(2, 1, 4, 4)
    mu, logvar = torch.zeros(2, 4), torch.zeros(2, 4)
    _, kl, _ = bvb.vae_metrics(x, x, mu, logvar)
    assert kl.tolist() == [0.0, 0.0]
    mu = torch.tensor([[1.0, 0, 0, 0], [2.0, 2.0, 0, 0]])           # KL = ½ Σ μ²
    logvar = torch.tensor([[0.0] * 4, [math.log(2.0)] + [0.0] * 3])  # + ½(σ² − 1 − log σ²) = ½(1 − ln 2)
    _, kl, _ = bvb.vae_metrics(x, x, mu, logvar)
    assert kl.tolist() == pytest.approx([0.5, 4.0 + 0.5 * (1 - math.log(2.0))])


def test_mse_is_per_pixel_mean_and_sharpness_of_constant_image_is_zero():
    x = torch.zeros(1, 1, 8, 8)
    recon = torch.full((1, 1, 8, 8), 0.5)
    mse, _, sharp = bvb.vae_metrics(x, recon, torch.zeros(1, 2), torch.zeros(1, 2))
    assert mse.item() == pytest.approx(0.25)
    assert sharp.item() == 0.0


def test_sharpness_of_vertical_stripes_is_half_the_contrast():
    stripes = torch.zeros(1, 1, 8, 8)
    stripes[..., ::2] = 0.6                      # |dx| = 0.6 everywhere, |dy| = 0
    assert bvb.sharpness(stripes).item() == pytest.approx(0.3)


# ----------------------------------------------------------------------------- BOM: scores, calibration, squeeze, ablations


def test_lower_better_score_at_hand_points():
    values = torch.tensor([0.0, 0.05, 0.1, 0.2])
    assert bvb.lower_better_score(values, 0.1).tolist() == pytest.approx([1.0, 0.5, 0.0, -1.0])


def test_higher_better_score_at_hand_points():
    values = torch.tensor([0.0, 0.02, 0.04, 0.08])
    assert bvb.higher_better_score(values, 0.04).tolist() == pytest.approx([0.0, 0.5, 1.0, 2.0])


def test_box_score_is_one_at_optimum_zero_at_floors_negative_outside():
    values = torch.tensor([10.0, 15.0, 20.0, 40.0, 60.0, 5.0, 70.0])
    scores = bvb.box_score(values, 10.0, 20.0, 60.0).tolist()
    assert scores == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0, -0.5, -0.25])


def bom_with(constraints, latent_dim=128, **knobs):
    method = bvb.BOMVAE(latent_dim, **knobs)
    method.constraints = dict(constraints)
    return method


BOX = {"mse_floor": 0.4, "kl_floor_low": 10.0, "kl_optimum": 20.0, "kl_floor_high": 60.0, "sharp_ceiling": 0.2}


def test_bom_loss_is_minus_mean_log_of_worst_score():
    mse = torch.tensor([0.1, 0.3])        # scores 0.75, 0.25
    kl = torch.tensor([15.0, 20.0])       # scores 0.5, 1.0
    sharp = torch.tensor([0.3, 0.1])      # scores 1.5, 0.5
    loss, skip, logs = bom_with(BOX).batch_loss(mse, kl, sharp, None)
    assert loss.item() == pytest.approx(-(math.log(0.5) + math.log(0.25)) / 2)
    assert not skip
    assert logs["bottleneck_counts"].tolist() == [1, 1, 0]
    assert logs["s_min"].item() == pytest.approx(0.375)


def test_bom_flags_a_batch_with_one_violating_image():
    loss, skip, logs = bom_with(BOX).batch_loss(torch.tensor([0.1, 0.5]), torch.tensor([15.0, 20.0]),
                                                torch.tensor([0.3, 0.3]), None)
    assert bool(skip) and logs["violations"].item() == 1 and logs["s_min_stepped"].item() == 0.0


@pytest.mark.parametrize("mse, kl, sharp, which", [
    (0.4, 20.0, 0.3, "mse"),          # MSE at its floor: (0.4 − 0.4)/0.4 = 0
    (0.1, 10.0, 0.3, "kl"),           # KL at the box's low floor: (10 − 10)/(20 − 10) = 0
    (0.1, 60.0, 0.3, "kl"),           # KL at the box's high floor: (60 − 60)/(60 − 20) = 0
    (0.1, 20.0, 0.0, "sharp"),        # sharpness 0: 0/0.2 = 0
])
def test_a_score_of_exactly_zero_is_a_violation_and_skips_the_batch(mse, kl, sharp, which):
    # image 0 scores exactly 0 on one bottleneck, image 1 scores min(0.75, 1, 1.5) = 0.75
    loss, skip, logs = bom_with(BOX).batch_loss(torch.tensor([mse, 0.1]), torch.tensor([kl, 20.0]),
                                                torch.tensor([sharp, 0.3]), None)
    scores = bvb.constraint_scores(torch.tensor([mse]), torch.tensor([kl]), torch.tensor([sharp]), BOX)[0]
    assert scores[bvb.BOTTLENECKS.index(which)].item() == 0.0 and scores.min().item() == 0.0
    assert bool(skip) and logs["violations"].item() == 1 and logs["skipped"].item() == 1
    assert logs["s_min_stepped"].item() == 0.0 and logs["s_min"].item() == pytest.approx(0.375)
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(-(math.log(1e-12) + math.log(0.75)) / 2)


def test_worst_score_counts_equal_bincount_without_calling_it(monkeypatch):
    worst = torch.randint(0, 3, (100,))
    for indices in (worst, worst.clamp(max=1)):                  # three scores, or two with the sharpness one off
        assert torch.equal(bvb.worst_counts(indices), torch.bincount(indices, minlength=3))
    monkeypatch.setattr(torch, "bincount", lambda *a, **k: pytest.fail("bincount syncs with the host on a GPU"))
    bom = bom_with({"mse_floor": 0.1, "kl_floor_low": 1.0, "kl_optimum": 5.0, "kl_floor_high": 10.0,
                    "sharp_ceiling": 0.5})
    _, _, logs = bom.batch_loss(torch.tensor([0.01, 0.09]), torch.tensor([5.0, 5.0]), torch.tensor([0.25, 0.5]), None)
    assert logs["bottleneck_counts"].tolist() == [1, 0, 1]      # image 2's MSE score 0.1 is its worst; image 1's sharpness


class StripeModel(torch.nn.Module):
    """Stands in for the VAE: call i returns batch i's outputs (the last batch's once they run out): image j is
    vertical stripes of contrast a_j (MSE against zeros a_j²/2, sharpness a_j/2) with posterior means μ_j and
    log σ² = 0 (KL = Σ_d μ_d²/2). Each batch is (contrasts, μ of shape (N, d))."""

    def __init__(self, *batches):
        super().__init__()
        self.batches, self.calls = batches, 0

    def forward(self, x):
        contrasts, mu = self.batches[min(self.calls, len(self.batches) - 1)]
        self.calls += 1
        recon = torch.zeros(len(contrasts), 1, 8, 8)
        for i, a in enumerate(contrasts):
            recon[i, ..., ::2] = a
        return recon, mu, torch.zeros_like(mu)


STRIPES = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
STRIPES[:2, ..., ::2] = 255                              # sharpness 0.5 (|Δ| = 1 across, 0 down), twice; then 0, 0


def test_calibration_on_a_fixed_batch():
    mus = torch.zeros(2, 4)
    mus[0, 0] = 2.0                                     # KL 2
    mus[1, :3] = 2.0                                    # KL 6
    model = StripeModel(([0.2, 0.6], mus))
    c = bvb.calibrate(model, iter([torch.zeros(2, 1, 8, 8)]), calib_batches=50, mse_floor_mult=2.0,
                      kl_low_mult=0.1, kl_high_mult=50.0)
    assert c["mse_floor"] == pytest.approx(2 * 0.18)
    assert c["kl_floor_low"] == pytest.approx(0.2)
    assert c["kl_optimum"] == pytest.approx(4.0)
    assert c["kl_floor_high"] == pytest.approx(300.0)
    assert c["sharp_ceiling"] == pytest.approx(0.2)


def test_calibration_takes_max_mse_min_kl_and_max_kl_over_all_batches_read():
    # MSE per batch: [0.02, 0.08], [0.18, 0.005], [0.045, 0.045] -> max 0.18 in batch 2
    # KL per batch:  [2, 4.5], [8, 18], [0.5, 4.5] -> min 0.5 in batch 3, max 18 in batch 2, mean 37.5/6
    # a 4th batch (KL 50 and 0, MSE 0.405) must not be read with calib_batches=3
    model = StripeModel(*[(contrasts, torch.tensor(mus).view(-1, 1)) for contrasts, mus in [
        ([0.2, 0.4], [2.0, 3.0]), ([0.6, 0.1], [4.0, 6.0]), ([0.3, 0.3], [1.0, 3.0]), ([0.9, 0.9], [10.0, 0.0])]])
    drawn = []

    def stream():                               # the training batches: far more than calibration may read
        for i in range(10):
            drawn.append(i)
            yield torch.zeros(2, 1, 8, 8)
    c = bvb.calibrate(model, stream(), calib_batches=3, mse_floor_mult=3.0, kl_low_mult=0.2, kl_high_mult=10.0)
    assert model.calls == 3 and len(drawn) == 4     # the 4th is drawn, found past the limit, and not used
    assert c["mse_floor"] == pytest.approx(3.0 * 0.18)
    assert c["kl_floor_low"] == pytest.approx(0.2 * 0.5)
    assert c["kl_optimum"] == pytest.approx(37.5 / 6)
    assert c["kl_floor_high"] == pytest.approx(10.0 * 18.0)
    assert c["sharp_ceiling"] == pytest.approx((0.1 + 0.2 + 0.3 + 0.05 + 0.15 + 0.15) / 6)


def test_squeeze_factor_rule():
    assert bvb.squeeze_factor(0.9, k=0.5) == pytest.approx(0.8)
    assert bvb.squeeze_factor(0.55, k=0.5) == pytest.approx(0.975)
    assert bvb.squeeze_factor(0.5, k=0.5) == 1.0
    assert bvb.squeeze_factor(0.2, k=0.5) == 1.0
    assert bvb.squeeze_factor(3.0, k=0.5) == 0.5           # never more than half
    assert bvb.squeeze_factor(float("nan"), k=0.5) == 1.0


def test_squeeze_tightens_mse_floor_and_moves_kl_box_toward_targets():
    c = {"mse_floor": 0.7, "kl_floor_low": 1.0, "kl_optimum": 17.0, "kl_floor_high": 1000.0, "sharp_ceiling": 0.3}
    out = bvb.squeeze(c, 0.8, (50.0, 80.0, 150.0))
    assert out["mse_floor"] == pytest.approx(0.56)
    assert out["kl_floor_low"] == pytest.approx(1.0 + 49.0 * 0.2)
    assert out["kl_optimum"] == pytest.approx(17.0 + 63.0 * 0.2)
    assert out["kl_floor_high"] == pytest.approx(1000.0 - 850.0 * 0.2)
    assert out["sharp_ceiling"] == 0.3 and c["mse_floor"] == 0.7     # ceiling kept, input untouched


def test_squeeze_never_passes_the_targets():
    targets = (50.0, 80.0, 150.0)
    c = {"mse_floor": 0.7, "kl_floor_low": 60.0, "kl_optimum": 70.0, "kl_floor_high": 1000.0, "sharp_ceiling": 0.3}
    for _ in range(60):
        c = bvb.squeeze(c, 0.5, targets)
        assert c["kl_floor_low"] >= 50.0 and c["kl_optimum"] <= 80.0 and c["kl_floor_high"] >= 150.0
        assert c["kl_floor_low"] < c["kl_optimum"] < c["kl_floor_high"]
    assert (c["kl_floor_low"], c["kl_optimum"], c["kl_floor_high"]) == pytest.approx(targets)


def test_bom_end_epoch_squeezes_only_from_start_epoch_and_above_threshold():
    sums = {"steps": 4, "s_min_stepped": 3.6, "violations": 0, "skipped": 0, "bottleneck_counts": [5, 2, 1]}
    method = bom_with(BOX)
    row = method.end_epoch(2, sums)                       # before epoch 3: no squeeze
    assert row["squeeze_factor"] == 1.0 and method.constraints == BOX
    row = method.end_epoch(3, sums)                       # mean s_min 0.9 -> factor 0.8
    assert row["s_min"] == pytest.approx(0.9) and row["squeeze_factor"] == pytest.approx(0.8)
    assert row["constraints"] == BOX                      # the row logs the constraints the epoch used
    assert method.constraints["mse_floor"] == pytest.approx(0.32)
    assert row["bottleneck_counts"] == {"mse": 5, "kl": 2, "sharp": 1}


def test_end_epoch_averages_s_min_over_the_stepped_batches_only():
    # batch means of s_min 0.5, 0.2 (skipped: adds 0 to s_min_stepped), 0.7: stepped mean (0.5 + 0.7)/2 = 0.6 →
    # factor 1 − (0.6 − 0.5)·0.5 = 0.95; a mean over all 3 batches (1.4/3, or 1.2/3) is below 0.5: no squeeze
    sums = {"steps": 2, "batches": 3, "s_min": 0.5 + 0.2 + 0.7, "s_min_stepped": 0.5 + 0.0 + 0.7, "violations": 5,
            "skipped": 1, "bottleneck_counts": [60, 30, 6]}
    method = bom_with(BOX, squeeze_start=3)
    row = method.end_epoch(3, sums)
    assert row["s_min"] == pytest.approx(0.6) and row["squeeze_factor"] == pytest.approx(0.95)
    assert row["violations"] == 5 and row["skipped_batches"] == 1 and row["constraints"] == BOX
    assert method.constraints["mse_floor"] == pytest.approx(0.4 * 0.95)
    assert method.constraints["kl_optimum"] == pytest.approx(20.0 + (0.625 * 128 - 20.0) * 0.05)
    stalled = bom_with(BOX).end_epoch(5, dict(sums, steps=0, s_min_stepped=0.0, skipped=3))
    assert stalled["s_min"] == 0.0 and stalled["squeeze_factor"] == 1.0


class FixedBOM(bvb.BOMVAE):
    """BOM whose calibrated constraints are then overridden by `fixed` (some keys or all), recording each batch's
    (mean s_min, loss, skip, violations) in `seen`."""

    def __init__(self, latent_dim, fixed, **knobs):
        super().__init__(latent_dim, **knobs)
        self.fixed, self.seen = fixed, []

    def setup(self, model, images, batch_size, seed):
        super().setup(model, images, batch_size, seed)
        self.constraints.update(self.fixed)

    def batch_loss(self, mse, kl, sharp, kl_dims):
        loss, skip, logs = super().batch_loss(mse, kl, sharp, kl_dims)
        self.seen.append((logs["s_min"].item(), loss.item(), bool(skip), int(logs["violations"])))
        return loss, skip, logs


# a KL box and a sharpness ceiling no image can miss: the MSE floor alone decides
OPEN_BOX = {"kl_floor_low": -1e6, "kl_optimum": 0.0, "kl_floor_high": 1e6, "sharp_ceiling": 1e-6}


def test_an_epoch_with_one_skipped_batch_of_three_steps_twice_and_squeezes_from_the_stepped_mean():
    # 24 mid-gray images in 3 batches of 8 (MSE ≈ 0.04 under the untrained model, score ≈ 0.7), 4 of them made
    # black (MSE ≈ 0.3, score ≈ −1), all in the epoch's 2nd batch: that batch is skipped, the other two step
    images = torch.full((24, 1, 64, 64), 128, dtype=torch.uint8)
    order = torch.randperm(24, generator=torch.Generator().manual_seed(0))    # train_run's first epoch order
    images[order[8:12]] = 0
    method = FixedBOM(16, dict(OPEN_BOX, mse_floor=0.15), squeeze_start=1)
    run = bvb.train_run(method, images, tiny_args(epochs=1, batch_size=8))
    row = run["history"][0]
    assert [skip for _, _, skip, _ in method.seen] == [False, True, False]
    assert [v for _, _, _, v in method.seen] == [0, 4, 0]
    assert row["steps"] == 2 and row["skipped_batches"] == 1 and row["violations"] == 4
    s = [s for s, _, _, _ in method.seen]
    stepped_mean, all_mean = (s[0] + s[2]) / 2, sum(s) / 3
    assert stepped_mean > 0.5 >= all_mean                          # the design: only the right mean squeezes
    assert row["s_min"] == pytest.approx(stepped_mean, rel=1e-6)
    assert row["loss"] == pytest.approx((method.seen[0][1] + method.seen[2][1]) / 2, rel=1e-6)
    factor = max(0.5, 1 - (stepped_mean - 0.5) * 0.5)
    assert row["squeeze_factor"] == pytest.approx(factor, rel=1e-6) and factor < 1
    assert method.constraints["mse_floor"] == pytest.approx(0.15 * factor, rel=1e-6)
    assert row["constraints"]["mse_floor"] == 0.15 and run["status"] == "ok"


def test_squeeze_factor_and_the_next_epochs_constraints_follow_the_rule(train_images):
    # epoch 1 is before squeeze_start 2 (factor 1 although s_min > 0.5);
    # epoch 2 squeezes by max(0.5, 1 − (s_min − 0.5)·0.5) and moves each KL edge that fraction to its target
    method = FixedBOM(16, dict(OPEN_BOX, mse_floor=10.0), squeeze_start=2)      # s_min ≈ 0.99: it must squeeze
    run = bvb.train_run(method, train_images[:16], tiny_args(epochs=2, batch_size=8))
    first, second = run["history"]
    assert first["s_min"] > 0.5 and first["squeeze_factor"] == 1.0
    assert second["constraints"] == first["constraints"]
    s = second["s_min"]
    factor = max(0.5, 1 - (s - 0.5) * 0.5)
    assert s > 0.5 and factor < 0.8 and second["squeeze_factor"] == pytest.approx(factor, rel=1e-9)
    low, opt, high = (t * 16 for t in bvb.KL_TARGETS_PER_DIM)
    c = method.constraints
    assert c["mse_floor"] == pytest.approx(10.0 * factor)
    assert c["kl_floor_low"] == pytest.approx(-1e6 + (low + 1e6) * (1 - factor))
    assert c["kl_optimum"] == pytest.approx(opt * (1 - factor))
    assert c["kl_floor_high"] == pytest.approx(1e6 + (high - 1e6) * (1 - factor))
    assert c["sharp_ceiling"] == 1e-6


def bom_set_up(ablation=None):
    """A BOM (or an ablation) calibrated on StripeModel against STRIPES: KL 2 and 6, sharpness 0.1 and 0.3."""
    mus = torch.zeros(2, 4)
    mus[0, 0], mus[1, :3] = 2.0, 2.0
    method = bvb.BOMVAE(4, ablation=ablation)
    method.setup(StripeModel(([0.2, 0.6], mus)), STRIPES, 2, seed=0)
    return method


def test_ablation_sharp_data_sets_the_ceiling_to_the_training_images_mean_sharpness_and_nothing_else():
    plain, ablated = bom_set_up(), bom_set_up("sharp=data")
    assert plain.calibration["sharp_ceiling"] == pytest.approx(0.2)      # the untrained outputs' mean
    assert ablated.calibration == dict(plain.calibration, sharp_ceiling=pytest.approx(0.25))   # (0.5+0.5+0+0)/4
    assert ablated.name == "bom_sharp=data" and ablated.settings()["ablation"] == "sharp=data"
    assert "ablation" not in plain.settings() and ablated.knobs == plain.knobs
    # sharpness 0.05 scores 0.05/0.25 = 0.2 under the data's ceiling, 0.25 under the untrained one
    loss, _, logs = ablated.batch_loss(torch.tensor([0.0]), torch.tensor([4.0]), torch.tensor([0.05]), None)
    assert loss.item() == pytest.approx(-math.log(0.2)) and logs["bottleneck_counts"].tolist() == [0, 0, 1]


def test_ablation_sharp_off_scores_mse_and_kl_only():
    method = bom_set_up("sharp=off")
    assert method.calibration == dict(bom_set_up().calibration, sharp_ceiling=None)
    method.constraints = dict(BOX, sharp_ceiling=None)
    mse = torch.tensor([0.1, 0.3])        # scores 0.75, 0.25
    kl = torch.tensor([15.0, 20.0])       # scores 0.5, 1.0
    sharp = torch.tensor([0.0, 0.0])      # would score 0 (a violation) with a ceiling
    loss, skip, logs = method.batch_loss(mse, kl, sharp, None)
    assert loss.item() == pytest.approx(-(math.log(0.5) + math.log(0.25)) / 2) and not skip
    assert logs["bottleneck_counts"].tolist() == [1, 1, 0]
    assert bvb.squeeze(method.constraints, 0.5, (50.0, 80.0, 150.0))["sharp_ceiling"] is None


def test_ablation_squeeze_1_squeezes_from_the_first_epoch_and_overrides_the_start_flag():
    sums = {"steps": 4, "s_min_stepped": 3.6, "violations": 0, "skipped": 0, "bottleneck_counts": [5, 2, 1]}
    plain, early = bom_with(BOX), bom_with(BOX, ablation="squeeze=1")
    assert plain.end_epoch(1, sums)["squeeze_factor"] == 1.0 and plain.constraints == BOX
    assert early.end_epoch(1, sums)["squeeze_factor"] == pytest.approx(0.8)
    assert early.constraints["mse_floor"] == pytest.approx(0.32) and early.name == "bom_squeeze=1"
    args = bvb.parse_args(["--methods", "bom:squeeze=1", "--bom-squeeze-start", "5"])
    method = bvb.make_method(args.method_specs[0], args)
    assert method.knobs == dict(bvb.BOMVAE.defaults(), squeeze_start=1) and method.settings()["ablation"] == "squeeze=1"


def test_bom_flags_reach_the_method():
    args = bvb.parse_args(["--device", "cpu", "--latent-dim", "16", *BOM_FLAGS])
    method = bvb.make_method(("bom", None), args)
    assert method.name == "bom"
    assert method.knobs == {"kl_scale": 2.0, "squeeze_k": 0.25, "squeeze_start": 2, "calib_batches": 2,
                            "mse_floor_mult": 3.0, "kl_low_mult": 0.2, "kl_high_mult": 10.0}
    assert method.kl_targets == pytest.approx((0.390625 * 32, 0.625 * 32, 1.171875 * 32))    # per dim x 16 x 2
    row = bom_with(BOX, **method.knobs).end_epoch(2, {"steps": 1, "s_min_stepped": 0.9, "violations": 0,
                                                      "skipped": 0, "bottleneck_counts": [1, 0, 0]})
    assert row["squeeze_factor"] == pytest.approx(1 - 0.4 * 0.25)        # k = 0.25 from epoch 2 on


def test_non_default_bom_flags_are_recorded_in_the_run_file_and_used_by_calibration(shared_out, data_dir):
    run = json.loads((shared_out / "runs" / "bom_seed0.json").read_text())
    knobs = {"kl_scale": 2.0, "squeeze_k": 0.25, "squeeze_start": 2, "calib_batches": 2, "mse_floor_mult": 3.0,
             "kl_low_mult": 0.2, "kl_high_mult": 10.0}
    assert {k: run["settings"][k] for k in knobs} == knobs
    assert run["settings"]["kl_targets"] == pytest.approx([12.5, 20.0, 37.5])
    flags = {dest for _, dest, _, _ in bvb.knob_flags()}
    assert "bom_kl_scale" in flags and not (flags | set(knobs)) & set(run["config"])     # stored once: in settings
    assert run["fingerprint"]["method_settings"]["kl_targets"] == pytest.approx([12.5, 20.0, 37.5])
    assert len(run["history"]) == 1 and run["history"][0]["squeeze_factor"] == 1.0    # epoch 1 < squeeze start 2
    # the recorded calibration: the untrained model's metrics on 2 batches (calibration order seeded with seed + 1)
    # through the multipliers 3 (max MSE), 0.2 (min KL) and 10 (max KL)
    images = bvb.load_mnist(data_dir, train=True)[0][:80]
    bvb.seed_everything(0)
    model = bvb.new_model(16, torch.device("cpu")).train()
    with torch.no_grad():
        metrics = [bvb.forward_metrics(model, x)[:3] for x, _ in
                   zip(bvb.batches(images, 32, torch.Generator().manual_seed(1)), range(2))]
    mse, kl, sharp = (torch.cat(parts) for parts in zip(*metrics))
    assert mse.numel() == 64
    expected = {"mse_floor": 3.0 * mse.max().item(), "kl_floor_low": 0.2 * kl.min().item(),
                "kl_optimum": kl.mean().item(), "kl_floor_high": 10.0 * kl.max().item(),
                "sharp_ceiling": sharp.mean().item()}
    assert run["config"]["calibration"] == pytest.approx(expected, rel=1e-6)
    assert run["history"][0]["constraints"] == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------- the other methods


def test_beta_loss_is_mean_mse_plus_beta_mean_kl():
    loss, skip, _ = bvb.BetaVAE(0.5).batch_loss(torch.tensor([0.1, 0.3]), torch.tensor([2.0, 4.0]),
                                                torch.tensor([0.1, 0.1]), None)
    assert loss.item() == pytest.approx(0.2 + 0.5 * 3.0)
    assert skip is None


def test_geco_update_at_hand_points_fast_while_met_slow_while_violated():
    geco = bvb.GECO(tolerance=0.01, rate=1e-4, speedup=10.0)
    kl, d = torch.tensor([30.0, 50.0]), bvb.IMAGE_PIXELS
    loss, _, logs = geco.batch_loss(torch.tensor([0.02, 0.02]), kl, None, None)     # C = D·(0.02 − 0.01) = 40.96
    assert loss.item() == pytest.approx(40.0 + 1.0 * 0.01 * d) and logs["lambda"].item() == 1.0
    assert float(geco.lam) == pytest.approx(math.exp(1e-4 * 40.96))                 # debiased C_ma = C at step 1
    geco.batch_loss(torch.tensor([0.005, 0.005]), kl, None, None)                   # C = −20.48
    c_ma = (0.99 * 0.01 * 40.96 + 0.01 * -20.48) / (1 - 0.99 ** 2)                  # m_2 / (1 − α²) = 9.93 > 0
    assert float(geco.lam) == pytest.approx(math.exp(1e-4 * 40.96 + 1e-4 * c_ma), rel=1e-5)
    for _ in range(300):
        geco.batch_loss(torch.tensor([0.005, 0.005]), kl, None, None)
    before, m = float(geco.lam), float(geco.ma)
    geco.batch_loss(torch.tensor([0.005, 0.005]), kl, None, None)
    c_ma = (0.99 * m + 0.01 * -20.48) / (1 - 0.99 ** 303)                           # < 0: met, 10x the rate
    assert c_ma < 0 and float(geco.lam) == pytest.approx(before * math.exp(10 * 1e-4 * c_ma), rel=1e-5)
    assert 1e-10 < float(geco.lam) < before


def test_geco_settles_lambda_and_meets_its_constraint_on_a_toy_problem():
    """x̂ = θ·1 (every pixel), target 1: MSE = (1 − θ)²; 'KL' = 50·θ² pulls θ to 0. Minimizing KL subject to
    MSE ≤ 0.01 gives θ = 0.9 and λ* = 100·0.9 / (2·D·0.1) (stationarity of KL + λ·D·(MSE − tol))."""
    theta = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=0.02)
    geco = bvb.GECO(tolerance=0.01, rate=2e-5, speedup=10.0)
    lams, mses = [], []
    for _ in range(3000):
        mse = ((1 - theta) ** 2).reshape(1)
        loss, _, _ = geco.batch_loss(mse, 50 * theta.reshape(1) ** 2, None, None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        lams.append(float(geco.lam)), mses.append(mse.item())
    lam_star = 100 * 0.9 / (2 * bvb.IMAGE_PIXELS * 0.1)
    assert statistics.fmean(mses[-500:]) == pytest.approx(0.01, rel=0.1)
    assert statistics.fmean(lams[-500:]) == pytest.approx(lam_star, rel=0.2)
    assert max(lams[-500:]) / min(lams[-500:]) < 1.1 and max(lams) < 100       # settled, never near its bounds


def test_controlvae_beta_rises_above_set_point_falls_below_and_stays_clipped():
    control = bvb.ControlVAE(kl_target=80.0, kp=0.01, ki=0.0001)
    beta, error = control.beta(torch.tensor(180.0))             # e = −100: P = 0.01/(1 + e^−100), I = 0.01
    assert error.item() == -100.0 and beta.item() == pytest.approx(0.02)
    betas = [control.beta(torch.tensor(180.0))[0].item() for _ in range(300)]
    assert betas[50] > betas[0] and max(betas) == 1.0            # clipped at β_max
    assert float(control.integral) <= 1.0                        # anti-windup: no integral past the clip
    falling = [control.beta(torch.tensor(20.0))[0].item() for _ in range(300)]   # KL below the set point
    assert falling[0] < 1.0 and all(b <= a for a, b in zip(falling, falling[1:]))
    assert min(falling) == 0.0 and float(control.integral) >= -0.01
    loss, _, logs = control.batch_loss(torch.tensor([0.01, 0.03]), torch.tensor([10.0, 30.0]), None, None)
    assert loss.item() == pytest.approx(4096 * 0.02 + logs["beta"].item() * 20.0)


def test_sigma_vae_uses_batch_mse_as_sigma2_and_the_gaussian_nll():
    torch.manual_seed(0)
    x, x_recon = torch.rand(3, 1, 64, 64), torch.rand(3, 1, 64, 64)
    mse = (x_recon - x).pow(2).flatten(1).mean(1)
    kl = torch.tensor([5.0, 6.0, 7.0])
    loss, _, logs = bvb.SigmaVAE().batch_loss(mse, kl, None, None)
    sigma2 = logs["sigma2"].item()
    soft_clipped = math.exp(2 * (-6 + math.log1p(math.exp(0.5 * math.log(mse.mean().item()) + 6))))
    assert sigma2 == pytest.approx(soft_clipped, rel=1e-5)
    assert sigma2 == pytest.approx(mse.mean().item(), rel=0.02)       # the soft clip's pull at log σ ≈ −0.9
    nll = -torch.distributions.Normal(x_recon, math.sqrt(sigma2)).log_prob(x).flatten(1).sum(1)
    assert loss.item() == pytest.approx(nll.mean().item() + 6.0, rel=1e-5)


def test_sigma_vae_soft_clips_log_sigma_at_minus_6():
    _, sigma2 = bvb.gaussian_nll(torch.tensor([1e-12, 1e-12]))       # log σ would be −13.8
    assert 0.5 * math.log(sigma2.item()) == pytest.approx(-6.0, abs=1e-3)
    _, sigma2 = bvb.gaussian_nll(torch.tensor([0.5, 0.7]))             # far above the clip: σ² = batch MSE
    assert sigma2.item() == pytest.approx(0.6, rel=0.01)


def test_free_bits_gives_no_kl_gradient_to_dimensions_below_lambda():
    kl_dims = torch.tensor([[0.1, 0.6, 0.3], [0.1, 0.4, 0.3]], requires_grad=True)   # means 0.1, 0.5, 0.3
    mse = torch.tensor([0.02, 0.02])
    loss, _, logs = bvb.FreeBits(0.25).batch_loss(mse, kl_dims.sum(1), None, kl_dims)
    nll, _ = bvb.gaussian_nll(mse)
    assert loss.item() == pytest.approx(nll.mean().item() + 0.25 + 0.5 + 0.3, rel=1e-6)
    assert logs["dims_below_lambda"].item() == 1
    loss.backward()
    assert kl_dims.grad[:, 0].tolist() == [0.0, 0.0]
    assert kl_dims.grad[:, 1:].flatten().tolist() == pytest.approx([0.5] * 4)


def test_methods_all_is_every_beta_every_tuning_free_method_and_every_ablation():
    specs = bvb.parse_methods("all")
    assert [b for kind, b in specs if kind == "beta"] == [1e-7, 3e-7, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3,
                                                          1e-2, 0.1]
    assert [spec for spec in specs if spec[0] != "beta"] == [(k, None) for k in bvb.TUNING_FREE] + [
        ("bom", "sharp=data"), ("bom", "sharp=off"), ("bom", "squeeze=1")]
    assert bvb.parse_methods("bom,ablations") == [("bom", None), ("bom", "sharp=data"), ("bom", "sharp=off"),
                                                  ("bom", "squeeze=1")]
    with pytest.raises(bvb.UsageError, match="'sharp=blur' in 'bom:sharp=blur' is not a BOM ablation .*sharp=off"):
        bvb.parse_methods("bom:sharp=blur")
    with pytest.raises(bvb.UsageError, match="listed twice"):
        bvb.parse_methods("ablations,bom:sharp=off")


def test_a_bom_item_combines_an_ablation_with_knob_values_in_one_name():
    # knobs after '+', in any order: one canonical item, so the same setting cannot be listed twice
    assert bvb.parse_methods("bom:kl_scale=2+sharp=off,bom:squeeze_start=2") == [
        ("bom", "sharp=off+kl_scale=2"), ("bom", "squeeze_start=2")]
    with pytest.raises(bvb.UsageError, match="listed twice"):
        bvb.parse_methods("bom:sharp=off+kl_scale=2,bom:kl_scale=2.0+sharp=off")
    args = tiny_args(bom_kl_scale=3.0, bom_squeeze_k=0.25, latent_dim=16)
    method = bvb.make_method(("bom", "sharp=off+kl_scale=2"), args)
    assert method.name == "bom_sharp=off_kl_scale=2" and method.ablation == "sharp=off" and method.variant == (
        "kl_scale",)
    assert method.knobs["kl_scale"] == 2.0 and method.knobs["squeeze_k"] == 0.25      # the item wins, flags fill in
    assert method.kl_targets == pytest.approx(tuple(t * 16 * 2 for t in bvb.KL_TARGETS_PER_DIM))
    assert bvb.make_method(("bom", "squeeze_start=2"), args).knobs["squeeze_start"] == 2
    for item, message in (("bom:sharp=off+kl_scal=2", "'kl_scal=2' in 'bom:sharp=off+kl_scal=2' is not a BOM"),
                          ("bom:sharp=off+sharp=data", "one at most"), ("bom:kl_scale=2+kl_scale=3", "once each"),
                          ("bom:kl_scale=0", "BOM's kl_scale must be a finite number > 0"),
                          ("bom:squeeze_start=1.5", "BOM's squeeze_start needs an integer"),
                          ("bom:calib_batches=0", "BOM's calib_batches must be >= 1")):
        with pytest.raises(bvb.UsageError, match=re.escape(message)):
            bvb.parse_methods(item)
    args = bvb.parse_args(["--methods", "bom:sharp=off", "--bom-sensitivity", "bom:sharp=off", "--device", "cpu"])
    assert args.method_specs[0] == ("bom", "sharp=off") and ("bom", "sharp=off+mse_floor_mult=4") in args.method_specs
    assert len(args.method_specs) == 1 + sum(map(len, bvb.BOMVAE.SENSITIVITY.values()))
    assert bvb.parse_args(["--bom-sensitivity", "--device", "cpu"]).method_specs[-1] == ("bom", "mse_floor_mult=4")
    with pytest.raises(bvb.UsageError, match="--bom-sensitivity takes one BOM item"):
        bvb.parse_args(["--bom-sensitivity", "beta:0.1", "--device", "cpu"])


# ----------------------------------------------------------------------------- the training loop


@pytest.mark.parametrize("spec", [("beta", 0.0001), ("beta", 0.1)] + [(m, None) for m in bvb.TUNING_FREE])
def test_every_method_trains_on_tiny_data(train_images, spec):
    args = tiny_args(epochs=3)
    method = bvb.make_method(spec, args)
    bvb.seed_everything(0)
    start = {k: v.clone() for k, v in bvb.VAE(16).state_dict().items()}
    run = bvb.train_run(method, train_images, args)
    assert run["status"] == "ok" and len(run["history"]) == 3
    assert all(row["steps"] == 3 for row in run["history"])         # 96 images / 32
    assert any(not torch.equal(v, start[k]) for k, v in run["model"].state_dict().items())
    if spec[0] == "bom":
        assert set(run["history"][0]) >= {"s_min", "violations", "skipped_batches", "bottleneck_counts",
                                          "constraints", "squeeze_factor"}
        assert sum(run["history"][0]["bottleneck_counts"].values()) == N_TRAIN
    for key in method.logged:
        assert all(math.isfinite(row[key]) for row in run["history"]), key


def test_violating_batches_are_skipped_and_parameters_do_not_change(train_images):
    bvb.seed_everything(0)
    start = bvb.VAE(16).state_dict()
    run = bvb.train_run(FixedBOM(16, {"mse_floor": 1e-9}), train_images, tiny_args(epochs=3))
    assert run["status"] == "stalled" and len(run["history"]) == 1       # ends after the first such epoch
    assert run["history"][0]["skipped_batches"] == 3 and run["history"][0]["violations"] == N_TRAIN
    for key, value in run["model"].state_dict().items():
        assert torch.equal(value, start[key]), key


class DivergesAt(bvb.BetaVAE):
    """β-VAE whose loss turns infinite from its n-th batch on."""

    def __init__(self, n):
        super().__init__(0.001)
        self.n, self.calls = n, 0

    def batch_loss(self, mse, kl, sharp, kl_dims):
        loss, skip, logs = super().batch_loss(mse, kl, sharp, kl_dims)
        self.calls += 1
        return (loss * float("inf") if self.calls >= self.n else loss), skip, logs


def test_divergence_is_caught_in_its_epoch_at_its_step_and_the_last_good_checkpoint_kept(train_images, tmp_path):
    path = str(tmp_path / "run.pt")
    run = bvb.train_run(DivergesAt(5), train_images, tiny_args(epochs=3), checkpoint=path)   # 3 batches per epoch
    assert run["status"] == "diverged" and run["diverged_at"] == {"epoch": 2, "step": 2}
    assert len(run["history"]) == 1
    saved = torch.load(path, weights_only=True)
    assert saved["status"] == "diverged" and saved["finished"] and saved["diverged_at"] == {"epoch": 2, "step": 2}
    good = bvb.train_run(bvb.BetaVAE(0.001), train_images, tiny_args(epochs=1))   # the same first epoch
    for key, value in good["model"].state_dict().items():
        assert torch.equal(saved["model"][key], value), key
    assert all(torch.isfinite(v).all() for v in saved["model"].values())


@pytest.mark.parametrize("fused", [True, False])
def test_a_skipped_step_leaves_weights_and_adam_state_alone_fused_or_not(fused):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1, fused=fused)
    loss = lambda: model(torch.randn(3, 4)).pow(2).sum()
    assert bvb.optimizer_step(optimizer, model, loss(), None).item()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: {kk: vv.clone() for kk, vv in v.items()} for k, v in optimizer.state_dict()["state"].items()}
    assert not bvb.optimizer_step(optimizer, model, loss(), torch.tensor(True)).item()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    after = optimizer.state_dict()["state"]
    assert all(torch.equal(state[k][kk], after[k][kk]) for k in state for kk in state[k])
    assert bvb.optimizer_step(optimizer, model, loss(), torch.tensor(False)).item()
    assert not all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert optimizer.state_dict()["state"][0]["step"].item() == 2


def test_a_non_fused_optimizer_state_resumes_under_a_fused_optimizer_and_still_skips(monkeypatch):
    # an MPS checkpoint (non-fused Adam) loaded on the CPU, where the optimizer is built fused: the param
    # group now says non-fused, and a skipped batch must neither assert nor move the weights
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    mps_adam = torch.optim.Adam(model.parameters(), lr=0.1, fused=False)
    bvb.optimizer_step(mps_adam, model, model(torch.ones(2, 3)).sum(), torch.tensor(False))
    cpu_adam = bvb.new_optimizer(model, 0.1)
    assert cpu_adam.defaults["fused"]
    cpu_adam.load_state_dict(mps_adam.state_dict())
    before = [p.detach().clone() for p in model.parameters()]
    assert not bvb.optimizer_step(cpu_adam, model, model(torch.ones(2, 3)).sum(), torch.tensor(True))
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    assert bvb.optimizer_step(cpu_adam, model, model(torch.ones(2, 3)).sum(), torch.tensor(False))
    assert not torch.equal(before[0], model.weight)


def test_amp_training_runs_and_keeps_metrics_in_fp32(train_images):
    run = bvb.train_run(bvb.BetaVAE(0.001), train_images, tiny_args(amp=True))
    assert run["status"] == "ok" and math.isfinite(run["history"][0]["mse"])
    mse, kl, sharp, kl_dims = bvb.forward_metrics(run["model"], train_images[:4].float() / 255, amp=True)
    assert mse.dtype == kl.dtype == sharp.dtype == kl_dims.dtype == torch.float32


def test_autocast_is_entered_only_with_amp(monkeypatch):
    entered = []
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: entered.append(a) or pytest.fail("autocast entered"))
    model, x = bvb.VAE(8), torch.rand(2, 1, 64, 64)
    bvb.forward_metrics(model, x, amp=False)
    with pytest.raises(pytest.fail.Exception):
        bvb.forward_metrics(model, x, amp=True)
    assert entered == [("cpu",)]


def test_fast_path_and_seed_pipeline_give_the_same_loss_on_the_same_batch_and_weights(data_dir):
    seed_data = datasets.MNIST(data_dir, train=True, download=False,
                               transform=transforms.Compose([transforms.Resize(64), transforms.ToTensor()]))
    seed_batch = torch.stack([seed_data[i][0] for i in range(16)])          # the seed's PIL pipeline
    fast_batch = next(bvb.batches(bvb.load_mnist(data_dir, train=True)[0][:16], 16))
    torch.manual_seed(0)
    seed_model = bvb.VAE(16)                                                # plain layout, as in the notebook
    fast_model = bvb.new_model(16, torch.device("cpu"))                     # channels_last on the CPU
    fast_model.load_state_dict(seed_model.state_dict())
    assert next(fast_model.enc[0].parameters()).is_contiguous(memory_format=torch.channels_last)
    torch.manual_seed(2)
    calibrated = bom_with(bvb.calibrate(seed_model, iter([seed_batch]), 50, 2.0, 0.1, 50.0), latent_dim=16)
    for method in (bvb.BetaVAE(0.001), calibrated):
        torch.manual_seed(1)
        seed_loss = method.batch_loss(*bvb.vae_metrics(seed_batch, *seed_model(seed_batch)), None)[0]
        torch.manual_seed(1)
        fast_loss = method.batch_loss(*bvb.forward_metrics(fast_model, fast_batch))[0]
        assert fast_loss.item() == pytest.approx(seed_loss.item(), rel=1e-5) and math.isfinite(fast_loss.item())
        seed_loss.backward(), fast_loss.backward()
        fast_grad, seed_grad = fast_model.fc_mu.weight.grad, seed_model.fc_mu.weight.grad
        assert seed_grad.norm() > 0
        assert (fast_grad - seed_grad).norm() / seed_grad.norm() < 1e-3    # summation order differs, not more
        seed_model.zero_grad(), fast_model.zero_grad()


def test_same_seed_gives_identical_metrics_and_another_seed_does_not(shared_out, data_dir, tmp_path):
    first = json.loads((shared_out / "summary.json").read_text())          # the same flags, another process
    second = bvb.main(run_args(data_dir, tmp_path / "b", *SHARED, "--no-plots"))
    other = bvb.main(run_args(data_dir, tmp_path / "c", *SHARED, "--no-plots", "--seed", "1"))
    metrics = lambda summary: [(r["method"], r["test_mse"], r["test_kl"], r["test_sharp"], r["test_iwae_nll"])
                               for r in summary["runs"]]
    assert metrics(first) == metrics(second)
    assert metrics(first) != metrics(other)


# ----------------------------------------------------------------------------- evaluation: likelihood bound, Fréchet distance, feature classifier


class ConstantDecoder(torch.nn.Module):
    """Decodes every z to the same image c: log p(x|z) does not depend on z."""

    def __init__(self, c):
        super().__init__()
        self.c = c

    def decode(self, z):
        return self.c.expand(z.shape[0], *self.c.shape[1:])


def test_iwae_equals_the_elbo_when_the_posterior_is_the_prior_and_the_decoder_ignores_z():
    torch.manual_seed(0)
    x, c = torch.rand(2, 1, 64, 64), torch.rand(1, 1, 64, 64)
    mu, logvar = torch.zeros(2, 5), torch.zeros(2, 5)          # q(z|x) = p(z): KL = 0, p(z)/q(z|x) = 1
    sigma2 = 0.05
    expected = -torch.distributions.Normal(c, math.sqrt(sigma2)).log_prob(x).flatten(1).sum(1)   # −ELBO = NLL
    for samples in (1, 7, 25):
        got = bvb.iwae_nll(ConstantDecoder(c), x, mu, logvar, sigma2, samples, chunk=4)
        assert got.tolist() == pytest.approx(expected.tolist(), rel=1e-5)


def test_iwae_with_one_sample_is_the_one_sample_elbo():
    torch.manual_seed(0)
    model = bvb.VAE(6).eval()
    x = torch.rand(3, 1, 64, 64)
    mu, logvar = torch.randn(3, 6) * 0.5, torch.randn(3, 6) * 0.3
    torch.manual_seed(1)
    got = bvb.iwae_nll(model, x, mu, logvar, 0.02, 1)
    torch.manual_seed(1)
    eps = torch.randn(1, 3, 6)[0]
    z = mu + eps * torch.exp(0.5 * logvar)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    log_px = torch.distributions.Normal(model.decode(z), math.sqrt(0.02)).log_prob(x).flatten(1).sum(1)
    elbo = log_px + torch.distributions.Normal(0, 1).log_prob(z).sum(1) - q.log_prob(z).sum(1)
    assert got.tolist() == pytest.approx((-elbo).tolist(), rel=1e-5)


D, LATENT, SIGMA2 = bvb.IMAGE_PIXELS, 3, 0.05
SCALES = torch.tensor([1.5, 1.0, 0.6], dtype=torch.float64)


class LinearGaussian:
    """decode(z) = W z + b with orthogonal columns of W (WᵀW = diag(s²)): p(x) = N(b, W Wᵀ + σ² I) and the
    exact posterior p(z|x) = N(S Wᵀ(x − b)/σ², S), S = diag(1 / (1 + s²/σ²)), is diagonal like q."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(D, LATENT, generator=g, dtype=torch.float64))
        self.W = q * SCALES
        self.b = 0.3 * torch.randn(D, generator=g, dtype=torch.float64)

    def decode(self, z):
        return z @ self.W.T + self.b

    def sample_x(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, LATENT, generator=g, dtype=torch.float64)
        noise = math.sqrt(SIGMA2) * torch.randn(n, D, generator=g, dtype=torch.float64)
        return (self.decode(z) + noise).view(n, 1, 64, 64)

    def exact_nll(self, x):
        p = torch.distributions.LowRankMultivariateNormal(self.b, self.W, torch.full((D,), SIGMA2, dtype=torch.float64))
        return -p.log_prob(x.flatten(1))

    def posterior(self, x):
        var = 1 / (1 + SCALES ** 2 / SIGMA2)
        return var * ((x.flatten(1) - self.b) @ self.W) / SIGMA2, var.log().expand(x.shape[0], LATENT)


def test_iwae_equals_the_exact_nll_for_any_k_and_chunking_when_q_is_the_exact_posterior():
    # q = p(z|x): every weight p(x, z)/q(z|x) equals p(x), so −log mean w = −log p(x) exactly, last chunk partial or not
    model = LinearGaussian()
    x = model.sample_x(4, seed=1)
    mu, logvar = model.posterior(x)
    exact = model.exact_nll(x)
    assert exact.abs().min() > 10                                 # a real density value, not a trivial zero
    for samples, chunk in ((1, 10), (25, 10), (25, 25), (25, 7), (25, 100), (3, 1)):
        torch.manual_seed(samples + chunk)
        got = bvb.iwae_nll(model, x, mu, logvar, SIGMA2, samples, chunk=chunk)
        assert got.shape == (4,)
        assert got.tolist() == pytest.approx(exact.tolist(), rel=1e-9, abs=1e-7), (samples, chunk)


def mismatched_q(model, x):
    """q off the posterior: mean shifted by one posterior sd, variance e² times too large (wider than the
    posterior, so the weights stay bounded and their averages well behaved)."""
    mu, logvar = model.posterior(x)
    return mu + torch.exp(0.5 * logvar), logvar + 2.0


# KL(q || p(z|x)) of mismatched_q: ½(σq²/σp² − 1 − log(σq²/σp²) + Δμ²/σp²) = ½(e² − 1 − 2 + 1) per dim
KL_Q_TO_POSTERIOR = LATENT * 0.5 * (math.e ** 2 - 2)


def test_iwae_with_one_sample_is_above_the_exact_nll_by_the_kl_to_the_posterior_on_average():
    # E[−log w] = −log p(x) + KL(q || p(z|x)) for K = 1 (about 8.08 nats here), averaged over 4 images x 500 draws
    model = LinearGaussian()
    x = model.sample_x(4, seed=2).repeat(500, 1, 1, 1)
    mu, logvar = mismatched_q(model, x)
    torch.manual_seed(0)
    gap = bvb.iwae_nll(model, x, mu, logvar, SIGMA2, 1) - model.exact_nll(x)
    se = gap.std().item() / math.sqrt(gap.numel())
    assert gap.mean().item() == pytest.approx(KL_Q_TO_POSTERIOR, abs=5 * se)
    assert se < 0.05 * KL_Q_TO_POSTERIOR


def test_iwae_bound_is_above_the_exact_nll_and_tightens_as_k_grows():
    # mean over 4 images (and repeated draws) of IWAE_K − (−log p(x)) for K = 1, 10, 200, q not the posterior
    model = LinearGaussian()
    images = model.sample_x(4, seed=3)
    gaps, ses = {}, {}
    for samples, repeats in ((1, 100), (10, 100), (200, 5)):
        x = images.repeat(repeats, 1, 1, 1)
        mu, logvar = mismatched_q(model, x)
        torch.manual_seed(samples)
        gap = bvb.iwae_nll(model, x, mu, logvar, SIGMA2, samples, chunk=10) - model.exact_nll(x)
        gaps[samples], ses[samples] = gap.mean().item(), gap.std().item() / math.sqrt(gap.numel())
    for samples in gaps:                                          # a bound: never below −log p(x) beyond noise
        assert gaps[samples] > -4 * ses[samples], (samples, gaps)
    for k, more in ((1, 10), (10, 200)):                          # each step down by more than 3 standard errors
        assert gaps[k] - gaps[more] > 3 * math.hypot(ses[k], ses[more]), (gaps, ses)
    assert gaps[200] < 0.05 * KL_Q_TO_POSTERIOR < 0.5 * gaps[1]


def test_iwae_with_a_partial_last_chunk_uses_exactly_k_draws_and_matches_a_direct_computation(monkeypatch):
    # the same 25 draws fed through torch.randn: chunk 10 (10 + 10 + 5), 7 (7 + 7 + 7 + 4), 25 and 100 must agree
    # with −log (1/25) Σ_k p(x|z_k) p(z_k)/q(z_k|x) computed with torch.distributions
    model = LinearGaussian()
    x = model.sample_x(3, seed=4)
    mu, logvar = mismatched_q(model, x)
    eps = torch.randn(25, 3, LATENT, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    std = torch.exp(0.5 * logvar)
    z = mu + eps * std
    normal = torch.distributions.Normal
    log_w = (normal(model.decode(z), math.sqrt(SIGMA2)).log_prob(x.flatten(1)).sum(-1)
             + normal(0.0, 1.0).log_prob(z).sum(-1) - normal(mu, std).log_prob(z).sum(-1))
    expected = -(torch.logsumexp(log_w, 0) - math.log(25))
    real_randn = torch.randn
    for chunk in (10, 7, 25, 100):
        used = []

        def stream(*size, **kw):
            assert tuple(size[1:]) == (3, LATENT)
            start = sum(used)
            used.append(size[0])
            return eps[start:start + size[0]]
        monkeypatch.setattr(torch, "randn", stream)
        got = bvb.iwae_nll(model, x, mu, logvar, SIGMA2, 25, chunk=chunk)
        monkeypatch.setattr(torch, "randn", real_randn)
        assert sum(used) == 25 and max(used) == min(chunk, 25), (chunk, used)
        assert got.tolist() == pytest.approx(expected.tolist(), rel=1e-10), chunk
    assert log_w.std(0).min() > 0.1                                # q is not the posterior: the weights differ


def test_frechet_distance_of_a_set_with_itself_is_zero_and_of_gaussians_matches_the_formula():
    torch.manual_seed(0)
    a = torch.randn(500, 4)
    assert bvb.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    # exact sample moments: a centered set scaled per dimension and shifted has known mean and covariance
    base = torch.tensor([[1.0, 1, 1], [-1, -1, 1], [1, -1, -1], [-1, 1, -1]])   # mean 0, cov (4/3)·I
    b = base * torch.tensor([2.0, 1, 3]) + torch.tensor([1.0, 0, -2])
    var_a, var_b = torch.full((3,), 4 / 3), torch.tensor([4.0, 1, 9]) * 4 / 3
    expected = (1 + 0 + 4) + ((var_a.sqrt() - var_b.sqrt()) ** 2).sum().item()
    assert bvb.frechet_distance(base, b) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_with_non_commuting_covariances_at_a_hand_computed_point():
    # a = {±(1,0), ±(0,2)}: mean 0, Σa = (2/3)·A, A = diag(1, 4); b = {±(1,1), ±(0,1)} + (1, −2): Σb = (2/3)·B,
    # B = [[1, 1], [1, 2]]. For 2x2, Tr √M = √(tr M + 2√det M): Tr √(AB) = √(9 + 2·√(4·1)) = √13, so
    # FD = |(1, −2)|² + (2/3)(tr A + tr B − 2√13) = 5 + (2/3)(8 − 2√13)
    a = torch.tensor([[1.0, 0], [-1, 0], [0, 2], [0, -2]])
    b = torch.tensor([[1.0, 1], [-1, -1], [0, 1], [0, -1]]) + torch.tensor([1.0, -2])
    ca, cb = np.cov(a.numpy().T), np.cov(b.numpy().T)
    assert np.allclose(ca, np.diag([2 / 3, 8 / 3])) and np.allclose(cb, [[2 / 3, 2 / 3], [2 / 3, 4 / 3]])
    assert not np.allclose(ca @ cb, cb @ ca)
    assert bvb.frechet_distance(a, b) == pytest.approx(5 + 2 / 3 * (8 - 2 * math.sqrt(13)), rel=1e-9)
    assert bvb.frechet_distance(b, a) == pytest.approx(5 + 2 / 3 * (8 - 2 * math.sqrt(13)), rel=1e-9)


def test_frechet_distance_with_random_non_commuting_covariances_matches_the_eigenvalues_of_the_product():
    # Tr (Σa Σb)^½ = Σ √λ_i over the eigenvalues of Σa Σb (real, ≥ 0: it is similar to Σa^½ Σb Σa^½)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 5)) @ rng.normal(size=(5, 5)) + rng.normal(size=5)
    b = rng.normal(size=(200, 5)) @ rng.normal(size=(5, 5)) * 0.7 + rng.normal(size=5)
    ca, cb = np.cov(a.T), np.cov(b.T)
    assert np.linalg.norm(ca @ cb - cb @ ca) > 0.1 * np.linalg.norm(ca @ cb)
    eig = np.linalg.eigvals(ca @ cb)
    assert np.abs(eig.imag).max() < 1e-8 * np.abs(eig.real).max() and eig.real.min() > 0
    expected = (np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(ca) + np.trace(cb)
                - 2 * np.sqrt(eig.real).sum())
    got = bvb.frechet_distance(torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32))
    assert got == pytest.approx(expected, rel=1e-5)
    # the commuting shortcut Σ(√var_a − √var_b)² on the diagonals would be wrong here
    naive = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.sum((np.sqrt(np.diag(ca)) - np.sqrt(np.diag(cb))) ** 2)
    assert abs(got - naive) > 0.05 * abs(expected)


class OnMPS(torch.Tensor):
    """A tensor that refuses float64 until it is moved to the CPU, as one on Apple's MPS does."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cpu:
            return args[0].as_subclass(torch.Tensor)
        if func is torch.Tensor.double or (func is torch.Tensor.to and torch.float64 in (*args[1:], *kwargs.values())):
            raise TypeError("Cannot convert a MPS Tensor to float64 dtype")
        return super().__torch_function__(func, types, args, kwargs)


def test_frechet_distance_makes_no_float64_tensor_on_the_features_device():
    a, b = torch.randn(50, 4), torch.randn(60, 4) + 1
    assert bvb.frechet_distance(a.as_subclass(OnMPS), b.as_subclass(OnMPS)) == bvb.frechet_distance(a, b)


def test_active_units_count_dimensions_whose_posterior_mean_varies():
    mu = torch.zeros(100, 4)
    mu[:, 0] = torch.linspace(-1, 1, 100)                      # variance ≈ 0.34
    mu[:, 1] = torch.linspace(-0.1, 0.1, 100)                  # variance ≈ 0.0034
    mu[:, 2] = 5.0                                             # constant
    assert bvb.active_units(mu) == 1


def test_classifier_is_trained_once_per_training_set_and_a_corrupt_or_foreign_cache_is_retrained(
        data_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    args = bvb.parse_args(run_args(data_dir, tmp_path / "out", "--cache-dir", str(cache)))
    splits = bvb.load_splits(args, torch.device("cpu"))
    _, accuracy, sha = bvb.get_classifier(splits, args)
    [path] = cache.iterdir()
    assert "trained on 80 images" in capsys.readouterr().out and 0 <= accuracy <= 1
    stamp = path.stat().st_mtime_ns
    assert bvb.get_classifier(splits, args)[2] == sha and path.stat().st_mtime_ns == stamp
    assert "loaded from" in capsys.readouterr().out
    path.write_bytes(b"not a checkpoint")                              # corrupt: retrained, same seeded weights
    assert bvb.get_classifier(splits, args)[2] == sha and "trained on 80" in capsys.readouterr().out
    state = torch.load(path, weights_only=True)
    torch.save(dict(state, fingerprint=dict(state["fingerprint"], epochs=1)), path)   # another setting: retrained
    assert bvb.get_classifier(splits, args)[2] == sha and "trained on 80" in capsys.readouterr().out
    other = bvb.parse_args(run_args(data_dir, tmp_path / "out", "--cache-dir", str(cache), "--val-size", "8"))
    bvb.get_classifier(bvb.load_splits(other, torch.device("cpu")), other)           # 88 other images: own file
    assert len(list(cache.iterdir())) == 2


def test_prepare_caches_the_classifier_and_writes_no_results(data_dir, tmp_path, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert bvb.main(run_args(data_dir, out, "--prepare", "--cache-dir", str(cache))) is None
    assert "Feature classifier ready" in capsys.readouterr().out
    assert not out.exists() and len(list(cache.iterdir())) == 1
    summary = bvb.main(run_args(data_dir, out, "--cache-dir", str(cache), *SMALL[:4], "--methods", "beta:0.1"))
    assert "loaded from" in capsys.readouterr().out
    run = json.loads((out / "runs" / "beta_0.1_seed0.json").read_text())
    assert run["reference"]["classifier_sha256"] == summary["reference"]["classifier_sha256"]
    assert len(run["reference"]["classifier_sha256"]) == 64


# ----------------------------------------------------------------------------- the report and the verdict


def test_mean_ci_is_the_student_t_interval():
    mean, half = bvb.mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-6)
    assert math.isnan(bvb.mean_ci([1.0])[1]) and bvb.mean_ci([1.0, float("nan")])[0] == 1.0


def test_student_t_quantile_matches_published_values():
    published = {1: 12.706205, 2: 4.302653, 3: 3.182446, 4: 2.776445, 9: 2.262157, 30: 2.042272, 100: 1.983972}
    for dof, value in published.items():
        assert bvb.t_quantile(dof) == pytest.approx(value, abs=1e-5)
    assert bvb.t_quantile(5, 0.95) == pytest.approx(2.015048, abs=1e-5)


def test_holm_and_the_t_test_at_hand_computed_points():
    assert bvb.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])     # 3·0.01; max(2·0.03, 0.04) kept monotone
    adjusted = bvb.holm([0.02, float("nan"), 0.5])
    assert adjusted[0] == pytest.approx(0.04) and math.isnan(adjusted[1]) and adjusted[2] == 0.5
    # t = 2/(1/√3) with 2 dof: p = 1 − t/√(2 + t²) in closed form
    t = 2 * math.sqrt(3)
    assert bvb.t_test_p([1.0, 2.0, 3.0]) == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-9)
    assert math.isnan(bvb.t_test_p([1.0])) and bvb.t_test_p([2.0, 2.0]) == 0.0 and bvb.t_test_p([0.0, 0.0]) == 1.0
    cell = bvb.interval([2.0, 8.0], ratio=True)                                  # geometric mean of 2 and 8
    assert cell["mean"] == pytest.approx(4.0) and cell["low"] * cell["high"] == pytest.approx(16.0)


def test_judgement_takes_the_side_of_the_interval_and_the_metric_direction():
    assert bvb.judge(-5.0, 1.0, -1) == "better" and bvb.judge(5.0, 1.0, -1) == "worse"
    assert bvb.judge(0.5, 1.0, -1) == "not distinguishable" and bvb.judge(5.0, 1.0, 1) == "better"
    assert bvb.judge(-5.0, float("nan"), -1) == "undetermined"


def fake_run(name, kind, seed, val, test, settings=None, history=(), sha="a" * 64):
    return {"name": name, "kind": kind, "variant": False, "seed": seed, "status": "ok", "train_seconds": 1.0,
            "settings": settings or ({"beta": float(name[5:])} if kind == "beta" else {}), "history": list(history),
            "reference": {"classifier_sha256": sha},
            "val": {k: val.get(k, 1.0) for k in bvb.METRICS}, "test": {k: test.get(k, 1.0) for k in bvb.METRICS}}


def test_best_of_k_is_the_mean_over_every_draw_of_the_validation_best_run():
    # three runs ranked by validation b, a, c (score: higher better); test values 5, 2, 9
    pool = [(1.0, 2.0), (3.0, 5.0), (0.5, 9.0)]
    curve = bvb.best_of_k(pool)
    assert curve[0] == pytest.approx((2 + 5 + 9) / 3)                       # k = 1: a random run
    assert curve[1] == pytest.approx((5 + 5 + 2) / 3)                       # pairs {a,b}→5, {b,c}→5, {a,c}→2
    assert curve[2] == 5.0                                                  # k = n: the validation-best run


def tuning_records():
    """Per seed three β runs (one of the notebook's grid: no second grid): validation IWAE NLL ranks β 1e-5 best, then
    3e-4, then 0.1; their test IWAE NLL is
    −100, −60, −20 (plus the seed's offset). β-VAE's best of k: k=1 −60, k=2 (−100·2 − 60)/3 = −86.67, k=3 −100.
    A method at −70 is beaten from k = 2 on; one at −95 from k = 3; one at −120 never (not within the grid)."""
    records = []
    for seed, offset in ((0, 0.0), (1, 1.0), (2, -1.0)):
        for name, val, test in (("beta_1e-05", -1.0, -100.0), ("beta_0.0003", -2.0, -60.0), ("beta_0.1", -3.0, -20.0)):
            records.append(fake_run(name, "beta", seed, {"iwae_nll": -val}, {"iwae_nll": test + offset}))
        for name, kind, test in (("geco", "geco", -70.0), ("controlvae", "controlvae", -95.0),
                                 ("sigma_vae", "sigma_vae", -120.0)):
            records.append(fake_run(name, kind, seed, {}, {"iwae_nll": test + offset + 0.1 * seed}))
    return records


def test_k_star_is_the_first_k_at_which_tuned_beta_vae_beats_the_method_paired_by_seed():
    methods = bvb.aggregate(tuning_records())
    t = bvb.tuning_cost(methods)
    assert list(t["grids"]) == ["β-VAE"] and t["grids"]["β-VAE"] == ["beta_1e-05", "beta_0.0003", "beta_0.1"]
    curve = t["curves"]["β-VAE"]["iwae_nll"]
    assert [c["mean"] for c in curve["k"]] == pytest.approx([-60.0, -260.0 / 3, -100.0])
    assert curve["per_seed"][1] == pytest.approx([-59.0, -260.0 / 3 + 1, -99.0])
    # a β run in one seed only (one more still training) waits: it neither joins the grid nor drops seeds 1 and 2
    late = bvb.tuning_cost(bvb.aggregate(tuning_records() + [fake_run("beta_1e-07", "beta", 0, {"iwae_nll": 0.0}, {})]))
    assert late["grids"] == t["grids"] and late["curves"]["β-VAE"]["iwae_nll"]["per_seed"] == curve["per_seed"]
    rows = {name: t["methods"][name]["iwae_nll"] for name in ("geco", "controlvae", "sigma_vae")}
    assert [rows[n]["k_star"]["β-VAE"]["k"] for n in rows] == [2, 3, None]
    geco = rows["geco"]["k_star"]["β-VAE"]
    assert geco["n"] == 3 and geco["at"]["mean"] == pytest.approx(-70.0 + 0.1 - (-260.0 / 3))
    # not within the grid: the comparison shown is at k = n, where the method is still better
    assert rows["sigma_vae"]["k_star"]["β-VAE"]["at"]["mean"] == pytest.approx(-20.0 + 0.1)
    # at k = n against the validation-chosen β (here the same by the mean and in each seed): robust findings
    assert rows["geco"]["at_n"]["finding"] == "worse" and rows["sigma_vae"]["at_n"]["finding"] == "better"
    assert rows["geco"]["at_n"]["beta"] == "beta_1e-05"


def test_a_stalled_setting_stays_in_its_tuning_grid_and_out_of_the_kl_slope():
    stalled = [dict(fake_run("beta_1e-07", "beta", seed, {"iwae_nll": 5.0}, {"iwae_nll": 0.0}), status="stalled")
               for seed in (0, 1, 2)]
    gone = [dict(fake_run("beta_1e-06", "beta", seed, {}, {}), status="diverged") for seed in (0, 1, 2)]
    t = bvb.tuning_cost(bvb.aggregate(tuning_records() + stalled + gone))
    # a tuner who draws the stalled β gets its run; the diverged one has no metrics to draw
    assert t["grids"]["β-VAE"] == ["beta_1e-05", "beta_0.0003", "beta_0.1", "beta_1e-07"]
    assert t["curves"]["β-VAE"]["iwae_nll"]["per_seed"][0][0] == pytest.approx((-100 - 60 - 20 + 0) / 4)
    # BOM's kl_scale grid: the stalled kl_scale 4 is a row of its table but no point of the slope
    knobs = {k: default for k, (default, _) in bvb.BOMVAE.KNOBS.items()}
    records = [r for r in front_records() if r["kind"] == "beta"]
    for seed in SEED_SCALE:
        for scale, kl, status in ((1.0, 60.0, "ok"), (2.0, 120.0 * (1 + seed / 10), "ok"), (4.0, 30.0, "stalled")):
            name = "bom" if scale == 1 else f"bom_kl_scale={scale:g}"
            settings = dict(knobs, kl_scale=scale, kl_targets=[50.0 * scale, 80.0 * scale, 150.0 * scale])
            records.append(dict(fake_run(name, "bom", seed, {}, {"kl": kl, "mse": 0.005}, settings), status=status,
                                variant=scale != 1))
    methods = bvb.aggregate(records)
    grids = bvb.knob_grids(methods, bvb.tuning_grids(methods))
    g = grids["bom, tuned"]
    assert sorted(g["settings"]) == ["bom", "bom_kl_scale=2", "bom_kl_scale=4"]
    slopes = [math.log(120.0 * (1 + seed / 10) / 60.0) / math.log(2) for seed in SEED_SCALE]
    assert g["kl_slope"]["n"] == 3 and g["kl_slope"]["mean"] == pytest.approx(statistics.fmean(slopes))
    md = "\n".join(bvb.knob_lines(grids))
    assert "; stalled |" in md and "bom_kl_scale=4 left out: stalled" in md


def test_the_finding_at_k_n_is_robust_only_when_mean_and_per_seed_choices_agree_after_holm():
    """beta_0.001 wins validation IWAE NLL on the mean over seeds (10 vs 10.33), but seed 0 alone prefers beta_0.1.
    sigma_vae beats beta_0.001 on test IWAE NLL in every seed, yet is 15 nats worse than beta_0.1 in seed 0."""
    records = []
    for seed, noise in ((0, 0.0), (1, 0.5), (2, -0.5)):
        records.append(fake_run("beta_0.001", "beta", seed, {"iwae_nll": 10.0}, {"iwae_nll": 100.0 + noise}))
        records.append(fake_run("beta_0.1", "beta", seed, {"iwae_nll": 9.0 if seed == 0 else 11.0}, {"iwae_nll": 80.0}))
        records.append(fake_run("sigma_vae", "sigma_vae", seed, {}, {"iwae_nll": 95.0 + (0.0, 0.2, -0.4)[seed]}))
    t = bvb.tuning_cost(bvb.aggregate(records))
    cell = t["methods"]["sigma_vae"]["iwae_nll"]["at_n"]
    assert cell["beta"] == "beta_0.001" and cell["mean"]["mean"] == pytest.approx((-5.0 - 5.3 - 4.9) / 3)
    assert cell["per_seed"]["mean"] == pytest.approx((15.0 - 5.3 - 4.9) / 3)
    assert bvb.finding(cell["mean"], -1) == "better" and bvb.finding(cell["per_seed"], -1) == "not distinguishable"
    assert cell["finding"] == "not distinguishable"
    # Holm over the table, one family per choice: every method x criterion in it (here 1 method x 3 criteria)
    at_n = [t["methods"]["sigma_vae"][key]["at_n"]["mean"] for key in bvb.TUNING_CRITERIA]
    assert [c["p_holm"] for c in at_n] == pytest.approx(bvb.holm([c["p"] for c in at_n]), nan_ok=True)


def test_the_tuning_cost_figure_has_its_size_and_is_not_blank(tmp_path):
    methods = bvb.aggregate(tuning_records())
    bvb.plot_tuning_cost(bvb.tuning_cost(methods), methods, str(tmp_path / "tuning_cost.png"))
    image = mpimg.imread(tmp_path / "tuning_cost.png")[..., :3]
    assert image.shape[:2] == (int(4.8 * 150), 15 * 150)
    assert image.std() > 0.05 and ((image.max(-1) - image.min(-1)) > 0.3).mean() > 0.0005


SEED_SCALE = {0: 1.0, 1: 1.5, 2: 0.7}     # every run of a seed is that much worse: only a paired comparison cancels it


def front_records():
    """Per seed three β runs at KL 10, 50, 200 with MSE 0.025, 0.008, 0.004 (times the seed's scale), FD prior
    400/200/800, IWAE NLL −20/−60/−100; and methods at a known ratio to that seed's front at KL 100 (front MSE
    √(0.008·0.004), IWAE −80, FD prior 400) or at KL 400 (outside)."""
    front = {0: 0.025, 1: 0.008, 2: 0.004}
    records = []
    for seed, scale in SEED_SCALE.items():
        for (name, kl, fd, iwae), mse in zip((("beta_0.001", 10.0, 400.0, -20.0), ("beta_0.0001", 50.0, 200.0, -60.0),
                                              ("beta_1e-05", 200.0, 800.0, -100.0)), front.values()):
            records.append(fake_run(name, "beta", seed, {}, {"kl": kl, "mse": mse * scale, "fd_prior": fd,
                                                              "iwae_nll": iwae}))
        at_100 = math.sqrt(0.008 * 0.004) * scale
        for name, kind, ratios, kl in (("bom_like", "bom", (1.9, 2.1, 2.0), 100.0), ("geco", "geco", (0.9, 1.1, 1.0), 100.0),
                                       ("sigma_vae", "sigma_vae", (0.45, 0.55, 0.5), 100.0),
                                       ("controlvae", "controlvae", (0.79, 0.81, 0.8), 100.0),
                                       ("freebits", "freebits", (1.0, 1.0, 1.0), 100.0)):
            records.append(fake_run(name, kind, seed, {}, {"kl": 400.0 if name == "freebits" and seed else kl,
                                                           "mse": ratios[seed] * at_100, "fd_prior": 200.0,
                                                           "iwae_nll": -70.0},
                                    {"kl_targets": [50.0, 80.0, 150.0], "tolerance": 0.01, "kl_target": 80.0,
                                     "lambda": 0.25}))
    return records


def test_the_front_is_interpolated_in_log_kl_and_never_extrapolated():
    betas = [r for r in front_records() if r["kind"] == "beta" and r["seed"] == 0]
    value, bracket, names = bvb.front_at(betas, 100.0, "mse")          # halfway between KL 50 and 200 in log KL
    assert value == pytest.approx(math.sqrt(0.008 * 0.004)) and bracket == (0.008, 0.004)
    assert names == ("beta_0.0001", "beta_1e-05")
    assert bvb.front_at(betas, 100.0, "iwae_nll")[0] == pytest.approx(-80.0)     # linear in the value itself
    assert bvb.front_at(betas, 10.0, "fd_prior")[0] == pytest.approx(400.0)      # an end point is inside
    assert bvb.front_at(betas, 9.9, "mse") is None and bvb.front_at(betas, 201.0, "mse") is None
    assert bvb.front_at(betas[:1], 10.0, "mse") is None                          # one β run is no front


def test_each_method_is_on_above_below_or_outside_the_front_paired_by_seed(tmp_path):
    gone = [dict(fake_run("bom_gone", "bom", seed, {}, {}, {"kl_targets": [50.0, 80.0, 150.0]}), status="diverged")
            for seed in SEED_SCALE]
    records = front_records() + gone
    front = bvb.matched_rate(bvb.aggregate(records))
    bom, geco, sigma, control, freebits = (front[n] for n in ("bom_like", "geco", "sigma_vae", "controlvae",
                                                              "freebits"))
    # the seed scales (1, 1.5, 0.7) cancel in the pairs: the ratios are exactly those put in
    assert bom["mse"]["mean"] == pytest.approx((1.9 * 2.1 * 2.0) ** (1 / 3)) and bom["position"] == "above"
    assert bom["between"] == front["freebits"]["between"] == ["beta_0.0001 – beta_1e-05"]
    assert [bom["per_seed"][s]["mse"] for s in SEED_SCALE] == pytest.approx([1.9, 2.1, 2.0])
    assert geco["position"] == "on" and geco["mse"]["low"] < 1 < geco["mse"]["high"]
    assert sigma["position"] == "below" and sigma["mse"]["mean"] == pytest.approx((0.45 * 0.55 * 0.5) ** (1 / 3))
    # 0.8x the front at KL 100 is 0.0045: below the chord, but above the β run at KL 200 (0.004) in every seed
    assert control["mse"]["p_holm"] < 0.05 and control["position"] == "on" and control["interpolation_only"]
    assert bom["iwae_nll"]["mean"] == pytest.approx(10.0) and bom["fd_prior"]["mean"] == pytest.approx(0.5)
    assert freebits["position"] == "outside" and freebits["seeds_outside"] == [1, 2] and freebits["mse"]["n"] == 1
    assert front["bom_gone"]["position"] == "diverged" and front["bom_gone"]["mse"]["n"] == 0
    # one Holm family: every cell of the table, not each row's three
    cells = [row[key] for row in front.values() for key in bvb.FRONT_METRICS]
    assert [c["p_holm"] for c in cells] == pytest.approx(bvb.holm([c["p"] for c in cells]), nan_ok=True)
    assert control["mse"]["p_holm"] > bvb.holm([control[key]["p"] for key in bvb.FRONT_METRICS])[0]
    config = {"epochs": 1, "train_images": 1, "val_images": 1, "test_images": 1, "iw_samples": 1, "device": "cpu",
              "torch": "x", "latent_dim": 128}
    summary, methods = bvb.summarize(records, {"test_data_sharpness": 0.03, "classifier_test_accuracy": 0.9}, config,
                                     "iwae_nll")
    bvb.write_report(str(tmp_path), summary, methods)
    md = (tmp_path / "summary.md").read_text()
    verdict = md.split("## Where each method lands")[0]
    assert "- Above the front (more MSE than β-VAE at the same rate): bom_like 2.00x [" in verdict
    assert "- Outside the β runs' rates (not extrapolated): freebits" in verdict
    assert "controlvae 0.80x [" in verdict and "(off it only by the interpolation)" in verdict
    assert "freebits 1.00x (1 of 3 seeds inside)." in verdict
    assert "- No verdict (every run diverged): bom_gone n/a." in verdict
    two = [r for r in records if r["seed"] != 2]                      # two seeds: their values beside the interval
    bvb.write_report(str(tmp_path), *bvb.summarize(two, {"test_data_sharpness": 0.03, "classifier_test_accuracy": 0.9},
                                                   config, "iwae_nll"))
    assert "2.00x [" in (md := (tmp_path / "summary.md").read_text()) and "] (seeds: 1.90x, 2.10x) |" in md
    assert summary["front"]["sigma_vae"]["position"] == "below"


def test_beta_is_chosen_on_validation_never_on_test_and_within_a_grid_when_asked():
    records = []
    for seed in (0, 1):
        # beta_0.1 is best on validation, beta_1e-05 would be best on test: the choice must ignore test
        records.append(fake_run("beta_1e-05", "beta", seed, {"iwae_nll": 12.0}, {"iwae_nll": 5.0}))
        records.append(fake_run("beta_0.1", "beta", seed, {"iwae_nll": 10.0}, {"iwae_nll": 9.0}))
    methods = bvb.aggregate(records)
    assert bvb.choose_beta(methods, "iwae_nll") == "beta_0.1"
    assert bvb.choose_beta(methods, "iwae_nll", (1e-5,)) == "beta_1e-05"
    assert bvb.choose_beta(methods, "iwae_nll", (1e-3,)) is None
    assert bvb.sweep_edge(methods, "beta_0.1") == "largest" and bvb.sweep_edge(methods, "beta_1e-05") == "smallest"
    assert bvb.sweep_edge(methods, "beta_1e-05", (1e-5,)) is None                # a grid of one has no edge
    assert bvb.criteria(methods, "iwae_nll")["iwae_nll_notebook_grid"]["beta"] == "beta_0.1"
    assert methods["beta_0.1"]["runs_to_choose"] == 2


def test_a_constrained_run_that_misses_its_target_is_flagged_and_one_that_reaches_it_is_not():
    geco = {"kind": "geco", "settings": {"tolerance": 0.01}, "history": [{"mse": 0.02}, {"mse": 0.0029}]}
    control = {"kind": "controlvae", "settings": {"kl_target": 80.0}, "history": [{"kl": 77.1}]}
    assert bvb.target_checks(geco) == [("training MSE", 0.0029, 0.01)] and bvb.missed(bvb.target_checks(geco)[0])
    assert not bvb.missed(bvb.target_checks(control)[0])                   # |77.1/80 − 1| = 3.6% ≤ 30%
    assert not bvb.missed(("training MSE", 0.0071, 0.01)) and bvb.missed(("training MSE", 0.0069, 0.01))
    records = [fake_run("beta_0.001", "beta", s, {}, {}) for s in (0, 1)]
    records += [fake_run("geco", "geco", s, {}, {}, {"tolerance": 0.01}, [{"mse": 0.0029 if s else 0.009}])
                for s in (0, 1)]
    methods = bvb.aggregate(records)
    assert methods["geco"]["missed_target"] == [1]


def test_free_bits_whose_floor_never_bound_is_reported_as_its_twin():
    assert bvb.FreeBits.idle([{"dims_below_lambda": 3.9}, {"dims_below_lambda": 0.04}, {"dims_below_lambda": 0.0}])
    assert not bvb.FreeBits.idle([{"dims_below_lambda": 3.9}, {"dims_below_lambda": 0.0}, {"dims_below_lambda": 2.0}])
    assert not bvb.SigmaVAE.idle([{"dims_below_lambda": 0.0}] * 3)
    assert not bvb.FreeBits.idle([{"dims_below_lambda": 0.0}])                  # one epoch says nothing yet
    records = [fake_run("freebits", "freebits", seed, {}, {}, {"lambda": 0.25},
                        [{"dims_below_lambda": 5.0}, {"dims_below_lambda": 0.0 if seed else 1.0}]) for seed in (0, 1)]
    methods = bvb.aggregate(records)
    assert methods["freebits"]["idle"] == [1] and bvb.FreeBits.twin == "sigma_vae"
    assert bvb.ControlVAE.sets_rate({"kl_target": 80.0}, 128).endswith("(BOM's KL optimum target, copied)")
    assert "copied" not in bvb.ControlVAE.sets_rate({"kl_target": 50.0}, 128)


def test_sharpness_is_judged_against_the_data_within_ten_percent():
    methods = {name: {"name": name, "variant": False, "test": {"sharp": (sharp, float("nan"))}}
               for name, sharp in (("bom", 0.26), ("beta_0.0001", 0.0275), ("sigma_vae", 0.02))}
    rows = bvb.sharpness_against_data(methods, 0.026)
    assert rows["bom"] == {"sharp": 0.26, "ratio": pytest.approx(10.0)}
    lines = bvb.sharpness_lines(rows)
    assert lines[0] == "- bom: 0.2600, 10.00x the data's (sharper than the data: high-frequency noise, not detail)"
    assert "within 10% of the data's" in lines[1] and "blurrier than the data" in lines[2]


def test_report_refuses_runs_evaluated_with_different_classifiers(tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    for seed, sha in ((0, "a" * 64), (1, "b" * 64)):
        (tmp_path / "runs" / f"beta_0.1_seed{seed}.json").write_text(json.dumps(fake_run("beta_0.1", "beta", seed, {}, {},
                                                                                          sha=sha)))
    with pytest.raises(bvb.UsageError, match=r"beta_0.1_seed0.json and .*beta_0.1_seed1.json belong to different "
                                             r"experiments \(classifier 'aaaaaaaaaaaa' in the one, 'bbbbbbbbbbbb'"):
        bvb.load_runs(str(tmp_path))
    (tmp_path / "runs" / "beta_0.1_seed1.json").write_text(json.dumps(fake_run("beta_0.1", "beta", 1, {}, {})))
    assert [r["seed"] for r in bvb.load_runs(str(tmp_path))] == [0, 1]


def test_the_answer_figures_draw_one_distinct_marker_per_method_at_the_set_size(tmp_path):
    methods = bvb.aggregate(front_records())
    names = [m["name"] for m in bvb.judged(methods)]
    drawn = bvb.plot_rate_distortion(methods, str(tmp_path / "rd.png"))
    assert set(drawn) == set(names) | {"β-VAE front (seed mean)"} and len(set(drawn.values())) == len(drawn)
    twins = [r for r in front_records() if r["name"] != "freebits"]
    twins += [dict(r, name="freebits", kind="freebits") for r in twins if r["name"] == "sigma_vae"]
    assert "freebits (nudged)" in bvb.plot_rate_distortion(bvb.aggregate(twins), str(tmp_path / "twins.png"))
    front = bvb.matched_rate(methods)
    forest = bvb.plot_matched_rate(front, methods, str(tmp_path / "forest.png"))
    assert set(forest) == set(names)            # freebits: inside in one seed only, a point without an interval
    for path, size in ((tmp_path / "rd.png", (6.5, 12)), (tmp_path / "forest.png", (2 + 0.5 * len(names), 12))):
        image = mpimg.imread(path)[..., :3]
        assert image.shape[:2] == (size[0] * 150, size[1] * 150)
        assert image.std() > 0.05 and ((image.max(-1) - image.min(-1)) > 0.3).mean() > 0.0005


def test_a_one_run_folder_draws_its_point_and_summary_md_links_only_figures_there(shared_out, small_out, tmp_path):
    bom = [dict(r, seed=0) for r in front_records() if r["name"] == "bom_like"][:1]
    bvb.plot_rate_distortion(bvb.aggregate(bom), str(tmp_path / "one.png"))
    image = mpimg.imread(tmp_path / "one.png")[..., :3]
    assert ((image.max(-1) - image.min(-1)) > 0.3).sum() > 50               # BOM's coloured marker
    for out, expected in ((shared_out, {"rate_distortion.png"}),         # one β: no front, no grid
                          (small_out, set())):                                # --no-plots: no figure, no link
        links = set(re.findall(r"!\[[^]]*\]\(([^)]+)\)", (out / "summary.md").read_text()))
        assert links == expected and all((out / link).is_file() for link in links), links


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_report_figures_have_the_set_pixel_size_and_are_not_blank(shared_out, name):
    # pixels = figsize x 150 dpi, and real content (many grey levels, visible contrast,
    # coloured curves and markers in the plots, none in the grayscale image grids)
    image = mpimg.imread(shared_out / name)[..., :3]
    (width, height), colour_share = FIGURES[name]
    assert image.shape[:2] == (height * 150, width * 150)
    gray = image.mean(-1)
    assert gray.std() > 0.05
    assert len(np.unique((gray * 255).round())) > 20
    assert (gray < 0.5).mean() > 0.005                    # ink: axes, lines, markers or image pixels
    coloured = ((image.max(-1) - image.min(-1)) > 0.3).mean()
    assert (coloured > colour_share) if colour_share else (coloured == 0.0)


def test_reconstruction_figure_shows_the_test_digits_in_its_first_row(shared_out):
    # fake digits are bright strokes on black: the "original" row holds large black areas, drawn on a fixed scale
    image = mpimg.imread(shared_out / "reconstructions_comparison.png")[..., :3].mean(-1)
    first_row = image[: image.shape[0] // 3]
    assert (first_row < 0.02).mean() > 0.2 and (first_row > 0.9).mean() > 0.1


def test_run_files_carry_the_script_hash_and_the_image_figure_arrays_of_their_model(shared_out, data_dir):
    record = json.loads((shared_out / "runs" / "bom_seed0.json").read_text())
    assert record["script_sha256"] == bvb.SCRIPT_SHA256 and "resumed_from_script_sha256" not in record
    model = bvb.new_model(16, torch.device("cpu"))
    model.load_state_dict(torch.load(shared_out / "checkpoints" / "bom_seed0.pt", weights_only=True)["model"])
    test_images = bvb.load_mnist(data_dir, train=False)[0]
    for key, packed in bvb.figure_images(model, test_images).items():
        stored = bvb.unpack_images(record["images"][key])
        assert stored.shape == (8, 1, 64, 64) and stored.dtype == np.uint8, key
        assert np.array_equal(stored, bvb.unpack_images(packed)) and stored.std() > 0, key
    recon = bvb.unpack_images(record["images"]["reconstructions"])
    model.eval()
    torch.manual_seed(0)
    torch.randn(8, 16)                                          # the shared prior samples come first
    exact = model(bvb.as_float(test_images[:8]))[0].detach().numpy() * 255
    assert np.abs(recon.astype(float) - exact).max() <= 0.5 + 1e-4   # rounded to the nearest grey level


def test_the_report_draws_every_figure_from_the_run_files_alone(shared_out, data_dir, tmp_path):
    out = copy_of(shared_out, tmp_path)
    shutil.rmtree(out / "checkpoints")
    for name in FIGURES:
        (out / name).unlink()
    bvb.main(run_args(data_dir, out, *SHARED, "--report"))
    for name in FIGURES:
        assert np.array_equal(mpimg.imread(out / name), mpimg.imread(shared_out / name)), name


def test_the_report_counts_the_script_versions_of_its_run_files(shared_out, data_dir, tmp_path, capsys):
    out = copy_of(shared_out, tmp_path)
    path = out / "runs" / "bom_seed0.json"
    record = json.loads(path.read_text())
    del record["script_sha256"]                                 # a run file written before they carried it
    path.write_text(json.dumps(record))
    summary = bvb.main(run_args(data_dir, out, *SHARED, "--report", "--no-plots"))
    assert summary["script_versions"] == {bvb.SCRIPT_SHA256: 1, None: 1}
    assert (f"Run files by script version (SHA-256): {bvb.SCRIPT_SHA256[:12]} (1 of 2 runs), not recorded (1 of 2 runs)"
            in capsys.readouterr().out)


def test_bom_sensitivity_runs_a_variant_s_knob_grid_judged_like_beta_s(data_dir, tmp_path):
    summary = bvb.main(run_args(data_dir, tmp_path, "--epochs", "1", "--latent-dim", "16", "--no-plots",
                                "--methods", "beta:0.001,beta:0.1,bom:sharp=off", "--bom-sensitivity", "bom:sharp=off"))
    settings = ["bom_sharp=off"] + [f"bom_sharp=off_{k}={v:g}" for k, vs in bvb.BOMVAE.SENSITIVITY.items() for v in vs]
    assert "bom_sharp=off_kl_scale=2" in settings and set(settings) <= set(summary["methods"])
    run = json.loads((tmp_path / "runs" / "bom_sharp=off_kl_scale=2_seed0.json").read_text())
    assert run["variant"] and run["settings"]["ablation"] == "sharp=off" and run["settings"]["kl_scale"] == 2.0
    assert run["settings"]["kl_targets"] == pytest.approx([t * 16 * 2 for t in bvb.KL_TARGETS_PER_DIM])
    assert run["config"]["calibration"]["sharp_ceiling"] is None                   # the ablation holds
    assert list(summary["front"]) == ["bom_sharp=off"]                             # variants are not in the verdict
    grid = summary["knob_grids"]["bom_sharp=off, tuned"]
    assert sorted(grid["settings"]) == sorted(settings) and grid["settings"]["bom_sharp=off"]["changes"] == {}
    assert grid["settings"]["bom_sharp=off_squeeze_k=1"]["changes"] == {"squeeze_k": 1.0}
    # the slope of log test KL on log kl_scale, from the run files of the kl_scale settings alone
    runs = {n: json.loads((tmp_path / "runs" / f"{n}_seed0.json").read_text()) for n in settings}
    points = [(math.log(r["settings"]["kl_scale"]), math.log(r["test"]["kl"])) for n, r in runs.items()
              if "squeeze" not in n and "mse_floor" not in n]
    assert len(points) == 5
    assert grid["kl_slope"]["mean"] == pytest.approx(statistics.linear_regression(*zip(*points))[0])
    assert math.isnan(grid["kl_slope"]["low"])                                     # one seed: no interval
    # the grid is tuned like β: its best of k over its 9 settings, on validation
    assert sorted(summary["tuning_cost"]["grids"]["bom_sharp=off, tuned"]) == sorted(settings)
    tuned = summary["tuning_cost"]["curves"]["bom_sharp=off, tuned"]["mse"]["per_seed"][0]
    best = min(runs.values(), key=lambda r: r["val"]["mse"])
    assert len(tuned) == 9 and tuned[-1] == best["test"]["mse"]
    assert tuned[0] == pytest.approx(statistics.fmean(r["test"]["mse"] for r in runs.values()))
    md = (tmp_path / "summary.md").read_text()
    assert "### bom_sharp=off and its knob settings" in md and "| bom_sharp=off_kl_scale=2 | kl_scale 2 | 20 | " in md


def test_ablations_train_in_the_loop_enter_the_verdict_and_the_why_section(data_dir, tmp_path):
    summary = bvb.main(run_args(data_dir, tmp_path, "--epochs", "2", "--latent-dim", "16", "--no-plots",
                                "--methods", "beta:0.001,beta:0.1,bom,ablations"))
    runs = {name: json.loads((tmp_path / "runs" / f"{name}_seed0.json").read_text())
            for name in ("bom", "bom_sharp=data", "bom_sharp=off", "bom_squeeze=1")}
    train = bvb.load_mnist(data_dir, train=True)[0][:80].float() / 255
    assert runs["bom_sharp=data"]["config"]["calibration"]["sharp_ceiling"] == pytest.approx(
        bvb.sharpness(train).mean().item(), rel=1e-5)
    assert runs["bom_sharp=off"]["config"]["calibration"]["sharp_ceiling"] is None
    assert all(row["bottleneck_counts"]["sharp"] == 0 for row in runs["bom_sharp=off"]["history"])
    assert runs["bom"]["history"][0]["squeeze_factor"] == 1.0
    first = runs["bom_squeeze=1"]["history"][0]
    assert first["squeeze_factor"] == pytest.approx(bvb.squeeze_factor(first["s_min"], k=0.5))
    # every ablation is judged against the β front and the β-VAE like every method
    assert list(summary["front"]) == ["bom", "bom_sharp=data", "bom_sharp=off", "bom_squeeze=1"]
    assert list(summary["tuning_cost"]["methods"]) == list(summary["front"])
    # the why section: one row per BOM, counts recomputed from the run files, one sentence per ablation
    diagnosis = summary["bom_diagnosis"]["methods"]
    assert list(diagnosis) == ["bom", "bom_sharp=data", "bom_sharp=off", "bom_squeeze=1"]
    histories = [json.loads((tmp_path / "runs" / f"bom_squeeze=1_seed{seed}.json").read_text())["history"]
                 for seed in (0,)]
    row = diagnosis["bom_squeeze=1"]
    assert row["squeezes"] == statistics.fmean(sum(r['squeeze_factor'] < 1 for r in h[:-1]) for h in histories)
    assert row["mse_floor_over_mse"] == statistics.fmean(h[-1]['constraints']['mse_floor'] / h[-1]['mse']
                                                         for h in histories)
    assert math.isnan(diagnosis["bom_sharp=off"]["sharp_ceiling_over_data"])           # no ceiling (null in JSON)
    assert len(row["worst_share_per_epoch"]) == 2                                # the per-epoch shares reach epoch 2
    assert "moves" not in diagnosis["bom"] and all("moves" in diagnosis[n] for n in list(diagnosis)[1:])
    fd = bvb.paired_difference(*(bvb.aggregate(bvb.load_runs(str(tmp_path)))[n] for n in ("bom_sharp=off", "bom")),
                               "fd_recon")
    move = diagnosis["bom_sharp=off"]["moves"]["fd_recon"]
    assert (move["diff"], move["n"]) == (fd[0], fd[2]) and math.isnan(move["half"]) and math.isnan(fd[1])  # 1 seed
    md = (tmp_path / "summary.md").read_text()
    sentences = [line for line in md.split("## Why BOM ends where it does")[1].splitlines() if line.startswith("- ")]
    assert [line.split(" ")[1] for line in sentences] == ["bom_sharp=data", "bom_sharp=off", "bom_squeeze=1"]
    assert f"({bvb.fmt_ci(fd[0], fd[1], 2)}, " in sentences[1]
    assert "| bom_sharp=off | no sharpness score: the MSE score and the KL box only | " in md
    alone = bvb.bom_diagnosis({n: m for n, m in bvb.aggregate(bvb.load_runs(str(tmp_path))).items()
                               if "ablation" not in m["settings"]}, 0.03, "beta_0.001")
    assert list(alone["methods"]) == ["bom"]
    assert bvb.diagnosis_lines(alone)[-1].startswith("- No ablation in these runs")


# ----------------------------------------------------------------------------- the command line and bad input


def test_cli_end_to_end_writes_every_output(shared_out, data_dir):
    out = shared_out
    cli = json.loads((out.parent / "cli.json").read_text())
    assert cli["returncode"] == 0 and cli["stderr"] == "", cli["stderr"]        # a fresh interpreter prints no noise
    for name in FIGURES:
        assert_drawn(out / name)
    summary = json.loads((out / "summary.json").read_text())
    methods = [r["method"] for r in summary["runs"]]
    assert methods == ["beta_0.0001", "bom", "data"]
    assert bvb.parse_args([]).method_specs == [("beta", 1e-4), ("beta", 1e-3), ("beta", 0.01), ("beta", 0.1),
                                               ("bom", None)]                     # the notebook's comparison
    data_row = summary["runs"][-1]
    assert data_row["status"] == "reference" and data_row["test_mse"] is None
    test_images = bvb.load_mnist(data_dir, train=False)[0]
    assert data_row["test_sharp"] == pytest.approx(bvb.sharpness(test_images.float() / 255).mean().item(), rel=1e-5)
    assert sorted(os.listdir(out / "runs")) == sorted(f"{m}_seed0.json" for m in methods[:-1])
    bom = json.loads((out / "runs" / "bom_seed0.json").read_text())
    assert set(bom["config"]["calibration"]) == {"mse_floor", "kl_floor_low", "kl_optimum", "kl_floor_high",
                                                 "sharp_ceiling"}
    assert [h["epoch"] for h in bom["history"]] == [1]
    md = (out / "summary.md").read_text()
    assert "Best β-VAE by validation MSE" in md and md.index("## Verdict") < md.index("## Test metrics")
    assert summary["front"]["bom"]["position"] in ("undetermined", "outside")   # one seed: no interval
    assert len((out / "summary.csv").read_text().strip().splitlines()) == 4
    assert "## Verdict" in cli["stdout"]
    for row in summary["runs"][:-1]:
        assert all(math.isfinite(row[f"test_{k}"]) for k in bvb.METRICS), row["method"]
        assert math.isfinite(row["val_neg_elbo"])


def test_default_out_is_named_from_the_settings_that_change_results():
    name = lambda *argv: bvb.parse_args(["--device", "cpu", *argv]).out
    assert name() == name("--epochs", "20", "--data-dir", "elsewhere", "--no-progress") == os.path.join("results", "default")
    assert name("--epochs", "5", "--seeds", "0", "1") == os.path.join("results", "e5_s0-1")
    assert name("--methods", "all", "--lr", "0.0003") == os.path.join("results", "methods-all_lr-0.0003")
    assert name("--seeds", "0", "1") != name("--seeds", "0", "2") and name("--out", "mine") == "mine"
    many = "beta:0.001,beta:0.002,beta:0.003,beta:0.004,beta:0.005,bom,geco"        # over 80 characters: cut, hashed
    long = name("--methods", many, "--bom-kl-scale", "2")
    assert len(os.path.basename(long)) == 60 + 1 + 8 and long != name("--methods", many, "--bom-kl-scale", "3")
    quick = bvb.parse_args(["--quick", "--device", "cpu"])
    assert (quick.epochs, quick.train_subset, quick.val_size, quick.test_subset, quick.iw_samples) == (3, 512, 256, 256, 8)
    assert quick.out == os.path.join("results", "quick") and bvb.parse_args(["--quick", "--epochs", "1"]).epochs == 1
    assert name("--quick", "--epochs", "1") == os.path.join("results", "quick_e1")
    # knobs of several methods: the order of the flags' first release, whatever the registry's order
    assert name("--bom-kl-scale", "2", "--geco-tolerance", "0.02") == os.path.join(
        "results", "geco-tolerance-0.02_bom-kl-scale-2")
    assert name("--bom-squeeze-start", "2", "--freebits-lambda", "0.5", "--controlvae-kl", "40") == os.path.join(
        "results", "controlvae-kl-40_freebits-lambda-0.5_bom-squeeze-start-2")


def test_a_method_added_to_the_registry_gets_its_knob_flags_checked_and_passed_to_it(monkeypatch, capsys):
    class Toy(bvb.Method):
        kind, label, KNOBS = "toy", "toy", {"gain": (2.0, "multiplies β"), "warmup": (3, "epochs before it acts")}

        def __init__(self, gain, warmup):
            self.beta = gain * warmup

    monkeypatch.setitem(bvb.METHOD_CLASSES, "toy", Toy)
    args = bvb.parse_args(["--device", "cpu", "--toy-gain", "0.5"])
    assert (args.toy_gain, args.toy_warmup) == (0.5, 3)
    assert Toy.from_args(args, None).beta == 1.5 and "toy_gain" not in bvb.run_config(args, {
        split: (torch.zeros(1),) for split in ("train", "val", "test")})
    for flags, message in ((["--toy-gain", "0"], "--toy-gain must be a finite number > 0"),
                           (["--toy-warmup", "0"], "--toy-warmup must be >= 1")):
        with pytest.raises(bvb.UsageError, match=message):
            bvb.parse_args(["--device", "cpu", *flags])


def test_method_knobs_default_to_their_papers_and_the_notebook():
    args = bvb.parse_args(["--device", "cpu"])
    assert {dest: getattr(args, dest) for _, dest, _, _ in bvb.knob_flags()} == {
        "geco_tolerance": 0.01, "geco_rate": 1e-5, "geco_speedup": 10.0,
        "controlvae_kl": None, "controlvae_kp": 0.01, "controlvae_ki": 0.0001, "freebits_lambda": 0.25,
        "bom_kl_scale": 1.0, "bom_squeeze_k": 0.5, "bom_squeeze_start": 3, "bom_calib_batches": 50,
        "bom_mse_floor_mult": 2.0, "bom_kl_low_mult": 0.1, "bom_kl_high_mult": 50.0}
    assert bvb.make_method(("controlvae", None), args).kl_target == 0.625 * 128      # BOM's KL optimum target


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--methods", "beta:0.1,vae"], "unknown method 'vae'"),
    (["--methods", "beta:0"], "β must be a finite number > 0"),
    (["--methods", "beta:-0.1"], "β must be a finite number > 0"),
    (["--methods", "beta:abc"], "needs a number"),
    (["--methods", "bom,bom"], "listed twice"),
    (["--train-subset", "-1"], "--train-subset must be >= 0"),
    (["--test-subset", "-5"], "--test-subset must be >= 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--epochs", "two"], "invalid int value"),
    (["--lr", "-0.001"], "--lr must be a finite number > 0"),
    (["--methods", "beta:"], "needs a number"),
    (["--train-subset", "81"], "--train-subset 81 is larger than the 80 training images there are after holding"),
    (["--test-subset", "1000"], "--test-subset 1000 is larger than the 40 test images there are"),
    (["--val-size", "96"], "--val-size 96 leaves no training images"),
    (["--seeds", "0", "0"], "a seed is listed twice"),
    (["--shard", "3/2"], "--shard must be K/N"),
    (["--shard", "1/2", "--report"], "separate modes"),
    (["--train-subset", "20"], "--batch-size 32 is larger than the 20 training images"),
    (["--resume", "--overwrite"], "choose one"),
    (["--geco-tolerance", "0"], "--geco-tolerance must be a finite number > 0"),
    (["--controlvae-kl", "-5"], "--controlvae-kl must be a finite number > 0"),
    (["--methods", "all,bom"], "listed twice"),
    (["--methods", ""], "--methods"),
    (["--iw-samples", "0"], "--iw-samples must be >= 1"),
    (["--val-size", "-1"], "--val-size must be >= 0"),
    (["--lr", "inf"], "--lr must be a finite number > 0"),
    (["--shard", "0/2"], "--shard must be K/N"),
    (["--bom-kl-scale", "0"], "--bom-kl-scale must be a finite number > 0"),
    (["--bom-squeeze-k", "-1"], "--bom-squeeze-k must be a finite number > 0"),
    (["--bom-squeeze-start", "0"], "--bom-squeeze-start must be >= 1"),
    (["--bom-calib-batches", "0"], "--bom-calib-batches must be >= 1"),
    (["--bom-mse-floor-mult", "0"], "--bom-mse-floor-mult must be a finite number > 0"),
    (["--bom-kl-low-mult", "0"], "--bom-kl-low-mult must be a finite number > 0"),
    (["--bom-kl-high-mult", "-2"], "--bom-kl-high-mult must be a finite number > 0"),
    (["--geco-rate", "nan"], "--geco-rate must be a finite number > 0"),
    (["--freebits-lambda", "0"], "--freebits-lambda must be a finite number > 0"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(data_dir, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    before = tree(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        bvb.main(run_args(data_dir, out, *flags))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("bom_vs_beta.py: error:"), err
    assert not out.exists() and tree(tmp_path) == before


def test_cli_bad_input_has_no_traceback(tmp_path, monkeypatch, capsys):
    """The file run as a script (its `__main__` block, in this interpreter: a new one only adds start-up time)."""
    monkeypatch.setattr(sys, "argv", ["bom_vs_beta.py", "--methods", "beta:", "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(os.path.join(HERE, "bom_vs_beta.py"), run_name="__main__")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "bom_vs_beta.py: error: --methods: 'beta:' needs a number after 'beta:'"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_but_absent_is_a_clean_error(data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bvb.main(["--device", "cuda", "--data-dir", data_dir, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "no CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_amp_is_refused_where_bf16_is_not_native_or_autocast_fails(monkeypatch):
    bvb.check_amp(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(bvb.UsageError, match=r"Tesla T4 \(compute capability 7.5\) has no native bf16"):
        bvb.check_amp(torch.device("cuda"))

    def no_bf16(*a, **k):
        raise RuntimeError("bf16 autocast is not supported here\nsecond line")
    monkeypatch.setattr(torch, "autocast", no_bf16)
    with pytest.raises(bvb.UsageError, match=r"^--amp: bf16 autocast fails on cpu .*\(bf16 autocast is not supported "
                                             r"here\); run without --amp$"):
        bvb.check_amp(torch.device("cpu"))


def test_out_that_is_a_file_or_unwritable_is_refused(data_dir, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    for out, message in ((a_file, "exists and is not a folder"), (a_file / "sub", "is not writable")):
        with pytest.raises(SystemExit) as exit_info:
            bvb.main(run_args(data_dir, out))
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and message in err and len(err.splitlines()) == 1
    assert a_file.read_text() == "keep me"


def test_report_without_run_files_is_a_one_line_error_and_creates_no_out(data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        bvb.main(run_args(data_dir, out, "--report"))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert len(err.splitlines()) == 1 and err.startswith("bom_vs_beta.py: error:") and "no run files" in err
    assert not out.exists(), sorted(os.listdir(tmp_path))


def test_report_on_an_existing_out_without_run_files_leaves_it_untouched(data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    before = tree(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        bvb.main(run_args(data_dir, out, "--report"))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "no run files" in err
    assert tree(tmp_path) == before


def test_existing_results_are_refused_then_replaced_only_on_purpose(small_out, data_dir, tmp_path, capsys):
    out = copy_of(small_out, tmp_path)
    before = tree(out)
    with pytest.raises(SystemExit) as exit_info:
        bvb.main(run_args(data_dir, out, "--epochs", "1", "--latent-dim", "16", "--no-plots"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "already holds results" in err and "--overwrite would delete runs" in err
    assert tree(out) == before
    bvb.main(run_args(data_dir, out, "--epochs", "1", "--latent-dim", "16", "--no-plots",
                      "--methods", "beta:0.01", "--overwrite"))
    assert sorted(os.listdir(out / "runs")) == ["beta_0.01_seed0.json"]
    assert sorted(os.listdir(out / "checkpoints")) == ["beta_0.01_seed0.lock", "beta_0.01_seed0.pt"]


def test_the_headline_command_starts_in_a_clone_beside_committed_results_and_a_rerun_says_resume(
        tmp_path, monkeypatch, capsys):
    """In a copy of the repository (the script and a committed experiment under results/), the headline
    command's flags (--epochs 20, the device aside) with the data holding 5,000 validation images starts
    training in results/default; the same command again is refused, offering a fresh --out and --resume, and
    naming what --overwrite would delete; the committed folder is never touched."""
    repo = tmp_path / "clone"
    committed = repo / "results" / "e5_methods-all_n6400_test2000_s0-1-2_val2000_iw16"
    (committed / "runs").mkdir(parents=True)
    (committed / "runs" / "bom_seed0.json").write_text('{"name": "bom"}')
    (committed / "summary.md").write_text("# committed")
    shutil.copy(os.path.join(HERE, "bom_vs_beta.py"), repo)
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    write_idx(raw, "train-images-idx3-ubyte", fake_digits(5064, rng))      # 64 to train on, 5,000 to validate
    write_idx(raw, "train-labels-idx1-ubyte", rng.integers(0, 10, 5064))
    write_idx(raw, "t10k-images-idx3-ubyte", fake_digits(16, rng))
    write_idx(raw, "t10k-labels-idx1-ubyte", rng.integers(0, 10, 16))
    before = tree(committed)
    monkeypatch.chdir(repo)
    started, train_run = [], bvb.train_run

    def interrupt(method, images, args, checkpoint=None, resume_from=None):
        if checkpoint is None:                                    # the wall-time estimate's few timed steps
            return train_run(method, images, args)
        started.append((method.name, images.shape[0], args.epochs))
        open(checkpoint, "w").close()                             # its first epoch is saved, then Ctrl-C
        raise KeyboardInterrupt
    monkeypatch.setattr(bvb, "train_run", interrupt)
    headline = ["--epochs", "20", "--device", "cpu", "--data-dir", str(tmp_path / "data"), "--cache-dir", CACHE,
                "--no-progress"]
    assert bvb.parse_args(headline).out == os.path.join("results", "default")
    with pytest.raises(SystemExit) as exit_info:
        bvb.main(headline)
    assert exit_info.value.code == 130 and started == [("beta_0.0001", 64, 20)]
    captured = capsys.readouterr()
    assert "writing to results/default" in captured.out and "Estimated wall time" in captured.out
    assert "--resume" in captured.err and (repo / "results" / "default" / "runs").is_dir()
    with pytest.raises(SystemExit) as exit_info:
        bvb.main(headline)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert "give this run a fresh folder (--out results/default-2)" in err and "--resume" in err
    assert err.index("--out results/default-2") < err.index(
        "--overwrite would delete checkpoints/beta_0.0001_seed0.pt, checkpoints, experiment.json in")
    assert tree(committed) == before


def test_empty_result_folders_left_by_a_failed_start_do_not_block_the_rerun(data_dir, tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "checkpoints").mkdir()
    bvb.main(run_args(data_dir, tmp_path, "--methods", "beta:0.001", "--epochs", "1", "--latent-dim", "8",
                      "--no-plots"))
    assert (tmp_path / "runs" / "beta_0.001_seed0.json").exists()


# ----------------------------------------------------------------------------- checkpoints, resume and shards


def test_atomic_write_keeps_the_old_file_when_a_write_breaks(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old")

    def broken(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError("disk full")
    with pytest.raises(OSError):
        bvb.atomic_write(str(path), broken)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["summary.json"]


def test_random_states_are_the_cpu_s_and_the_run_device_s_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)       # a GPU machine ...
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: pytest.fail("a CPU run created a CUDA context"))
    order = torch.Generator().manual_seed(3)
    assert set(bvb.random_states(order, torch.device("cpu"))) == {"torch", "order"}   # ... running on its CPU
    saved = torch.tensor([7], dtype=torch.uint8)
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: saved)
    restored = []
    monkeypatch.setattr(torch.mps, "set_rng_state", restored.append)
    rng = bvb.random_states(order, torch.device("mps"))
    assert rng["mps"] is saved
    bvb.set_random_states(rng, order, torch.device("mps"))
    assert restored == [saved]


STATEFUL = ["--epochs", "3", "--latent-dim", "16", "--methods", "geco,controlvae,bom", "--bom-squeeze-start", "1",
            "--no-plots"]


class Killed(BaseException):
    """A crash no handler in the script catches, raised right after a checkpoint is written."""


def test_stateful_runs_killed_mid_training_resume_to_the_same_metrics(data_dir, tmp_path, monkeypatch, capsys):
    """Killed inside epoch 2 of each of GECO, ControlVAE and BOM in turn (after their state has moved: λ, the
    integral, a squeeze), resuming each time; the result equals an uninterrupted run's exactly. GECO and ControlVAE
    die in this process right after their epoch-1 checkpoint; BOM's process gets a real SIGKILL."""
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    bvb.main(run_args(data_dir, reference, *STATEFUL))
    real_save = bvb.save_checkpoint
    for i, name in enumerate(("geco", "controlvae", "bom")):
        checkpoint = killed / "checkpoints" / f"{name}_seed0.pt"
        argv = run_args(data_dir, killed, *STATEFUL, *(["--resume"] if i else []))
        if name != "bom":
            def save(path, state, name=name):
                real_save(path, state)
                if os.path.basename(path) == f"{name}_seed0.pt" and len(state["history"]) == 1:
                    raise Killed
            monkeypatch.setattr(bvb, "save_checkpoint", save)
            with pytest.raises(Killed):
                bvb.main(argv)
            monkeypatch.setattr(bvb, "save_checkpoint", real_save)
        else:
            proc = subprocess.Popen(script(*argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.time() + 120
            while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.005)
            proc.send_signal(signal.SIGKILL)             # after epoch 1 of this run: inside epoch 2
            proc.wait()
            assert (killed / "checkpoints" / "bom_seed0.lock").exists()     # left behind, locking nothing
        state = torch.load(checkpoint, weights_only=True)
        assert not state["finished"] and len(state["history"]) < 3, name
        moved = {"geco": float(state["method"].get("lambda", 1.0)) != 1.0,
                 "controlvae": state["method"].get("integral", 0.0) != 0.0,
                 "bom": state["method"].get("constraints") != state["method"].get("calibration")}
        assert moved[name], name
    assert not (killed / "summary.json").exists()
    capsys.readouterr()
    bvb.main(run_args(data_dir, killed, *STATEFUL, "--resume"))
    assert "bom: resuming after epoch" in capsys.readouterr().out
    assert summary_metrics(killed) == summary_metrics(reference)
    for name in ("geco", "controlvae", "bom"):
        history = lambda out: json.loads((out / "runs" / f"{name}_seed0.json").read_text())["history"]
        assert history(killed) == history(reference), name


def test_resume_skips_finished_runs_and_reproduces_the_summary(small_out, data_dir, tmp_path, capsys):
    first = json.loads((small_out / "summary.json").read_text())
    again = bvb.main(run_args(data_dir, copy_of(small_out, tmp_path), *SMALL, "--resume"))
    assert capsys.readouterr().out.count("finished earlier") == 2
    assert [r["seed"] for r in again["runs"]] == [r["seed"] for r in first["runs"]]
    history = json.loads((small_out / "runs" / "bom_seed0.json").read_text())["history"]
    assert [row["epoch"] for row in history] == [1, 2, 3]


def test_resume_reevaluates_a_finished_checkpoint_to_the_same_metrics(shared_out, data_dir, tmp_path, capsys):
    # the β run's file is gone but its finished checkpoint is there: --resume must load it (no training) and
    # evaluate it again to the same numbers, and keep the BOM run's file as it is
    out = copy_of(shared_out, tmp_path)
    original = json.loads((out / "runs" / "beta_0.0001_seed0.json").read_text())
    bom_file = (out / "runs" / "bom_seed0.json").read_bytes()
    (out / "runs" / "beta_0.0001_seed0.json").unlink()
    bvb.main(run_args(data_dir, out, *SHARED, "--no-plots", "--resume"))
    printed = capsys.readouterr().out
    assert "beta_0.0001: finished earlier" in printed and "loaded from" in printed
    assert "bom, seed 0: finished earlier, kept from" in printed and "epoch 1/1" not in printed
    again = json.loads((out / "runs" / "beta_0.0001_seed0.json").read_text())
    for split in ("val", "test"):
        assert again[split] == original[split], split
    assert again["history"] == original["history"] and again["train_seconds"] == original["train_seconds"]
    assert (out / "runs" / "bom_seed0.json").read_bytes() == bom_file


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "Interrupted"), (signal.SIGTERM, 143, "Terminated")])
def test_ctrl_c_and_sigterm_keep_completed_epochs_and_print_the_resume_command(data_dir, tmp_path, sig, code, word):
    """SIGTERM is what SLURM sends before pre-empting a job: it ends the run as Ctrl-C does."""
    out = tmp_path / "out"
    proc = subprocess.Popen(script(*run_args(data_dir, out, *SMALL)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # (a shell's background job ignores SIGINT and passes that on; Ctrl-C must reach the script as at a terminal)
    first = out / "checkpoints" / "beta_0.001_seed0.pt"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert f"{word}. Every completed epoch" in err and err.strip().endswith("--no-plots --resume")
    assert "Traceback" not in err
    torch.load(first, weights_only=True)             # what was saved is intact
    locks = [bvb.lock(str(path)) for path in (out / "checkpoints").glob("*.lock")]
    assert locks and None not in locks                # the locks went with the process, their files stay
    bvb.release(locks)
    bvb.main(run_args(data_dir, out, *SMALL, "--resume"))
    assert summary_metrics(out)


def test_one_folder_is_one_experiment_resume_and_report_refuse_other_settings(small_out, data_dir, tmp_path, capsys):
    out = copy_of(small_out, tmp_path)
    for finished in (True, False):                        # every run finished; one still to train
        if not finished:
            (out / "runs" / "bom_seed0.json").unlink()
        before = tree(out)
        for flags, setting in ((["--iw-samples", "8"], "iw_samples 3 in the one, 8"),
                               (["--test-subset", "20"], "test_images 40 in the one, 20"),
                               (["--lr", "5e-4"], "(lr 0.001 there, 0.0005 now)")):  # a training flag: as before
            with pytest.raises(SystemExit) as exit_info:
                bvb.main(run_args(data_dir, out, *SMALL, *flags, "--resume"))
            err = capsys.readouterr().err.strip()
            assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and setting in err, err
            assert tree(out) == before
    # run files that disagree are refused by --report, never averaged
    shutil.copy(small_out / "runs" / "bom_seed0.json", out / "runs")
    path = out / "runs" / "beta_0.001_seed0.json"
    record = json.loads(path.read_text())
    record["config"]["iw_samples"] = 8
    path.write_text(json.dumps(record))
    with pytest.raises(SystemExit) as exit_info:
        bvb.main(run_args(data_dir, out, *SMALL, "--report"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "beta_0.001_seed0.json and " in err and "(iw_samples 8 in the one, 3" in err


def test_a_second_process_on_a_folder_in_use_is_refused_at_its_start_but_a_shard_is_not(data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    one = ["--epochs", "1", "--latent-dim", "8", "--methods", "beta:0.001,beta:0.1", "--no-plots"]
    # the first process has claimed the folder and started its runs: no run file yet
    first = bvb.parse_args(run_args(data_dir, out, *one))
    splits = bvb.load_splits(first, first.torch_device)
    bvb.prepare_out(first, [])
    locks = bvb.lock_runs(first, bvb.run_grid(first), set())
    bvb.claim(str(out / "experiment.json"), bvb.command_experiment(first, splits))
    assert json.loads((out / "experiment.json").read_text())["lr"] == 1e-3
    before = tree(out)
    for flags, message in ((["--lr", "5e-4", "--shard", "2/2"], "(lr 0.001 in the one, 0.0005 in the other)"),
                           (["--shard", "2/2"], "beta_0.1, seed 0 is being trained into"),
                           (["--overwrite"], "--overwrite: beta_0.001_seed0 is being trained into"),  # not deleted
                           (["--shard", "1/2", "--overwrite"], "--overwrite: beta_0.001_seed0 is being trained")):
        with pytest.raises(SystemExit) as exit_info:
            bvb.main(run_args(data_dir, out, *one, *flags))
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
        assert tree(out) == before
    bvb.release(locks[1:])                  # the first process goes on with beta_0.001 alone, as shard 1/2 would
    bvb.main(run_args(data_dir, out, *one, "--shard", "2/2"))   # shard 2/2 of the same command trains beside it
    assert sorted(os.listdir(out / "runs")) == ["beta_0.1_seed0.json"]
    assert bvb.lock(str(out / "checkpoints" / "beta_0.001_seed0.lock")) is None       # still the first's
    bvb.release(locks[:1])
    # the feature classifier is part of the experiment: a folder whose runs used another refuses this one
    experiment = json.loads((out / "experiment.json").read_text())
    (out / "experiment.json").write_text(json.dumps(dict(experiment, classifier="0" * 12)))
    with pytest.raises(SystemExit):
        bvb.main(run_args(data_dir, out, *one, "--shard", "1/2"))
    assert "(classifier '000000000000' in the one" in capsys.readouterr().err
    assert sorted(os.listdir(out / "runs")) == ["beta_0.1_seed0.json"]


def test_without_flock_or_hard_links_runs_go_on_unlocked(data_dir, tmp_path, monkeypatch):
    """A file system without flock (Lustre without -o flock) or hard links (exFAT, some network mounts)."""
    def refuse(*args):
        raise OSError(38, "Function not implemented")
    monkeypatch.setattr(bvb.fcntl, "flock", refuse)
    monkeypatch.setattr(bvb.os, "link", refuse)
    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    (out / "runs" / "geco_seed7.json").write_text("{broken")                # --overwrite deletes it unread
    bvb.main(run_args(data_dir, out, "--epochs", "1", "--latent-dim", "8", "--methods", "beta:0.1", "--no-plots",
                      "--overwrite"))
    assert os.listdir(out / "runs") == ["beta_0.1_seed0.json"]
    assert json.loads((out / "experiment.json").read_text())["epochs"] == 1


def test_flags_are_checked_before_the_data_loads_and_the_estimate_counts_an_uncached_classifier(
        data_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        bvb.main(["--data-dir", str(tmp_path / "no-data"), "--out", str(tmp_path / "file"), "--device", "cpu"])
    assert "--out" in capsys.readouterr().err and not (tmp_path / "no-data").exists()
    args = bvb.parse_args(run_args(data_dir, tmp_path / "out", "--epochs", "1", "--latent-dim", "8"))
    splits = bvb.load_splits(args, args.torch_device)
    bvb.get_classifier(splits, args)                       # now in the cache
    monkeypatch.setattr(bvb, "time_classifier", lambda splits: 3600.0)
    assert bvb.estimate_wall_time(splits, args, 1) < 3600
    assert bvb.estimate_wall_time(splits, bvb.with_flags(args, cache_dir=str(tmp_path / "empty")), 1) > 3600


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs a folder no one can write to: Linux's /proc/self")
def test_an_unwritable_cache_dir_is_one_line_and_the_classifier_is_used_anyway(data_dir, tmp_path, capsys):
    argv = run_args(data_dir, tmp_path / "out", "--prepare")
    argv[argv.index(CACHE)] = "/proc/self"            # even root cannot create a file there
    bvb.main(argv)
    captured = capsys.readouterr()
    assert "; not cached (/proc/self/classifier-" in captured.out and "Feature classifier ready" in captured.out
    assert "Traceback" not in captured.err and not (tmp_path / "out").exists()


def test_corrupt_checkpoint_is_named_in_a_one_line_error(small_out, data_dir, tmp_path, capsys):
    out = copy_of(small_out, tmp_path)
    (out / "runs" / "bom_seed0.json").unlink()             # as if killed before the run file was written
    path = out / "checkpoints" / "bom_seed0.pt"
    path.write_bytes(path.read_bytes()[:5000])
    before = (out / "summary.json").read_text()
    with pytest.raises(SystemExit) as exit_info:
        bvb.main(run_args(data_dir, out, *SMALL, "--resume"))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert str(path) in err and "unreadable" in err
    assert (out / "summary.json").read_text() == before


def test_checkpoint_from_other_settings_says_what_differs(small_out, data_dir, tmp_path, capsys):
    out = copy_of(small_out, tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        bvb.main(run_args(data_dir, out, *SMALL, "--resume", "--latent-dim", "8"))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "beta_0.001_seed0.json" in err and "latent_dim 16 there, 8 now" in err
    (out / "runs" / "beta_0.001_seed0.json").unlink()
    with pytest.raises(SystemExit):
        bvb.main(run_args(data_dir, out, *SMALL, "--resume", "--latent-dim", "8"))
    err = capsys.readouterr().err.strip()
    assert "beta_0.001_seed0.pt" in err and "latent_dim 16 there, 8 now" in err


class WritesAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_cannot_run_code(data_dir, tmp_path, capsys):
    marker = tmp_path / "ran"
    (tmp_path / "checkpoints").mkdir()
    torch.save({"fingerprint": WritesAFile(str(marker))}, tmp_path / "checkpoints" / "bom_seed0.pt")
    with pytest.raises(SystemExit) as exit_info:
        bvb.main(run_args(data_dir, tmp_path, *SMALL, "--resume"))
    assert exit_info.value.code == 2 and "unreadable" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize("garbage", [
    b"\x00\xff\xfe not json at all",
    b'{"name": "beta_0.0001", "fingerprint": {"method": "beta_0.0',     # cut off mid-write
    b"null",
    b"[1, 2, 3]",
    b'{"fingerprint": "beta_0.0001"}',
], ids=["binary", "truncated", "null", "list", "fingerprint-not-a-dict"])
def test_unreadable_run_file_under_resume_is_a_one_line_error_and_changes_nothing(shared_out, data_dir, tmp_path,
                                                                                  capsys, garbage):
    out = copy_of(shared_out, tmp_path)
    run_file = out / "runs" / "beta_0.0001_seed0.json"
    run_file.write_bytes(garbage)
    before = tree(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        bvb.main(run_args(data_dir, out, *SHARED, "--no-plots", "--resume"))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert len(err.splitlines()) == 1 and err.startswith("bom_vs_beta.py: error:"), err
    assert str(run_file) in err
    assert tree(tmp_path) == before


def test_unreadable_run_file_under_report_is_a_one_line_error_and_changes_nothing(shared_out, data_dir, tmp_path,
                                                                                  capsys):
    out = copy_of(shared_out, tmp_path)
    (out / "runs" / "beta_0.0001_seed0.json").write_bytes(b"\x00\xff\xfe not json at all")
    before = tree(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        bvb.main(run_args(data_dir, out, *SHARED, "--report"))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert len(err.splitlines()) == 1 and err.startswith("bom_vs_beta.py: error:") and "beta_0.0001_seed0" in err
    assert tree(tmp_path) == before


def test_resuming_a_checkpoint_of_another_script_version_is_refused_unless_asked(shared_out, data_dir, tmp_path,
                                                                                  capsys):
    out = copy_of(shared_out, tmp_path)
    checkpoint = out / "checkpoints" / "beta_0.0001_seed0.pt"
    state = torch.load(checkpoint, weights_only=True)
    state["script_sha256"] = "0123456789ab" + "0" * 52
    torch.save(state, checkpoint)
    (out / "runs" / "beta_0.0001_seed0.json").unlink()
    before = tree(out)
    with pytest.raises(SystemExit) as exit_info:
        bvb.main(run_args(data_dir, out, *SHARED, "--no-plots", "--resume"))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert f"was written by another version of bom_vs_beta.py (SHA-256 0123456789ab there, {bvb.SCRIPT_SHA256[:12]} " \
           f"now)" in err and "--any-version" in err
    assert tree(out) == before
    summary = bvb.main(run_args(data_dir, out, *SHARED, "--no-plots", "--resume", "--any-version"))
    record = json.loads((out / "runs" / "beta_0.0001_seed0.json").read_text())
    assert record["script_sha256"] == bvb.SCRIPT_SHA256
    assert record["resumed_from_script_sha256"] == state["script_sha256"]
    assert summary["script_versions"] == {bvb.SCRIPT_SHA256: 2}
    assert f"{bvb.SCRIPT_SHA256[:12]} (2 of 2 runs)" in capsys.readouterr().out


def test_the_script_hash_is_of_the_file_or_of_the_notebook_cell_it_was_pasted_into():
    with open(os.path.join(HERE, "bom_vs_beta.py"), "rb") as f:
        source = f.read()
    assert bvb.SCRIPT_SHA256 == hashlib.sha256(source).hexdigest()
    cell_name = "<ipython-input-7-0123456789ab>"        # IPython keeps a cell's text in linecache under such a name
    linecache.cache[cell_name] = (len(source), None, source.decode().splitlines(True), cell_name)
    namespace = {"__name__": "cell"}
    try:
        exec(compile(source, cell_name, "exec"), namespace)
    finally:
        del linecache.cache[cell_name]
    assert namespace["SCRIPT_SHA256"] == hashlib.sha256(source).hexdigest()


SHARD_RUN = ["--epochs", "1", "--latent-dim", "16", "--methods", "beta:0.001,beta:0.1,bom", "--seeds", "0", "1"]


def comparable(summary):
    """A summary without what legitimately differs between invocations: timings and the invocation's flags."""
    strip = lambda row: {k: v for k, v in row.items() if k != "train_seconds"}
    methods = {name: {k: v for k, v in m.items() if k != "train_seconds"} for name, m in summary["methods"].items()}
    return json.dumps(bvb.json_safe([[strip(r) for r in summary["runs"]], methods, summary["front"],
                                     summary["criteria"], summary["tuning_cost"], summary["analysis"]]))   # nan: null


def test_two_shards_and_a_report_equal_one_unsharded_run(data_dir, tmp_path):
    whole = bvb.main(run_args(data_dir, tmp_path / "whole", *SHARD_RUN, "--no-plots"))   # the shards draw them
    sharded = tmp_path / "sharded"
    assert bvb.main(run_args(data_dir, sharded, *SHARD_RUN, "--shard", "1/2")) is None
    assert not (sharded / "summary.json").exists() and len(os.listdir(sharded / "runs")) == 3
    bvb.main(run_args(data_dir, sharded, *SHARD_RUN, "--shard", "2/2"))
    report = bvb.main(run_args(data_dir, sharded, *SHARD_RUN, "--report"))
    assert comparable(report) == comparable(whole)
    assert len(whole["runs"]) == 7 and whole["methods"]["bom"]["seeds"] == [0, 1]
    for name in FIGURES:
        assert_drawn(sharded / name)
    md = (tmp_path / "whole" / "summary.md").read_text()
    assert md.index("## Verdict: each method against the β-VAE rate–distortion front") < md.index(
        "## What tuning buys") < md.index("## Where each method lands") < md.index("## Test metrics")
    assert "| bom | " in md.split("## Where each method lands")[0] and " ± " in md


# ----------------------------------------------------------------------------- benchmark


def test_benchmark_times_every_path_and_writes_benchmark_json(data_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    report = bvb.main(run_args(data_dir, out, "--benchmark", "--benchmark-steps", "2", "--benchmark-repeats", "2",
                               "--latent-dim", "16", "--methods", "beta:0.001,bom", "--epochs", "2", "--seeds", "0", "1"))
    saved = json.loads((out / "benchmark.json").read_text())
    assert set(saved["paths"]) == {"notebook pipeline (reference)", "compute ceiling", "beta_0.001", "bom"}
    assert all(len(row["repeats_ms"]) == 2 for row in saved["paths"].values())   # the arithmetic: a test below
    assert saved == json.loads(json.dumps(bvb.json_safe(report))) and "vs ceiling" in capsys.readouterr().out
    assert not (out / "summary.json").exists()                  # a benchmark trains nothing for the tables


def test_benchmark_report_arithmetic_from_known_timings(tmp_path, monkeypatch):
    # known seconds per step in, hand-computed speeds, ratios and wall-time estimates out.
    # medians: seed 0.2 s, ceiling 0.05 s, beta_0.001 0.1 s, bom 0.25 s; 2 epochs x ceil(80/32) = 6 steps, 2 seeds,
    # 7 s of evaluation per run: estimate 2·((0.1·6 + 7) + (0.25·6 + 7)) = 32.2 s, seed's 2·2·0.2·6 = 4.8 s
    per_spec = {("beta", 0.001): [0.1, 0.1, 0.1], ("bom", None): [0.4, 0.2, 0.25]}
    monkeypatch.setattr(bvb, "time_notebook_pipeline", lambda args, device: [0.3, 0.1, 0.2])
    monkeypatch.setattr(bvb, "time_compute_ceiling", lambda images, args: [0.05, 0.04, 0.06])
    monkeypatch.setattr(bvb, "time_training", lambda spec, images, args: per_spec[spec])
    monkeypatch.setattr(bvb, "time_evaluation", lambda splits, args: 7.0)
    args = bvb.parse_args(["--benchmark", "--epochs", "2", "--seeds", "0", "1", "--methods", "beta:0.001,bom",
                           "--batch-size", "32", "--device", "cpu", "--out", str(tmp_path)])
    x, y = torch.zeros(80, 1, 64, 64, dtype=torch.uint8), torch.zeros(80, dtype=torch.long)
    bvb.run_benchmark(args, {"train": (x, y), "val": (x[:0], y[:0]), "test": (x[:8], y[:8])})
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    expected = {"notebook pipeline (reference)": (200.0, 160.0, 1.0, 0.25),
                "compute ceiling": (50.0, 640.0, 4.0, 1.0),
                "beta_0.001": (100.0, 320.0, 2.0, 0.5),
                "bom": (250.0, 128.0, 0.8, 0.2)}
    assert set(saved["paths"]) == set(expected)
    for name, (ms, per_s, vs_notebook, vs_ceiling) in expected.items():
        row = saved["paths"][name]
        assert (row["ms_per_step"], row["images_per_s"], row["vs_notebook"], row["vs_ceiling"]) == pytest.approx(
            (ms, per_s, vs_notebook, vs_ceiling)), name
    assert saved["paths"]["bom"]["repeats_ms"] == pytest.approx([400.0, 200.0, 250.0])
    assert saved["eval_seconds_per_run"] == 7.0
    assert saved["estimated_comparison_seconds"] == pytest.approx(32.2)
    assert saved["notebook_pipeline_training_seconds"] == pytest.approx(4.8)


def test_the_benchmark_waits_for_an_mps_queue_before_reading_the_clock(monkeypatch):
    waited = []
    monkeypatch.setattr(torch.mps, "synchronize", lambda: waited.append("mps"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: waited.append("cuda"))
    for device in ("cpu", "mps", "cuda"):
        bvb.sync(torch.device(device))
    assert waited == ["mps", "cuda"]


def test_the_readme_lists_the_script_s_sections_in_the_file_s_order():
    with open(os.path.join(HERE, "bom_vs_beta.py"), encoding="utf-8") as f:
        sections = [line.split(" ", 2)[2].strip() for line in f if line.startswith("# " + "-" * 20)]
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        layout = f.read().split("## Reading the script")[1].split("\n## ")[0]
    rows = [line.split(" | ")[0].lstrip("| ") for line in layout.splitlines() if line.startswith("| ")]
    assert len(sections) >= 10 and rows[2:] == sections          # after the table's header and rule


# ----------------------------------------------------------------------------- the file as a notebook cell


def test_notebook_kernel_argv_is_ignored(monkeypatch):
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "/root/.local/kernel-1234.json"])
    args = bvb.parse_args()
    assert args.epochs == 20 and args.methods == bvb.DEFAULT_METHODS and args.out == os.path.join("results", "default")
    assert bvb.parse_args(["--epochs", "2"]).epochs == 2


KERNEL_ARGV = ["/usr/lib/python3/site-packages/ipykernel_launcher.py", "-f",
               "/root/.local/share/jupyter/runtime/kernel-1234.json"]


def test_the_file_pasted_into_a_notebook_cell_ignores_the_kernel_argv(tmp_path, monkeypatch, capsys):
    # the source run as __main__ under a kernel's argv, in an empty folder: the default run stops at the one-line
    # MNIST error (./data is empty, the download is stubbed out), so the argv was NOT parsed as flags
    from torchvision import datasets
    downloads = []

    def offline(self):
        downloads.append(self.root)
        raise RuntimeError("no download in this test")
    monkeypatch.setattr(datasets.MNIST, "download", offline)
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    monkeypatch.setattr(sys, "argv", KERNEL_ARGV)
    monkeypatch.chdir(tmp_path)
    with open(os.path.join(HERE, "bom_vs_beta.py")) as f:
        cell = compile(f.read(), "<notebook cell>", "exec")
    with pytest.raises(SystemExit) as exit_info:
        exec(cell, {"__name__": "__main__"})
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    assert "unrecognized arguments" not in err
    assert len(err.splitlines()) == 1 and err.startswith("bom_vs_beta.py: error: MNIST not found in")
    assert os.path.join(str(tmp_path), "data", "MNIST", "raw") in err
    assert downloads == ["./data"]                                  # the default --data-dir, tried once
    assert not (tmp_path / "results").exists()


def test_the_resume_hint_in_a_notebook_is_a_main_call_that_resumes(monkeypatch):
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    args = bvb.parse_args(["--epochs", "2", "--out", "it's here", "--overwrite", "--device", "cpu"])
    hint = bvb.resume_command(args)
    assert hint.startswith("main([") and hint.endswith("'--resume'])")
    argv = ast.literal_eval(hint[len("main("):-1])
    assert argv == ["--epochs", "2", "--out", "it's here", "--device", "cpu", "--resume"]
    again = bvb.parse_args(argv)
    assert again.resume and not again.overwrite and again.out == "it's here" and again.epochs == 2
    assert bvb.resume_command(bvb.parse_args(None)) == "main(['--resume'])"     # a cell's main(): defaults
    monkeypatch.delitem(sys.modules, "ipykernel")
    hint = bvb.resume_command(args)
    assert shlex.split(hint) == ["python", "bom_vs_beta.py", *argv]
