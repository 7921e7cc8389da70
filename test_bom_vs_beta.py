"""Quick checks of bom_vs_beta.py at hand-computed points, on tiny IDX files that a fixture
writes (no network, no real MNIST): scores, metrics, the squeeze, the training loop, the report,
the CLI and its errors."""
import ast
import hashlib
import json
import linecache
import math
import os
import pathlib
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
import types

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from torchvision import datasets, transforms

import bom_vs_beta as bvb

# ---------------------------------------- fixtures and shared helpers

HERE = os.path.dirname(os.path.abspath(__file__))
N_TRAIN, N_TEST = 96, 40
CPU = torch.device("cpu")
approx = pytest.approx

def write_idx(raw, name, array):
    """IDX: magic (0, 0, uint8 type 0x08, ndim), big-endian dims, then the bytes."""
    with open(os.path.join(raw, name), "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 0x08, array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())

def fake_digits(n, rng):
    """Like MNIST, bright strokes on black: 3 filled rectangles per 28x28 image."""
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
    for split, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        write_idx(raw, f"{split}-images-idx3-ubyte", fake_digits(n, rng))
        write_idx(raw, f"{split}-labels-idx1-ubyte", rng.integers(0, 10, n))
    return str(root)

CACHE = tempfile.mkdtemp(prefix="bom_vs_beta_classifiers_")

@pytest.fixture(scope="session", autouse=True)
def remove_cache():
    """The session's classifier cache is the one thing written outside tmp_path: it goes."""
    yield
    shutil.rmtree(CACHE, ignore_errors=True)

def run_args(data_dir, out, flags=""):
    """Tiny real runs: 80 training, 16 validation, 40 test images, 3 importance samples; the
    feature classifier cached for the session in CACHE, not in the user's cache (a later
    --cache-dir in flags wins)."""
    return ["--data-dir", data_dir, "--out", str(out), "--cache-dir", CACHE, *(
        "--batch-size 32 --device cpu --val-size 16 --iw-samples 3 --no-progress " + flags).split()]

def tree(root):
    """Every folder and file under root, files with their bytes: equal trees, nothing written."""
    paths = map(pathlib.Path, [root, *pathlib.Path(root).rglob("*")])
    return {str(p): p.read_bytes() if p.is_file() else None for p in paths}

def load(path):
    return json.loads(pathlib.Path(path).read_text())

def refused(argv, capsys, root):
    """main(argv) exits 2 with one line on stderr and changes nothing under root: that line."""
    before = tree(root)
    with pytest.raises(SystemExit) as exit_info:
        bvb.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("bom_vs_beta.py: error:") and tree(root) == before, err
    return err

def tiny_args(**kw):
    args = {dest: default for _, dest, default, _ in bvb.knob_flags()}
    args.update(seed=0, latent_dim=16, lr=1e-3, batch_size=32, epochs=1, no_progress=True,
                amp=False, val_size=0)
    return types.SimpleNamespace(**dict(args, **kw))

@pytest.fixture(scope="module")
def train_images(data_dir):
    return bvb.load_mnist(data_dir, train=True)[0]

# BOM knobs that differ from every default; with 80 training images of batch 32, 2 calibration
# batches read 64 images (the default 50 would read all three batches).
BOM_FLAGS = ("--bom-kl-scale 2 --bom-squeeze-k 0.25 --bom-squeeze-start 2 --bom-calib-batches 2 "
             "--bom-mse-floor-mult 3 --bom-kl-low-mult 0.2 --bom-kl-high-mult 10")
SHARED = "--methods beta:0.001,beta:0.1,bom --seeds 0 1 --epochs 1 --latent-dim 16 " + BOM_FLAGS

@pytest.fixture(scope="module")
def shared_out(data_dir, tmp_path_factory):
    """The one integration run: two seeds of two β and BOM, with checkpoints and every figure,
    through `python bom_vs_beta.py` (its output in cli.json beside it); shared read-only,
    tests that change it work on a copy."""
    out = tmp_path_factory.mktemp("shared") / "out"
    proc = subprocess.run([sys.executable, os.path.join(HERE, "bom_vs_beta.py"), *run_args(
        data_dir, out, SHARED)], capture_output=True,
                          text=True, timeout=300)
    (out.parent / "cli.json").write_text(json.dumps(
        {"returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}))
    return out

# file: (figsize in inches, least share of coloured pixels); the shared run's 3 methods give 4 rows
# of reconstructions (originals + 3 models), 3 rows of samples; grids use the gray colormap
FIGURES = {
    "training_comparison.png": ((15, 4), 0.002), "rate_distortion.png": ((12, 7), 0.0001),
    "tuning_cost.png": ((12, 4.8), 0.0001), "reconstructions_comparison.png": ((16, 2 * 4), 0.0),
    "samples_comparison.png": ((16, 2 * 3), 0.0)}

def fake_run(name, kind, seed, val, test, settings=None, history=(), sha="a" * 64):
    beta = {"beta": float(name[5:])} if kind == "beta" else {}
    return {"name": name, "kind": kind, "variant": False, "seed": seed, "status": "ok",
            "train_seconds": 1.0, "settings": settings or beta, "history": list(history),
            "reference": {"classifier_sha256": sha},
            "val": {k: val.get(k, 1.0) for k in bvb.METRICS},
            "test": {k: test.get(k, 1.0) for k in bvb.METRICS}}

# ---------------------------------------- data

def test_splits_hold_out_the_last_training_images_as_views_of_one_copy(data_dir, monkeypatch):
    full, labels = bvb.load_mnist(data_dir, train=True)
    args = types.SimpleNamespace(data_dir=data_dir, val_size=16, train_subset=10,
                                 test_subset=8, quick=True)
    monkeypatch.setattr(bvb, "QUICK_CLASSIFIER_IMAGES", 50)   # --quick's classifier: a slice
    splits = bvb.load_splits(args, CPU)
    assert torch.equal(splits["train"][0], full[:10]) and torch.equal(splits["val"][0], full[80:])
    assert torch.equal(splits["val"][1], labels[80:]) and len(splits["test"][0]) == 8
    assert torch.equal(splits["classifier"][0], full[:50])
    args.val_size, args.train_subset, args.quick = 0, 0, False
    splits = bvb.load_splits(args, torch.device("meta"))   # a copy per split would have no base
    train = splits["train"][0]._base
    assert train.shape[0] == N_TRAIN and splits["val"][0].shape[0] == 0
    assert splits["classifier"][0]._base is train and splits["classifier"][0].shape[0] == N_TRAIN
    assert splits["test"][0]._base.shape[0] == N_TEST

def test_batches_cover_every_image_once_with_a_short_last_batch():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1)
    got = list(bvb.batches(images, 4, torch.Generator().manual_seed(0)))
    assert [len(b) for b in got] == [4, 4, 2]
    assert sorted((torch.cat(got) * 255).round().flatten().tolist()) == list(range(10))

@pytest.mark.parametrize("broken", ["truncated", "missing"])
def test_data_that_neither_reads_nor_downloads_is_one_line_and_leaves_no_folder(
        broken, data_dir, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "nowhere"
    if broken == "truncated":
        shutil.copytree(data_dir, folder)
        images = folder / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
        images.write_bytes(images.read_bytes()[:1000])
    monkeypatch.setattr(datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])   # no network
    err = refused(run_args(str(folder), tmp_path / "out"), capsys, tmp_path)
    if broken == "truncated":
        assert f"could not read MNIST from {folder / 'MNIST' / 'raw'}: " in err
    else:
        assert f"MNIST not found in {folder / 'MNIST' / 'raw'}" in err
        assert all(name in err for name in bvb.MNIST_RAW_FILES)

# ---------------------------------------- metrics

def test_vae_metrics_mse_kl_and_sharpness_at_hand_points():
    x, stripes = torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8)
    stripes[1, ..., ::2] = 0.6          # |dx| = 0.6 everywhere, |dy| = 0: sharpness 0.3
    mu = torch.tensor([[1.0, 0, 0, 0], [2.0, 2.0, 0, 0]])        # KL = ½ Σ μ²
    logvar = torch.tensor([[0.0] * 4, [math.log(2.0)] + [0.0] * 3])   # + ½(σ² − 1 − log σ²)
    mse, kl, sharp = bvb.vae_metrics(x, stripes, mu, logvar)
    assert mse.tolist() == approx([0.0, 0.18]) and sharp.tolist() == approx([0.0, 0.3])
    assert kl.tolist() == approx([0.5, 4.0 + 0.5 * (1 - math.log(2.0))])

# ---------------------------------------- BOM: scores, calibration, squeeze, ablations

BOX = {"mse_floor": 0.4, "kl_floor_low": 10.0, "kl_optimum": 20.0, "kl_floor_high": 60.0,
       "sharp_ceiling": 0.2}

def bom_with(constraints, latent_dim=128, **knobs):
    method = bvb.BOMVAE(latent_dim, **knobs)
    method.state["constraints"] = dict(constraints)
    return method

def test_bom_scores_and_loss_at_hand_points_a_score_at_or_below_zero_skips_the_batch(
        monkeypatch):
    # MSE (0.4 − v)/0.4; the KL box 1 at 20, 0 at its floors 10 and 60, < 0 outside; v/0.2
    mse = torch.tensor([0.0, 0.2, 0.4, 0.8, 0.0, 0.0, 0.0])
    kl = torch.tensor([10.0, 15.0, 20.0, 40.0, 60.0, 5.0, 70.0])
    sharp = torch.tensor([0.0, 0.1, 0.2, 0.4, 0.0, 0.0, 0.0])
    scores = bvb.constraint_scores(mse, kl, sharp, BOX)
    assert scores.T.tolist() == [approx([1.0, 0.5, 0.0, -1.0, 1.0, 1.0, 1.0]),
                                 approx([0.0, 0.5, 1.0, 0.5, 0.0, -0.5, -0.25]),
                                 approx([0.0, 0.5, 1.0, 2.0, 0.0, 0.0, 0.0])]
    off = dict(BOX, sharp_ceiling=None)
    assert torch.equal(bvb.constraint_scores(mse, kl, sharp, off), scores[:, :2])
    worst = torch.randint(0, 3, (100,))
    for indices in (worst, worst.clamp(max=1)):     # three scores, or two with sharpness off
        assert torch.equal(bvb.worst_counts(indices), torch.bincount(indices, minlength=3))
    monkeypatch.setattr(torch, "bincount", lambda *a, **k: pytest.fail("syncs on a GPU"))
    # MSE 0.1, 0.3 score 0.75, 0.25; KL 15, 20 score 0.5, 1; sharpness 0.3, 0.1 score 1.5, 0.5
    # (sharpness 0 would score 0 with a ceiling): loss −mean log of the worst, which is counted
    mse, kl = torch.tensor([0.1, 0.3]), torch.tensor([15.0, 20.0])
    for method, sharp in ((bom_with(BOX), [0.3, 0.1]), (bom_with(off), [0.0, 0.0])):
        loss, skip, logs = method.batch_loss(mse, kl, torch.tensor(sharp), None)
        assert loss.item() == approx(-(math.log(0.5) + math.log(0.25)) / 2) and not skip
        assert logs["bottleneck_counts"].tolist() == [1, 1, 0]
        assert logs["s_min"].item() == approx(0.375)
    # image 0 at its MSE floor scores 0 (or −0.25 past it): a violation, the batch skipped;
    # image 1 scores min(0.75, 1, 1.5); the log is clamped at 1e-12
    for mse0, worst in ((0.4, 0.0), (0.5, -0.25)):
        loss, skip, logs = bom_with(BOX).batch_loss(
            torch.tensor([mse0, 0.1]), torch.tensor([20.0, 20.0]), torch.tensor([0.3, 0.3]), None)
        assert bool(skip) and logs["violations"].item() == 1 and logs["skipped"].item() == 1
        assert logs["s_min_stepped"].item() == 0.0
        assert logs["s_min"].item() == approx((worst + 0.75) / 2)
        assert loss.item() == approx(-(math.log(1e-12) + math.log(0.75)) / 2)

class StripeModel(torch.nn.Module):
    """Call i returns batch i's (then the last batch's) outputs: image j vertical stripes of
    contrast a_j (MSE to zeros a_j²/2, sharpness a_j/2), μ_j, log σ² = 0 (KL = Σ_d μ_d²/2)."""

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

def test_calibration_and_the_sharpness_ablations_at_hand_points():
    # MSE per batch [0.02, 0.08], [0.18, 0.005], [0.045, 0.045]: max 0.18; KL [2, 4.5], [8, 18],
    # [0.5, 4.5]: min 0.5, max 18, mean 37.5/6; batch 4 (KL 50, MSE 0.405) is not read
    model = StripeModel(*[(a, torch.tensor(mus).view(-1, 1)) for a, mus in [
        ([0.2, 0.4], [2.0, 3.0]), ([0.6, 0.1], [4.0, 6.0]), ([0.3, 0.3], [1.0, 3.0]),
        ([0.9, 0.9], [10.0, 0.0])]])
    stream = iter([torch.zeros(2, 1, 8, 8)] * 10)   # the training batches: more than it reads
    c = bvb.calibrate(model, stream, 3, mse_floor_mult=3.0, kl_low_mult=0.2, kl_high_mult=10.0)
    assert model.calls == 3 and len(list(stream)) == 7        # the 4th is not even drawn
    assert c == approx({"mse_floor": 3 * 0.18, "kl_floor_low": 0.2 * 0.5, "kl_optimum": 37.5 / 6,
                        "kl_floor_high": 10.0 * 18.0, "sharp_ceiling": 0.95 / 6})
    # BOM's setup reads its 2 batches (of the 50 asked) of 4 images, stripes of contrast 1
    # (sharpness 0.5), decoded as stripes of contrast 0.2, 0.6 with KL 2, 6: MSE 0.32, 0.08,
    # sharpness 0.1, 0.3: its ceiling 0.2, the images' 0.5 with sharp=data
    images = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    images[..., ::2] = 255
    stripes = ([0.2, 0.6], torch.tensor([[2.0, 0, 0, 0], [2.0, 2.0, 2.0, 0]]))
    set_up = {}
    for ablation in (None, "sharp=data", "sharp=off"):
        set_up[ablation] = bvb.BOMVAE(4, ablation=ablation)
        set_up[ablation].setup(StripeModel(stripes), images, 2, seed=0)
    c = set_up[None].state["calibration"]
    assert c == approx({"mse_floor": 2 * 0.32, "kl_floor_low": 0.2, "kl_optimum": 4.0,
                        "kl_floor_high": 300.0, "sharp_ceiling": 0.2})
    assert set_up[None].state["constraints"] == c and "ablation" not in set_up[None].settings()
    data, off = set_up["sharp=data"], set_up["sharp=off"]
    assert data.state["calibration"] == dict(c, sharp_ceiling=0.5)
    assert off.state["calibration"] == dict(c, sharp_ceiling=None)
    assert data.name == "bom_sharp=data" and data.settings()["ablation"] == "sharp=data"
    # sharpness 0.05 scores 0.05/0.5 = 0.1 under the data's ceiling, 0.25 under the outputs'
    loss, _, logs = data.batch_loss(torch.tensor([0.0]), torch.tensor([4.0]),
                                    torch.tensor([0.05]), None)
    assert loss.item() == approx(-math.log(0.1)) and logs["bottleneck_counts"].tolist() == [0, 0, 1]
    assert bvb.squeeze(off.state["constraints"], 0.5, (1.0, 2.0, 3.0))["sharp_ceiling"] is None

def test_the_squeeze_moves_the_kl_box_toward_never_past_its_targets():
    factors = [bvb.squeeze_factor(s_min, k=0.5) for s_min in (0.9, 0.55, 3.0, 0.5, 0.2, math.nan)]
    assert factors == approx([0.8, 0.975, 0.5, 1.0, 1.0, 1.0])   # never over half, none ≤ 0.5
    targets = (50.0, 80.0, 150.0)
    c = {"mse_floor": 0.7, "kl_floor_low": 1.0, "kl_optimum": 17.0, "kl_floor_high": 1000.0,
         "sharp_ceiling": 0.3}
    assert bvb.squeeze(c, 0.8, targets) == approx(dict(
        c, mse_floor=0.56, kl_floor_low=1.0 + 49.0 * 0.2, kl_optimum=17.0 + 63.0 * 0.2,
        kl_floor_high=1000.0 - 850.0 * 0.2))             # the ceiling kept
    assert c["mse_floor"] == 0.7                         # the input untouched
    c = dict(c, kl_floor_low=60.0, kl_optimum=70.0)
    for _ in range(60):
        c = bvb.squeeze(c, 0.5, targets)
        low, opt, high = c["kl_floor_low"], c["kl_optimum"], c["kl_floor_high"]
        assert 50.0 <= low < opt <= 80.0 and opt < high and high >= 150.0
    assert (low, opt, high) == approx(targets)

def test_end_epoch_squeezes_from_squeeze_start_by_the_mean_s_min_of_the_stepped_batches():
    # batch means of s_min 0.5, 0.2 (skipped: adds 0 to s_min_stepped), 0.7: stepped mean 0.6 →
    # factor 1 − (0.6 − 0.5)·0.5 = 0.95; the mean over all 3 batches is below 0.5: no squeeze
    sums = {"steps": 2, "batches": 3, "s_min": 1.4, "s_min_stepped": 0.5 + 0.0 + 0.7,
            "violations": 5, "skipped": 1, "bottleneck_counts": [60, 30, 6]}
    plain, early = bom_with(BOX), bom_with(BOX, ablation="squeeze=1")
    for epoch in (1, 2):                                 # before epoch 3: no squeeze
        assert plain.end_epoch(epoch, sums)["squeeze_factor"] == 1.0
    assert plain.state["constraints"] == BOX
    assert early.end_epoch(1, sums)["squeeze_factor"] == approx(0.95)   # squeeze=1: epoch 1 on
    row = plain.end_epoch(3, sums)
    assert (row["s_min"], row["squeeze_factor"]) == approx((0.6, 0.95))
    assert row["bottleneck_counts"] == {"mse": 60, "kl": 30, "sharp": 6}
    for method in (plain, early):                        # the KL optimum's target: 0.625 x 128
        c = method.state["constraints"]
        assert (c["mse_floor"], c["kl_optimum"]) == approx((0.4 * 0.95, 20 + (80 - 20) * 0.05))
    stalled = bom_with(BOX).end_epoch(5, dict(sums, steps=0, s_min_stepped=0.0, skipped=3))
    assert stalled["s_min"] == 0.0 and stalled["squeeze_factor"] == 1.0

class FixedBOM(bvb.BOMVAE):
    """BOM whose calibrated constraints are then overridden by `fixed` (some keys or all),
    recording each batch's (mean s_min, loss, skip) in `seen`."""

    def __init__(self, latent_dim, fixed, **knobs):
        super().__init__(latent_dim, **knobs)
        self.fixed, self.seen = fixed, []

    def setup(self, model, images, batch_size, seed):
        super().setup(model, images, batch_size, seed)
        self.state["constraints"].update(self.fixed)

    def batch_loss(self, mse, kl, sharp, kl_dims):
        loss, skip, logs = super().batch_loss(mse, kl, sharp, kl_dims)
        self.seen.append((logs["s_min"].item(), loss.item(), bool(skip)))
        return loss, skip, logs

# a KL box and a sharpness ceiling no image can miss: the MSE floor alone decides
OPEN_BOX = {"kl_floor_low": -1e6, "kl_optimum": 0.0, "kl_floor_high": 1e6, "sharp_ceiling": 1e-6}

def test_an_epoch_with_one_skipped_batch_of_three_squeezes_by_the_two_that_stepped():
    # 24 mid-gray images in 3 batches of 8 (MSE ≈ 0.04 untrained, score ≈ 0.7), 4 made black
    # (MSE ≈ 0.3, score ≈ −1), all in the epoch's 2nd batch: it is skipped, the other two step
    images = torch.full((24, 1, 64, 64), 128, dtype=torch.uint8)
    order = torch.randperm(24, generator=torch.Generator().manual_seed(0))  # train_run's order
    images[order[8:12]] = 0
    method = FixedBOM(16, dict(OPEN_BOX, mse_floor=0.15), squeeze_start=1)
    row = bvb.train_run(method, images, tiny_args(batch_size=8))["history"][0]
    s, loss, skip = zip(*method.seen)
    assert skip == (False, True, False)
    assert row["steps"] == 2 and row["skipped_batches"] == 1 and row["violations"] == 4
    stepped = (s[0] + s[2]) / 2
    assert stepped > 0.5 >= sum(s) / 3         # the design: only the right mean squeezes
    assert (row["s_min"], row["loss"]) == approx((stepped, (loss[0] + loss[2]) / 2), rel=1e-6)
    factor = max(0.5, 1 - (stepped - 0.5) * 0.5)
    assert row["squeeze_factor"] == approx(factor, rel=1e-6) and factor < 1
    assert method.state["constraints"]["mse_floor"] == approx(0.15 * factor, rel=1e-6)
    assert row["constraints"]["mse_floor"] == 0.15

def test_bom_flags_reach_its_run_file_and_calibration_and_run_files_keep_its_images(
        shared_out, data_dir):
    knobs = {"kl_scale": 2.0, "squeeze_k": 0.25, "squeeze_start": 2, "calib_batches": 2,
             "mse_floor_mult": 3.0, "kl_low_mult": 0.2, "kl_high_mult": 10.0}
    run = load(shared_out / "runs" / "bom_seed0.json")
    assert run["name"] == "bom" and {k: run["settings"][k] for k in knobs} == knobs
    assert not ({f"bom_{k}" for k in knobs} | set(knobs)) & set(run["config"])   # recorded once
    for settings in (run["settings"], run["fingerprint"]["method_settings"]):   # (0.39, 0.625,
        assert settings["kl_targets"] == approx([12.5, 20.0, 37.5])          # 1.17) x 16 x 2
    # the recorded calibration: the untrained model's metrics on 2 batches of the 80 training
    # images (in an order seeded with seed + 1) through the multipliers 3, 0.2 and 10
    images = bvb.load_mnist(data_dir, train=True)[0][:80]
    bvb.seed_everything(0)
    model = bvb.new_model(16, CPU, 1e-3)[0]
    order = torch.Generator().manual_seed(1)
    expected = bvb.calibrate(model, bvb.batches(images, 32, order), 2, 3.0, 0.2, 10.0)
    assert run["config"]["calibration"] == approx(expected, rel=1e-6)
    [epoch] = run["history"]
    assert epoch["constraints"] == approx(expected, rel=1e-6) and epoch["squeeze_factor"] == 1.0
    # the image figures' arrays, from its checkpoint's model, each at the nearest grey level
    checkpoint = torch.load(shared_out / "checkpoints" / "bom_seed0.pt", weights_only=True)
    model.load_state_dict(checkpoint["model"])
    test_images = bvb.load_mnist(data_dir, train=False)[0]
    for key, packed in bvb.figure_images(model, test_images).items():
        stored = bvb.unpack_images(run["images"][key])
        assert stored.shape == (8, 1, 64, 64) and stored.dtype == np.uint8, key
        assert np.array_equal(stored, bvb.unpack_images(packed)) and stored.std() > 0, key
    model.eval()
    torch.manual_seed(0)
    torch.randn(8, 16)  # the shared prior samples come first
    exact = model(bvb.as_float(test_images[:8]))[0].detach().numpy() * 255
    recon = bvb.unpack_images(run["images"]["reconstructions"])
    assert np.abs(recon - exact).max() <= 0.5 + 1e-4

# ---------------------------------------- the other methods

def test_beta_sigma_vae_and_free_bits_losses_at_hand_points():
    loss, skip, _ = bvb.BetaVAE(0.5).batch_loss(torch.tensor([0.1, 0.3]), torch.tensor([2.0, 4.0]),
                                                 None, None)
    assert loss.item() == approx(0.2 + 0.5 * 3.0) and skip is None   # mean MSE + β·mean KL
    # σ-VAE: σ² the batch MSE, log σ soft-clipped at −6; loss the Gaussian NLL + KL
    torch.manual_seed(0)
    x, x_recon = torch.rand(3, 1, 64, 64), torch.rand(3, 1, 64, 64)
    mse = (x_recon - x).pow(2).flatten(1).mean(1)
    loss, _, logs = bvb.SigmaVAE().batch_loss(mse, torch.tensor([5.0, 6.0, 7.0]), None, None)
    sigma2 = logs["sigma2"].item()
    log_sigma = -6 + math.log1p(math.exp(0.5 * math.log(mse.mean().item()) + 6))
    assert sigma2 == approx(math.exp(2 * log_sigma), rel=1e-5)
    normal = torch.distributions.Normal(x_recon, math.sqrt(sigma2))
    assert loss.item() == approx(-normal.log_prob(x).sum().item() / 3 + 6.0, rel=1e-5)
    tiny = bvb.gaussian_nll(torch.tensor([1e-12, 1e-12]))[1]   # log σ would be −13.8
    assert 0.5 * math.log(tiny.item()) == approx(-6.0, abs=1e-3)
    # free bits: NLL + Σ_d max(λ, batch-mean KL_d), means 0.1, 0.5, 0.3: no gradient to the 1st
    kl_dims = torch.tensor([[0.1, 0.6, 0.3], [0.1, 0.4, 0.3]], requires_grad=True)
    loss, _, logs = bvb.FreeBits(**{"lambda": 0.25}).batch_loss(mse, None, None, kl_dims)
    nll, _ = bvb.gaussian_nll(mse)
    assert loss.item() == approx(nll.mean().item() + 0.25 + 0.5 + 0.3, rel=1e-6)
    assert logs["dims_below_lambda"].item() == 1
    loss.backward()
    assert kl_dims.grad.flatten().tolist() == approx([0.0, 0.5, 0.5] * 2)

def test_geco_update_at_hand_points_fast_while_met_slow_while_violated():
    """The paper's Algorithm 1 and genesis' code: C_ma starts at the first step's C."""
    geco = bvb.GECO(tolerance=0.01, rate=1e-4, speedup=10.0)
    s = geco.state

    def step(mse):
        return geco.batch_loss(torch.tensor([mse, mse]), torch.tensor([30.0, 50.0]), None, None)
    loss, _, logs = step(0.02)                               # C = D·(0.02 − 0.01) = 40.96
    assert loss.item() == approx(40.0 + 40.96) and logs["lambda"].item() == 1.0
    lam1 = math.exp(1e-4 * 40.96)                            # C_ma = C at step 1
    assert float(s["lambda"]) == approx(lam1)
    loss, _, logs = step(0.005)                              # C = −20.48
    assert loss.item() == approx(40.0 + lam1 * -20.48, rel=1e-6)
    c_ma2 = 0.99 * 40.96 + 0.01 * -20.48                     # 40.3456 > 0: still violated
    assert float(s["ma"]) == approx(c_ma2)
    assert float(s["lambda"]) == approx(lam1 * math.exp(1e-4 * c_ma2), rel=1e-6)
    for _ in range(300):
        step(0.005)
    before, m = float(s["lambda"]), float(s["ma"])
    step(0.005)
    c_ma = 0.99 * m + 0.01 * -20.48                          # < 0: met, 10x the rate
    assert c_ma < 0 and s["steps"] == 303
    assert float(s["lambda"]) == approx(before * math.exp(10 * 1e-4 * c_ma), rel=1e-5)

def test_controlvae_beta_rises_above_set_point_falls_below_and_stays_clipped():
    control = bvb.ControlVAE(kl_target=80.0, kp=0.01, ki=0.0001)
    loss, _, logs = control.batch_loss(torch.tensor([0.01, 0.03]),
                                       torch.tensor([170.0, 190.0]), None, None)
    # e = 80 − 180 = −100: P = 0.01/(1 + e^−100), I = 0.01: β = 0.02
    assert logs["kl_error"].item() == -100.0 and logs["beta"].item() == approx(0.02)
    assert loss.item() == approx(4096 * 0.02 + 0.02 * 180.0)

    def beta(kl):
        return control.batch_loss(torch.zeros(1), torch.tensor([kl]), None, None)[2]["beta"].item()
    rising = [beta(180.0) for _ in range(300)]
    assert rising[50] > rising[0] and max(rising) == 1.0            # clipped at β_max
    assert float(control.state["integral"]) <= 1.0      # anti-windup: none past the clip
    falling = [beta(20.0) for _ in range(300)]                   # KL below the set point
    assert falling[0] < 1.0 and all(b <= a for a, b in zip(falling, falling[1:]))
    assert min(falling) == 0.0 and float(control.state["integral"]) >= -0.01

def test_methods_all_and_a_bom_item_of_an_ablation_and_knob_values_in_one_name():
    ablations = [("bom", "sharp=data"), ("bom", "sharp=off"), ("bom", "squeeze=1")]
    assert bvb.parse_methods("all") == [("beta", b) for b in bvb.ALL_BETAS] + [
        (k, None) for k in bvb.TUNING_FREE] + ablations
    assert bvb.parse_methods("bom,ablations") == [("bom", None)] + ablations
    # knobs after '+', in any order: one canonical item, so one setting cannot be listed twice
    assert bvb.parse_methods("bom:kl_scale=2+sharp=off,bom:squeeze_start=2") == [
        ("bom", "sharp=off+kl_scale=2"), ("bom", "squeeze_start=2")]
    args = tiny_args(bom_kl_scale=3.0, bom_squeeze_k=0.25, latent_dim=16)
    method = bvb.make_method(("bom", "sharp=off+kl_scale=2"), args)
    assert method.name == "bom_sharp=off_kl_scale=2" and method.ablation == "sharp=off"
    assert method.variant == ("kl_scale",) and method.knobs["squeeze_k"] == 0.25   # a flag's
    assert method.kl_targets == approx(tuple(t * 32 for t in bvb.KL_TARGETS_PER_DIM))   # ×2
    args = bvb.parse_args("--methods bom:squeeze=1 --bom-squeeze-start 5".split())
    method = bvb.make_method(args.method_specs[0], args)      # squeeze=1 overrides the flag
    assert method.knobs["squeeze_start"] == 1 and method.settings()["ablation"] == "squeeze=1"
    specs = bvb.parse_args("--methods bom:sharp=off --bom-sensitivity bom:sharp=off".split()
                           ).method_specs
    assert specs[0] == ("bom", "sharp=off") and ("bom", "sharp=off+mse_floor_mult=4") in specs
    assert len(specs) == 1 + sum(map(len, bvb.BOMVAE.SENSITIVITY.values()))
    assert bvb.parse_args(["--bom-sensitivity"]).method_specs[-1] == ("bom", "mse_floor_mult=4")

# ---------------------------------------- the training loop

def same(a, b):
    """Two state dicts hold equal tensors."""
    return all(torch.equal(v, b[k]) for k, v in a.items())

class Toy(bvb.Method):
    """A new method as the README says one is written: a kind and a loss, nothing declared."""

    kind = "toy"

    def batch_loss(self, mse, kl, sharp, kl_dims):
        return mse.mean() + kl.mean(), None, {}

@pytest.mark.parametrize("spec", [("beta", 0.1)] + [(kind, None) for kind in bvb.TUNING_FREE])
def test_every_method_trains_on_tiny_data(train_images, spec):
    method = bvb.make_method(spec, tiny_args(epochs=2))
    bvb.seed_everything(0)
    start = bvb.VAE(16).state_dict()
    run = bvb.train_run(method, train_images[:64], tiny_args(epochs=2))
    assert run["status"] == "ok" and [row["steps"] for row in run["history"]] == [2, 2]   # 64 / 32
    assert not same(run["model"].state_dict(), start)
    for key in method.logged:
        assert all(math.isfinite(row[key]) for row in run["history"]), key
    if spec[0] == "bom":
        assert sum(run["history"][0]["bottleneck_counts"].values()) == 64

class DivergesAt(bvb.BetaVAE):
    """β-VAE whose loss turns infinite from its n-th batch on."""

    def __init__(self, n):
        super().__init__(0.001)
        self.n, self.calls = n, 0

    def batch_loss(self, mse, kl, sharp, kl_dims):
        loss, skip, logs = super().batch_loss(mse, kl, sharp, kl_dims)
        self.calls += 1
        return (loss * float("inf") if self.calls >= self.n else loss), skip, logs

def test_a_run_stalls_when_every_batch_violates_and_diverges_caught_within_the_epoch(
        train_images, tmp_path):
    bvb.seed_everything(0)
    start = bvb.VAE(16).state_dict()
    run = bvb.train_run(FixedBOM(16, {"mse_floor": 1e-9}), train_images, tiny_args(epochs=3))
    assert run["status"] == "stalled" and len(run["history"]) == 1   # ends after that epoch
    assert run["history"][0]["skipped_batches"] == 3 and run["history"][0]["violations"] == N_TRAIN
    assert same(run["model"].state_dict(), start)                    # never stepped
    path = str(tmp_path / "run.pt")
    run = bvb.train_run(DivergesAt(5), train_images, tiny_args(epochs=3), checkpoint=path)
    # inf from batch 5 (epoch 2, step 2 of 3), caught at the epoch's last step, a host sync
    assert run["status"] == "diverged" and run["diverged_at"] == {"epoch": 2, "step": 3}
    saved = torch.load(path, weights_only=True)      # the last good epoch's checkpoint, kept
    assert saved["status"] == "ok" and not saved["finished"] and len(saved["history"]) == 1

@pytest.mark.parametrize("adam", ["fused", "plain", "plain state in fused"])
def test_a_skipped_step_leaves_weights_and_adam_state_alone(adam):
    # "plain state in fused": an MPS checkpoint (non-fused Adam) loaded on the CPU, where
    # new_model's Adam is fused: its param group now says non-fused; skipping must not assert
    torch.manual_seed(0)
    model, optimizer = bvb.new_model(4, CPU, 0.1)
    assert optimizer.defaults["fused"] and optimizer.defaults["lr"] == 0.1

    def loss():
        return model(torch.rand(2, 1, 64, 64))[0].mean()
    plain = torch.optim.Adam(model.parameters(), lr=0.1, fused=False)
    assert bvb.optimizer_step(optimizer if adam == "fused" else plain, model, loss(), None)
    if adam == "plain":
        optimizer = plain
    elif adam != "fused":
        optimizer.load_state_dict(plain.state_dict())
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: {kk: vv.clone() for kk, vv in v.items()}
             for k, v in optimizer.state_dict()["state"].items()}
    assert not bvb.optimizer_step(optimizer, model, loss(), torch.tensor(True)).item()
    after = optimizer.state_dict()["state"]
    assert same(weights, model.state_dict()) and all(same(state[k], after[k]) for k in state)
    assert bvb.optimizer_step(optimizer, model, loss(), torch.tensor(False)).item()
    assert not same(weights, model.state_dict())
    assert optimizer.state_dict()["state"][0]["step"].item() == 2

def test_amp_keeps_the_metrics_in_fp32_and_is_refused_where_bf16_is_not_native_or_fails(
        monkeypatch):
    torch.manual_seed(0)
    model, x = bvb.VAE(16), torch.rand(4, 1, 64, 64)
    metrics = bvb.forward_metrics(model, x, amp=True)
    assert len(metrics) == 4 and all(m.dtype == torch.float32 for m in metrics)

    bvb.check_amp(CPU)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(bvb.UsageError, match=r": Tesla T4 has no native bf16; run without"):
        bvb.check_amp(torch.device("cuda"))

    def no_bf16(device_type, **kwargs):
        raise RuntimeError(f"bf16 autocast is not supported on {device_type}\nsecond line")
    monkeypatch.setattr(torch, "autocast", no_bf16)
    bvb.forward_metrics(model, x, amp=False)   # enters no autocast
    with pytest.raises(RuntimeError, match="not supported on cpu"):
        bvb.forward_metrics(model, x, amp=True)
    with pytest.raises(bvb.UsageError, match=r"^--amp on cpu with torch .*: bf16 autocast is not "
                                             r"supported on cpu; run without --amp$"):
        bvb.check_amp(CPU)

def test_load_mnist_and_its_fast_path_give_the_seed_pipeline_s_images_and_loss(data_dir):
    seed_data = datasets.MNIST(data_dir, train=True, download=False, transform=transforms.Compose(
        [transforms.Resize(64), transforms.ToTensor()]))            # the seed notebook's, PIL
    seed_batch = torch.stack([seed_data[i][0] for i in range(16)])
    images, labels = bvb.load_mnist(data_dir, train=True)
    assert images.shape == (N_TRAIN, 1, 64, 64) and images.dtype == torch.uint8
    assert labels[:16].tolist() == [seed_data[i][1] for i in range(16)]
    fast_batch = next(bvb.batches(images[:16], 16))
    assert torch.equal(fast_batch, seed_batch)
    torch.manual_seed(0)
    seed_model = bvb.VAE(16)                                # plain layout, as in the notebook
    fast_model = bvb.new_model(16, CPU, 1e-3)[0]            # channels_last on the CPU
    fast_model.load_state_dict(seed_model.state_dict())
    assert fast_model.enc[0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.manual_seed(2)
    calibration = bvb.calibrate(seed_model, iter([seed_batch]), 50, 2.0, 0.1, 50.0)
    for method in (bvb.BetaVAE(0.001), bom_with(calibration, latent_dim=16)):
        torch.manual_seed(1)
        seed_metrics = bvb.vae_metrics(seed_batch, *seed_model(seed_batch))
        seed_loss = method.batch_loss(*seed_metrics, None)[0]
        torch.manual_seed(1)
        fast_loss = method.batch_loss(*bvb.forward_metrics(fast_model, fast_batch))[0]
        assert math.isfinite(fast_loss.item())
        assert fast_loss.item() == approx(seed_loss.item(), rel=1e-5)
        seed_loss.backward()
        fast_loss.backward()
        fast_grad, seed_grad = fast_model.fc_mu.weight.grad, seed_model.fc_mu.weight.grad
        assert seed_grad.norm() > 0             # summation order differs, not more:
        assert (fast_grad - seed_grad).norm() / seed_grad.norm() < 1e-3
        seed_model.zero_grad()
        fast_model.zero_grad()

# ---------------------------------------- evaluation: IWAE bound, Fréchet distance, classifier

def test_iwae_is_the_importance_weighted_bound_over_exactly_k_draws_in_any_chunking(
        monkeypatch):
    # a linear Gaussian decoder and any q: the same 25 draws fed through torch.randn, K = 25 in
    # chunks of 10, 7, 25 and 100, and K = 1 (the one-sample −ELBO) give
    # −log (1/K) Σ_k p(x|z_k) p(z_k) / q(z_k|x), computed here with torch.distributions
    torch.manual_seed(0)
    model = types.SimpleNamespace(decode=torch.nn.Linear(3, 4096).requires_grad_(False))
    x, mu, logvar = torch.rand(2, 1, 64, 64), torch.randn(2, 3), torch.randn(2, 3)
    eps = torch.randn(25, 2, 3)
    std = torch.exp(0.5 * logvar)
    z, normal = mu + eps * std, torch.distributions.Normal
    log_w = (normal(model.decode(z), math.sqrt(0.05)).log_prob(x.flatten(1)).sum(-1)
             + normal(0.0, 1.0).log_prob(z).sum(-1) - normal(mu, std).log_prob(z).sum(-1))
    for samples, chunk in ((25, 10), (25, 7), (25, 25), (25, 100), (1, 10)):
        used = []

        def draws(*size, **kw):
            used.append(size[0])
            return eps[sum(used) - size[0]:sum(used)]
        monkeypatch.setattr(torch, "randn", draws)
        got = bvb.iwae_nll(model, x, mu, logvar, 0.05, samples, chunk=chunk)
        assert sum(used) == samples and max(used) == min(chunk, samples), (chunk, used)
        expected = -(torch.logsumexp(log_w[:samples], 0) - math.log(samples))
        assert got.tolist() == approx(expected.tolist(), rel=1e-5), chunk

class OnMPS(torch.Tensor):
    """A tensor that refuses float64 until it is moved to the CPU, as one on Apple's MPS does."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.cpu:
            return args[0].as_subclass(torch.Tensor)
        to = (*args[1:], *(kwargs or {}).values()) if func is torch.Tensor.to else ()
        if func is torch.Tensor.double or torch.float64 in to:
            raise TypeError("Cannot convert a MPS Tensor to float64 dtype")
        return super().__torch_function__(func, types, args, kwargs or {})

def test_frechet_distance_at_hand_computed_points_commuting_or_not_off_the_device():
    # a = {±(1,0), ±(0,2)}: Σa = (2/3)·A, A = diag(1, 4); b = {±(1,1), ±(0,1)} + (1, −2):
    # Σb = (2/3)·B, B = [[1, 1], [1, 2]], AB ≠ BA. For 2x2, Tr √M = √(tr M + 2√det M), so
    # Tr √(AB) = √13 and FD = |(1, −2)|² + (2/3)(tr A + tr B − 2√13)
    a = torch.tensor([[1.0, 0], [-1, 0], [0, 2], [0, -2]])
    b = torch.tensor([[1.0, 1], [-1, -1], [0, 1], [0, -1]]) + torch.tensor([1.0, -2])
    for first, second in ((a, b), (b, a), (a.as_subclass(OnMPS), b.as_subclass(OnMPS))):
        got = bvb.frechet_distance(first, second)
        assert got == approx(5 + 2 / 3 * (8 - 2 * math.sqrt(13)), rel=1e-9)
    assert bvb.frechet_distance(b, b) == approx(0.0, abs=1e-12)

class ConstantModel(torch.nn.Module):
    """Encodes every batch to the posterior N(mu, I) and decodes every z to the image c."""

    def __init__(self, c, mu):
        super().__init__()
        self.c, self.mu, self.latent_dim = c, mu, mu.shape[1]

    def decode(self, z):
        return self.c.expand(z.shape[0], *self.c.shape[1:])

    def forward(self, x):
        return self.decode(self.mu), self.mu, torch.zeros_like(self.mu)

@pytest.mark.parametrize("val_size", [16, 0])
def test_evaluate_run_fits_sigma2_on_validation_and_counts_active_units(val_size):
    # every image decodes to 0.25: MSE 0.0625 on the black validation images, 0.5625 on the
    # white test images; σ² is the validation MSE (the test's without a validation split)
    mu = torch.zeros(100, 4)
    mu[:, 0] = torch.linspace(-1, 1, 100)                 # variance ≈ 0.34: active
    mu[:, 1] = torch.linspace(-0.1, 0.1, 100)             # variance ≈ 0.0034: not
    mu[:, 2] = 5.0                                        # constant: not
    model = ConstantModel(torch.full((1, 1, 64, 64), 0.25), mu)
    black, labels = torch.zeros(100, 1, 64, 64, dtype=torch.uint8), torch.zeros(100).long()
    splits = {"val": (black, labels), "test": (black + 255, labels)}
    args = types.SimpleNamespace(val_size=val_size, iw_samples=2, no_progress=True)
    features = {split: torch.randn(100, 128) for split in splits}
    out = bvb.evaluate_run(model, splits, bvb.DigitClassifier(), features, args, seed=0)
    sigma2 = 0.0625 if val_size else 0.5625
    assert out["sigma2"] == approx(sigma2) and ("val" in out) == bool(val_size)
    test, kl = out["test"], 0.5 * mu.pow(2).sum(1).mean().item()
    assert test["mse"] == approx(0.5625) and test["kl"] == approx(kl)
    assert test["sharp"] == 0.0 and test["active_units"] == 1
    nll = 4096 * (0.5625 / (2 * sigma2) + 0.5 * math.log(2 * math.pi * sigma2))
    assert test["neg_elbo"] == approx(nll + kl, rel=1e-5)

def test_prepare_caches_the_classifier_once_per_training_set_retrains_a_bad_one_or_says_why_not(
        data_dir, tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "out"
    argv = run_args(data_dir, out, f"--cache-dir {cache}")
    assert bvb.main([*argv, "--prepare"]) is None and not out.exists()   # no results written
    printed = capsys.readouterr().out
    assert "trained on 80 images" in printed and "Feature classifier ready" in printed
    [path] = cache.iterdir()
    stamp, args = path.stat().st_mtime_ns, bvb.parse_args(argv)
    splits = bvb.load_splits(args, CPU)
    _, accuracy, sha = bvb.get_classifier(splits, args)
    assert "loaded from" in capsys.readouterr().out and path.stat().st_mtime_ns == stamp
    assert 0 <= accuracy <= 1 and len(sha) == 64
    path.write_bytes(b"not a checkpoint")            # corrupt: retrained, same seeded weights
    assert bvb.get_classifier(splits, args)[2] == sha
    state = torch.load(path, weights_only=True)
    torch.save(dict(state, fingerprint=dict(state["fingerprint"], epochs=1)), path)   # another
    assert bvb.get_classifier(splits, args)[2] == sha
    assert capsys.readouterr().out.count("trained on 80") == 2
    args.val_size = 8
    bvb.get_classifier(bvb.load_splits(args, CPU), args)     # 88 other images: their own file
    assert len(list(cache.iterdir())) == 2
    if os.path.isdir("/proc/self"):  # Linux's: unwritable even by root
        bvb.main(run_args(data_dir, out, "--prepare --cache-dir /proc/self"))
        printed = capsys.readouterr().out
        assert "; not cached (/proc/self/classifier-" in printed and "classifier ready" in printed
        assert not out.exists()

# ---------------------------------------- the report and the verdict

def holm_of(ps):
    cells = [{"p": p} for p in ps]
    bvb.holm(cells)
    return [c["p_holm"] for c in cells]

def test_intervals_holm_and_their_display_at_hand_computed_points():
    for dof, value in {1: 12.706205, 3: 3.182446, 30: 2.042272}.items():
        assert bvb.t_quantile(dof) == approx(value, abs=1e-5)
    assert bvb.t_quantile(5, 0.95) == approx(2.015048, abs=1e-5)
    # sd 1: half = t(2)/√3; t-test of mean 0: t = 2√3, p = 1 − t/√(2 + t²)
    c, t, half = bvb.interval([1.0, 2.0, 3.0]), 2 * math.sqrt(3), 4.302653 / math.sqrt(3)
    assert (c["mean"], c["n"]) == (2.0, 3) and c["p"] == approx(1 - t / math.sqrt(2 + t * t))
    assert (c["low"], c["high"]) == approx((2 - half, 2 + half), rel=1e-6)
    one = bvb.interval([1.0, math.nan])  # the nan left out: one value, no interval
    assert (one["mean"], one["n"]) == (1.0, 1) and math.isnan(one["low"] + one["p"])
    assert bvb.interval([2.0, 2.0])["p"] == 0.0 and bvb.interval([0.0, 0.0])["p"] == 1.0
    ratio = bvb.interval([2.0, 8.0], ratio=True)  # geometric mean of 2 and 8
    assert ratio["mean"] == approx(4.0) and ratio["low"] * ratio["high"] == approx(16.0)
    # a positive quantity: seeds' values, not an interval, from 2 seeds or reaching 0
    two = bvb.interval([0.0150, 0.0110], positive=True)
    assert math.isnan(two["low"]) and two["seed_values"] == [0.0150, 0.0110]
    assert bvb.show(two, 4) == "0.0130 (seeds: 0.0150, 0.0110)"
    assert "seed_values" in bvb.interval([1.0, 30.0, 2.0], positive=True)   # 11 ± 40
    assert bvb.interval([1.0, 1.2, 1.1], positive=True)["low"] > 0
    assert bvb.interval([-3.0, 5.0])["low"] < 0   # a difference keeps its interval
    # Holm: 3·0.01; max(2·0.03, 0.04) kept monotone; a nan takes no part
    assert holm_of([0.01, 0.04, 0.03]) == approx([0.03, 0.06, 0.06])
    assert holm_of([0.02, math.nan, 0.5]) == approx([0.04, math.nan, 0.5], nan_ok=True)
    c = {"mean": 1.05, "low": 0.97, "high": 1.14, "n": 3, "p_holm": 0.01}
    assert bvb.show(c, 2, "ratio", star=True) == "1.05x [0.97, 1.14]*"
    c = dict(c, mean=8.5, low=-2.1, high=3.7)
    assert bvb.show(c, 1, "difference") == "+8.5 [-2.1, +3.7]"
    c = dict(c, mean=1.2, low=math.nan, p_holm=0.2)
    assert bvb.show(c, 2, "ratio", True, [1.0, 1.1]) == "1.20x (seeds: 1.00x, 1.10x)"
    assert bvb.show(dict(c, n=0), 2) == "n/a"

def tuning_records():
    """Validation ranks β 1e-5, 3e-4, 0.1; their test IWAE NLL −100, −60, −20
    (+ the seed's offset): best of k −60, (−100·2 − 60)/3, −100. Methods at
    −70 (beaten from k = 2), −95 (from k = 3), −120 (never)."""
    records = []
    for seed, offset in ((0, 0.0), (1, 1.0), (2, -1.0)):
        for name, val, test in (("beta_1e-05", 1.0, -100.0), ("beta_0.0003", 2.0, -60.0),
                                ("beta_0.1", 3.0, -20.0)):
            records.append(fake_run(name, "beta", seed, {"iwae_nll": val},
                                    {"iwae_nll": test + offset}))
        for kind, test in (("geco", -70.0), ("controlvae", -95.0), ("sigma_vae", -120.0)):
            test = {"iwae_nll": test + offset + seed / 10}
            records.append(fake_run(kind, kind, seed, {}, test))
    return records

def test_k_star_is_the_first_k_whose_expected_best_of_k_beta_beats_the_method():
    # three runs ranked by validation b, a, c: test values 5, 2, 9
    curve = bvb.best_of_k([(1.0, 2.0), (3.0, 5.0), (0.5, 9.0)])
    assert curve == approx([(2 + 5 + 9) / 3, (5 + 5 + 2) / 3, 5.0])  # {a,b}→5, {b,c}→5, {a,c}→2
    stalled = [dict(fake_run("beta_1e-07", "beta", s, {"iwae_nll": 5.0}, {"iwae_nll": 0.0}),
                    status="stalled") for s in (0, 1, 2)]
    gone = [dict(fake_run("beta_1e-06", "beta", s, {}, {}), status="diverged") for s in (0, 1)]
    late = [fake_run("beta_1e-08", "beta", 0, {"iwae_nll": 0.0}, {})]  # one seed only: waits
    t = bvb.tuning_cost(bvb.aggregate(tuning_records() + stalled + gone + late))
    assert t["grids"] == {"β-VAE": ["beta_1e-05", "beta_0.0003", "beta_0.1", "beta_1e-07"]}
    curve = t["curves"]["β-VAE"]["iwae_nll"]
    assert curve["per_seed"][0][0] == approx((-100 - 60 - 20) / 4)  # the stalled β drawn too
    t = bvb.tuning_cost(bvb.aggregate(tuning_records()))
    curve = t["curves"]["β-VAE"]["iwae_nll"]
    assert [c["mean"] for c in curve["k"]] == approx([-60.0, -260.0 / 3, -100.0])
    assert curve["per_seed"][1] == approx([-59.0, -260.0 / 3 + 1, -99.0])
    rows = {n: t["methods"][n]["iwae_nll"]["k_star"]["β-VAE"]
            for n in ("geco", "controlvae", "sigma_vae")}
    assert [rows[n]["k"] for n in rows] == [2, 3, None] and rows["geco"]["n"] == 3
    assert rows["geco"]["at"]["mean"] == approx(-70.0 + 0.1 - (-260.0 / 3))
    assert rows["sigma_vae"]["at"]["mean"] == approx(-20.0 + 0.1)  # never: shown at k = n
    md = "\n".join(bvb.tuning_lines(t))
    assert "| geco | IWAE NLL (nats) | -69.9 [" in md and "| 2 of 3: +16.8 [" in md
    assert "| not within its 3: -19.9 [" in md

SEED_SCALE = {0: 1.0, 1: 1.5, 2: 0.7}  # every run of a seed that much worse

def front_records():
    """β runs at KL 10, 50, 200: MSE 0.025, 0.008, 0.004 (x the seed's scale),
    FD prior 400/200/800, IWAE NLL −20/−60/−100; methods at a known ratio to the
    front at KL 100 (MSE √(0.008·0.004), IWAE −80, FD 400) or at KL 400."""
    records = []
    for seed, scale in SEED_SCALE.items():
        for name, kl, fd, iwae, mse in (("beta_0.001", 10.0, 400.0, -20.0, 0.025),
                                        ("beta_0.0001", 50.0, 200.0, -60.0, 0.008),
                                        ("beta_1e-05", 200.0, 800.0, -100.0, 0.004)):
            records.append(fake_run(name, "beta", seed, {}, {
                "kl": kl, "mse": mse * scale, "fd_prior": fd, "iwae_nll": iwae}))
        for name, kind, ratios in (("bom_like", "bom", (1.9, 2.1, 2.0)),
                                   ("geco", "geco", (0.9, 1.1, 1.0)),
                                   ("sigma_vae", "sigma_vae", (0.45, 0.55, 0.5)),
                                   ("controlvae", "controlvae", (0.79, 0.81, 0.8)),
                                   ("freebits", "freebits", (1.0, 1.0, 1.0))):
            test = {"kl": 400.0 if name == "freebits" and seed else 100.0, "fd_prior": 200.0,
                    "mse": ratios[seed] * math.sqrt(0.008 * 0.004) * scale, "iwae_nll": -70.0}
            records.append(fake_run(name, kind, seed, {}, test, {
                "kl_targets": [50.0, 80.0, 150.0], "tolerance": 0.01, "kl_target": 80.0,
                "lambda": 0.25}))
    return records

CONFIG = {"epochs": 1, "train_images": 1, "val_images": 1, "test_images": 1, "iw_samples": 1,
          "device": "cpu", "torch": "x", "latent_dim": 128}

def summary_md(records):
    for r in records:
        r["config"] = CONFIG
        r["reference"].update(test_data_sharpness=0.03, classifier_test_accuracy=0.9)
    summary, methods = bvb.summarize(records, "iwae_nll")
    return summary, bvb.summary_markdown(summary, methods, ())

def rows_of(md, title):
    """{first cell: row} of the table under `## title`."""
    part = md.split("## " + title)[1].split("\n## ")[0]
    return {row.split(" | ")[0][2:]: row for row in part.splitlines() if row.startswith("| ")}

def test_the_front_interpolates_in_log_kl_and_each_method_is_placed_by_seed_in_one_holm_family():
    gone = [dict(fake_run("bom_gone", "bom", seed, {}, {}, {"kl_targets": [50.0, 80.0, 150.0]}),
                 status="diverged") for seed in SEED_SCALE]
    records = front_records() + gone
    betas = [r for r in records if r["kind"] == "beta" and r["seed"] == 0]
    value, bracket, names = bvb.front_at(betas, 100.0, "mse")  # halfway in log KL: 50 – 200
    assert value == approx(math.sqrt(0.008 * 0.004)) and bracket == (0.008, 0.004)
    assert names == ("beta_0.0001", "beta_1e-05")
    assert bvb.front_at(betas, 100.0, "iwae_nll")[0] == approx(-80.0)  # linear in the value
    assert bvb.front_at(betas, 10.0, "fd_prior")[0] == approx(400.0)  # an end is inside
    for kl in (9.9, 201.0, 0.0, math.nan, math.inf):    # outside, or no rate to place
        assert bvb.front_at(betas, kl, "mse") is None, kl
    assert bvb.front_at(betas[:1], 10.0, "mse") is None  # one β run: no front
    front = bvb.matched_rate(bvb.aggregate(records))
    bom, geco, sigma, control, freebits = (
        front[n] for n in ("bom_like", "geco", "sigma_vae", "controlvae", "freebits"))
    # the seed scales cancel in the pairs: the ratios are those put in
    assert [bom["per_seed"][s]["mse"] for s in SEED_SCALE] == approx([1.9, 2.1, 2.0])
    assert bom["mse"]["mean"] == approx((1.9 * 2.1 * 2.0) ** (1 / 3))
    assert bom["between"] == ["beta_0.0001 – beta_1e-05"]
    assert bom["iwae_nll"]["mean"] == approx(10.0) and bom["fd_prior"]["mean"] == approx(0.5)
    assert geco["mse"]["low"] < 1 < geco["mse"]["high"] and geco["equivalent"]["p_holm"] > 0.05
    # 0.8x the front at KL 100 is 0.0045: below the chord, above the β run at KL 200 (0.004)
    assert control["mse"]["p_holm"] < 0.05 and control["position"] == "n.d."
    assert freebits["seeds_outside"] == [1, 2] and freebits["mse"]["n"] == 1
    # one Holm family: every cell of the table and each equivalence test
    cells = [row[key] for row in front.values() for key in bvb.FRONT]
    cells += [row["equivalent"] for row in front.values()]
    assert [c["p_holm"] for c in cells] == approx(holm_of([c["p"] for c in cells]), nan_ok=True)
    summary, md = summary_md(records)
    rows = rows_of(md, "Verdict")  # one table sorted by position
    positions = {"bom_like": "above", "sigma_vae": "below", "geco": "n.d. (3 seeds)",
                 "controlvae": "n.d. (3 seeds; off the front only by the interpolation)",
                 "freebits": "outside", "bom_gone": "diverged"}
    assert list(rows)[2:] == list(positions)
    assert all(rows[n].endswith(f"| {p} |") for n, p in positions.items())
    assert "| 1 (outside: seeds 1, 2) | 1.00x | " in rows["freebits"]
    assert "| 0 | n/a | n/a | n/a |" in rows["bom_gone"]
    # the test table's sharpness is a ratio to the data's: 1.0 / 0.03
    assert "| 33.33x [33.33, 33.33] |" in rows_of(md, "Test metrics")["bom_like"]
    _, md = summary_md([r for r in records if r["seed"] != 2])  # two seeds: their values
    assert "| 2.00x [1.06, 3.77] (seeds: 1.90x, 2.10x) |" in rows_of(md, "Verdict")["bom_like"]
    row = rows_of(md, "Test metrics")["beta_0.001"].split(" | ")
    assert row[3] == "0.0312 (seeds: 0.0250, 0.0375)" and "[" not in row[4] + row[12]
    for r in records:       # --val-size 0: no β chosen, yet every table
        del r["val"]
    summary, md = summary_md(records)
    assert summary["criteria"] == {} and "## Test metrics" in md and "## Verdict" in md

def verdict_of(ratios, above=False, below=False):
    """position() of one method alone in its table, from its seeds' MSE ratios to the front."""
    row = {"mse": bvb.interval(ratios, True), "past": {"above": above, "below": below},
           "equivalent": {"p": bvb.equivalence_p([math.log(r) for r in ratios])},
           "diverged": False, "seeds_outside": []}
    bvb.holm([row["mse"], row["equivalent"]])
    return bvb.position(row), row

def test_comparable_is_an_equivalence_test_and_n_d_says_why():
    # 1.05x, tight: the ratio differs from 1, yet no seed is past both β runs: comparable
    (word, why), row = verdict_of([1.04, 1.05, 1.06, 1.05])
    assert (word, why) == ("on, ±10%", "") and row["mse"]["p_holm"] < 0.05
    # 1.08x [1.01, 1.16] over 4 seeds: its 90% interval reaches past 1.1: not distinguishable
    logs = [math.log(1.08) + d for d in (-0.05, -0.02, 0.02, 0.05)]
    (word, why), row = verdict_of([math.exp(x) for x in logs])
    assert (round(row["mse"]["low"], 2), round(row["mse"]["high"], 2)) == (1.01, 1.16)
    assert (word, why) == ("n.d.", "4 seeds")
    # TOST at hand: t = (ln 1.1 − mean)/se, p = P(T ≥ t) with 3 dof; the 90% interval's end
    se = statistics.stdev(logs) / 2
    t = (math.log(1.1) - statistics.fmean(logs)) / se
    assert row["equivalent"]["p"] == approx(0.5 - bvb.t_mass(t, 3), rel=1e-9)
    assert math.exp(statistics.fmean(logs) + bvb.t_quantile(3, 0.95) * se) > 1.1
    # the notebook's BOM at full size: 13.93x and 10.41x, both seeds above both β runs
    (word, why), _ = verdict_of([13.93, 10.41], above=True)
    assert (word, why) == ("n.d.", "2 seeds; every seed above both β runs")
    # a Holm finding with every seed past both runs: above (below)
    assert verdict_of([2.0, 2.1, 1.9, 2.05], above=True)[0] == ("above", "")
    assert verdict_of([0.5, 0.52, 0.49, 0.5], below=True)[0] == ("below", "")
    assert verdict_of([2.0, 2.1, 1.9, 2.05])[0] == (
        "n.d.", "4 seeds; off the front only by the interpolation")
    assert verdict_of([1.3])[0] == ("undetermined", "")

def test_a_bisection_on_log_beta_counts_the_runs_to_land_near_a_rate():
    # log KL linear in log β: KL = 100 at β = 1e-4, 10 at 1e-2 (one decade of KL per two of β)
    curve, bracket = [(1e-4, 100.0), (1e-2, 10.0)], (1e-4, 1e-2)
    # target 40: first run at β = 1e-3 (KL 31.6), then 10^-3.5 (56.2), then 10^-3.25 (42.2)
    assert bvb.bisection_runs(curve, 40.0, math.log(42.2 / 40) + 1e-3, bracket) == 3
    assert bvb.bisection_runs(curve, 40.0, math.log(40 / 31.6) + 1e-3, bracket) == 1
    assert bvb.bisection_runs(curve, 500.0, 0.1, bracket) is None       # past the sweep's end
    assert bvb.bisection_runs(curve, 40.0, 0.0, bracket) is None        # never exactly
    assert bvb.bisection_runs(curve, 40.0, 0.3, (1e-7, 0.1)) is None    # a run past its β runs
    # on runs: each seed's β runs' last training epochs give its curve; ControlVAE (set point
    # 80) ends its training at KL 100 in seed 0 and 82 in seed 1
    runs = [fake_run(f"beta_{b:g}", "beta", seed, {}, {}, history=[{"kl": kl}])
            for seed in (0, 1) for b, kl in curve]
    runs += [fake_run("controlvae", "controlvae", seed, {}, {}, {"kl_target": 80.0, "kp": 0.01,
                      "ki": 1e-4, "beta_range": [0.0, 1.0]}, [{"kl": kl}])
             for seed, kl in ((0, 100.0), (1, 82.0))]
    runs += [fake_run("sigma_vae", "sigma_vae", 0, {}, {}, {}, [{"kl": 300.0}])]  # no set rate
    targeting = bvb.rate_targeting(bvb.aggregate(runs))
    assert list(targeting) == ["controlvae"]
    seeds = targeting["controlvae"]
    assert [seeds[s]["reached_over_target"] for s in (0, 1)] == approx([1.25, 1.025])
    # seed 0, within ln 1.25: β = 1e-3 (31.6) no, 10^-3.5 (56.2) no, 10^-3.75 (75.0) yes;
    # seed 1 landed within ±10%: the same (75.0 is within 10% of 80, 56.2 is not)
    assert [seeds[s]["bisection_runs"] for s in (0, 1)] == [3, 3]

def test_beta_is_chosen_on_validation_never_on_test():
    records = []
    for seed in (0, 1):  # beta_0.1 best on the validation mean; 1e-05 on test and MSE
        records.append(fake_run("beta_1e-05", "beta", seed, {"iwae_nll": 12.0, "mse": 0.1},
                                {"iwae_nll": 5.0}))
        records.append(fake_run("beta_0.1", "beta", seed, {"iwae_nll": 10.0 + 3 * seed,
                                                           "mse": 0.2}, {"iwae_nll": 9.0}))
    methods = bvb.aggregate(records)
    chosen = bvb.criteria(methods, "iwae_nll")
    assert chosen["iwae_nll"]["beta"] == "beta_0.1" and chosen["iwae_nll"]["edge"] == "largest"
    assert chosen["mse"]["beta"] == "beta_1e-05" and chosen["mse"]["edge"] == "smallest"
    assert methods["beta_0.1"]["runs_to_choose"] == 2
    late = fake_run("beta_1e-07", "beta", 1, {"iwae_nll": 0.0}, {})   # one seed: not choosable
    assert bvb.choose(bvb.aggregate(records + [late]), "iwae_nll") == "beta_0.1"
    records[3]["status"] = "diverged"  # beta_0.1 in seed 1: out, and one setting is no choice
    assert bvb.choose(bvb.aggregate(records), "iwae_nll") is None

def test_own_targets_are_checked_on_the_last_epoch_and_idle_free_bits_is_named_its_twin():
    # the last epoch's MSE against GECO's 0.01 within ±30%: 0.0029 and 0.0069 miss
    records = [fake_run("geco", "geco", s, {}, {}, {"tolerance": 0.01},
                        [{"mse": 0.02}, {"mse": v}])
               for s, v in enumerate((0.009, 0.0029, 0.0071, 0.0069))]
    records.append(fake_run("controlvae", "controlvae", 0, {}, {}, {"kl_target": 80.0},
                            [{"kl": 77.1}]))  # |77.1/80 − 1| = 3.6%
    records += [fake_run("freebits", "freebits", seed, {}, {}, {"lambda": 0.25}, [
        {"dims_below_lambda": 5.0}, {"dims_below_lambda": 0.0 if seed else 1.0}])
                for seed in (0, 1)]
    methods = bvb.aggregate(records)
    assert methods["geco"]["targets"][1] == [("training MSE", 0.0029, 0.01)]
    assert methods["geco"]["missed_target"] == [1, 3]
    assert methods["controlvae"]["missed_target"] == [] and methods["freebits"]["idle"] == [1]
    rows = {r.split(" | ")[0][2:]: r for r in bvb.landing_lines({}, methods, 128)}
    assert "| training MSE 0.009, 0.0029, 0.0071, 0.0069 / 0.01; MISSED (seeds 1, 3) |" in \
        rows["geco"]
    assert "acted in epoch 1 only (seeds 1): trained as sigma_vae" in rows["freebits"]
    assert "| KL set point 80 nats (BOM's KL optimum target, copied) |" in rows["controlvae"]
    reference = {"test_data_sharpness": 0.03, "classifier_test_accuracy": 0.9}
    assert "missed its target (seeds 1, 3) |" in "\n".join(bvb.test_lines(methods, reference))

def drawn_figure(monkeypatch, plot, *args):
    """The figure `plot` hands to finish, kept open to be read."""
    figures = []
    monkeypatch.setattr(bvb, "finish", lambda fig, *rest: figures.append(fig))
    plot(*args, "unused.png")
    return figures[0]

def test_figures_show_every_method_apart_and_every_interval_readable(monkeypatch, tmp_path):
    methods = bvb.aggregate(front_records())
    names, styles = [m["name"] for m in bvb.judged(methods)], bvb.styles_of(methods)
    assert len({styles[n] for n in names}) == len(names)
    fig = drawn_figure(monkeypatch, bvb.plot_rate_distortion, methods, bvb.matched_rate(methods))
    assert len(fig.axes) == 3 and [t.get_text() for t in fig.axes[0].texts] == [
        "β=0.001", "β=0.0001", "β=1e-05"]
    twins = [r for r in front_records() if r["name"] != "freebits"]
    twins += [dict(r, name="freebits", kind="freebits") for r in twins if r["name"] == "sigma_vae"]
    twins = bvb.aggregate(twins)
    assert "freebits (nudged)" in bvb.plot_rate_distortion(
        twins, bvb.matched_rate(twins), str(tmp_path / "twins.png"))
    # neighbouring β values differ in colour (RGB distance), not only the ends of the ramp
    sweep = bvb.aggregate([dict(r, name=f"beta_{b:g}", settings={"beta": b}) for b in
                           bvb.ALL_BETAS for r in front_records()[:1]])
    colours = [bvb.styles_of(sweep)[m["name"]][0][:3] for m in bvb.betas(sweep)]
    assert min(np.linalg.norm(np.diff(colours, axis=0), axis=1)) > 0.2
    # the ratio axis: 0.9x, 1x, 1.1x ticked and a seventh of the axis apart at 77x
    front = {"bom": {"mse": {"n": 2, "mean": 12.0, "low": 1.9, "high": 76.5}, "position": "n.d."},
             "geco": {"mse": {"n": 0, "mean": 1.0, "low": 0.92, "high": 1.17},
                      "position": "outside"}}
    fig, ax = bvb.plt.subplots()
    bvb.forest(ax, front, "mse", {"bom": ("C0", "o"), "geco": ("C1", "D")})
    assert {0.9, 1, 1.1} <= set(ax.get_xticks()) and max(ax.get_xticks()) <= 76.5 * 1.05
    place = ax.transData.transform([(0.9, 0), (1.1, 0)])[:, 0]
    assert place[1] - place[0] > ax.bbox.width / 7 and ax.texts[0].get_text() == "outside"
    bvb.plt.close(fig)
    # tuning cost: each other method in a slot of its own, each seed's value where its
    # interval is withheld; k ticks are integers
    methods = bvb.aggregate(tuning_records())
    tuning = bvb.tuning_cost(methods)
    tuning["methods"]["geco"]["fd_prior"]["test"] = bvb.interval([50.0, 200.0], positive=True)
    fig = drawn_figure(monkeypatch, bvb.plot_tuning_cost, tuning, methods)
    strips, curves = fig.axes[::2], fig.axes[1::2]
    for strip in strips:
        slots = [line.get_xdata()[0] for line in strip.lines
                 if line.get_marker() not in ("None", "_", "") and line.get_mfc() != "none"]
        assert len(slots) == len(set(slots)) == 3
    fd_strip = strips[bvb.TUNING_CRITERIA.index("fd_prior")]
    hollow = [list(line.get_ydata()) for line in fd_strip.lines if line.get_mfc() == "none"]
    assert [h for h in hollow if h] == [[50.0, 200.0]]
    assert all(float(k).is_integer() for ax in curves for k in ax.get_xticks())
    # training: the sharpness panel on a log scale, the data's line dotted unlike any method's
    curve = {"values": [[0, 0.1, 5.0, 0.2], [1, 0.01, 50.0, 0.03]]}
    records = [dict(r, curve=curve) for r in front_records()]
    fig = drawn_figure(monkeypatch, bvb.plot_training, records, bvb.aggregate(records), 0.03)
    assert [ax.get_yscale() for ax in fig.axes] == ["log"] * 3
    assert fig.axes[2].lines[-1].get_linestyle() == ":"

def test_ablations_a_knob_grid_and_a_new_method_class_train_in_the_loop_and_are_judged(
        data_dir, tmp_path, monkeypatch):
    """On a file system without flock (Lustre without -o flock) or hard links (exFAT), in a
    folder where a failed start left empty folders and a lock file."""
    def refuse(*args):
        raise OSError(38, "Function not implemented")
    monkeypatch.setattr(bvb.fcntl, "flock", refuse)
    monkeypatch.setattr(bvb.os, "link", refuse)
    (tmp_path / "runs").mkdir()
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "geco_seed0.lock").write_text("")
    monkeypatch.setitem(bvb.METHOD_CLASSES, "toy", Toy)
    summary = bvb.main(run_args(data_dir, tmp_path, "--epochs 2 --latent-dim 16 --no-plots "
                                "--methods beta:0.001,beta:0.1,bom,ablations,toy "
                                "--bom-sensitivity bom:sharp=off"))
    boms = ["bom", "bom_sharp=data", "bom_sharp=off", "bom_squeeze=1"]
    settings = ["bom_sharp=off"] + [f"bom_sharp=off_{k}={v:g}"
                                    for k, vs in bvb.BOMVAE.SENSITIVITY.items() for v in vs]
    runs = {n: load(tmp_path / "runs" / f"{n}_seed0.json") for n in boms + settings + ["toy"]}
    assert runs["bom_sharp=off"]["config"]["calibration"]["sharp_ceiling"] is None
    first = runs["bom_squeeze=1"]["history"][0]          # squeezes from epoch 1, bom from 3
    assert first["squeeze_factor"] == approx(bvb.squeeze_factor(first["s_min"], k=0.5))
    assert runs["bom"]["history"][0]["squeeze_factor"] == 1.0
    # every ablation and the toy class are judged like every method; no knob setting is (its
    # grid's best is)
    assert list(summary["front"]) == boms + ["toy"] and runs["toy"]["status"] == "ok"
    assert len(os.listdir(tmp_path / "runs")) == 15
    assert load(tmp_path / "experiment.json")["epochs"] == 2
    assert list(summary["tuning_cost"]["methods"]) == boms + ["toy", "bom_sharp=off, tuned"]
    # the knob grid of bom:sharp=off: variants that keep the ablation
    run = runs["bom_sharp=off_kl_scale=2"]
    assert run["variant"] and run["settings"]["ablation"] == "sharp=off"
    assert run["config"]["calibration"]["sharp_ceiling"] is None
    assert run["settings"]["kl_targets"] == approx([t * 16 * 2 for t in bvb.KL_TARGETS_PER_DIM])
    grid = summary["knob_grids"]["bom_sharp=off, tuned"]
    assert sorted(grid["settings"]) == sorted(settings) and len(settings) == 9
    assert grid["settings"]["bom_sharp=off_squeeze_k=1"]["changes"] == {"squeeze_k": 1.0}
    # d log test KL / d log kl_scale over the kl_scale settings' run files
    points = {n: (math.log(runs[n]["settings"]["kl_scale"]), math.log(runs[n]["test"]["kl"]))
              for n in settings if "squeeze" not in n and "mse_floor" not in n}
    slope = statistics.linear_regression(*zip(*points.values()))[0]
    assert len(points) == 5 and math.isnan(grid["kl_slope"]["low"])  # one seed: no interval
    assert grid["kl_slope"]["mean"] == approx(slope)
    # the grid is tuned like β: its best of k over its 9 settings, on validation
    tuned = summary["tuning_cost"]["curves"]["bom_sharp=off, tuned"]["fd_prior"]["per_seed"][0]
    best = min((runs[n] for n in settings), key=lambda r: r["val"]["fd_prior"])
    assert len(tuned) == 9 and tuned[-1] == best["test"]["fd_prior"]
    assert tuned[0] == approx(statistics.fmean(runs[n]["test"]["fd_prior"] for n in settings))
    md = (tmp_path / "summary.md").read_text()
    assert "| bom_sharp=off_kl_scale=2 | kl_scale 2 | 20 | " in md and "![" not in md  # no plots
    assert "| toy | " in rows_of(md, "Where each method")["toy"]
    # a stalled setting is a row of its grid but no point of the slope
    records = bvb.load_runs(str(tmp_path))
    for r in records:
        if r["name"] == "bom_sharp=off_kl_scale=4":
            r["status"] = "stalled"
    methods = bvb.aggregate(records)
    grid = bvb.knob_grids(methods, bvb.tuning_grids(methods))["bom_sharp=off, tuned"]
    del points["bom_sharp=off_kl_scale=4"]
    slope = statistics.linear_regression(*zip(*points.values()))[0]
    assert "bom_sharp=off_kl_scale=4" in grid["settings"]
    assert grid["kl_slope"]["mean"] == approx(slope)
    assert "; stalled, left out: bom_sharp=off_kl_scale=4." in "\n".join(bvb.knob_lines(
        {"g": grid}))

# ---------------------------------------- the command line and bad input

def test_the_cli_writes_every_output_and_figures_of_the_set_pixel_size_that_are_not_blank(
        shared_out, data_dir):
    out, cli = shared_out, load(shared_out.parent / "cli.json")
    assert cli["returncode"] == 0 and cli["stderr"] == "", cli["stderr"]  # no noise
    assert "Estimated training time" in cli["stdout"] and "## Verdict" in cli["stdout"]
    assert sorted(os.listdir(out)) == sorted(["runs", "checkpoints", "experiment.json",
                                              *bvb.REPORT_PATHS])
    assert len(os.listdir(out / "runs")) == 6
    *runs, data = load(out / "summary.json")["runs"]
    test_images = bvb.load_mnist(data_dir, train=False)[0].float() / 255
    assert data["test_sharp"] == approx(bvb.sharpness(test_images).mean().item(), rel=1e-5)
    for row in runs:
        assert all(math.isfinite(row[f"test_{k}"]) for k in bvb.METRICS), row["method"]
    # figsize x 150 dpi; grey levels, contrast, ink; colour in plots only
    for name, ((width, height), colour_share) in FIGURES.items():
        image = mpimg.imread(out / name)[..., :3]
        assert image.shape[:2] == (height * 150, width * 150), name
        gray = image.mean(-1)
        assert gray.std() > 0.05 and len(np.unique((gray * 255).round())) > 20, name
        assert (gray < 0.5).mean() > 0.005, name
        coloured = ((image.max(-1) - image.min(-1)) > 0.3).mean()
        assert (coloured > colour_share) if colour_share else (coloured == 0.0), name
    # fake digits are bright strokes on black: the "original" row, on a fixed scale
    first_row = mpimg.imread(out / "reconstructions_comparison.png")[:8 * 150 // 4, :, :3]
    assert (first_row < 0.02).mean() > 0.2 and (first_row > 0.9).mean() > 0.1
    links = set(re.findall(r"!\[[^]]*\]\(([^)]+)\)", (out / "summary.md").read_text()))
    assert links == {"rate_distortion.png", "tuning_cost.png"}, links

def test_default_out_is_named_from_the_settings_that_change_results():
    def name(flags=""):
        return os.path.relpath(bvb.parse_args(f"--device cpu {flags}".split()).out, "results")
    assert name() == "default" == name("--epochs 20 --data-dir elsewhere")
    assert name("--epochs 5 --seeds 0 1") == "e5_s0-1"
    assert name("--methods all --lr 0.0003") == "methods-all_lr-0.0003"
    assert name("--quick") == "quick" and name("--quick --epochs 1") == "quick_e1"
    assert name("--bom-squeeze-start 2 --freebits-lambda 0.5 --geco-tolerance 0.02"
                ) == "geco-tolerance-0.02_freebits-lambda-0.5_bom-squeeze-start-2"
    many = "--methods " + ",".join(f"beta:0.00{i}" for i in range(1, 9))   # over 80 characters:
    assert len(name(many)) == 69 and name(many) != name(many + ",bom")      # cut, hashed
    assert bvb.parse_args(["--out", "mine"]).out == "mine"
    quick = bvb.parse_args(["--quick", "--device", "cpu"])
    assert {key: getattr(quick, key) for key in bvb.QUICK} == bvb.QUICK
    assert bvb.parse_args([]).method_specs == [  # the notebook's
        ("beta", 1e-4), ("beta", 1e-3), ("beta", 0.01), ("beta", 0.1), ("bom", None)]

def test_a_method_s_knobs_are_flags_checked_by_their_type(monkeypatch):
    class Toy(bvb.Method):
        kind, label = "toy", "toy"
        KNOBS = {"gain": (2.0, "multiplies β"), "warmup": (3, "epochs before it acts")}

    monkeypatch.setitem(bvb.METHOD_CLASSES, "toy", Toy)
    args = bvb.parse_args("--device cpu --toy-gain 0.5".split())
    assert Toy.from_args(args, None).knobs == {"gain": 0.5, "warmup": 3}
    splits = {split: (torch.zeros(1),) for split in ("train", "val", "test")}
    assert "toy_gain" not in bvb.run_config(args, splits)  # a run's are in its settings
    for flag, message in (("--toy-gain", "a finite number > 0"), ("--toy-warmup", ">= 1")):
        with pytest.raises(bvb.UsageError, match=f"{flag} must be {message}"):
            bvb.parse_args(["--device", "cpu", flag, "0"])

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")

@pytest.mark.parametrize("flags, message", [
    ("--epochs 0", "--epochs must be >= 1"),
    ("--methods bom:sharp=blur",
     "'sharp=blur' in 'bom:sharp=blur' is not a BOM ablation (sharp=data"),
    ("--methods ablations,bom:sharp=off", "listed twice"),
    ("--methods bom:sharp=off+kl_scale=2,bom:kl_scale=2.0+sharp=off", "listed twice"),
    ("--methods bom:sharp=off+sharp=data", "one at most"),
    ("--methods bom:kl_scale=2+kl_scale=3", "once each"),
    ("--methods bom:kl_scale=0", "BOM's kl_scale must be a finite number > 0"),
    ("--methods bom:kl_scale=x", "BOM's kl_scale must be a finite number > 0, got 'x'"),
    ("--methods bom:squeeze_start=1.5", "BOM's squeeze_start must be an integer >= 1"),
    ("--methods bom:calib_batches=0", "BOM's calib_batches must be an integer >= 1"),
    ("--bom-sensitivity beta:0.1", "--bom-sensitivity takes one BOM item"),
    ("--lr nan", "--lr must be a finite number > 0"),
    ("--bom-calib-batches 0.5", "invalid int value"),
    ("--controlvae-kl-target -5", "--controlvae-kl-target must be a finite number > 0"),
    ("--seeds 4294967296", "--seeds must be between 0 and 4294967295"),
    ("--seeds 0 0", "a seed is listed twice"),
    ("--methods beta:0.1,vae", "unknown method 'vae'"),
    ("--methods beta:-0.1", "'beta:-0.1' needs a finite number > 0 after 'beta:'"),
    ("--methods beta:0.001,beta:0.0010000001", "two items name the same run, beta_0.001"),
    ("--train-subset 81",
     "--train-subset 81 is larger than the 80 training images there are after holding"),
    ("--test-subset 41", "--test-subset 41 is larger than the 40 test images"),
    ("--val-size 96", "--val-size 96 leaves no training images"),
    ("--train-subset 20", "--batch-size 32 is larger than the 20 training images"),
    ("--resume", "does not exist, so there is nothing to resume"),
    ("--report", "--report: no run files in"),
    ("--out " + os.devnull, "exists and is not a folder"),
    ("--out " + os.path.join(os.devnull, "sub"), "is not writable"),
    ("--shard 3/2", "--shard must be K/N"),
    ("--shard 1/2 --report", "separate modes"),
    ("--resume --overwrite", "choose one"),
    pytest.param("--device cuda", "this torch sees no CUDA device", marks=NO_CUDA),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
        data_dir, tmp_path, capsys, flags, message):
    assert message in refused(run_args(data_dir, tmp_path / "out", flags), capsys, tmp_path)

def test_help_shows_every_default_in_argparse_s_form(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bvb.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split()).split(" options: ")[1]
    assert exit_info.value.code == 0 and "--overwrite replace the results in --out --" in text
    for flag, default in (("--seeds", "[0]"), ("--train-subset", "0"),
                          ("--controlvae-ki", "0.0001"), ("--cache-dir", bvb.default_cache_dir())):
        help_of = re.search(re.escape(flag) + r" [A-Z_{]((?! --).)*", text).group(0)
        assert help_of.endswith(f"(default: {default})"), help_of

# ---------------------------------------- checkpoints, resume and shards

def test_atomic_write_keeps_the_old_file_when_a_write_breaks(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old")

    def broken(tmp):
        pathlib.Path(tmp).write_text("half")
        raise OSError("disk full")
    with pytest.raises(OSError):
        bvb.atomic_write(str(path), broken)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["summary.json"]

class OnMPSModel(torch.nn.Module):
    """No weights; its parameters say they are on Apple's MPS."""

    def parameters(self):
        return iter([types.SimpleNamespace(device=torch.device("mps"))])

def test_a_checkpoint_keeps_the_cpu_s_the_order_s_and_the_run_device_s_rng_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_rng_state", None)  # a CPU run leaves CUDA alone
    saved, restored = torch.tensor([7], dtype=torch.uint8), []
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: saved)
    monkeypatch.setattr(torch.mps, "set_rng_state", restored.append)
    order, method = torch.Generator().manual_seed(3), bvb.BetaVAE(0.1)
    optimizer = types.SimpleNamespace(state_dict=dict, load_state_dict=dict)
    cpu = dict(dict.fromkeys(bvb.RUN_STATE, 0), model=torch.nn.Linear(1, 1))
    for run, keys in ((cpu, ["order", "torch"]), (dict(cpu, model=OnMPSModel()),
                                                  ["mps", "order", "torch"])):
        state = bvb.checkpoint_state(run, optimizer, method, order, {}, False)
        assert sorted(state["rng"]) == keys
        bvb.restore_checkpoint(state, run, optimizer, method, order)
    assert restored == [saved]

STATEFUL = ("--epochs 3 --latent-dim 16 --methods geco,controlvae,bom --bom-squeeze-start 1 "
            "--no-plots")

def test_runs_stopped_mid_training_resume_to_the_same_metrics(
        data_dir, tmp_path, monkeypatch, capsys):
    """Ctrl-C right after epoch 1 of GECO, then of ControlVAE (λ, the integral have moved),
    then SIGTERM (SLURM's notice before pre-emption) after BOM's (a squeeze has moved),
    resuming each time: the same result as an uninterrupted run."""
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    bvb.main(run_args(data_dir, reference, STATEFUL))
    real_save, stopping, flags = bvb.save_checkpoint, [], ""

    def save(path, state):
        real_save(path, state)
        if os.path.basename(path) == "bom_seed0.pt" == f"{stopping[-1]}_seed0.pt":
            os.kill(os.getpid(), signal.SIGTERM)
        elif os.path.basename(path) == f"{stopping[-1]}_seed0.pt":
            raise KeyboardInterrupt
    monkeypatch.setattr(bvb, "save_checkpoint", save)
    for name, word, code in (("geco", "Interrupted", 130), ("controlvae", "Interrupted", 130),
                             ("bom", "Terminated", 143)):
        stopping.append(name)
        with pytest.raises(SystemExit) as exit_info:
            bvb.main(run_args(data_dir, stopped, STATEFUL + flags))
        err, flags = capsys.readouterr().err, " --resume"
        assert exit_info.value.code == code and f"{word}. Every completed epoch" in err
        assert err.strip().endswith("--no-plots --resume") and "Traceback" not in err
        state = torch.load(stopped / "checkpoints" / f"{name}_seed0.pt", weights_only=True)
        m = state["method"]
        moved = {"geco": float(m.get("lambda", 1.0)) != 1.0,
                 "controlvae": m.get("integral", 0.0) != 0.0,
                 "bom": m.get("constraints") != m.get("calibration")}
        assert not state["finished"] and len(state["history"]) == 1 and moved[name], name
    stopping.append("none")
    bvb.main(run_args(data_dir, stopped, STATEFUL + " --resume"))
    assert "bom: resuming after epoch 1" in capsys.readouterr().out
    for path in ("summary.json", *(f"runs/{name}_seed0.json" for name in stopping[:3])):
        assert without_timings(load(stopped / path)) == without_timings(load(reference / path))

class WritesAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))

def test_a_used_folder_is_refused_resumed_or_replaced_only_on_purpose(
        shared_out, data_dir, tmp_path, capsys):
    out = shutil.copytree(shared_out, tmp_path / "out")
    beta, bom = out / "runs" / "beta_0.001_seed0.json", out / "runs" / "bom_seed0.json"
    checkpoint, original = out / "checkpoints" / "beta_0.001_seed0.pt", load(beta)

    def refuses(flags):
        return refused(run_args(data_dir, out, f"{SHARED} {flags}"), capsys, tmp_path)
    assert f"--out {out} already holds results: give this run a fresh --out, add --resume to " \
           f"continue them, or --overwrite to replace them" in refuses("")
    assert "(iw_samples 3 in the one, 8 in the other)" in refuses("--resume --iw-samples 8")
    beta.unlink()  # as if killed before its run file: its finished checkpoint is checked
    assert (f"{checkpoint} was written with other settings (latent_dim 16 there, 8 now)"
            in refuses("--resume --latent-dim 8"))
    other = "0123456789ab" + "0" * 52
    torch.save(dict(torch.load(checkpoint, weights_only=True), script_sha256=other), checkpoint)
    assert (f"another version of bom_vs_beta.py (SHA-256 0123456789ab there, "
            f"{bvb.SCRIPT_SHA256[:12]} now): resume with that version, add --any-version"
            in refuses("--resume"))
    bom_file = bom.read_bytes()
    summary = bvb.main(run_args(data_dir, out, SHARED + " --resume --any-version"))
    printed, again = capsys.readouterr().out, load(beta)   # loaded, evaluated again
    assert "beta_0.001: finished earlier (ok), loaded from" in printed and "epoch 1/" not in printed
    assert "bom, seed 0: finished earlier, kept from" in printed and bom.read_bytes() == bom_file
    assert [again[k] for k in ("val", "test", "history")] == [
        original[k] for k in ("val", "test", "history")]
    assert again["resumed_from_script_sha256"] == other
    assert summary["script_versions"] == {bvb.SCRIPT_SHA256: 6}
    bom.unlink()   # its checkpoint is refused unread: loading runs no code (weights_only)
    path, marker = out / "checkpoints" / "bom_seed0.pt", tmp_path / "ran"
    torch.save({"fingerprint": WritesAFile(str(marker))}, path)
    assert f"checkpoint {path} is unreadable" in refuses("--resume")  # no marker
    beta.write_text("{broken")  # --overwrite replaces everything, unread, a stray folder too
    (out / "runs" / "stray").mkdir()
    bvb.main(run_args(data_dir, out, "--epochs 1 --latent-dim 16 --no-plots --methods beta:0.01 "
                                     "--overwrite"))
    assert os.listdir(out / "runs") == ["beta_0.01_seed0.json"]
    assert [p.name for p in (out / "checkpoints").glob("*.pt")] == ["beta_0.01_seed0.pt"]

def test_unreadable_or_disagreeing_run_files_are_one_line_and_change_nothing(
        shared_out, data_dir, tmp_path, capsys):
    out = shutil.copytree(shared_out, tmp_path / "out")
    run_file, experiment = out / "runs" / "beta_0.001_seed0.json", out / "experiment.json"
    record = load(run_file)
    sha = record["reference"]["classifier_sha256"]
    garbage = (b"\x00\xff not json", b'{"name": "beta_0.0', b"null")
    cases = [(g, mode) for g in garbage for mode in ("--report", SHARED + " --resume")]
    cases.append((json.dumps(dict(record, fingerprint="beta")).encode(), SHARED + " --resume"))
    for contents, mode in cases:
        run_file.write_bytes(contents)
        assert str(run_file) in refused(run_args(data_dir, out, mode), capsys, tmp_path)
    run_file.write_text(json.dumps(record))
    experiment.write_text("null")  # its own advice, not a run file's
    err = refused(run_args(data_dir, out, SHARED + " --resume"), capsys, tmp_path)
    assert "experiment.json is unreadable: move it away (the next command writes it" in err
    for key, value, differs in (  # --report refuses run files of two experiments
            ("classifier_sha256", "b" * 64, f"(classifier 'bbbbbbbbbbbb' in the one, '{sha[:12]}'"),
            ("iw_samples", 8, "(iw_samples 8 in the one, 3 in the other)")):
        record["reference" if key == "classifier_sha256" else "config"][key] = value
        run_file.write_text(json.dumps(record))
        err = refused(run_args(data_dir, out, "--report"), capsys, tmp_path)
        assert f"{run_file.parent / 'beta_0.001_seed1.json'} belong to different experiments " \
               f"{differs}" in err

def test_a_run_in_use_is_refused_to_a_second_process_but_a_shard_trains_beside_it(
        data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    one = "--epochs 1 --latent-dim 8 --methods beta:0.001,beta:0.1 --no-plots "
    locks = []  # the first process has claimed the folder and locked its runs
    experiment = bvb.plan_out(bvb.parse_args(run_args(data_dir, out, one)), locks)[-1]
    bvb.claim(str(out / "experiment.json"), experiment)
    for flags, message in (  # nothing deleted under the first
            ("--lr 5e-4 --shard 2/2", "(lr 0.001 in the one, 0.0005 in the other)"),
            ("--shard 2/2", f"beta_0.1_seed0 is being trained into {out} by another"),
            ("--overwrite", "beta_0.001_seed0 is being trained into"),
            ("--shard 1/2 --overwrite", "beta_0.001_seed0 is being trained into")):
        assert message in refused(run_args(data_dir, out, one + flags), capsys, tmp_path)
    locks[1].close()  # the first goes on with beta_0.001 alone, as shard 1/2 would
    assert "beta_0.001_seed0 is being trained into" in refused(run_args(  # nor under its others
        data_dir, out, one + "--overwrite --methods beta:0.1"), capsys, tmp_path)
    bvb.main(run_args(data_dir, out, one + "--shard 2/2"))  # shard 2/2 trains beside it
    assert os.listdir(out / "runs") == ["beta_0.1_seed0.json"]
    assert bvb.lock(str(out / "checkpoints" / "beta_0.001_seed0.lock")) is None  # the first's
    third = tmp_path / "third"  # a refused command makes no lock file
    bvb.plan_out(bvb.parse_args(run_args(data_dir, third, one + "--shard 2/2")), locks)
    refused(run_args(data_dir, third, one), capsys, tmp_path)
    assert os.listdir(third / "checkpoints") == ["beta_0.1_seed0.lock"]
    for handle in locks:
        handle.close()
    (third / "experiment.json").write_text(json.dumps(dict(experiment, classifier="0" * 12)))
    assert "(pass --cache-dir the folder's feature classifier) belong to different experiments " \
           "(classifier '000000000000' in the one" in refused(
        run_args(data_dir, third, one + "--resume"), capsys, tmp_path)

def test_a_run_another_process_finished_while_this_one_waited_is_kept(
        data_dir, tmp_path, monkeypatch):
    out, one, locks = tmp_path / "out", "--epochs 1 --latent-dim 8 --methods beta:0.001 ", []
    bvb.plan_out(bvb.parse_args(run_args(data_dir, out, one)), locks)   # a started folder
    locks.pop().close()
    lock_runs, run_file = bvb.lock_runs, out / "runs" / "beta_0.001_seed0.json"

    def finished_meanwhile(paths, held):
        run_file.write_text("{}")
        lock_runs(paths, held)
    monkeypatch.setattr(bvb, "lock_runs", finished_meanwhile)
    plan = bvb.plan_out(bvb.parse_args(run_args(data_dir, out, one + "--resume")), locks)
    assert plan[2] == {str(run_file)} and plan[3] == {}

def test_experiment_json_is_written_once_then_compared(tmp_path):
    path = str(tmp_path / "experiment.json")
    bvb.claim(path, {"lr": 1e-3})
    bvb.claim(path, {"lr": 1e-3})
    with pytest.raises(bvb.UsageError, match=r"\(lr 0.001 in the one, 0.0005 in the other\)"):
        bvb.claim(path, {"lr": 5e-4})
    assert load(path) == {"lr": 1e-3} and os.listdir(tmp_path) == ["experiment.json"]

def test_a_lock_on_a_file_removed_meanwhile_is_taken_again_on_the_file_there(
        tmp_path, monkeypatch):
    path, flock, removed = str(tmp_path / "run.lock"), bvb.fcntl.flock, []

    def flock_then_removed(handle, operation):   # a refused process removes it meanwhile
        flock(handle, operation)
        if not removed:
            removed.append(os.remove(path))
    monkeypatch.setattr(bvb.fcntl, "flock", flock_then_removed)
    handle = bvb.lock(path)
    assert removed and os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
    assert handle.created

def without_timings(summary):
    """What two invocations share: no config (their flags), no seconds."""
    if isinstance(summary, dict):
        return {k: without_timings(v) for k, v in summary.items()
                if "seconds" not in str(k) and k != "config"}
    if isinstance(summary, list):
        return [without_timings(v) for v in summary]
    return summary

def test_two_shards_and_a_report_from_their_run_files_alone_equal_the_shared_run(
        shared_out, data_dir, tmp_path, capsys):
    sharded = tmp_path / "r[1]{x}"  # the folder's name taken verbatim
    assert bvb.main(run_args(data_dir, sharded, SHARED + " --shard 1/2")) is None
    assert not (sharded / "summary.json").exists() and len(os.listdir(sharded / "runs")) == 3
    bvb.main(run_args(data_dir, sharded, SHARED + " --shard 2/2"))
    shutil.rmtree(sharded / "checkpoints")
    record = load(sharded / "runs" / "bom_seed0.json")
    del record["script_sha256"]  # a run file from before they carried it
    (sharded / "runs" / "bom_seed0.json").write_text(json.dumps(record))
    report = bvb.main(run_args(data_dir, sharded, SHARED + " --report"))
    assert report.pop("script_versions") == {bvb.SCRIPT_SHA256: 5, None: 1}
    assert (f"Run files by script version (SHA-256): {bvb.SCRIPT_SHA256[:12]} (5 of 6 runs), "
            f"not recorded (1 of 6 runs)") in capsys.readouterr().out
    whole = load(shared_out / "summary.json")
    del whole["script_versions"]
    assert json.dumps(bvb.json_safe(without_timings(report))) == json.dumps(
        without_timings(whole))
    for name in FIGURES:
        assert np.array_equal(mpimg.imread(sharded / name), mpimg.imread(shared_out / name)), name

# ---------------------------------------- benchmark

def test_benchmark_times_each_method_and_writes_benchmark_json(
        data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bvb, "BENCHMARK_STEPS", 2)
    monkeypatch.setattr(bvb, "BENCHMARK_REPEATS", 2)
    out = tmp_path / "bench"
    argv = run_args(data_dir, out, "--benchmark --latent-dim 16 --methods beta:0.001,bom "
                                   "--epochs 2 --seeds 0 1")
    report = bvb.main(argv)
    assert load(out / "benchmark.json") == json.loads(json.dumps(bvb.json_safe(report)))
    assert [len(row["repeats_ms"]) for row in report["methods"].values()] == [2, 2]
    assert "images/s" in capsys.readouterr().out and os.listdir(out) == ["benchmark.json"]
    assert "already holds results" in refused(argv, capsys, tmp_path)
    # known medians, 0.1 s and 0.25 s a step: 2 seeds x 2 epochs x ceil(80/32) = 6 steps
    timings = {("beta", 0.001): [0.1, 0.1, 0.1], ("bom", None): [0.4, 0.2, 0.25]}
    monkeypatch.setattr(bvb, "time_training",
                        lambda spec, images, args, steps, repeats: timings[spec])
    report = bvb.main([*argv, "--overwrite"])
    bom = report["methods"]["bom"]
    assert (bom["ms_per_step"], bom["images_per_s"]) == approx((250.0, 128.0))
    assert bom["repeats_ms"] == approx([400.0, 200.0, 250.0])
    assert report["estimated_training_seconds"] == approx(2 * 6 * (0.1 + 0.25))
    args = bvb.parse_args(argv)  # the start-up estimate: 3 β runs
    splits = bvb.load_splits(args, CPU)
    assert bvb.training_seconds(splits, args, 3) == approx(3 * 6 * 0.1)

def test_the_readme_lists_the_script_s_sections_in_the_file_s_order():
    script = pathlib.Path(HERE, "bom_vs_beta.py").read_text(encoding="utf-8")
    readme = pathlib.Path(HERE, "README.md").read_text(encoding="utf-8")
    layout = readme.split("## Reading the script")[1].split("\n## ")[0]
    rows = re.findall(r"^\| (.+?) \|", layout, re.M)[2:]  # after the header and its rule
    assert len(rows) >= 10 and rows == re.findall(r"^# -{20,} (.+)$", script, re.M)

# ---------------------------------------- the file as a notebook cell

def test_the_file_run_as_a_script_parses_argv_but_in_a_cell_ignores_it_and_hints_a_call(
        tmp_path, monkeypatch, capsys):
    source = pathlib.Path(HERE, "bom_vs_beta.py").read_text()
    assert bvb.SCRIPT_SHA256 == hashlib.sha256(source.encode()).hexdigest()
    monkeypatch.setattr(sys, "argv", ["bom_vs_beta.py", "--methods", "beta:", "--out",
                                      str(tmp_path / "out")])  # its __main__ block, here
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(os.path.join(HERE, "bom_vs_beta.py"), run_name="__main__")
    assert exit_info.value.code == 2 and capsys.readouterr().err == (
        "bom_vs_beta.py: error: --methods: 'beta:' needs a finite number > 0 after 'beta:'\n")
    # pasted into a cell under a kernel's argv, where ./data has no MNIST and no download
    # works: the default run stops at one line; the folders the download made are gone

    def offline(self):  # as torchvision's does: the folder first, then the download
        os.makedirs(self.raw_folder, exist_ok=True)
        raise RuntimeError("no download in this test")
    monkeypatch.setattr(datasets.MNIST, "download", offline)
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "/root/kernel-1234.json"])
    assert bvb.resume_command(bvb.parse_args()) == "main(['--resume'])"  # a cell's main()
    argv = ["--epochs", "2", "--out", "it's here", "--overwrite", "--device", "cpu"]
    hint = bvb.resume_command(bvb.parse_args(argv))
    again = ["--epochs", "2", "--out", "it's here", "--device", "cpu", "--resume"]
    assert hint.startswith("main([") and ast.literal_eval(hint[5:-1]) == again
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("mine")
    before = tree(tmp_path)
    cell_name, namespace = "<ipython-input-7-0123456789ab>", {"__name__": "__main__"}
    monkeypatch.setitem(linecache.cache, cell_name, (0, None, source.splitlines(True), cell_name))
    with pytest.raises(SystemExit) as exit_info:
        exec(compile(source, cell_name, "exec"), namespace)
    assert namespace["SCRIPT_SHA256"] == bvb.SCRIPT_SHA256  # the cell's text: the file's
    err = capsys.readouterr().err.strip()
    raw = os.path.join(str(tmp_path), "data", "MNIST", "raw")
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"bom_vs_beta.py: error: MNIST not found in {raw}")
    assert err.endswith("in DIR/MNIST/raw/ and pass --data-dir DIR")
    assert tree(tmp_path) == before  # no results/ either
    monkeypatch.delitem(sys.modules, "ipykernel")
    assert shlex.split(bvb.resume_command(bvb.parse_args(argv))) == [
        "python", "bom_vs_beta.py", *again]
