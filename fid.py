"""
FID of DiT/DiffFit samples: the TF 2015-12-05 Inception (pool3, 2048-d), statistics files, the Fréchet distance.
FID: Heusel et al. 2017, arXiv:1706.08500; the `clean` resize: Parmar et al. 2022 (clean-fid), arXiv:2104.11222.

    python fid.py samples/ --ref food101                          # a folder (or .npz) of samples vs a dataset
    python fid.py food101 --save-stats food101_clean.npz          # cache a reference's statistics once
    python fid.py samples.npz food101_clean.npz                   # any two of: folder, samples .npz, statistics .npz, dataset
    python fid.py samples/ --ref toy --split test --mode toy      # the toy world: the toy judge's features, NOT comparable with FIDs

Weights: pt_inception-2015-12-05-6726825d.pth from --weights, $FID_INCEPTION_WEIGHTS, the torch.hub cache, or --download.
"""
import argparse
import hashlib
import json
import os
import re
import sys
import warnings

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import toy
from files import atomic_write, check_flags, download, exit_interrupted, load_arrays, load_file, unwritable
from prepare import DATASETS, image_files, open_dataset, rgb

# -----------------------------------------------------------------------------
parser = argparse.ArgumentParser(description="FID between any two of: image folder, samples .npz, statistics .npz, dataset name.")
# inputs
parser.add_argument("inputs", nargs="+",
                    help="one or two of: an image folder (recursive), a samples .npz (arr_0: uint8 N,H,W,3), a statistics .npz, a dataset name")
parser.add_argument("--ref", default=None, help="the reference to score against (same kinds as the inputs), e.g. food101")
parser.add_argument("--split", default="train", help="split of a named dataset (default: %(default)s)")
parser.add_argument("--image-size", type=int, default=256,
                    help="resolution a named dataset is centre-cropped to (the toy's are their own) (default: %(default)s)")
parser.add_argument("--data-dir", default="data", help="where named datasets live (as for train.py) (default: %(default)s)")
parser.add_argument("--save-stats", default=None, metavar="OUT.npz", help="write the statistics of the one input to OUT.npz instead of scoring")
# features
parser.add_argument("--mode", default="clean", choices=["clean", "legacy_pytorch", "toy"],
                    help="clean: clean-fid's antialiased resize; legacy_pytorch: exactly pytorch-fid; "
                         "toy: the toy judge's features (toy.py), not comparable with published FIDs. ADM's reference batches "
                         "(legacy_tensorflow: TF's resize) need ADM's evaluator (default: %(default)s)")
parser.add_argument("--weights", default=None, help="path of pt_inception-2015-12-05-6726825d.pth (default: $FID_INCEPTION_WEIGHTS, then the torch.hub cache)")
parser.add_argument("--download", action="store_true", help="download the Inception weights if they are not found")
parser.add_argument("--allow-mode-mismatch", action="store_true", help="compare statistics made in different modes anyway")
# compute
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device of the Inception network (default: %(default)s)")
parser.add_argument("--batch-size", type=int, default=50, help="images per forward pass (default: %(default)s)")
parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader processes (decode + resize) (default: %(default)s)")

def die(msg):
    """Bad input: one `error:` line and exit code 2, as in every script here."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)

parser.error = lambda msg: die(f"{msg} (see --help)")  # argparse's own complaints as one line too, without the usage block

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"  # torch.hub convention: 6726825d starts its SHA-256
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_NAME
WEIGHTS_URL_ALT = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"

# -----------------------------------------------------------------------------
# the FID Inception: torchvision's Inception3 names (so the .pth loads strictly), TF's pooling quirks

class Conv(nn.Module):
    """conv (no bias) -> BatchNorm (TF's eps 0.001) -> ReLU, the unit every block is made of."""
    def __init__(self, c_in, c_out, k, s=1, p=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, s, p, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))

def avg_pool(x):  # TF averages over the valid pixels only: count_include_pad=False (torchvision counts the padding)
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)

def max_pool(x):  # Mixed_7c pools with max, a quirk of the TF graph
    return F.max_pool2d(x, 3, 1, 1)

class InceptionA(nn.Module):  # Mixed_5b/5c/5d, 35x35
    def __init__(self, c_in, pool_features):
        super().__init__()
        self.branch1x1 = Conv(c_in, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = Conv(c_in, 48, 1), Conv(48, 64, 5, p=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3 = Conv(c_in, 64, 1), Conv(64, 96, 3, p=1), Conv(96, 96, 3, p=1)
        self.branch_pool = Conv(c_in, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))), self.branch_pool(avg_pool(x))], 1)

