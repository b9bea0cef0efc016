"""
What every script shares at its edges: the checks of its flags and outputs, and the files it reads and writes. Writes
are atomic; tensors are read as safetensors or torch weights_only, arrays with allow_pickle=False, so no file handed in
can run code; published weights are downloaded on demand and checked by SHA-256.
DiffFit: Xie et al. 2023, arXiv:2304.06648.
"""
import contextlib
import hashlib
import http.client
import json
import math
import os
import pickle
import re
import signal
import sys
import tempfile
import time
import urllib.request
import warnings
import zipfile

import numpy as np
import torch
from tqdm import tqdm

# -----------------------------------------------------------------------------
# flags, outputs, one atomic writer, safetensors (u64 little-endian header size, JSON header, raw little-endian bytes)

def check_flags(args, rules):
    """Every script checks its flags first, before anything is loaded, downloaded or created. rules: (flag, fine?,
    what is wrong; what to do); the first broken one raises ValueError('--flag value: ...'), one `error:` line."""
    for flag, ok, why in rules:
        if not ok:
            value = getattr(args, flag[2:].replace("-", "_"))
            raise ValueError(f"{flag}{'' if isinstance(value, bool) else f' {value}'}: {why}")

def unwritable(folder):
    """Why files cannot be made in `folder` (created if missing), or None: asked before a run, not found out after it."""
    if not folder:
        return "an empty path"
    p = os.path.abspath(folder)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        return f"{p} is a file, not a folder"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"{p} is read-only for this user"
    try:  # a real try too: root passes os.access everywhere, and some file systems (/proc, read-only mounts) refuse anyway
        probe = tempfile.mkdtemp(dir=p)
    except OSError as e:
        return f"{p} does not take new files ({e.strerror or e})"
    with contextlib.suppress(OSError):  # made is what counts; an append-only folder may keep it
        os.rmdir(probe)
    return None

class Terminated(SystemExit):
    """Raised by SIGTERM (exit_on_sigterm): exit code 143, as a process killed by it."""

def exit_on_sigterm():
    """SIGTERM (what torchrun sends every rank once one has failed, and what a scheduler sends) unwinds like Ctrl-C, so a
    script's cleanups run: a run folder without a checkpoint is removed, a half-written file's temp goes."""
    def stop(sig, frame):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # DataLoader workers get the SIGTERM too: their deaths must not cut the cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # nor a second SIGTERM
        raise Terminated(128 + sig)
    signal.signal(signal.SIGTERM, stop)

