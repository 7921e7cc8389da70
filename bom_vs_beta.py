"""BOM-VAE vs β-VAE on MNIST (64x64): does BOM match or beat β-VAE without tuning β?

BOM (Bottleneck Optimization) maximizes the worst of several normalized constraint
scores (MSE, KL box, sharpness) and tightens the constraints with an adaptive squeeze.
β-VAE minimizes mean MSE + β·mean KL for a grid of β. Both train the same conv VAE
in one shared loop; test metrics, tables, four figures and a computed analysis land in --out.

    python bom_vs_beta.py --epochs 20 --device cuda          # the full comparison
    python bom_vs_beta.py --epochs 2 --train-subset 6400     # a quick look on a CPU
    main(["--epochs", "2"])                                  # from a notebook cell
"""
import argparse
import csv
import io
import json
import math
import os
import platform
import random
import shlex
import shutil
import statistics
import sys
import time
from contextlib import redirect_stderr, redirect_stdout

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode
from tqdm.auto import tqdm

# ----------------------------------------------------------------------------- config

DEFAULT_METHODS = "beta:0.0001,beta:0.001,beta:0.01,beta:0.1,bom"
IMAGE_SIZE = 64                 # MNIST's 28x28 digits are resized to 64x64 (bilinear)
GRAD_CLIP = 1.0                 # max global grad norm, as in the seed
EVAL_BATCH = 256                # evaluation batch (metrics are per image, so any size gives the same means)
CURVE_BLOCK = 10                # training curves store means of 10 steps (fewer in epochs under 100 steps)
LOG_EVERY = 20                  # live progress-bar values are read every 20 steps
# BOM defaults, all from the seed
CALIBRATION_BATCHES = 50        # batches of the untrained model that set the initial constraints
KL_TARGETS_PER_DIM = (0.390625, 0.625, 1.171875)  # KL box targets (low, optimum, high) per latent dim
SQUEEZE_K = 0.5                 # squeeze gain: factor = 1 - (s_min - 0.5) * k
SQUEEZE_THRESHOLD = 0.5         # no squeeze while the epoch's mean s_min is at or below this
SQUEEZE_MIN_FACTOR = 0.5        # never tighten by more than half in one epoch
SQUEEZE_START_EPOCH = 3         # first epoch whose end may squeeze
# the other tuning-free methods
GECO_ALPHA = 0.99               # GECO: moving average of the constraint
GECO_LAMBDA_RANGE = (1e-3, 1e6)  # GECO: λ is clamped to this range
CONTROLVAE_BETA_RANGE = (0.0, 1.0)  # ControlVAE: β_min, β_max
SIGMA_LOG_MIN = -6.0            # σ-VAE / free bits: log σ soft-clipped from below
IMAGE_PIXELS = IMAGE_SIZE * IMAGE_SIZE
ALL_BETAS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1)
TUNING_FREE = ("bom", "geco", "controlvae", "sigma_vae", "freebits")
MNIST_RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                   "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit status 2, nothing written."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def build_parser():
    p = OneLineParser(prog="bom_vs_beta.py", description="BOM-VAE vs β-VAE on MNIST resized to 64x64.")
    p.add_argument("--epochs", type=int, default=20, help="training epochs per run (seed: 20)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="where to train; auto picks cuda, then mps, then cpu")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma list of runs: beta:<β> (loss = MSE + β·KL), bom, geco, controlvae, sigma_vae, "
                        "freebits; 'all' = β in 1e-6..0.1 and every tuning-free method")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds weights, batch order and sampling; every method gets the same start")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size (seed: 64)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (seed: 1e-3)")
    p.add_argument("--latent-dim", type=int, default=128, help="latent dimensions (seed: 128)")
    p.add_argument("--data-dir", default="./data",
                   help="folder holding MNIST/raw/ (downloaded there when missing)")
    p.add_argument("--out", default="results", help="folder for tables, run histories and figures")
    p.add_argument("--train-subset", type=int, default=0, help="train on the first N images (0 = all 60,000)")
    p.add_argument("--test-subset", type=int, default=0, help="test on the first N images (0 = all 10,000)")
    p.add_argument("--geco-tolerance", type=float, default=0.01,
                   help="GECO: the per-pixel MSE it must reach (its remaining hyperparameter)")
    p.add_argument("--geco-rate", type=float, default=0.01, help="GECO: λ ← λ·exp(rate·C_ma) per batch")
    p.add_argument("--controlvae-kl", type=float, default=None,
                   help="ControlVAE: KL set point in nats (default: BOM's KL optimum target, 0.625 per latent dim)")
    p.add_argument("--controlvae-kp", type=float, default=0.01, help="ControlVAE: proportional gain")
    p.add_argument("--controlvae-ki", type=float, default=0.0001, help="ControlVAE: integral gain")
    p.add_argument("--freebits-lambda", type=float, default=0.25, help="free bits: KL floor per latent dim (nats)")
    p.add_argument("--no-plots", action="store_true", help="skip the four figures")
    p.add_argument("--resume", action="store_true",
                   help="continue the runs checkpointed in --out/checkpoints; finished runs are not retrained")
    p.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (epoch lines still print)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast for the network (metrics and loss stay fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model before training")
    p.add_argument("--benchmark", action="store_true",
                   help="time training steps of each method, the seed's pipeline and the compute ceiling; "
                        "writes benchmark.json instead of training")
    p.add_argument("--benchmark-steps", type=int, default=50, help="timed training steps per repeat")
    p.add_argument("--benchmark-repeats", type=int, default=3, help="repeats per measurement (median reported)")
    return p


def parse_methods(text):
    """'beta:0.001,bom' -> [('beta', 0.001), ('bom', None)]; 'all' is every β of ALL_BETAS and every
    tuning-free method; raises UsageError on anything else."""
    specs = []
    items = [s.strip() for s in text.split(",")]
    if "all" in items:
        i = items.index("all")
        items[i:i + 1] = [f"beta:{b:g}" for b in ALL_BETAS] + list(TUNING_FREE)
    for item in items:
        if item in TUNING_FREE:
            spec = (item, None)
        elif item.startswith("beta:"):
            try:
                beta = float(item[5:])
            except ValueError:
                raise UsageError(f"--methods: '{item}' needs a number after 'beta:'") from None
            if not (math.isfinite(beta) and beta > 0):
                raise UsageError(f"--methods: β must be a finite number > 0, got '{item}'")
            spec = ("beta", beta)
        else:
            raise UsageError(f"--methods: unknown method '{item}' (use beta:<β>, {', '.join(TUNING_FREE)} or all)")
        if spec in specs:
            raise UsageError(f"--methods: '{item}' is listed twice")
        specs.append(spec)
    return specs


def resolve_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available to this torch")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: MPS is not available on this machine")
    return torch.device(name)