class InceptionB(nn.Module):  # Mixed_6a, 35x35 -> 17x17
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3 = Conv(c_in, 384, 3, s=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3 = Conv(c_in, 64, 1), Conv(64, 96, 3, p=1), Conv(96, 96, 3, s=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))), F.max_pool2d(x, 3, 2)], 1)

class InceptionC(nn.Module):  # Mixed_6b..6e, 17x17, factorised 7x7 convs
    def __init__(self, c_in, c7):
        super().__init__()
        self.branch1x1 = Conv(c_in, 192, 1)
        self.branch7x7_1, self.branch7x7_2, self.branch7x7_3 = Conv(c_in, c7, 1), Conv(c7, c7, (1, 7), p=(0, 3)), Conv(c7, 192, (7, 1), p=(3, 0))
        self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3 = Conv(c_in, c7, 1), Conv(c7, c7, (7, 1), p=(3, 0)), Conv(c7, c7, (1, 7), p=(0, 3))
        self.branch7x7dbl_4, self.branch7x7dbl_5 = Conv(c7, c7, (7, 1), p=(3, 0)), Conv(c7, 192, (1, 7), p=(0, 3))
        self.branch_pool = Conv(c_in, 192, 1)

    def forward(self, x):
        d = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        return torch.cat([self.branch1x1(x), self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                          self.branch7x7dbl_5(self.branch7x7dbl_4(d)), self.branch_pool(avg_pool(x))], 1)

class InceptionD(nn.Module):  # Mixed_7a, 17x17 -> 8x8
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = Conv(c_in, 192, 1), Conv(192, 320, 3, s=2)
        self.branch7x7x3_1, self.branch7x7x3_2 = Conv(c_in, 192, 1), Conv(192, 192, (1, 7), p=(0, 3))
        self.branch7x7x3_3, self.branch7x7x3_4 = Conv(192, 192, (7, 1), p=(3, 0)), Conv(192, 192, 3, s=2)

    def forward(self, x):
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b, F.max_pool2d(x, 3, 2)], 1)

class InceptionE(nn.Module):  # Mixed_7b/7c, 8x8, split 1x3 / 3x1 convs
    def __init__(self, c_in, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = Conv(c_in, 320, 1)
        self.branch3x3_1, self.branch3x3_2a, self.branch3x3_2b = Conv(c_in, 384, 1), Conv(384, 384, (1, 3), p=(0, 1)), Conv(384, 384, (3, 1), p=(1, 0))
        self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(c_in, 448, 1), Conv(448, 384, 3, p=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = Conv(384, 384, (1, 3), p=(0, 1)), Conv(384, 384, (3, 1), p=(1, 0))
        self.branch_pool = Conv(c_in, 192, 1)

    def forward(self, x):
        a, d = self.branch3x3_1(x), self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(self.pool(x))], 1)

class FIDInception(nn.Module):
    """Inception-v3 as in TF's 2015-12-05 graph; forward maps a normalised (N, 3, 299, 299) batch to pool3 (N, 2048)."""
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3 = Conv(3, 32, 3, s=2), Conv(32, 32, 3), Conv(32, 64, 3, p=1)
        self.Conv2d_3b_1x1, self.Conv2d_4a_3x3 = Conv(64, 80, 1), Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e = (InceptionC(768, c7) for c7 in (128, 160, 160, 192))
        self.Mixed_7a, self.Mixed_7b, self.Mixed_7c = InceptionD(768), InceptionE(1280, avg_pool), InceptionE(2048, max_pool)
        self.fc = nn.Linear(2048, 1008)  # TF's 1008-way softmax; unused by FID, kept so the file loads strictly

    def forward(self, x):
        x = F.max_pool2d(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))), 3, 2)  # (N, 64, 73, 73)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, 2)                     # (N, 192, 35, 35)
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))                     # (N, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))                     # (N, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))                                    # (N, 2048, 8, 8)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)                                         # (N, 2048) pool3