def exit_interrupted():
    """After Ctrl-C and its cleanups, end as killed by SIGINT (as Python does after an uncaught KeyboardInterrupt), so a
    shell loop around the script stops too."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
    sys.exit(130)  # (not reached)

def peer_lost(e):
    """Is the RuntimeError e what torch.distributed raises when a rank lost contact with another, which died? That rank
    has said why; this one need not add a traceback."""
    return isinstance(e, torch.distributed.DistError) or "by peer" in str(e)

def launched_by_torchrun():
    """Is this process one of a torchrun launch? RANK says so; then the rest of torchrun's variables must be there too."""
    if "RANK" not in os.environ:
        return False
    missing = [k for k in ("WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"RANK is set, so this process would be one of a torchrun launch, but {', '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} not: launch it with torchrun, or unset RANK")
    n = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    bad = next((k for k, v in n.items() if not v.isdigit()), None)  # a wrong one would hang in init_process_group
    if bad or not int(n["RANK"]) < int(n["WORLD_SIZE"]) or not int(n["LOCAL_RANK"]) <= int(n["RANK"]):
        raise ValueError(f"{bad or 'RANK'}={n[bad or 'RANK']} with WORLD_SIZE={n['WORLD_SIZE']}, LOCAL_RANK={n['LOCAL_RANK']}: torchrun sets "
                         f"0 <= LOCAL_RANK <= RANK < WORLD_SIZE; launch it with torchrun, or unset RANK")
    return True

def atomic_write(path, write):
    """write(f) into path + ".tmp", fsync, rename: readers see the old file or the whole new one, never half of one.
    A failure (a full disk, a crash of write) removes the temp file and leaves the old file as it was."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
              "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}

def write_safetensors(path, tensors, metadata=None):
    """name -> tensor, plus str -> str metadata, as a .safetensors file (atomically)."""
    assert sys.byteorder == "little", "safetensors stores little-endian data"
    names = {v: k for k, v in _ST_DTYPES.items()}
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        blob = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""  # the raw bytes, any dtype
        header[name] = dict(dtype=names[t.dtype], shape=list(t.shape), data_offsets=[offset, offset + len(blob)])
        blobs.append(blob)
        offset += len(blob)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # pad so the payload starts 8-byte aligned, as the safetensors package does
    atomic_write(path, lambda f: f.writelines([len(head).to_bytes(8, "little") + head, *blobs]))

def read_safetensors(path):
    """A .safetensors file -> (name -> CPU tensor, metadata dict). Anything that is not a whole, consistent file
    (truncated, a header that lies about sizes, not safetensors at all) raises ValueError naming the file."""
    assert sys.byteorder == "little", "safetensors stores little-endian data"
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > size - 8 or n > 100 << 20:
            raise ValueError(f"{path}: not a safetensors file (its first 8 bytes give a header of {n} bytes in a file of {size})")
        try:
            header = json.loads(f.read(n))
            metadata = header.pop("__metadata__", None) or {}
            entries = {k: (_ST_DTYPES[v["dtype"]], [int(s) for s in v["shape"]], [int(o) for o in v["data_offsets"]])
                       for k, v in header.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
            raise ValueError(f"{path}: not a safetensors file (unreadable header: {e.__class__.__name__} {e})") from None
        payload, sd = size - 8 - n, {}
        for name, (dtype, shape, (start, end)) in entries.items():
            if end - start != math.prod(shape) * dtype.itemsize or not 0 <= start <= end:
                raise ValueError(f"{path}: tensor {name} spans {end - start} bytes, not {math.prod(shape)} x {dtype} "
                                 "as its shape says: the header is inconsistent")
            if end > payload:
                raise ValueError(f"{path}: truncated: tensor {name} ends at byte {end} of a payload of {payload}; "
                                 "the file is incomplete (download or copy it again)")
            buf = bytearray(end - start)  # one fresh (aligned, writable) buffer per tensor, shared by the tensor
            f.seek(8 + n + start)
            f.readinto(buf)
            sd[name] = (torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)).reshape(shape)
    return sd, metadata

def load_file(path, what="checkpoint"):
    """Every file a user hands in goes through here: a .safetensors file -> (tensors, metadata), anything else is
    torch.load(weights_only=True), so a pickled object is refused, never run. Truncated, garbage or pickled files
    raise one ValueError line naming the file and what it is not (never torch's advice to load it with pickle)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path}: no such file")
    with open(path, "rb") as f:
        head = f.read(9)
    if path.endswith(".safetensors") or (len(head) == 9 and head[8:] == b"{" and not head.startswith(b"PK")):
        return read_safetensors(path)
    if not head.startswith(b"PK") and head[:1] != b"\x80":  # torch files are zips (or, before torch 1.6, pickles)
        raise ValueError(f"{what} {path}: not a torch or safetensors file ({'empty' if not head else 'unknown format'})")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on the way to refusing them
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # keep torch's sentence that says why ("unsupported GLOBAL posix.system ..."), drop its advice
        m = re.search(r"((?:Unsupported|Trying to load unsupported)[^\n]*?)(?: was not an allowed| whose module|\.?\n|\.?$)", str(e))
        why = m.group(1) if m else "not plain tensors and dicts"
        raise ValueError(f"{what} {path}: refused: it is not plain tensors and dicts ({why})") from None
    except (RuntimeError, EOFError, OSError) as e:  # a zip cut short, ...
        raise ValueError(f"{what} {path}: unreadable, truncated or not a torch file ({str(e).split('.')[0] or e.__class__.__name__})") from None

def load_arrays(path, what, read=lambda f: f, mmap=False):
    """load_file for numpy files: read(np.load(path)) of an .npy array (a read-only memory map with mmap) or an .npz
    (whose arrays read lazily, so read does the reading), never with pickle. Truncated, garbage or pickled files
    raise one ValueError line naming the file, never numpy's advice to load them unsafely."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path}: no such file")
    with open(path, "rb") as f:
        head = f.read(6)
    if head != b"\x93NUMPY" and not head.startswith(b"PK"):  # numpy would try it as a pickle
        kind = "empty" if not head else "a pickle, which is never loaded" if head[:1] == b"\x80" else "unknown format"
        raise ValueError(f"{what} {path}: not a numpy .npy or .npz file ({kind})")
    try:
        f = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        with f if isinstance(f, np.lib.npyio.NpzFile) else contextlib.nullcontext():
            return read(f)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        why = "it holds Python objects, which are never unpickled" if re.search("pickle|Python objects", str(e)) else str(e) or type(e).__name__
        raise ValueError(f"{what} {path}: unreadable, truncated or not a numpy file ({why})") from None
# -----------------------------------------------------------------------------
# published weights: downloaded on demand, atomically, checked by SHA-256

PRETRAINED = {  # file name -> (url, SHA-256 or None where not yet recorded)
    "DiT-XL-2-256x256.pt": ("https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt", None),
    "DiT-XL-2-512x512.pt": ("https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt", None),
    "sd-vae-ft-ema.safetensors": ("https://huggingface.co/stabilityai/sd-vae-ft-ema/resolve/main/diffusion_pytorch_model.safetensors", None),
    # pinned: 334,643,276 bytes, SHA-256 as published for the hub file (its Git LFS object id)
    "sd-vae-ft-mse.safetensors": ("https://huggingface.co/stabilityai/sd-vae-ft-mse/resolve/main/diffusion_pytorch_model.safetensors",
                                  "a1d993488569e928462932c8c38a0760b874d166399b14414135bd9c42df5815"),
    # diffusers' DiT folders (read_diffusers_dit): converted DiT-XL-2-256x256.pt / -512x512.pt
    **{f"facebook/DiT-XL-2-{S}/transformer/{f}": (f"https://huggingface.co/facebook/DiT-XL-2-{S}/resolve/main/transformer/{f}", None)
       for S in (256, 512) for f in ("config.json", "diffusion_pytorch_model.safetensors")},
}
PRETRAINED_DIR = os.environ.get("DIFFFIT_PRETRAINED", "pretrained")

def published(name):
    """Is `name` a published file (DiT-XL-2-256x256.pt) or hub DiT (facebook/DiT-XL-2-256) that pretrained_file downloads?"""
    return name in PRETRAINED or f"{name}/transformer/config.json" in PRETRAINED

def pretrained_file(name):
    """Path of a published file, downloaded into PRETRAINED_DIR the first time (under torchrun by local rank 0 only; the
    node's other processes wait for it). A hash not yet in PRETRAINED is recorded next to the file (<name>.sha256) on
    first download, and every later download must match it."""
    path = os.path.join(PRETRAINED_DIR, name)
    if not os.path.exists(path) and int(os.environ.get("LOCAL_RANK", 0)) > 0:  # under torchrun one process per node downloads
        print(f"local rank {os.environ['LOCAL_RANK']}: waiting for local rank 0 to download {path}", flush=True)
        while not os.path.exists(path):  # it lands atomically; if local rank 0 fails, torchrun stops this process too
            time.sleep(1)
    if not os.path.exists(path):
        url, sha = PRETRAINED[name]
        recorded = path + ".sha256"
        if sha is None and os.path.exists(recorded):
            with open(recorded) as f:
                sha = f.read().strip()
        digest = download(url, path, sha)
        if sha is None:
            with open(recorded, "w") as f:
                f.write(digest + "\n")
    return path

def download(url, path, sha256=None):
    """url -> path atomically (atomic_write); returns the SHA-256. sha256 may be a prefix (torch.hub names)."""
    folder = os.path.dirname(os.path.abspath(path))
    made = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    h = hashlib.sha256()
    def fetch(f):  # raising here deletes the temp file: a wrong or short download never lands at path
        with urllib.request.urlopen(url, timeout=60) as r:
            size = int(r.headers.get("Content-Length") or 0)
            with tqdm(total=size or None, unit="B", unit_scale=True, desc=os.path.basename(path)) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
        if size and bar.n != size:  # http.client returns b"" (no error) when the server closes early
            raise http.client.IncompleteRead(b"", size - bar.n)
        if sha256 and not h.hexdigest().startswith(sha256.lower()):
            raise ValueError(f"{url}: SHA-256 {h.hexdigest()[:16]}... is not the expected {sha256[:16]}...; download deleted")
    try:
        atomic_write(path, fetch)
    except (OSError, http.client.HTTPException) as e:
        raise FileNotFoundError(f"could not download {os.path.basename(path)} from {url} ({e.__class__.__name__}: {e}); "
                                f"put the file at {path}") from None
    finally:
        if made and not os.listdir(folder):  # a failed first download leaves no empty pretrained/ behind
            os.rmdir(folder)
    return h.hexdigest()