def parse_args(argv=None):
    """Parse and check flags. In a notebook the kernel's own argv is ignored (argv=None -> defaults)."""
    if argv is None:
        argv = [] if "ipykernel" in sys.modules else sys.argv[1:]
    args = build_parser().parse_args(argv)
    args.argv = list(argv)
    for flag, value, low in (("--epochs", args.epochs, 1), ("--batch-size", args.batch_size, 1),
                             ("--latent-dim", args.latent_dim, 1), ("--train-subset", args.train_subset, 0),
                             ("--test-subset", args.test_subset, 0), ("--benchmark-steps", args.benchmark_steps, 1),
                             ("--benchmark-repeats", args.benchmark_repeats, 1)):
        if value < low:
            raise UsageError(f"{flag} must be >= {low}, got {value}")
    for flag, value in (("--lr", args.lr), ("--geco-tolerance", args.geco_tolerance), ("--geco-rate", args.geco_rate),
                        ("--controlvae-kp", args.controlvae_kp), ("--controlvae-ki", args.controlvae_ki),
                        ("--freebits-lambda", args.freebits_lambda),
                        ("--controlvae-kl", 1.0 if args.controlvae_kl is None else args.controlvae_kl)):
        if not (math.isfinite(value) and value > 0):
            raise UsageError(f"{flag} must be a finite number > 0, got {value}")
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the results in --out, --overwrite replaces them: choose one")
    args.method_specs = parse_methods(args.methods)
    args.torch_device = resolve_device(args.device)
    return args


def seed_everything(seed):
    """One place for every random source: python, numpy, torch (CPU and GPU)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

# ----------------------------------------------------------------------------- data


def load_mnist(data_dir, train, subset):
    """MNIST digits as uint8 (N, 1, 64, 64), resized once (bilinear, byte-identical to PIL's Resize(64))."""
    raw = os.path.join(data_dir, "MNIST", "raw")
    present = all(os.path.isfile(os.path.join(raw, name)) for name in MNIST_RAW_FILES)
    log = io.StringIO()
    try:
        with redirect_stdout(log), redirect_stderr(log):
            ds = datasets.MNIST(data_dir, train=train, download=True)
    except Exception as e:
        if present:
            raise UsageError(f"could not read MNIST from {os.path.abspath(raw)}: {e}".replace("\n", " ")) from None
        raise UsageError(f"MNIST not found in {os.path.abspath(raw)} and could not be downloaded: "
                         f"put the four raw files there ({', '.join(MNIST_RAW_FILES)}) "
                         f"or point --data-dir at their parent folder") from None
    digits = ds.data
    if subset > len(digits):
        raise UsageError(f"--{'train' if train else 'test'}-subset {subset} is larger than the "
                         f"{len(digits)} images there are")
    if subset:
        digits = digits[:subset]
    return TF.resize(digits.unsqueeze(1), [IMAGE_SIZE, IMAGE_SIZE],
                     interpolation=InterpolationMode.BILINEAR, antialias=True)


def batches(images, batch_size, generator=None):
    """Float batches in [0, 1] from resident uint8 images; shuffled when a generator is given.
    The last batch may be smaller, as with a DataLoader's default drop_last=False."""
    n = images.shape[0]
    order = torch.randperm(n, generator=generator).to(images.device) if generator is not None else None
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size] if order is not None else slice(start, start + batch_size)
        yield images[idx].float().div_(255)

# ----------------------------------------------------------------------------- model