def load_inception(weights=None, download_ok=False, device="cpu"):
    """The FID Inception with the 2015-12-05 weights from: weights, else $FID_INCEPTION_WEIGHTS, else the torch.hub cache (pytorch-fid's)."""
    path = weights or os.environ.get("FID_INCEPTION_WEIGHTS") or os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_NAME)
    if not os.path.isfile(path):
        if not download_ok:
            raise FileNotFoundError(f"FID Inception weights not found at {path}: download {WEIGHTS_URL} (or {WEIGHTS_URL_ALT}) "
                               f"there, or pass --weights / set $FID_INCEPTION_WEIGHTS, or use --download")
        download(WEIGHTS_URL, path, sha256="6726825d")
    sd = load_file(path, "FID Inception weights")
    sd = sd[0] if isinstance(sd, tuple) else sd
    net = FIDInception()  # a plain dict without num_batches_tracked loads strictly (BatchNorm fills them in)
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")} if isinstance(sd, dict) else {}
    ref = {k: v.shape for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    bad = sorted(ref.keys() ^ sd.keys()) + [k for k in ref if k in sd and getattr(sd[k], "shape", None) != ref[k]]
    if bad:
        raise ValueError(f"FID Inception weights {path}: not the 2015-12-05 Inception ({len(bad)} tensors missing, unexpected or "
                         f"misshapen, e.g. {bad[0]}): use {WEIGHTS_NAME} from {WEIGHTS_URL}")
    net.load_state_dict(sd, strict=True)
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if not digest.startswith("6726825d"):
        warnings.warn(f"{path} has SHA-256 {digest[:8]}..., not 6726825d...: not the standard FID weights, FIDs are not comparable")
    net.weights = f"{os.path.basename(path)} sha256:{digest[:16]}"  # recorded in statistics files
    return net.eval().requires_grad_(False).to(device)

# -----------------------------------------------------------------------------
# images -> features

def preprocess(img, mode):
    """uint8 (H, W, 3) -> the network's input: (3, 299, 299) float32 normalised as the mode prescribes (toy: unchanged)."""
    if mode == "clean":  # clean-fid: each channel a float32 PIL image, bicubic (antialiased) to 299, clipped, not re-quantised
        x = np.stack([np.asarray(Image.fromarray(img[..., c].astype(np.float32), "F").resize((299, 299), Image.BICUBIC)) for c in range(3)])
        return (torch.from_numpy(x).clamp(0, 255) - 128) / 128
    x = torch.from_numpy(np.array(img))  # a copy: decoded images are read-only
    if mode == "toy":
        return x
    x = x.permute(2, 0, 1)[None].float() / 255  # legacy_pytorch: pytorch-fid's ops (bilinear, no antialias, then 2x - 1)
    return 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)[0] - 1

class Images(torch.utils.data.Dataset):
    """Network inputs from image files, a uint8 (N, H, W, 3) array, or a dataset of (uint8 (3, H, W), label)."""
    def __init__(self, items, mode):
        self.items, self.mode = items, mode

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        """The input, or why it was skipped: an image that does not decode (train.py and prepare.py skip those too)."""
        item = self.items[i]
        if item is None:  # prepare's ImageDataset: unreadable, and reported there
            return f"image {i} of the dataset"
        if isinstance(item, str):
            try:
                with Image.open(item) as f:
                    img = np.asarray(rgb(f))  # as training reads it (upright, 16-bit scaled); decoding fails here if truncated
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                return f"{item}: {e}"
        elif isinstance(item, (tuple, list)):  # (uint8 image (3, H, W), label) from prepare.open_dataset
            img = item[0].permute(1, 2, 0).numpy()
        else:
            img = np.asarray(item)
        return preprocess(img, self.mode)

def readable(batch):
    """DataLoader collate_fn for Images: (the inputs that decoded; why each of the others was skipped)."""
    return [x for x in batch if not isinstance(x, str)], [x for x in batch if isinstance(x, str)]

@torch.inference_mode()
def get_features(images, mode, net=None, batch_size=50, num_workers=0, device="cpu"):
    """Features (N, d) float64 of any of the sources Images takes, in batches on device. Unreadable images are skipped
    and reported in one line; none readable is a ValueError."""
    loader = torch.utils.data.DataLoader(Images(images, mode), batch_size=batch_size, num_workers=num_workers, collate_fn=readable)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # TF32 shifts features by ~1e-3
    feats, skipped, sizes = [], [], set()
    try:  # always fp32, also when called inside a caller's bf16 autocast (a measure must not change with the precision)
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            for good, bad in tqdm(loader, desc=f"features ({mode}, {len(loader.dataset)} images)", unit="batch", disable=not sys.stderr.isatty()):
                skipped += bad
                sizes |= {tuple(x.shape) for x in good}  # the Inception's inputs are all 299 px; the toy judge's as read
                if len(sizes) > 1:
                    raise ValueError(f"images of different sizes ({' and '.join(f'{h}x{w}' for h, w, _ in sorted(sizes))}): the toy judge "
                                     "reads a set of one size (its domains: 32 or 64 px)")
                if good:
                    x = torch.stack(good)
                    feats.append(toy.judge_features(x.numpy())[0] if mode == "toy" else net(x.to(device)).cpu().double().numpy())
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    if not feats:
        raise ValueError(f"none of the {len(skipped)} images could be read ({skipped[0]})" if skipped else "no images to read")
    if skipped:
        print(f"warning: skipped {len(skipped)} unreadable images ({'; '.join(skipped[:3])}{' ...' if len(skipped) > 3 else ''})",
              file=sys.stderr, flush=True)
    return np.concatenate(feats)

