"""
Datasets and the VAE latent cache: the toy domains of the offline default (toy.py), the paper's eight datasets, ImageNet or
any image folder, read with the reference
(ADM) centre crop, and encoded once into a memory-mapped cache of VAE posteriors that training samples from.
DiffFit: Xie et al. 2023, arXiv:2304.06648. DiT: Peebles & Xie 2022, arXiv:2212.09748.

    torchrun --nproc_per_node=8 prepare.py --data food101 --download   # fetch Food-101, encode its train split on 8 GPUs
    python prepare.py --data cub200                                     # one GPU (CPU works too: ~1 image/s at 256 px)
    python prepare.py --data path/to/folder --image-size 256            # any folder of <class>/<image> (cache in data/<folder>-<hash>/)
    python prepare.py --data toy --export results/toy-images            # a toy domain's real images as PNG class folders

torchvision fetches food101, sun397, caltech101 and flowers102 (--download). The others are image folders
<data-dir>/<name>/<split>/<class>/<image> that you make once (the cache never reads them again):
    cub200      CUB_200_2011.tgz (https://data.caltech.edu/records/65de6-vp158), split by train_test_split.txt:
                  cd data && tar xzf CUB_200_2011.tgz && paste -d' ' CUB_200_2011/images.txt CUB_200_2011/train_test_split.txt |
                  while read i f j t; do s=test; [ $t = 1 ] && s=train; mkdir -p cub200/$s/${f%/*}; ln -s $PWD/CUB_200_2011/images/$f cub200/$s/$f; done
    artbench10  the 256x256 "a-la-ImageFolder" release (github.com/liaopeiyuan/artbench): its train/ and test/ into data/artbench10/
    df20m       DF20M-images.tar.gz and DF20M-metadata.zip (sites.google.com/view/danish-fungi-dataset): link each DF20M/<image_path>
                into data/df20m/{train,test}/<scientificName>/ following DF20M-{train,public_test}_metadata_PROD.csv
    imagenet    ILSVRC2012_img_train.tar unpacked to data/imagenet/train/<wnid>/ (sorted wnids = the standard class indices)
    stanford_cars  torchvision's layout, from a mirror (its original URL is dead): see DATASETS below
"""
import argparse
import datetime
import glob
import hashlib
import json
import os
import shutil
import sys

import numpy as np
import torch
import torch.distributed as dist
import torchvision
from PIL import Image, ImageOps
from tqdm import tqdm

import toy
from files import Terminated, atomic_write, check_flags, exit_interrupted, exit_on_sigterm, launched_by_torchrun, peer_lost, unwritable
from models import VAE_SCALE, bf16_chosen, load_vae, precision_note

# -----------------------------------------------------------------------------
parser = argparse.ArgumentParser(description="Encode a dataset's train split once into a memory-mapped VAE latent cache (python or torchrun).")
# data
parser.add_argument("--data", default="food101", help="a name in DATASETS or the path of an image folder <class>/<image> (default: %(default)s)")
parser.add_argument("--data-dir", default="data", help="datasets live in <data-dir>/<name>/, and so do their caches (default: %(default)s)")
parser.add_argument("--image-size", type=int, default=256, help="centre-crop resolution, a multiple of 8 (paper: 256; §4.3: 512) (default: %(default)s)")
parser.add_argument("--download", action="store_true", help="let torchvision download the dataset if it is missing")
parser.add_argument("--export", default=None, metavar="DIR", help="a toy domain: write its real images as DIR/{train,test}/<class>/<n>.png instead")
# model
parser.add_argument("--vae", default="ema",
                    help="VAE given to models.load_vae (DiT: sd-vae-ft-ema; the encoders of ema and mse are the same) (default: %(default)s)")
# encoding
parser.add_argument("--batch-size", type=int, default=32, help="images per VAE call per rank (each is encoded twice: as is and flipped) (default: %(default)s)")
parser.add_argument("--num-workers", type=int, default=4, help="image-decoding worker processes per rank (default: %(default)s)")
parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                    help="VAE in bf16 autocast where the hardware has it (auto), always (bf16) or never (fp32) (default: %(default)s)")