class VAE(nn.Module):
    """The seed's conv VAE: 4 stride-2 convs (32-64-128-256, GroupNorm(8), LeakyReLU(0.2)) to a
    latent of latent_dim, mirrored transposed convs back to a sigmoid 64x64 image."""

    def __init__(self, latent_dim=128):
        super().__init__()
        self.latent_dim = latent_dim
        self.enc = nn.Sequential(
            nn.Conv2d(1, 32, 3, 2, 1), nn.GroupNorm(8, 32), nn.LeakyReLU(0.2),
            nn.Conv2d(32, 64, 3, 2, 1), nn.GroupNorm(8, 64), nn.LeakyReLU(0.2),
            nn.Conv2d(64, 128, 3, 2, 1), nn.GroupNorm(8, 128), nn.LeakyReLU(0.2),
            nn.Conv2d(128, 256, 3, 2, 1), nn.GroupNorm(8, 256), nn.LeakyReLU(0.2),
        )
        self.fc_mu = nn.Linear(256 * 4 * 4, latent_dim)
        self.fc_logvar = nn.Linear(256 * 4 * 4, latent_dim)
        self.fc_dec = nn.Linear(latent_dim, 256 * 4 * 4)
        self.dec = nn.Sequential(
            nn.ConvTranspose2d(256, 128, 3, 2, 1, 1), nn.GroupNorm(8, 128), nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(128, 64, 3, 2, 1, 1), nn.GroupNorm(8, 64), nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(64, 32, 3, 2, 1, 1), nn.GroupNorm(8, 32), nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(32, 1, 3, 2, 1, 1), nn.Sigmoid(),
        )

    def decode(self, z):
        return self.dec(self.fc_dec(z).view(-1, 256, 4, 4))

    def forward(self, x):
        """Returns (reconstruction, μ, log σ²); z is sampled in train and eval mode alike, as in the seed."""
        h = self.enc(x).flatten(1)
        mu, logvar = self.fc_mu(h), self.fc_logvar(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decode(z), mu, logvar

def new_model(latent_dim, device):
    """A fresh VAE on device; channels_last on the CPU, where it measured 1.2x faster (oneDNN convolutions)."""
    model = VAE(latent_dim).to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cpu" else model


def new_optimizer(model, lr):
    """Adam; the fused kernel where torch has one (measured 5% faster per step on the CPU)."""
    device = next(model.parameters()).device
    return torch.optim.Adam(model.parameters(), lr=lr, fused=device.type in ("cpu", "cuda"))

# ----------------------------------------------------------------------------- metrics


def sharpness(images):
    """Per image: (mean |x[i, j+1] − x[i, j]| + mean |x[i+1, j] − x[i, j]|) / 2."""
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().mean((1, 2, 3))
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().mean((1, 2, 3))
    return (dx + dy) / 2


def kl_per_dim(mu, logvar):
    """KL(q(z_d|x) || N(0, 1)) = −½ (1 + log σ²_d − μ²_d − σ²_d), per image and latent dimension."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())


def vae_metrics(x, x_recon, mu, logvar):
    """Per image: MSE = mean over pixels; KL = Σ_d KL_d; sharpness."""
    mse = (x_recon - x).pow(2).flatten(1).mean(1)
    return mse, kl_per_dim(mu, logvar).sum(1), sharpness(x_recon)


def forward_metrics(model, x, amp=False):
    """One forward pass -> per image (MSE, KL, sharpness) and per-dimension KL; with amp the network runs
    in bf16, metrics in fp32."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        x_recon, mu, logvar = model(x)
    mu, logvar = mu.float(), logvar.float()
    return (*vae_metrics(x, x_recon.float(), mu, logvar), kl_per_dim(mu, logvar))

# ----------------------------------------------------------------------------- constraint scores


def lower_better_score(value, floor):
    """(floor − value) / floor: 1 at value 0, 0 at the floor, negative past it (MSE)."""
    return (floor - value) / floor


def higher_better_score(value, ceiling):
    """value / ceiling: 0 at value 0, 1 at the ceiling (sharpness)."""
    return value / ceiling


def box_score(value, floor_low, optimum, floor_high):
    """min(left ramp, right ramp): 1 at the optimum, 0 at both floors, negative outside the box (KL)."""
    left = (value - floor_low) / (optimum - floor_low)
    right = (floor_high - value) / (floor_high - optimum)
    return torch.minimum(left, right)


def constraint_scores(mse, kl, sharp, c):
    """Scores (N, 3) in the order BOTTLENECKS, under constraints c (a dict of floats)."""
    return torch.stack([lower_better_score(mse, c["mse_floor"]),
                        box_score(kl, c["kl_floor_low"], c["kl_optimum"], c["kl_floor_high"]),
                        higher_better_score(sharp, c["sharp_ceiling"])], dim=1)


BOTTLENECKS = ("mse", "kl", "sharp")


@torch.no_grad()
def calibrate(model, batch_iter, n_batches=CALIBRATION_BATCHES):
    """Initial constraints from the untrained model on n_batches: mse_floor = 2·max MSE,
    kl box = [0.1·min KL, mean KL, 50·max KL], sharp_ceiling = mean sharpness."""
    model.train()
    mse, kl, sharp = [], [], []
    for i, x in enumerate(batch_iter):
        if i >= n_batches:
            break
        m, k, s, _ = forward_metrics(model, x)
        mse.append(m), kl.append(k), sharp.append(s)
    mse, kl, sharp = torch.cat(mse), torch.cat(kl), torch.cat(sharp)
    return {"mse_floor": 2.0 * mse.max().item(), "kl_floor_low": 0.1 * kl.min().item(),
            "kl_optimum": kl.mean().item(), "kl_floor_high": 50.0 * kl.max().item(),
            "sharp_ceiling": sharp.mean().item()}


def squeeze_factor(s_min, k=SQUEEZE_K, threshold=SQUEEZE_THRESHOLD, min_factor=SQUEEZE_MIN_FACTOR):
    """max(min_factor, 1 − (s_min − threshold)·k) when s_min > threshold, else 1.0 (no squeeze)."""
    if not s_min > threshold:
        return 1.0
    return max(min_factor, 1.0 - (s_min - threshold) * k)


def squeeze(c, factor, kl_targets):
    """mse_floor ← factor·mse_floor; each KL box edge moves the fraction (1 − factor) of its distance
    to its target (low, optimum, high), so it approaches the target and never passes it."""
    out = dict(c, mse_floor=c["mse_floor"] * factor)
    for key, target in zip(("kl_floor_low", "kl_optimum", "kl_floor_high"), kl_targets):
        out[key] = c[key] + (target - c[key]) * (1.0 - factor)
    return out

# ----------------------------------------------------------------------------- methods
# A method is its per-batch loss plus its per-epoch update; train_run() is the one loop for all.
# batch_loss returns (loss, skip, logs): skip is None or a bool tensor (True = no optimizer step),
# logs are tensors summed over the epoch on the device.


class Method:
    """Defaults: no calibration, no per-epoch update, no state. `logged` names per-batch values whose
    epoch means go into the history."""

    logged = ()

    def setup(self, model, images, batch_size, seed):
        pass

    def end_epoch(self, epoch, sums):
        return {key: sums[key] / sums["batches"] for key in self.logged}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def config(self):
        return {"method": self.kind, **self.settings()}


class BetaVAE(Method):
    """β-VAE: loss = mean MSE + β·mean KL."""

    kind = "beta"

    def __init__(self, beta):
        self.beta = beta
        self.name = f"beta_{beta:g}"

    def settings(self):
        return {"beta": self.beta}

    def batch_loss(self, mse, kl, sharp, kl_dims):
        return mse.mean() + self.beta * kl.mean(), None, {}


class BOMVAE(Method):
    """BOM-VAE: loss = −mean log(min(MSE score, KL box score, sharpness score)); a batch with any
    score ≤ 0 is skipped; from epoch 3 the constraints are squeezed when the epoch's mean s_min > 0.5."""

    kind = name = "bom"

    def __init__(self, latent_dim):
        self.kl_targets = tuple(t * latent_dim for t in KL_TARGETS_PER_DIM)
        self.constraints = None
        self.calibration = None

    def settings(self):
        return {"kl_targets": list(self.kl_targets), "squeeze_k": SQUEEZE_K, "squeeze_threshold": SQUEEZE_THRESHOLD,
                "squeeze_min_factor": SQUEEZE_MIN_FACTOR, "squeeze_start_epoch": SQUEEZE_START_EPOCH,
                "calibration_batches": CALIBRATION_BATCHES}

    def setup(self, model, images, batch_size, seed):
        calib_order = torch.Generator().manual_seed(seed + 1)   # leaves the training order untouched
        self.calibration = calibrate(model, batches(images, batch_size, calib_order))
        self.constraints = dict(self.calibration)
        c = self.calibration
        print(f"  calibration: mse_floor={c['mse_floor']:.4f}, kl_box=[{c['kl_floor_low']:.1f}, "
              f"{c['kl_optimum']:.1f}, {c['kl_floor_high']:.1f}], sharp_ceiling={c['sharp_ceiling']:.4f}")
        if c["kl_floor_high"] < self.kl_targets[2]:
            print(f"  warning: KL upper floor {c['kl_floor_high']:.1f} is below its target "
                  f"{self.kl_targets[2]:.1f}; the squeeze will widen it")

    def batch_loss(self, mse, kl, sharp, kl_dims):
        scores = constraint_scores(mse, kl, sharp, self.constraints)
        s_min, worst = scores.min(dim=1)
        violated = s_min <= 0
        skip = violated.any()
        loss = -torch.log(s_min.clamp_min(1e-12)).mean()
        logs = {"s_min": s_min.mean(), "s_min_stepped": torch.where(skip, 0.0, s_min.mean()),
                "violations": violated.sum(), "skipped": skip.long(),
                "bottleneck_counts": torch.bincount(worst, minlength=3)}
        return loss, skip, logs

    def end_epoch(self, epoch, sums):
        """Squeeze once per epoch from the mean s_min of the batches that stepped."""
        steps = sums["steps"]
        s_min = sums["s_min_stepped"] / steps if steps else 0.0   # the seed's mean over stepped batches
        used = dict(self.constraints)
        factor = squeeze_factor(s_min) if epoch >= SQUEEZE_START_EPOCH else 1.0
        if factor < 1.0:
            self.constraints = squeeze(self.constraints, factor, self.kl_targets)
        counts = sums["bottleneck_counts"]
        return {"s_min": s_min, "violations": int(sums["violations"]), "skipped_batches": int(sums["skipped"]),
                "bottleneck_counts": dict(zip(BOTTLENECKS, (int(v) for v in counts))),
                "constraints": used, "squeeze_factor": factor}

    def state_dict(self):
        return {"calibration": self.calibration, "constraints": self.constraints}

    def load_state_dict(self, state):
        self.calibration, self.constraints = state["calibration"], state["constraints"]

    def config(self):
        return dict(super().config(), calibration=self.calibration)


class GECO(Method):
    """GECO (Rezende & Viola 2018): minimize KL subject to MSE ≤ tolerance. With the batch constraint
    C = mean MSE / tolerance − 1: loss = mean KL + λ·C; after each batch C_ma ← α·C_ma + (1 − α)·C and
    λ ← clamp(λ·exp(rate·C_ma)), λ starting at 1 (λ grows while C_ma > 0, shrinks while C_ma < 0)."""

    kind = name = "geco"
    logged = ("lambda", "constraint")

    def __init__(self, tolerance, rate):
        self.tolerance, self.rate = tolerance, rate
        self.lam, self.c_ma = 1.0, None

    def settings(self):
        return {"tolerance": self.tolerance, "rate": self.rate, "alpha": GECO_ALPHA,
                "lambda_range": list(GECO_LAMBDA_RANGE)}

    def batch_loss(self, mse, kl, sharp, kl_dims):
        constraint = mse.mean() / self.tolerance - 1
        lam = torch.as_tensor(self.lam, device=mse.device)
        c = constraint.detach()
        self.c_ma = c if self.c_ma is None else GECO_ALPHA * self.c_ma + (1 - GECO_ALPHA) * c
        self.lam = (lam * torch.exp(self.rate * self.c_ma)).clamp(*GECO_LAMBDA_RANGE)
        return kl.mean() + lam * constraint, None, {"lambda": lam, "constraint": c}

    def state_dict(self):
        return {"lambda": float(self.lam), "c_ma": None if self.c_ma is None else float(self.c_ma)}

    def load_state_dict(self, state):
        self.lam, self.c_ma = state["lambda"], state["c_ma"]


class ControlVAE(Method):
    """ControlVAE (Shao et al. 2020): loss = mean Σ_pixels (x̂ − x)² + β(t)·mean KL, β from a PI controller
    on e(t) = KL_target − KL(t): β = Kp/(1 + exp(e)) + I + β_min, with I ← I − Ki·e only while β stays
    inside [β_min, β_max] (anti-windup), and β clipped to that range."""

    kind = name = "controlvae"
    logged = ("beta", "kl_error")

    def __init__(self, kl_target, kp, ki):
        self.kl_target, self.kp, self.ki = kl_target, kp, ki
        self.integral = 0.0

    def settings(self):
        return {"kl_target": self.kl_target, "kp": self.kp, "ki": self.ki, "beta_range": list(CONTROLVAE_BETA_RANGE)}

    def beta(self, kl_mean):
        """One controller step from the batch's mean KL; returns (β, error)."""
        beta_min, beta_max = CONTROLVAE_BETA_RANGE
        error = self.kl_target - kl_mean
        integral = self.integral - self.ki * error
        raw = self.kp / (1 + torch.exp(error)) + integral + beta_min
        self.integral = torch.where((raw >= beta_min) & (raw <= beta_max), integral, self.integral)
        return raw.clamp(beta_min, beta_max), error

    def batch_loss(self, mse, kl, sharp, kl_dims):
        beta, error = self.beta(kl.mean().detach())
        return IMAGE_PIXELS * mse.mean() + beta * kl.mean(), None, {"beta": beta, "kl_error": error}

    def state_dict(self):
        return {"integral": float(self.integral)}

    def load_state_dict(self, state):
        self.integral = state["integral"]


def gaussian_nll(mse):
    """Per-image Gaussian NLL summed over the D pixels, one σ shared by the batch at its optimum
    σ² = batch MSE (log σ soft-clipped at −6): D·(½·MSE_i/σ² + log σ + ½·log 2π). Returns (NLL, σ²)."""
    log_sigma = 0.5 * torch.log(mse.mean())
    log_sigma = SIGMA_LOG_MIN + nn.functional.softplus(log_sigma - SIGMA_LOG_MIN)
    sigma2 = torch.exp(2 * log_sigma)
    return IMAGE_PIXELS * (0.5 * mse / sigma2 + log_sigma + 0.5 * math.log(2 * math.pi)), sigma2


class SigmaVAE(Method):
    """σ-VAE (Rybkin et al. 2021), calibrated decoder with the optimal shared σ: loss = mean NLL + mean KL."""

    kind = name = "sigma_vae"
    logged = ("sigma2",)

    def settings(self):
        return {"log_sigma_min": SIGMA_LOG_MIN}

    def batch_loss(self, mse, kl, sharp, kl_dims):
        nll, sigma2 = gaussian_nll(mse)
        return nll.mean() + kl.mean(), None, {"sigma2": sigma2.detach()}


class FreeBits(Method):
    """Free bits (Kingma et al. 2016) on the σ-VAE likelihood: loss = mean NLL + Σ_d max(λ, batch-mean KL_d);
    a latent dimension below λ nats gets no KL gradient."""

    kind = name = "freebits"
    logged = ("sigma2", "dims_below_lambda")

    def __init__(self, lam):
        self.lam = lam

    def settings(self):
        return {"lambda": self.lam, "log_sigma_min": SIGMA_LOG_MIN}

    def batch_loss(self, mse, kl, sharp, kl_dims):
        nll, sigma2 = gaussian_nll(mse)
        kl_per_dim = kl_dims.mean(0)
        return (nll.mean() + kl_per_dim.clamp(min=self.lam).sum(), None,
                {"sigma2": sigma2.detach(), "dims_below_lambda": (kl_per_dim < self.lam).sum()})


def make_method(spec, args):
    kind, value = spec
    if kind == "beta":
        return BetaVAE(value)
    if kind == "bom":
        return BOMVAE(args.latent_dim)
    if kind == "geco":
        return GECO(args.geco_tolerance, args.geco_rate)
    if kind == "controlvae":
        kl_target = args.controlvae_kl if args.controlvae_kl is not None else KL_TARGETS_PER_DIM[1] * args.latent_dim
        return ControlVAE(kl_target, args.controlvae_kp, args.controlvae_ki)
    if kind == "sigma_vae":
        return SigmaVAE()
    return FreeBits(args.freebits_lambda)


def run_fingerprint(method, args, n_train):
    """The settings a run's checkpoint must share with the command that resumes it."""
    return {"method": method.name, "method_settings": method.settings(), "seed": args.seed, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
            "latent_dim": args.latent_dim, "train_images": n_train, "amp": args.amp}


def weights_finite(model):
    return bool(torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all())


def train_run(method, images, args, checkpoint=None, resume_from=None):
    """Train one VAE with `method`; returns its model, per-epoch history, training curve, train seconds and
    status: ok | stalled (an epoch skipped every batch) | diverged (a non-finite loss or weight, caught
    within the epoch). With `checkpoint` (a path) the full state is saved after every epoch;
    `resume_from` (a loaded checkpoint) continues after its last completed epoch."""
    seed_everything(args.seed)
    model = new_model(args.latent_dim, images.device)
    forward = torch.compile(model) if args.compile else model
    optimizer = new_optimizer(model, args.lr)
    order = torch.Generator().manual_seed(args.seed)
    run = {"model": model, "history": [], "curve": [], "status": "ok", "diverged_at": None, "train_seconds": 0.0}
    if resume_from is None:
        method.setup(model, images, args.batch_size, args.seed)
    else:
        restore_checkpoint(resume_from, run, optimizer, method, order)
        if resume_from["finished"]:
            print(f"  {method.name}: finished earlier ({run['status']}), loaded from {checkpoint}")
            return run
        print(f"  {method.name}: resuming after epoch {len(run['history'])} from {checkpoint}")
    fingerprint = run_fingerprint(method, args, images.shape[0])
    n_batches = math.ceil(images.shape[0] / args.batch_size)
    for epoch in range(len(run["history"]) + 1, args.epochs + 1):
        start = time.time()
        model.train()
        sums, steps, stepped_loss, step_metrics = {}, 0, 0.0, []
        first_bad_step = torch.zeros((), dtype=torch.long, device=images.device)   # 0 = none yet
        bar = tqdm(total=n_batches, desc=f"{method.name} epoch {epoch}/{args.epochs}",
                   leave=False, disable=args.no_progress)
        for i, x in enumerate(batches(images, args.batch_size, order)):
            mse, kl, sharp, kl_dims = forward_metrics(forward, x, args.amp)
            loss, skip, logs = method.batch_loss(mse, kl, sharp, kl_dims)
            batch_means = torch.stack([mse.mean(), kl.mean(), sharp.mean()]).detach()
            step_metrics.append(batch_means)
            for key, value in logs.items():
                sums[key] = sums.get(key, 0) + value.detach()
            if skip is None or not skip:               # BOM's violating batch takes no optimizer step
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
                optimizer.step()
                steps += 1
                stepped_loss = stepped_loss + loss.detach()
                bad = ~torch.isfinite(loss.detach()) & (first_bad_step == 0)
                first_bad_step = torch.where(bad, i + 1, first_bad_step)
            if (i + 1) % LOG_EVERY == 0 or i + 1 == n_batches:     # the only host syncs inside an epoch
                bar.set_postfix(loss=f"{loss.item():.4f}", mse=f"{batch_means[0].item():.4f}",
                                kl=f"{batch_means[1].item():.1f}",
                                **({"s_min": f"{logs['s_min'].item():.3f}"} if "s_min" in logs else {}))
                if first_bad_step.item() or not weights_finite(model):
                    run["diverged_at"] = {"epoch": epoch, "step": first_bad_step.item() or i + 1}
                    break
            bar.update(1)
        bar.close()
        run["train_seconds"] += time.time() - start
        if run["diverged_at"] is not None:
            run["status"] = "diverged"
            print(f"  {method.name}: diverged (non-finite loss or weights) in epoch {epoch} at step "
                  f"{run['diverged_at']['step']}; the comparison goes on without it")
            if checkpoint:
                mark_diverged(checkpoint, run, fingerprint)
            break

        per_step = torch.stack(step_metrics).cpu()
        epoch_means = per_step.mean(0).tolist()
        sums = {k: (v.cpu().tolist() if v.dim() else v.item()) for k, v in sums.items()}
        sums.update(steps=steps, batches=n_batches)
        row = {"epoch": epoch, "loss": float(stepped_loss) / steps if steps else float("nan"),
               "mse": epoch_means[0], "kl": epoch_means[1], "sharp": epoch_means[2], "steps": steps}
        row.update(method.end_epoch(epoch, sums))
        run["history"].append(row)
        block_size = max(1, min(CURVE_BLOCK, n_batches // 10))
        for b in range(0, n_batches, block_size):
            block = per_step[b:b + block_size]
            run["curve"].append([epoch - 1 + (b + block.shape[0] / 2) / n_batches] + block.mean(0).tolist())
        print(epoch_line(method.name, row, args.epochs))
        if steps == 0:
            run["status"] = "stalled"
            print(f"  {method.name}: stalled (every batch of epoch {epoch} violated a constraint); "
                  f"the comparison goes on without it")
        if checkpoint:
            finished = run["status"] != "ok" or epoch == args.epochs
            save_checkpoint(checkpoint, checkpoint_state(run, optimizer, method, order, fingerprint, finished))
        if run["status"] != "ok":
            break
    return run


def epoch_line(name, row, epochs):
    text = (f"  [{name}] epoch {row['epoch']}/{epochs}: loss={row['loss']:.4f} mse={row['mse']:.4f} "
            f"kl={row['kl']:.1f} sharp={row['sharp']:.4f}")
    if "s_min" in row:
        c = row["constraints"]
        text += (f" s_min={row['s_min']:.3f} skipped={row['skipped_batches']} violations={row['violations']}"
                 f" mse_floor={c['mse_floor']:.4f} kl_box=[{c['kl_floor_low']:.1f}, {c['kl_optimum']:.1f},"
                 f" {c['kl_floor_high']:.1f}] squeeze={row['squeeze_factor']:.3f}")
    return text

# ----------------------------------------------------------------------------- checkpoints


def atomic_write(path, write):
    """write(tmp) then rename over path: a crash mid-write never leaves a half-written file behind."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def checkpoint_state(run, optimizer, method, order, fingerprint, finished):
    """Everything a resumed run needs to continue exactly: weights, optimizer, method state, RNG states."""
    rng = {"torch": torch.get_rng_state(), "order": order.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return {"fingerprint": fingerprint, "finished": finished, "status": run["status"],
            "diverged_at": run["diverged_at"], "history": run["history"], "curve": run["curve"],
            "train_seconds": run["train_seconds"], "model": run["model"].state_dict(),
            "optimizer": optimizer.state_dict(), "method": method.state_dict(), "rng": rng}


def save_checkpoint(path, state):
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path, fingerprint):
    """A checkpoint's state, loaded as data only (weights_only: no code from the file runs); UsageError
    when it is unreadable or was written with other settings than `fingerprint`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = state["fingerprint"]
    except Exception as e:
        raise UsageError(f"checkpoint {path} is unreadable ({type(e).__name__}); "
                         f"delete it or rerun with --overwrite") from None
    differs = [f"{k} {saved.get(k)!r} there, {v!r} now" for k, v in fingerprint.items() if saved.get(k) != v]
    if differs:
        raise UsageError(f"checkpoint {path} was written with other settings ({'; '.join(differs)}): "
                         f"use another --out, or --overwrite to start again")
    return state


def restore_checkpoint(state, run, optimizer, method, order):
    run.update({k: state[k] for k in ("history", "curve", "status", "diverged_at", "train_seconds")})
    if "model" in state:            # a run that diverged in its first epoch has no good weights to keep
        run["model"].load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        method.load_state_dict(state["method"])
        torch.set_rng_state(state["rng"]["torch"])
        order.set_state(state["rng"]["order"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["rng"]["cuda"])


def mark_diverged(path, run, fingerprint):
    """Record the divergence in the checkpoint and keep its last good weights."""
    state = torch.load(path, map_location="cpu", weights_only=True) if os.path.exists(path) else {}
    state.update(fingerprint=fingerprint, finished=True, status="diverged", diverged_at=run["diverged_at"],
                 history=run["history"], curve=run["curve"], train_seconds=run["train_seconds"])
    save_checkpoint(path, state)

# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model, images, seed):
    """Mean test MSE, KL and sharpness per image (z sampled from q(z|x), seeded so every model sees the same noise)."""
    model.eval()
    torch.manual_seed(seed)
    totals = torch.zeros(3, device=images.device)
    for x in batches(images, EVAL_BATCH):
        mse, kl, sharp, _ = forward_metrics(model, x)
        totals += torch.stack([mse.sum(), kl.sum(), sharp.sum()])
    mse, kl, sharp = (totals / images.shape[0]).tolist()
    return {"mse": mse, "kl": kl, "sharp": sharp}


def data_sharpness(images):
    """Mean sharpness of the images themselves: a reconstruction sharper than this is noise, not detail."""
    total = sum(sharpness(x).sum().item() for x in batches(images, EVAL_BATCH))
    return total / images.shape[0]

# ----------------------------------------------------------------------------- benchmark


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def machine_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    return f"{model}, {torch.get_num_threads()} threads"


def time_steps(step, device, steps, repeats):
    """Seconds per step of `repeats` blocks of `steps` calls of step(), after 3 warm-up calls."""
    for _ in range(3):
        step()
    sync(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        seconds.append((time.perf_counter() - start) / steps)
    return seconds


def time_seed_pipeline(args, device):
    """The seed's own pipeline, as the reference: a DataLoader running PIL Resize(64) + ToTensor on every
    image (shuffled, 2 workers), a β-VAE step on the plain model, and the seed's nine .item() calls per step."""
    data = datasets.MNIST(args.data_dir, train=True, download=False,
                          transform=transforms.Compose([transforms.Resize(IMAGE_SIZE), transforms.ToTensor()]))
    if args.train_subset:
        data = Subset(data, range(min(args.train_subset, len(data))))
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, num_workers=2)
    seed_everything(args.seed)
    model = VAE(args.latent_dim).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    history = []

    def endless():
        while True:
            yield from loader
    loader_batches = endless()

    def step():
        x = next(loader_batches)[0].to(device)
        optimizer.zero_grad()
        mse, kl, sharp, _ = forward_metrics(model, x)
        loss = mse.mean() + 1e-3 * kl.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        history.append([t.item() for t in (loss, mse.mean(), kl.mean(),            # epoch lists
                                           mse.mean(), kl.mean(), sharp.mean(),    # per-step history
                                           loss, mse.mean(), kl.mean())])          # progress bar
    return time_steps(step, device, args.benchmark_steps, args.benchmark_repeats)


def time_compute_ceiling(images, args):
    """Forward + backward + clip + Adam on one resident batch: the model's own speed, nothing else."""
    seed_everything(args.seed)
    model = new_model(args.latent_dim, images.device)
    forward = torch.compile(model) if args.compile else model
    optimizer = new_optimizer(model, args.lr)
    x = next(batches(images[:args.batch_size], args.batch_size))

    def step():
        mse, kl, _, _ = forward_metrics(forward, x, args.amp)
        loss = mse.mean() + 1e-3 * kl.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
    return time_steps(step, images.device, args.benchmark_steps, args.benchmark_repeats)


def time_training(spec, images, args):
    """Seconds per step of the real training loop (train_run, one epoch of --benchmark-steps batches)."""
    steps = min(args.benchmark_steps, math.ceil(images.shape[0] / args.batch_size))
    subset = images[:steps * args.batch_size]
    quiet = argparse.Namespace(**dict(vars(args), epochs=1, no_progress=True))
    with redirect_stdout(io.StringIO()):
        train_run(make_method(spec, args), subset[:3 * args.batch_size], quiet)   # warm-up
        return [train_run(make_method(spec, args), subset, quiet)["train_seconds"] / steps
                for _ in range(args.benchmark_repeats)]


def run_benchmark(args, train_images, test_images):
    """Print and save ms/step and images/s of each method, the seed's pipeline and the compute ceiling,
    and estimate the wall time of the whole comparison with these flags."""
    device = train_images.device
    print(f"Benchmark on {machine_name(device)} ({device}), torch {torch.__version__}, batch {args.batch_size}, "
          f"median of {args.benchmark_repeats} x {args.benchmark_steps} steps")
    timings = {"seed pipeline (reference)": time_seed_pipeline(args, device),
               "compute ceiling": time_compute_ceiling(train_images, args)}
    for spec in args.method_specs:
        timings[make_method(spec, args).name] = time_training(spec, train_images, args)
    eval_images = test_images[:2000]
    start = time.perf_counter()
    evaluate(new_model(args.latent_dim, device), eval_images, args.seed)
    sync(device)
    eval_seconds = (time.perf_counter() - start) * test_images.shape[0] / eval_images.shape[0]

    medians = {name: statistics.median(t) for name, t in timings.items()}
    ref, ceiling = medians["seed pipeline (reference)"], medians["compute ceiling"]
    rows = {name: {"ms_per_step": 1000 * m, "images_per_s": args.batch_size / m, "vs_seed": ref / m,
                   "vs_ceiling": ceiling / m, "repeats_ms": [1000 * t for t in timings[name]]}
            for name, m in medians.items()}
    print(f"{'path':<28} {'ms/step':>9} {'images/s':>9} {'vs seed':>8} {'vs ceiling':>11}")
    for name, r in rows.items():
        print(f"{name:<28} {r['ms_per_step']:>9.1f} {r['images_per_s']:>9.1f} {r['vs_seed']:>7.2f}x "
              f"{r['vs_ceiling']:>10.0%}")
    steps_per_run = args.epochs * math.ceil(train_images.shape[0] / args.batch_size)
    methods = [make_method(spec, args).name for spec in args.method_specs]
    estimate = sum(medians[name] * steps_per_run + eval_seconds for name in methods)
    seed_estimate = len(methods) * ref * steps_per_run
    print(f"Estimated wall time of this comparison ({len(methods)} runs x {steps_per_run} steps + evaluation): "
          f"{estimate / 60:.1f} min; the seed's pipeline would train for {seed_estimate / 60:.1f} min")
    report = {"machine": machine_name(device), "device": str(device), "torch": torch.__version__,
              "flags": {k: v for k, v in vars(args).items() if k not in ("method_specs", "torch_device")},
              "paths": rows, "eval_seconds_per_run": eval_seconds,
              "estimated_comparison_seconds": estimate, "seed_pipeline_training_seconds": seed_estimate}
    write_json(os.path.join(args.out, "benchmark.json"), report)
    return report

# ----------------------------------------------------------------------------- report


def json_safe(obj):
    """Non-finite floats become null so the files stay valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_text(path, text):
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            f.write(text)
    atomic_write(path, write)


def write_json(path, obj):
    write_text(path, json.dumps(json_safe(obj), indent=1))


def fmt(value, digits):
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


SUMMARY_FIELDS = ("method", "seed", "test_mse", "test_kl", "test_sharp", "train_seconds", "status")


def balanced_score(row):
    """The seed's balanced score: 1/(MSE + 0.001) · 1/(|KL − 100| + 10) · sharpness (peaks at KL = 100)."""
    return 1.0 / (row["test_mse"] + 0.001) * 1.0 / (abs(row["test_kl"] - 100) + 10) * row["test_sharp"]


def relative(a, b):
    return f"{100 * (a - b) / b:+.1f}%"


def analysis(rows):
    """The seed's analysis, computed: best β by test MSE, balanced score, BOM vs the best β."""
    betas = [r for r in rows if r["method"].startswith("beta_") and r["status"] == "ok"]
    bom = next((r for r in rows if r["method"] == "bom"), None)
    lines = []
    not_ok = [f"{r['method']} ({r['status']})" for r in rows if r["status"] not in ("ok", "reference")]
    if not_ok:
        lines.append(f"Runs left out of the comparison: {', '.join(not_ok)}.")
    if betas:
        best = min(betas, key=lambda r: r["test_mse"])
        lines.append(f"Best β-VAE by test MSE: {best['method']} (MSE={best['test_mse']:.4f}).")
    if bom is not None and bom["status"] == "ok":
        lines.append(f"BOM-VAE: MSE={bom['test_mse']:.4f}, KL={bom['test_kl']:.1f}, sharpness={bom['test_sharp']:.4f}.")
    if betas:
        best_bal = max(betas, key=balanced_score)
        lines.append(f"Best β-VAE by balanced score: {best_bal['method']} (score={balanced_score(best_bal):.4f}).")
    if betas and bom is not None and bom["status"] == "ok":
        lines.append(f"BOM-VAE balanced score: {balanced_score(bom):.4f}.")
        mse_verdict = "lower (better)" if bom["test_mse"] < best["test_mse"] else "not lower"
        bal_verdict = "higher (better)" if balanced_score(bom) > balanced_score(best_bal) else "not higher"
        lines.append(f"BOM vs best β by MSE ({best['method']}): MSE {relative(bom['test_mse'], best['test_mse'])}"
                     f" ({mse_verdict}), KL {bom['test_kl']:.1f} vs {best['test_kl']:.1f},"
                     f" sharpness {bom['test_sharp']:.4f} vs {best['test_sharp']:.4f}.")
        lines.append(f"BOM vs best β by balanced score ({best_bal['method']}): "
                     f"{balanced_score(bom):.4f} vs {balanced_score(best_bal):.4f} ({bal_verdict}).")
    return lines


def write_summary(out, rows, config, lines):
    write_json(os.path.join(out, "summary.json"), {"config": config, "runs": rows, "analysis": lines})
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=SUMMARY_FIELDS)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r[k] is None else r[k]) for k in SUMMARY_FIELDS})
    write_text(os.path.join(out, "summary.csv"), table.getvalue())
    md = ["# BOM-VAE vs β-VAE: test metrics", "",
          f"epochs={config['epochs']}, seed={config['seed']}, train images={config['train_images']}, "
          f"test images={config['test_images']}, device={config['device']}", "",
          "| method | seed | MSE ↓ | KL | sharpness | train s | status |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['method']} | {'' if r['seed'] is None else r['seed']} | {fmt(r['test_mse'], 4)} | {fmt(r['test_kl'], 1)} | "
                  f"{fmt(r['test_sharp'], 4)} | {fmt(r['train_seconds'], 1)} | {r['status']} |")
    md += ["", "`data` is the test images' own sharpness: a reconstruction sharper than it is noise, not detail.",
           "", "## Analysis", ""] + [f"- {line}" for line in lines]
    write_text(os.path.join(out, "summary.md"), "\n".join(md) + "\n")
    print_table(rows)