# -----------------------------------------------------------------------------
# statistics and the Fréchet distance

def statistics(features):
    """(mu, sigma) in float64, as pytorch-fid computes them (unbiased covariance)."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)

def save_stats(path, mu, sigma, **meta):
    """mu, sigma (float64) + metadata as 0-d arrays: an .npz pytorch-fid reads too. Never overwrites; written atomically."""
    if os.path.exists(path):
        raise ValueError(f"{path} exists; not overwriting it")
    arrays = dict(mu=np.float64(mu), sigma=np.float64(sigma), **{k: np.array(v) for k, v in meta.items()})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # main checked that it can be made
    atomic_write(str(path), lambda f: np.savez_compressed(f, **arrays))

def load_stats(path):
    """(mu, sigma, meta) of a statistics .npz; files without a mode (pytorch-fid's, ADM's) get an assumed one."""
    def read(f):  # ADM files also hold arr_0 (images: not read), mu_s, sigma_s
        files = getattr(f, "files", [])
        meta = {k: f[k].item() for k in files if k != "arr_0" and f[k].ndim == 0}
        return f.get("mu") if files else None, f.get("sigma") if files else None, meta, "arr_0" in files
    mu, sigma, meta, adm = load_arrays(str(path), "statistics", read)
    if mu is None or sigma is None or mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"statistics {path}: no mu (d,) and sigma (d, d) in it: write statistics with fid.py --save-stats")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"statistics {path}: mu or sigma holds NaN or inf: write them again with fid.py --save-stats")
    if "mode" not in meta:
        meta["mode"] = "legacy_tensorflow" if adm else "legacy_pytorch"
        warnings.warn(f"{path} records no mode; assuming {meta['mode']} ({'ADM' if adm else 'pytorch-fid'} file)")
    return mu, sigma, meta

def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """|mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^1/2) in float64, with TTUR's safeguards and an eigh cross-check."""
    mu1, mu2, s1, s2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, sigma1, sigma2))
    assert mu1.shape == mu2.shape and s1.shape == s2.shape == (len(mu1), len(mu1)), "statistics of different feature sizes"
    r1, r2 = s1, s2  # what the square root is taken of
    covmean = scipy.linalg.sqrtm(s1 @ s2)  # no disp=False (deprecated since scipy 1.16): one array returned
    if not np.isfinite(covmean).all():  # singular product: regularise both, inside the root only (TTUR, pytorch-fid)
        warnings.warn(f"sqrtm(S1 S2) is not finite; adding {eps} * I to both covariances inside it")
        r1, r2 = s1 + eps * np.eye(len(mu1)), s2 + eps * np.eye(len(mu1))
        covmean = scipy.linalg.sqrtm(r1 @ r2)
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.abs(np.diagonal(covmean).imag).max():.3g} in sqrtm(S1 S2): too few samples?")
        covmean = covmean.real
    diff = mu1 - mu2
    fid = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    # cross-check: Tr (S1 S2)^1/2 = sum sqrt(eig(S1^1/2 S2 S1^1/2)), symmetric, so eigh works (guards against sqrtm regressions)
    lam, v = np.linalg.eigh(r1)
    r = (v * np.sqrt(lam.clip(0))) @ v.T
    tr = np.sqrt(np.linalg.eigvalsh(r @ r2 @ r).clip(0)).sum()
    if abs(fid - float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr)) > 1e-4 * max(abs(fid), 1):
        warnings.warn(f"sqrtm and eigh disagree on Tr((S1 S2)^1/2): {np.trace(covmean):.6g} vs {tr:.6g}; check your scipy (>= 1.13)")
    return fid