def die(msg):
    """Bad input: one `error:` line and exit code 2, as in every script here."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)

parser.error = lambda msg: die(f"{msg} (see --help)")  # argparse's own complaints as one line too, without the usage block

# -----------------------------------------------------------------------------
# datasets: one literal dict of facts

DATASETS = {
    # tv: the torchvision class, reading <data-dir>/<name>/ with splits {ours: its split argument}; None means torchvision has
    # no split, so "train" is every image (the paper does not say which images it used). Without tv: an image folder
    # <data-dir>/<name>/<split>/. how: what to do when it is missing.
    "food101":       dict(classes=101, tv="Food101", splits={"train": "train", "test": "test"},
                          how="`python prepare.py --data food101 --download` fetches it (5 GB from ETH Zurich)"),
    "sun397":        dict(classes=397, tv="SUN397", splits={"train": None},
                          how="`python prepare.py --data sun397 --download` fetches it (from vision.princeton.edu)"),
    "caltech101":    dict(classes=101, tv="Caltech101", splits={"train": None},
                          how="`python prepare.py --data caltech101 --download` fetches it (from data.caltech.edu)"),
    "flowers102":    dict(classes=102, tv="Flowers102", splits={"train": "train", "val": "val", "test": "test"},
                          how="`python prepare.py --data flowers102 --download` fetches it (from robots.ox.ac.uk)"),
    "stanford_cars": dict(classes=196, tv="StanfordCars", splits={"train": "train", "test": "test"},
                          how="torchvision cannot download it (the Stanford URL is dead): put cars_train/, cars_test/, devkit/ and "
                              "cars_test_annos_withlabels.mat from a mirror (e.g. Kaggle) into <data-dir>/stanford_cars/stanford_cars/"),
    "cub200":        dict(classes=200, how="make it from CUB_200_2011.tgz and its train_test_split.txt as the top of prepare.py shows"),
    "artbench10":    dict(classes=10, how="unpack the ArtBench-10 256x256 ImageFolder release there (see the top of prepare.py)"),
    # DF20-Mini: 182 classes = distinct class_id/scientificName in the DF20M metadata; the dataset authors' DF20M models have 182
    # outputs (huggingface.co/BVRA/legacy_seresnext101_32x4d.in1k_ft_df20m_299). Keeping only rows with a `species` value gives 179.
    "df20m":         dict(classes=182, how="link the DF20M images into class folders by the metadata CSVs (see the top of prepare.py)"),
    "imagenet":      dict(classes=1000, base_labels=True, how="unpack ILSVRC2012 into <class wnid>/ folders (see the top of prepare.py)"),
    # the offline default: the toy world's RGB domains, drawn in memory by toy.py, pixel space (no VAE). base_labels: its
    # classes are the base's own (toy-64 is the toy's ImageNet at 64x64), so the class table is kept, as for ImageNet.
    **{name: dict(classes=d["classes"], toy=True, size=d["size"], base_labels=d["labels"] == "toy-source", how="drawn by toy.py")
       for name, d in toy.DOMAINS.items()},
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")  # matched case-insensitively
CROP_VERSION = "adm-center-crop-2"  # bump when the pixels fed to the VAE change: every cache becomes stale (2: upright, 16-bit scaled)
FORMAT = "float16 (N, flip, mean|std, 4, S/8, S/8) v1"

# -----------------------------------------------------------------------------
# images

def center_crop_arr(pil_image, image_size):
    """ADM/DiT centre crop: halve with BOX while the short side is >= 2x the size, BICUBIC-resize the short side to
    the size (the other side to round(x * scale)), then crop the centre at offset (dim - size) // 2."""
    while min(pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    left, top = (pil_image.width - image_size) // 2, (pil_image.height - image_size) // 2
    return pil_image.crop((left, top, left + image_size, top + image_size))

def rgb(img):
    """A decoded PIL image as 8-bit RGB, upright as a viewer shows it (phone photos store EXIF orientation instead of
    rotating), 16-bit greyscale scaled to 8 bits (convert() would clip every value above 255 to white)."""
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # malformed EXIF (Pillow raises TypeError, KeyError, ...): the pixels as stored are still an image
        pass
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        img = Image.fromarray((np.asarray(img, np.float64) / 257).clip(0, 255).round().astype(np.uint8))  # 65535 -> 255
    return img.convert("RGB")

_reported = set()  # unreadable paths this process has already printed

class ImageDataset(torch.utils.data.Dataset):
    """(path, label) pairs -> (uint8 (3, S, S) centre crop, label), or None for an unreadable image (reported once)."""

    def __init__(self, samples, classes, image_size, root):
        self.samples, self.classes, self.image_size, self.root = samples, classes, image_size, root

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        try:
            with Image.open(path) as f:
                img = center_crop_arr(rgb(f), self.image_size)  # decoding happens here, so truncated files fail here
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            if path not in _reported:
                _reported.add(path)
                print(f"warning: skipping unreadable image {path}: {e}", file=sys.stderr, flush=True)
            return None
        return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous(), label

def collate(batch):
    """DataLoader collate_fn for open_dataset: drops unreadable images -> uint8 (B, 3, S, S), labels (B,)."""
    batch = [b for b in batch if b is not None]
    return torch.stack([b[0] for b in batch]) if batch else torch.zeros(0, 3, 0, 0, dtype=torch.uint8), torch.tensor([b[1] for b in batch], dtype=torch.long)

def image_files(top):
    """Image files under top, recursively, sorted: any case of extension, hidden files and folders skipped. Linked folders
    are followed, each real folder once, and never one that holds the folder linking to it (a link back up would loop)."""
    def fail(e):  # os.walk would skip an unreadable folder, and its images, without a word
        raise OSError(f"cannot read {e.filename}: {e.strerror}: make it readable, or move it out of {top}")
    seen, found = set(), []
    for dirpath, dirs, files in os.walk(top, followlinks=True, onerror=fail):
        if (here := os.path.realpath(dirpath)) in seen:
            dirs[:] = []
            continue
        seen.add(here)
        dirs[:] = [d for d in dirs if not d.startswith(".") and not (here + os.sep).startswith(os.path.realpath(os.path.join(dirpath, d)) + os.sep)]
        found += [os.path.join(dirpath, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    return sorted(found)

def sub_folders(folder):
    """The sorted names of folder's visible sub-folders: an image folder's classes."""
    return sorted(d.name for d in os.scandir(folder) if d.is_dir() and not d.name.startswith("."))

def image_folder(path, split):
    """The <class>/<image> folder a path names: path/<split> when path holds nothing but split folders (train/<class>/,
    test/<class>/, any case), else path itself."""
    subs = sub_folders(path)
    if not subs or any(s.lower() not in ("train", "val", "valid", "validation", "test") or not sub_folders(os.path.join(path, s)) for s in subs):
        return path
    if not (match := [s for s in subs if s.lower() == split]):
        raise FileNotFoundError(f"--data {path}: holds the split folders {', '.join(subs)} but no {split}/: pass --data {os.path.join(path, subs[0])}")
    return os.path.join(path, match[0])

def read_folder(folder):
    """An image folder: classes = sorted sub-folders (hidden ones skipped), images found recursively inside each; a class
    folder without images is refused."""
    classes = sub_folders(folder)
    found = [image_files(os.path.join(folder, c)) for c in classes]
    if not any(found):
        loose = [f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
        raise FileNotFoundError(f"{folder}: no images in <class>/ sub-folders (extensions {', '.join(IMAGE_EXTENSIONS)})" +
                                (f"; move its {len(loose)} loose images into one sub-folder per class" if loose else ""))
    if empty := [c for c, files in zip(classes, found) if not files]:  # a class of nothing: a label the model could never learn
        raise ValueError(f"{folder}: class folders without an image ({len(empty)}: {', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}): "
                         "remove them, or add their images")
    return [(p, y) for y, files in enumerate(found) for p in files], classes

def dataset_dir(name, root):
    """Where a dataset and its caches live: <root>/<name>, or for a path (caches only) <root>/<folder name>-<hash of the path>,
    so two folders of the same name keep apart."""
    if name in DATASETS:
        return os.path.join(root, name)
    path = os.path.abspath(name)
    out = os.path.join(root, f"{os.path.basename(path)}-{hashlib.sha1(path.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}")
    if (os.path.realpath(out) + os.sep).startswith(os.path.realpath(path) + os.sep):
        raise ValueError(f"--data-dir {root}: inside --data {name}, where its caches would be read as a class: pass a --data-dir outside it")
    return out

def open_dataset(name, root, split="train", image_size=256, download=False):
    """A Dataset of (uint8 (3, S, S) centre crop, label), unflipped (training flips), sorted by path."""
    info = DATASETS.get(name)
    if info is not None and info.get("toy"):
        images, labels = toy.load(name, split)
        return torch.utils.data.TensorDataset(images.permute(0, 3, 1, 2), labels)
    if info is None and not os.path.isdir(name):
        raise FileNotFoundError(f"{name!r} is neither a dataset ({', '.join(DATASETS)}) nor an image folder")
    if info is None:  # a path: the folder itself, or its split folder
        base = image_folder(os.path.normpath(name), split)
        samples, classes = read_folder(base)
    elif "tv" in info:
        if split not in info["splits"]:
            raise ValueError(f"{name} has no split {split!r}: choose one of {', '.join(info['splits'])}")
        base = dataset_dir(name, root)
        kw = {} if info["splits"][split] is None else dict(split=info["splits"][split])
        try:
            ds = getattr(torchvision.datasets, info["tv"])(base, download=download, **({} if info["tv"] == "Caltech101" else dict(loader=str)), **kw)
        except (RuntimeError, ValueError):  # torchvision's "Dataset not found", StanfordCars' "cannot be downloaded"
            raise FileNotFoundError(f"{name} is not in {base}: {info['how']}") from None
        if info["tv"] == "Caltech101":  # no loader argument; its files are <category>/image_<k:04d>.jpg
            classes = ds.categories
            samples = [(os.path.join(ds.root, "101_ObjectCategories", classes[y], f"image_{k:04d}.jpg"), y) for k, y in zip(ds.index, ds.y)]
        else:  # with loader=str (torchvision >= 0.22), ds[i] is (path, label) and no image is opened
            classes, samples = ds.classes, [ds[i] for i in range(len(ds))]
    else:
        base = os.path.join(dataset_dir(name, root), split)
        if not os.path.isdir(base):
            raise FileNotFoundError(f"{name}: no image folder {base}/<class>/: {info['how']}")
        samples, classes = read_folder(base)
    if info is not None and len(classes) != info["classes"]:
        raise ValueError(f"{name}: found {len(classes)} classes under {base}, expected {info['classes']}: is it prepared as the top of prepare.py says?")
    return ImageDataset(sorted((str(p), int(y)) for p, y in samples), list(classes), image_size, base)

# -----------------------------------------------------------------------------
# the latent cache: <dir>/cache-<split>-<S>-<vae>.{npy,labels.npy,json}
# Storage is float16: it halves the disk/page cache of fp32 (Food-101 at 256 px: 2.5 GB instead of 5) and its error is
# small next to the smallest noise the diffusion adds (sqrt(1 - alpha_bar_0) = 0.01): measured on N(0, 5.49^2) values (the unscaled
# SD latent scale) it is 2.1e-4 RMS, 1.4e-3 max after x0.18215, and 4.9e-4 relative on the std. bfloat16 is 8x worse.

def cache_base(name, root, split, image_size, vae_name):
    vae = "".join(c if c.isalnum() or c in "-_." else "_" for c in os.path.basename(os.path.normpath(vae_name)))
    return os.path.join(dataset_dir(name, root), f"cache-{split}-{image_size}-{vae}")

def cache_settings(name, split, image_size, vae_name):
    """What a cache must have been made from; open_cache refuses one made with other settings."""
    return dict(dataset=name if name in DATASETS else os.path.abspath(name), split=split, image_size=image_size,
                vae=vae_name, crop=CROP_VERSION, format=FORMAT)

def _encode_chunks(ds, chunks, parts, vae, batch_size, device, num_workers, show, bf16):
    """Encode the chunks [a, b) of ds that parts/ lacks; each is written (latents and kept indices) once it is complete."""
    todo = [(a, b) for a, b in chunks if not os.path.exists(f"{parts}/{a:09d}-{b:09d}.npz")]
    if not todo:
        return
    batches = [(a, b, list(range(i, min(i + batch_size, b)))) for a, b in todo for i in range(a, b, batch_size)]
    loader = torch.utils.data.DataLoader(ds, batch_sampler=[idx for _, _, idx in batches], num_workers=num_workers, collate_fn=list)
    h = ds.image_size // 8
    lat, kept = [np.zeros((0, 2, 2, 4, h, h), np.float16)], []
    for (a, b, idx), items in tqdm(zip(batches, loader), total=len(batches), disable=not show, desc="encode"):
        good = [(i, item[0]) for i, item in zip(idx, items) if item is not None]  # unreadable images are None
        if good:
            kept += [i for i, _ in good]
            x = torch.stack([x for _, x in good]).to(device).float().div(127.5).sub(1)  # uint8 -> [-1, 1], as ToTensor + Normalize(0.5, 0.5)
            with torch.inference_mode(), torch.autocast(torch.device(device).type, torch.bfloat16, enabled=bf16):
                mean, std = vae.encode(torch.cat([x, x.flip(3)]))  # both flips in one call: (2B, 4, h, w) each
            z = torch.stack([mean, std], 1).float().unflatten(0, (2, len(x))).transpose(0, 1)  # (B, flip, mean|std, 4, h, w)
            lat.append(z.cpu().numpy().astype(np.float16))
        if idx[-1] == b - 1:  # the chunk is complete: write it, and it is never encoded again
            arrays = dict(lat=np.concatenate(lat), idx=np.array(kept, np.int64))
            atomic_write(f"{parts}/{a:09d}-{b:09d}.npz", lambda f: np.savez(f, **arrays))
            lat, kept = lat[:1], []

def waiting_group():
    """A gloo group for the barriers of data preparation, where the other ranks wait while rank 0 alone downloads a dataset
    or writes the cache (ImageNet at 512 px: 168 GB) for longer than NCCL's default 10 minutes; training keeps NCCL's."""
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=2))

def encode_cache(name, root, split, image_size, vae, vae_name, batch_size=32, rank=0, world=1, device="cpu", chunk_size=1024, num_workers=0,
                 bf16=False):
    """Encode a split into <dir>/cache-<split>-<S>-<vae>.npy once and return that path. vae.encode(x in [-1, 1]) returns
    the unscaled posterior (mean, std). Rank r encodes chunks r, r + world, ...; rank 0 finishes (after a barrier when
    torch.distributed is initialised; without it, call the other ranks first). An interrupted run resumes chunk-wise."""
    assert image_size % 8 == 0, "the VAE downsamples by 8"
    ds = open_dataset(name, root, split, image_size)
    base, fp = cache_base(name, root, split, image_size, vae_name), cache_settings(name, split, image_size, vae_name)
    def stamp(p):  # an image replaced or repaired in place is another image (a broken link: unreadable, and skipped)
        try:
            return f"{(st := os.stat(p)).st_size}\t{st.st_mtime_ns}"  # one stat per image: ImageNet has 1.28M
        except OSError:
            return "missing"
    listing = "\n".join(f"{os.path.relpath(p, ds.root)}\t{y}\t{stamp(p)}" for p, y in ds.samples)  # the images it is made of, as they are now
    fp["listing"] = hashlib.sha1(listing.encode("utf-8", "surrogateescape")).hexdigest()  # file names need not be UTF-8
    fp["precision"] = "bf16" if bf16 else "fp32"  # the VAE's bf16 rounding stays in the latents: an fp32 run re-encodes them
    if os.path.exists(base + ".json"):
        with open(base + ".json") as f:
            old = dict({"precision": "bf16"}, **json.load(f))  # a cache from before the field: maybe bf16, so fine for bf16 runs only
        changed = [k for k in fp if old.get(k) != fp[k] and not (k == "precision" and old[k] == "fp32")]  # fp32 serves bf16 too
        if not changed:
            return base + ".npy"  # done already
        if rank == 0:
            print(f"{base}.npy is stale (made with another {', '.join(changed)}): encoding again", flush=True)
    parts = f"{base}.parts-{hashlib.sha1(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:10]}"  # new settings, fresh start
    os.makedirs(parts, exist_ok=True)
    chunks = [(a, min(a + chunk_size, len(ds))) for a in range(0, len(ds), chunk_size)]
    group = waiting_group() if dist.is_available() and dist.is_initialized() else None  # made while every rank is here
    _encode_chunks(ds, chunks[rank::world], parts, vae, batch_size, device, num_workers, rank == 0, bf16)
    if group:
        dist.barrier(group=group)
    if rank == 0:  # finish: any chunk still missing (none under torchrun), then one array, its labels, and the json last
        _encode_chunks(ds, chunks, parts, vae, batch_size, device, num_workers, True, bf16)
        if os.path.exists(base + ".json"):
            os.remove(base + ".json")  # while the files are replaced, the cache is absent rather than mixed
        files = [np.load(f"{parts}/{a:09d}-{b:09d}.npz") for a, b in chunks]
        idx = np.concatenate([f["idx"] for f in files])
        if not len(idx):  # no cache of nothing: train.py would have no batch to draw
            shutil.rmtree(parts, ignore_errors=True)
            if not os.listdir(os.path.dirname(base)):  # and the folder made for it, unless it holds other caches
                os.rmdir(os.path.dirname(base))
            raise ValueError(f"{name}: none of its {len(ds)} images could be read (each is named above)")
        def write_latents(out):  # a .npy header, then the chunks' bytes in order
            header = dict(descr=np.dtype(np.float16).str, fortran_order=False, shape=(len(idx), 2, 2, 4, image_size // 8, image_size // 8))
            np.lib.format.write_array_header_1_0(out, header)
            for f in files:
                out.write(f["lat"].tobytes())
        atomic_write(base + ".npy", write_latents)
        atomic_write(base + ".labels.npy", lambda out: np.save(out, np.array([ds.samples[i][1] for i in idx], np.int64)))
        skipped = [os.path.relpath(ds.samples[i][0], ds.root) for i in sorted(set(range(len(ds))) - set(idx.tolist()))]
        meta = dict(fp, images=len(ds), n=len(idx), skipped=skipped, classes=ds.classes)
        atomic_write(base + ".json", lambda out: out.write(json.dumps(meta, indent=1).encode()))
        for d in glob.glob(base + ".parts-*"):
            shutil.rmtree(d, ignore_errors=True)
        print(f"{base}.npy: {len(idx)} images ({len(skipped)} unreadable skipped{', listed above and in the .json' if skipped else ''})", flush=True)
    if group:
        dist.barrier(group=group)
        dist.destroy_process_group(group)
    return base + ".npy"

def open_cache(name, root, split, image_size, vae_name):
    """The cache as memory maps: mean and std (N, 2, 4, S/8, S/8) (index 1 = flipped image), labels (N,), and its json."""
    base = cache_base(name, root, split, image_size, vae_name)
    if not os.path.exists(base + ".json"):
        raise FileNotFoundError(f"no latent cache for {name} ({split}, {image_size} px, vae {vae_name}) at {base}.npy: "
                                f"run `torchrun --nproc_per_node=8 prepare.py --data {name} --image-size {image_size} --vae {vae_name}` first")
    with open(base + ".json") as f:
        meta = json.load(f)
    want = cache_settings(name, split, image_size, vae_name)
    if {k: meta.get(k) for k in want} != want:
        diff = ", ".join(f"{k}: {meta.get(k)!r} (want {v!r})" for k, v in want.items() if meta.get(k) != v)
        raise ValueError(f"stale latent cache {base}.npy ({diff}): delete it and run prepare.py again")
    latents = np.load(base + ".npy", mmap_mode="r")  # (N, flip, mean|std, 4, h, w)
    return dict(latents=latents, mean=latents[:, :, 0], std=latents[:, :, 1], labels=np.load(base + ".labels.npy"), meta=meta)

def sample_latents(cache, idx, generator=None):
    """The training-time draw for images idx: a random flip each, z = (mean + std * eps) * 0.18215 -> float (B, 4, h, w)."""
    idx = np.asarray(idx, dtype=np.int64)
    flip = torch.randint(0, 2, (len(idx),), generator=generator)
    post = torch.from_numpy(cache["latents"][idx, flip.numpy()].astype(np.float32))  # (B, mean|std, 4, h, w)
    eps = torch.randn(post[:, 0].shape, generator=generator)
    return (post[:, 0] + post[:, 1] * eps) * VAE_SCALE

# -----------------------------------------------------------------------------

def check_args(args):
    """Every flag before a download or the VAE: ValueError('--flag value: what is wrong; what to do')."""
    info = DATASETS.get(args.data, {})
    out, exp = unwritable(args.data_dir), unwritable(args.export) if args.export else None
    if not info and os.path.isdir(args.data):
        dataset_dir(args.data, args.data_dir)  # raises for a --data-dir inside the folder
    check_flags(args, [
        ("--data", not info.get("toy") or args.export, "nothing to encode: the toy data is pixels made in memory (train.py reads it as it "
                                                       "is); --export DIR writes its images"),
        ("--export", not args.export or info.get("toy"), f"only the toy domains ({', '.join(toy.DOMAINS)}) are made here; real datasets are files already"),
        ("--export", exp is None, f"{exp}: pass a folder you can write to"),
        ("--export", not (args.export and os.path.isdir(args.export) and os.listdir(args.export)),  # would mix in or overwrite images
         "not empty: pass a new or empty folder (delete this one to export again)"),
        ("--data", info or os.path.isdir(args.data), f"not a dataset ({', '.join(DATASETS)}) nor an image folder <class>/<image>"),
        ("--download", not args.download or "tv" in info,
         f"only torchvision's datasets download ({', '.join(k for k, v in DATASETS.items() if 'tv' in v)}): drop --download"),
        ("--vae", args.vae in ("ema", "mse") or os.path.exists(args.vae), "no such file: use ema, mse or the path of an SD VAE file"),
        ("--image-size", args.image_size >= 8 and args.image_size % 8 == 0, "use a multiple of 8, the VAE's downsampling (paper: 256)"),
        ("--image-size", args.image_size <= 2048, "use at most 2048 (the paper: 256, and 512 in §4.3); each image is decoded at this size"),
        ("--data-dir", out is None, f"{out}: the cache goes there: pass a --data-dir you can write to"),
        ("--batch-size", args.batch_size >= 1, "use at least 1 image per VAE call"),
        ("--num-workers", args.num_workers >= 0, "use 0 (decode in this process) or more"),
    ])

def main(args):
    # Every flag first. Setup DDP: torchrun sets RANK and WORLD_SIZE; plain python is one process.
    check_args(args)
    ddp = launched_by_torchrun()
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    if rank == 0:
        print(vars(args), flush=True)
    if args.export:  # a toy domain's real images, for the eye and for fid.py
        if rank == 0:
            toy.export(args.data, args.export)
            print(f"wrote {args.export}/{{train,test}}/<class>/<n>.png: {args.data}, {toy.DOMAINS[args.data]['classes']} classes")
        return

    # Find (or download, on rank 0 only) the dataset before loading the VAE, so a missing one fails fast.
    group = waiting_group() if ddp else None
    if rank == 0:
        open_dataset(args.data, args.data_dir, "train", args.image_size, download=args.download)  # train.py reads the train split's cache
    if group:
        dist.barrier(group=group)
        dist.destroy_process_group(group)

    # Encode: every rank its chunks, rank 0 writes the cache.
    vae = load_vae(args.vae).to(device).eval()
    bf16 = bf16_chosen(args.precision, device)
    if rank == 0:
        print(precision_note(args.precision, device), flush=True)
    path = encode_cache(args.data, args.data_dir, "train", args.image_size, vae, args.vae, args.batch_size,
                        rank, world, device, num_workers=args.num_workers, bf16=bf16)
    if rank == 0:
        print(f"done: {path}")
    if ddp:
        dist.destroy_process_group()

if __name__ == "__main__":
    exit_on_sigterm()
    args = parser.parse_args()
    try:
        main(args)
    except (KeyboardInterrupt, Terminated) as e:  # Ctrl-C or SIGTERM: no traceback; the latent cache keeps its finished chunks
        if not args.export and int(os.environ.get("RANK", 0)) == 0:
            print("stopped: the same command goes on from the chunks of the latent cache already encoded", flush=True)
        if isinstance(e, Terminated):
            raise
        exit_interrupted()
    except (ValueError, OSError) as e:  # bad input, a VAE that is missing or cannot be downloaded: one line, exit code 2
        die(str(e))
    except RuntimeError as e:  # under torchrun: another rank failed, and said why
        if not peer_lost(e):
            raise
        die(f"rank {os.environ.get('RANK', 0)}: lost contact with another rank (its error, if any, is above)")