def print_table(rows):
    print("\n" + "=" * 72 + "\nFINAL RESULTS (test set)\n" + "=" * 72)
    print(f"{'method':<16} {'MSE':>10} {'KL':>10} {'sharpness':>10} {'train s':>9}  status")
    for r in rows:
        print(f"{r['method']:<16} {fmt(r['test_mse'], 4):>10} {fmt(r['test_kl'], 1):>10} "
              f"{fmt(r['test_sharp'], 4):>10} {fmt(r['train_seconds'], 1):>9}  {r['status']}")


def finish_figure(fig, path):
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=150, format="png"))
    if "ipykernel" in sys.modules:
        plt.show()
    plt.close(fig)


def plot_training(runs, data_sharp, path):
    """Training MSE (log), KL and sharpness per block of steps, x in epochs; data sharpness as a line."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, run in runs.items():
        curve = np.array(run["curve"], dtype=float).reshape(-1, 4)
        marker = "o" if len(curve) < 30 else None
        for ax, col in zip(axes, (1, 2, 3)):
            ax.plot(curve[:, 0], curve[:, col], label=name, alpha=0.8, marker=marker, ms=3)
    axes[2].axhline(data_sharp, color="black", ls="--", lw=1, label="data")
    for ax, title in zip(axes, ("MSE (↓ better)", "KL divergence", "Sharpness (data = dashed)")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    finish_figure(fig, path)


PARETO_MARKERS = {"bom": "o", "geco": "^", "controlvae": "v", "sigma_vae": "D", "freebits": "P"}


def plot_pareto(rows, data_sharp, path):
    """Test MSE vs KL per run; β runs as squares, BOM a circle, the other tuning-free methods their own
    markers; sharpness (vs the data's) in the labels."""
    fig, ax = plt.subplots(figsize=(10, 6))
    runs = [r for r in rows if r["status"] == "ok"]
    colors = plt.cm.viridis(np.linspace(0, 1, max(len(runs), 1)))
    for r, color in zip(runs, colors):
        marker = PARETO_MARKERS.get(r["method"], "s")                   # β runs are squares
        ax.scatter(r["test_mse"], r["test_kl"], s=110 if r["method"] == "bom" else 60, c=[color], marker=marker,
                   edgecolors="black", label=f"{r['method']} (sharp {r['test_sharp']:.4f})")
    ax.set_xlabel("test MSE (↓ better)")
    ax.set_ylabel("test KL (moderate is better)")
    ax.set_title(f"Pareto front: MSE vs KL (data sharpness {data_sharp:.4f})")
    ax.legend()
    ax.grid(True, alpha=0.3)
    finish_figure(fig, path)


def image_grid(rows_of_images, labels, title, path):
    """Rows of 8 grayscale images on one fixed [0, 1] scale, so no row is contrast-stretched."""
    n = len(rows_of_images)
    fig, axes = plt.subplots(n, 8, figsize=(16, 2 * n), squeeze=False)
    for row, (images, label) in enumerate(zip(rows_of_images, labels)):
        for i in range(8):
            ax = axes[row, i]
            if i < images.shape[0]:
                ax.imshow(images[i, 0].float().cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
        axes[row, 0].set_ylabel(label, fontsize=11)
    if title:
        fig.suptitle(title, fontsize=14)
    finish_figure(fig, path)


@torch.no_grad()
def plot_images(runs, test_images, seed, latent_dim, out):
    originals = next(batches(test_images[:8], 8))
    recons, samples = [], []
    torch.manual_seed(seed)
    z = torch.randn(8, latent_dim, device=test_images.device)
    for run in runs.values():
        run["model"].eval()
        recons.append(run["model"](originals)[0])
        samples.append(run["model"].decode(z))
    names = list(runs)
    image_grid([originals] + recons, ["original"] + names, "Reconstructions of the first 8 test images",
               os.path.join(out, "reconstructions_comparison.png"))
    image_grid(samples, names, "Samples from the prior (same z for all models)",
               os.path.join(out, "samples_comparison.png"))

# ----------------------------------------------------------------------------- main


RESULT_PATHS = ("summary.json", "summary.csv", "summary.md", "runs", "checkpoints", "training_comparison.png",
                "pareto_comparison.png", "reconstructions_comparison.png", "samples_comparison.png")


def check_inputs(args, n_train):
    """Checks that need the data or --out; returns the result paths in --out that --overwrite replaces."""
    if args.batch_size > n_train:
        raise UsageError(f"--batch-size {args.batch_size} is larger than the {n_train} training images")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} exists and is not a folder")
    owned = ("benchmark.json",) if args.benchmark else RESULT_PATHS
    existing = [p for p in owned if os.path.exists(os.path.join(args.out, p))]
    if existing and not (args.resume or args.overwrite):
        raise UsageError(f"--out {args.out} already holds results ({', '.join(existing)}): "
                         f"add --resume to continue them or --overwrite to replace them")
    return existing if args.overwrite else []


def prepare_out(args, replaced):
    """Create --out (and runs/, checkpoints/) after removing what --overwrite replaces; UsageError if unwritable."""
    try:
        for name in replaced:
            path = os.path.join(args.out, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        for sub in ([] if args.benchmark else ["runs", "checkpoints"]):
            os.makedirs(os.path.join(args.out, sub), exist_ok=True)
        os.makedirs(args.out, exist_ok=True)
        atomic_write(os.path.join(args.out, ".write-test"), lambda tmp: open(tmp, "w").close())
        os.remove(os.path.join(args.out, ".write-test"))
    except OSError as e:
        raise UsageError(f"--out {args.out} is not writable ({e.strerror})") from None


def resume_command(args):
    argv = [a for a in args.argv if a not in ("--overwrite", "--resume")] + ["--resume"]
    if "ipykernel" in sys.modules:
        return f"main({argv!r})"
    return " ".join(["python", "bom_vs_beta.py"] + [shlex.quote(a) for a in argv])


def main(argv=None):
    """Run the comparison (or --benchmark); returns the summary rows (or the benchmark report).
    Bad input exits with status 2 before anything is written; Ctrl-C keeps every completed epoch."""
    try:
        args = parse_args(argv)
        device = args.torch_device
        train_images = load_mnist(args.data_dir, True, args.train_subset).to(device)
        test_images = load_mnist(args.data_dir, False, args.test_subset).to(device)
        replaced = check_inputs(args, train_images.shape[0])
        methods = [make_method(spec, args) for spec in args.method_specs]
        checkpoints = {m.name: os.path.join(args.out, "checkpoints", f"{m.name}_seed{args.seed}.pt") for m in methods}
        resume_states = {m.name: load_checkpoint(checkpoints[m.name], run_fingerprint(m, args, train_images.shape[0]))
                         for m in methods if args.resume and os.path.exists(checkpoints[m.name])}
        prepare_out(args, replaced)
    except UsageError as e:
        print(f"bom_vs_beta.py: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.benchmark:
        return run_benchmark(args, train_images, test_images)
    try:
        return run_comparison(args, methods, train_images, test_images, checkpoints, resume_states)
    except KeyboardInterrupt:
        print(f"\nInterrupted. Every completed epoch is saved in {os.path.join(args.out, 'checkpoints')}; "
              f"resume with:\n  {resume_command(args)}", file=sys.stderr)
        raise SystemExit(130) from None


def run_comparison(args, methods, train_images, test_images, checkpoints, resume_states):
    device = train_images.device
    config = {k: v for k, v in vars(args).items() if k not in ("method_specs", "torch_device", "argv")}
    config.update(device=str(device), torch=torch.__version__, train_images=train_images.shape[0],
                  test_images=test_images.shape[0])
    print(f"Device: {device} | train {train_images.shape[0]} images, test {test_images.shape[0]} images, "
          f"{args.epochs} epochs, seed {args.seed}")

    runs, rows = {}, []
    for method in methods:
        print(f"\n{'=' * 60}\nTraining {method.name}\n{'=' * 60}")
        run = train_run(method, train_images, args, checkpoints[method.name], resume_states.get(method.name))
        if run["status"] == "diverged":
            test = {"mse": float("nan"), "kl": float("nan"), "sharp": float("nan")}
        else:
            test = evaluate(run["model"], test_images, args.seed)
        print(f"  test: MSE={test['mse']:.4f}, KL={test['kl']:.1f}, sharpness={test['sharp']:.4f} "
              f"({run['train_seconds']:.1f} s, {run['status']})")
        runs[method.name] = run
        rows.append({"method": method.name, "seed": args.seed, "test_mse": test["mse"], "test_kl": test["kl"],
                     "test_sharp": test["sharp"], "train_seconds": run["train_seconds"], "status": run["status"]})
        write_json(os.path.join(args.out, "runs", f"{method.name}_seed{args.seed}.json"),
                   {"config": dict(config, **method.config()), "status": run["status"],
                    "diverged_at": run["diverged_at"], "test": test, "train_seconds": run["train_seconds"],
                    "history": run["history"],
                    "curve": {"columns": ["epoch", "mse", "kl", "sharp"], "values": run["curve"]}})

    data_sharp = data_sharpness(test_images)
    rows.append({"method": "data", "seed": None, "test_mse": None, "test_kl": None, "test_sharp": data_sharp,
                 "train_seconds": None, "status": "reference"})
    lines = analysis(rows)
    write_summary(args.out, rows, config, lines)
    print("\nANALYSIS")
    for line in lines:
        print(f"  {line}")
    if not args.no_plots:
        plot_training(runs, data_sharp, os.path.join(args.out, "training_comparison.png"))
        plot_pareto(rows, data_sharp, os.path.join(args.out, "pareto_comparison.png"))
        plot_images({name: run for name, run in runs.items() if run["status"] != "diverged"},
                    test_images, args.seed, args.latent_dim, args.out)
    print(f"\nWrote {os.path.abspath(args.out)}")
    return rows


if __name__ == "__main__":
    main()