def compare(stats1, stats2, allow_mode_mismatch=False):
    """FID between two (mu, sigma, meta): refuses different modes, warns about singular covariances."""
    (mu1, s1, m1), (mu2, s2, m2) = stats1, stats2
    if m1["mode"] != m2["mode"] and not allow_mode_mismatch:
        raise ValueError(f"mode mismatch: {m1['mode']} vs {m2['mode']}; FIDs of different protocols are not comparable (--allow-mode-mismatch to force)")
    if len(mu1) != len(mu2):
        raise ValueError(f"statistics of different feature sizes ({len(mu1)} vs {len(mu2)}): "
                         "the toy mode's and the Inception's cannot be compared")
    for m in (m1, m2):
        if m.get("num_images", np.inf) <= len(mu1):
            warnings.warn(f"{m['num_images']} samples <= {len(mu1)} feature dims: the covariance is singular and the FID unreliable "
                          f"(use well over {len(mu1)}" + ("; 50k is standard)" if len(mu1) == 2048 else ")"))
    return frechet_distance(mu1, s1, mu2, s2)

# -----------------------------------------------------------------------------

def images_of(src, args):
    """What the images of src are: a file list, a (memory-mapped) array, or a dataset; None for a statistics file."""
    if os.path.isfile(src) and src.endswith(".npz"):
        def read(f):  # arr_0 in memory (50k x 256^2 x 3 = 9.8 GB; else pass the PNG folder)
            files = getattr(f, "files", [])
            return "mu" in files, f["arr_0"] if "arr_0" in files and "mu" not in files else None
        stats, images = load_arrays(src, "samples or statistics", read)
        if stats:
            return None
        if images is None or images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"{src}: holds neither statistics (mu, sigma) nor samples (arr_0: uint8 N,H,W,3)")
        return images
    if os.path.isdir(src):
        files = image_files(src)
        if not files:
            raise FileNotFoundError(f"no images under {src}")
        begun = os.path.join(src, "settings.json")  # a sample set of sample.py: its samples 000000.png ..., every one of them
        if os.path.exists(begun):
            try:
                with open(begun) as f:
                    want = int(json.load(f)["samples"])
            except (ValueError, TypeError, KeyError):
                raise ValueError(f"{begun}: not the settings.json of a sample set sample.py began; move it out of {src}") from None
            files = [os.path.join(src, f"{i:06d}.png") for i in range(want)]  # only those: not a grid someone put there
            if missing := [f for f in files if not os.path.exists(f)]:
                raise ValueError(f"{src}: {len(missing)} of the {want} samples sample.py was asked for are missing ({os.path.basename(missing[0])}"
                                 f"{', ...' if len(missing) > 1 else ''}): run the same sample.py command again to finish it")
        return files
    if os.path.exists(src) or os.sep in src:
        raise ValueError(f"{src}: not an image folder, a .npz or a dataset name")
    return open_dataset(src, args.data_dir, args.split, args.image_size)  # (uint8 (3, S, S) centre crop, label) items

def toy_accuracy(images, domain):
    """The toy judge's class accuracy on a sample set as sample.py writes one (sample i has class i mod K): a samples
    array, or the folder of its PNGs 000000.png, ...; None for other inputs, whose classes are unknown."""
    k = toy.DOMAINS[domain]["classes"]
    if isinstance(images, np.ndarray):
        return toy.accuracy(toy.judge_features(images)[1], np.arange(len(images)) % k, domain)
    names = [os.path.basename(f) for f in images] if isinstance(images, list) else []
    if not names or not all(re.fullmatch(r"\d+\.png", n) for n in names):
        return None
    arr = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in images])
    return toy.accuracy(toy.judge_features(arr)[1], np.array([int(n[:-4]) % k for n in names]), domain)

def check_args(args):
    """Every flag before anything is read or loaded: ValueError('--flag value: what is wrong; what to do')."""
    srcs = args.inputs + ([args.ref] if args.ref else [])
    if len(srcs) != (1 if args.save_stats else 2):
        raise ValueError(f"need {'one input with --save-stats' if args.save_stats else 'two inputs (or one and --ref)'}, got {len(srcs)}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    out = unwritable(os.path.dirname(os.path.abspath(args.save_stats))) if args.save_stats else None
    toy_data = any(DATASETS.get(s, {}).get("toy") for s in srcs)
    check_flags(args, [
        ("--save-stats", args.save_stats is None or args.save_stats.endswith(".npz"), "a statistics file is an .npz: end the name in .npz"),
        ("--save-stats", args.save_stats is None or not os.path.exists(args.save_stats), "exists; not overwriting it: pass a new name"),
        ("--save-stats", out is None, f"{out}: pass a --save-stats you can write to"),
        ("--image-size", args.image_size >= 1, "use a positive resolution (256 as DiT samples)"),
        ("--image-size", not toy_data or args.image_size == parser.get_default("image_size"), "the toy data comes in its own size: drop --image-size"),
        ("--mode", not toy_data or args.mode == "toy", "the toy data is judged by the toy judge: use --mode toy"),
        ("--split", not toy_data or args.split in toy.SPLIT_SEED, "the toy domains have a train and a test split"),
        ("--weights", args.weights is None or args.mode != "toy", "the toy mode uses the shipped toy judge: drop --weights"),
        ("--download", not args.download or args.mode != "toy", "the toy mode uses the shipped toy judge: drop --download"),
        ("--weights", args.weights is None or os.path.isfile(args.weights) or args.download,
         f"no such file: pass the path of {WEIGHTS_NAME}, or add --download to fetch it there"),
        ("--device", device is not None, "not a torch device: use cpu, cuda or cuda:N"),
        ("--device", device is None or device.type != "cuda" or torch.cuda.is_available(), "there is no CUDA device here: use --device cpu"),
        ("--batch-size", args.batch_size >= 1, "use at least 1 image per forward pass"),
        ("--num-workers", args.num_workers >= 0, "use 0 (decode in this process) or more"),
    ])

def main(args):
    # Inputs: one (to save its statistics) or two (to score), each checked before the network is loaded
    check_args(args)
    srcs = args.inputs + ([args.ref] if args.ref else [])
    images = [images_of(s, args) for s in srcs]
    loaded = {s: load_stats(s) for s, i in zip(srcs, images) if i is None}  # read first: images are measured in their mode
    for s, (_, _, m) in loaded.items():
        if any(i is not None for i in images) and m["mode"] != args.mode and not args.allow_mode_mismatch:
            raise ValueError(f"--mode {args.mode}: {s} holds {m['mode']} statistics; pass --mode {m['mode']} to measure the images alike")
    if args.mode == "toy":
        print(f"toy judge features ({toy.JUDGE_PATH}): NOT comparable with published FIDs")

    # Statistics: read the files, compute the rest (the network is loaded only if needed)
    net = load_inception(args.weights, args.download, args.device) if args.mode != "toy" and any(i is not None for i in images) else None
    stats = []
    for src, imgs in zip(srcs, images):
        if imgs is None:
            stats.append(loaded[src])
            continue
        try:
            feats = get_features(imgs, args.mode, net, args.batch_size, args.num_workers, args.device)
        except ValueError as e:
            raise ValueError(f"{src}: {e}") from None
        if len(feats) < 2:  # one image has no covariance: NaN statistics, then a failed sqrtm
            raise ValueError(f"{src}: {len(feats)} image; statistics need at least 2 (an FID wants 10k or more; 50k is standard)")
        meta = dict(mode=args.mode, num_images=len(feats), source=os.path.abspath(src) if os.path.exists(src) else f"{src} ({args.split})",
                    weights=net.weights if net else "toy judge (toy.py)")
        stats.append((*statistics(feats), meta))
        print(f"{src}: {len(feats)} images")

    # Save or score
    if args.save_stats:
        save_stats(args.save_stats, *stats[0][:2], **stats[0][2])
        print(f"wrote {args.save_stats} (mode {args.mode}, N = {stats[0][2]['num_images']})")
        return
    fid = compare(*stats, allow_mode_mismatch=args.allow_mode_mismatch)
    n1, n2 = (m.get("num_images", "?") for _, _, m in stats)
    print(f"FID {fid:.4f}  (N = {n1} vs {n2}, mode {stats[0][2]['mode']})")
    domain = next((s for s in srcs if s in toy.DOMAINS), None)
    for src, imgs in zip(srcs, images):  # the toy: the judge's head reads the classes of a sample set too
        acc = toy_accuracy(imgs, domain) if args.mode == "toy" and domain and src != domain and imgs is not None else None
        if acc is not None:
            k = toy.DOMAINS[domain]["classes"]
            print(f"{src}: toy judge class accuracy {acc:.1%} (sample i has class i mod {k}, as sample.py writes them; "
                  f"read among the judge's {toy.JUDGE_CLASSES} classes)")

if __name__ == "__main__":
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"  # one line, without the source line under it
    try:
        main(parser.parse_args())
    except KeyboardInterrupt:  # Ctrl-C: no traceback
        exit_interrupted()
    except (ValueError, OSError) as e:  # bad input, or a file that cannot be written: one line, exit code 2
        die(str(e))
