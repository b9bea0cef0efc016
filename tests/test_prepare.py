"""
Tests of prepare.py: datasets in torchvision's on-disk layouts (tiny fakes made here), the ADM centre crop, and the
latent cache (equivalence with online encoding, fingerprints, resume, ranks, unreadable images).

    python -m pytest tests/test_prepare.py
"""
import argparse
import json
import os
import shutil

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

import prepare  # noqa: E402


def save_image(path, w, h, seed):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def make_folder(root):
    """An image folder with mixed-case extensions, a garbage file, a truncated JPEG and things to ignore."""
    for i, rel in enumerate(["cat/a.JPG", "cat/b.png", "cat/sub/c.jpeg", "dog/d.jpg", "dog/e.Png", "dog/f.jpg"]):
        save_image(os.path.join(root, rel), 20 + 3 * i, 18 + 5 * i, i)
    with open(os.path.join(root, "dog", "garbage.jpg"), "wb") as f:
        f.write(b"this is not an image")
    good = open(os.path.join(root, "dog", "f.jpg"), "rb").read()
    with open(os.path.join(root, "cat", "truncated.jpg"), "wb") as f:
        f.write(good[: len(good) // 2])
    with open(os.path.join(root, "cat", "notes.txt"), "w") as f:
        f.write("not an image extension")
    save_image(os.path.join(root, ".hidden", "x.jpg"), 20, 20, 99)  # hidden: not a class
    return root


class TinyVAE(torch.nn.Module):
    """A VAE-like encoder: 8x8 patches -> posterior mean and std (N, 4, S/8, S/8); counts its calls."""

    def __init__(self, fail_at=None):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 8, stride=8)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.3)
            self.conv.bias.copy_(torch.cat([torch.zeros(4), torch.full((4,), -3.0)]))  # small std: flips are distinct modes
        self.calls, self.fail_at = 0, fail_at

    def encode(self, x):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("simulated interruption")
        mean, logvar = self.conv(x).chunk(2, dim=1)
        return mean * 5, torch.exp(0.5 * logvar)


def std_error_of_std(z):
    """Standard error of the sample std along dim 0 (delta method, any distribution): sqrt((m4 - s^4) / K) / (2 s)."""
    c = z - z.mean(0)
    s2 = c.pow(2).mean(0)
    return ((c.pow(4).mean(0) - s2 ** 2) / len(z)).sqrt() / (2 * s2.sqrt())


def crop_tensor(path, size):
    with Image.open(path) as f:
        return torch.from_numpy(np.array(prepare.center_crop_arr(f.convert("RGB"), size))).permute(2, 0, 1)

# -----------------------------------------------------------------------------
# images and datasets

@pytest.mark.parametrize("w, h, steps", [
    (100, 60, [("box", (50, 30)), ("bicubic", (27, 16)), ("crop", (5, 0))]),              # one halving, round(26.67) = 27
    (130, 70, [("box", (65, 35)), ("box", (32, 17)), ("bicubic", (30, 16)), ("crop", (7, 0))]),  # two halvings, floor of odd sizes
    (40, 90, [("box", (20, 45)), ("bicubic", (16, 36)), ("crop", (0, 10))]),              # portrait
    (24, 20, [("bicubic", (19, 16)), ("crop", (1, 0))]),                                  # no halving, round(19.2) = 19
    (64, 32, [("box", (32, 16)), ("bicubic", (32, 16)), ("crop", (8, 0))]),               # exactly 2x: halved (>=), then as is
])
def test_center_crop_matches_adm_steps(w, h, steps):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))
    want = img
    for op, arg in steps:  # the ADM steps with the sizes worked out by hand
        if op == "box":
            want = want.resize(arg, resample=Image.BOX)
        elif op == "bicubic":
            want = want.resize(arg, resample=Image.BICUBIC)
        else:
            want = Image.fromarray(np.array(want)[arg[1]:arg[1] + 16, arg[0]:arg[0] + 16])
    got = prepare.center_crop_arr(img, 16)
    assert got.size == (16, 16)
    np.testing.assert_array_equal(np.array(got), np.array(want))


def test_center_crop_of_an_image_twice_the_size_is_the_2x2_mean_of_its_centre():
    """ADM's halving is a 2x2 box mean (the reference for the steps above): 64x32 -> 32x16, then the centre 16x16."""
    a = np.random.default_rng(1).integers(0, 256, (32, 64, 3), dtype=np.uint8)
    got = np.array(prepare.center_crop_arr(Image.fromarray(a), 16)).astype(int)
    want = a[:, 16:48].reshape(16, 2, 16, 2, 3).mean((1, 3))
    assert np.abs(got - want).max() <= 1  # PIL resizes in two separable passes, each rounding to uint8


def make_food101(root, n_test_classes=3):
    base = os.path.join(root, "food101", "food-101")
    classes = [f"dish_{k:03d}" for k in range(101)]
    meta = {"train": {c: [f"{c}/{k}1"] for k, c in enumerate(classes)}, "test": {c: [f"{c}/{k}2"] for k, c in enumerate(classes)}}
    for split in meta:
        for k, c in enumerate(classes):
            for rel in meta[split][c]:
                save_image(os.path.join(base, "images", rel + ".jpg"), 16 + k % 7, 16 + k % 5, k)
        os.makedirs(os.path.join(base, "meta"), exist_ok=True)
        with open(os.path.join(base, "meta", f"{split}.json"), "w") as f:
            json.dump(meta[split], f)
    return base, classes


def test_food101_reads_its_split_json_as_labels_in_class_order(tmp_path):
    base, classes = make_food101(tmp_path)
    ds = prepare.open_dataset("food101", tmp_path, "test", image_size=16)
    assert len(ds) == 101 and ds.classes == classes
    x, y = ds[37]
    assert x.dtype == torch.uint8 and x.shape == (3, 16, 16) and y == 37
    torch.testing.assert_close(x, crop_tensor(os.path.join(base, "images", classes[37], "372.jpg"), 16), rtol=0, atol=0)
    with pytest.raises(ValueError, match="no split 'val'"):
        prepare.open_dataset("food101", tmp_path, "val", 16)


def test_stanford_cars_labels_are_the_mat_files_one_based_classes_minus_one(tmp_path):
    base = os.path.join(tmp_path, "stanford_cars", "stanford_cars")
    os.makedirs(os.path.join(base, "devkit"))
    scipy.io.savemat(os.path.join(base, "devkit", "cars_meta.mat"), {"class_names": np.array([f"car {k}" for k in range(196)], dtype=object)[None]})
    ann = np.zeros((1, 3), dtype=[("fname", "O"), ("class", "O")])
    for i, cls in enumerate([5, 1, 196]):  # 1-based in the .mat
        ann[0, i] = (f"{i:05d}.jpg", np.array([[cls]], dtype=np.uint8))
        save_image(os.path.join(base, "cars_train", f"{i:05d}.jpg"), 30, 20, i)
    scipy.io.savemat(os.path.join(base, "devkit", "cars_train_annos.mat"), {"annotations": ann})
    ds = prepare.open_dataset("stanford_cars", tmp_path, "train", 16)
    assert [y for _, y in ds.samples] == [4, 0, 195] and len(ds.classes) == 196
    assert ds[2][0].shape == (3, 16, 16)


def test_missing_datasets_say_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="--download"):
        prepare.open_dataset("food101", tmp_path)
    with pytest.raises(FileNotFoundError, match="mirror"):
        prepare.open_dataset("stanford_cars", tmp_path)
    with pytest.raises(FileNotFoundError, match="train_test_split"):
        prepare.open_dataset("cub200", tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a dataset"):
        prepare.open_dataset(str(tmp_path / "nowhere"), tmp_path)
    with pytest.raises(FileNotFoundError, match="prepare.py --data food101"):
        prepare.open_cache("food101", tmp_path, "train", 256, "ema")


def test_an_image_folder_lists_classes_sorted_and_reports_each_unreadable_image_once(tmp_path, capfd):
    folder = make_folder(str(tmp_path / "pics"))
    ds = prepare.open_dataset(folder, tmp_path / "data", image_size=16)
    names = [os.path.relpath(p, folder) for p, _ in ds.samples]
    assert ds.classes == ["cat", "dog"]
    assert names == ["cat/a.JPG", "cat/b.png", "cat/sub/c.jpeg", "cat/truncated.jpg", "dog/d.jpg", "dog/e.Png", "dog/f.jpg", "dog/garbage.jpg"]
    assert [y for _, y in ds.samples] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert ds[3] is None and ds[7] is None and ds[3] is None
    err = capfd.readouterr().err.splitlines()  # each bad path reported once, by path
    assert len(err) == 2 and "cat/truncated.jpg" in err[0] and "dog/garbage.jpg" in err[1]
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=prepare.collate)
    ys = torch.cat([y for _, y in loader])
    assert ys.tolist() == [0, 0, 0, 1, 1, 1]  # bad ones dropped, the same on every pass


def test_unknown_class_count_is_refused(tmp_path):
    for c in range(3):
        save_image(os.path.join(tmp_path, "artbench10", "train", f"style{c}", "0.jpg"), 20, 20, c)
    with pytest.raises(ValueError, match="found 3 classes"):
        prepare.open_dataset("artbench10", tmp_path, "train", 16)

# -----------------------------------------------------------------------------
# the latent cache

def test_the_cache_holds_both_flips_of_every_readable_image_beside_its_labels(tmp_path, capfd):
    folder, root = make_folder(str(tmp_path / "pics")), str(tmp_path / "data")
    vae = TinyVAE()
    path = prepare.encode_cache(folder, root, "train", 16, vae, "tiny", batch_size=3, chunk_size=4)
    assert path == os.path.join(prepare.dataset_dir(folder, root), "cache-train-16-tiny.npy") and os.path.exists(path)
    assert os.path.basename(os.path.dirname(path)).startswith("pics-")  # the folder's name and a hash of its path
    assert sorted(os.listdir(os.path.dirname(path))) == ["cache-train-16-tiny.json", "cache-train-16-tiny.labels.npy", "cache-train-16-tiny.npy"]
    cache = prepare.open_cache(folder, root, "train", 16, "tiny")
    assert cache["latents"].shape == (6, 2, 2, 4, 2, 2) and cache["latents"].dtype == np.float16
    assert isinstance(cache["latents"], np.memmap) and cache["mean"].shape == (6, 2, 4, 2, 2)
    assert cache["labels"].tolist() == [0, 0, 0, 1, 1, 1]
    assert cache["meta"]["skipped"] == ["cat/truncated.jpg", "dog/garbage.jpg"] and cache["meta"]["n"] == 6
    assert "2 unreadable skipped" in capfd.readouterr().out
    # every stored posterior is the encoding of its crop (index 0) and of the flipped crop (index 1), to float16 precision
    ds = prepare.open_dataset(folder, root, image_size=16)
    good = [i for i in range(len(ds)) if ds[i] is not None]
    x = torch.stack([ds[i][0] for i in good]).float() / 127.5 - 1
    for flip in (0, 1):
        mean, std = vae.encode(x.flip(3) if flip else x)
        torch.testing.assert_close(torch.from_numpy(cache["mean"][:, flip].astype(np.float32)), mean.detach(), rtol=2 ** -11, atol=1e-6)
        torch.testing.assert_close(torch.from_numpy(cache["std"][:, flip].astype(np.float32)), std.detach(), rtol=2 ** -11, atol=1e-6)


def test_cached_latents_match_online_encoding_in_distribution(tmp_path):
    """Per image and element, latents drawn from the cache and latents made online (crop -> random flip -> encode ->
    mean + std * eps -> x0.18215) have the same mean and std, within 5 standard errors of K draws each."""
    folder, root = str(tmp_path / "pics"), str(tmp_path / "data")
    for i in range(4):
        save_image(os.path.join(folder, f"c{i % 2}", f"{i}.png"), 24 + 4 * i, 20 + 3 * i, i)
    vae = TinyVAE()
    prepare.encode_cache(folder, root, "train", 16, vae, "tiny", batch_size=2)
    cache = prepare.open_cache(folder, root, "train", 16, "tiny")
    ds, K = prepare.open_dataset(folder, root, image_size=16), 4000
    g = torch.Generator().manual_seed(0)
    for i in range(len(ds)):
        cached = prepare.sample_latents(cache, [i] * K, g)  # (K, 4, 2, 2)
        x = ds[i][0].float().div(127.5).sub(1).expand(K, 3, 16, 16)
        x = torch.where(torch.rand(K, 1, 1, 1, generator=g) < 0.5, x.flip(3), x)  # the reference's RandomHorizontalFlip
        with torch.no_grad():
            mean, std = vae.encode(x)
        online = (mean + std * torch.randn(mean.shape, generator=g)) * prepare.VAE_SCALE
        se_mean = (cached.var(0) / K + online.var(0) / K).sqrt()
        assert ((cached.mean(0) - online.mean(0)).abs() <= 5 * se_mean).all()
        se_std = (std_error_of_std(cached) ** 2 + std_error_of_std(online) ** 2).sqrt()
        tol = 5 * se_std + 1e-3 * online.std(0)  # + float16 storage: the modes move by <= 2^-11 relative
        assert ((cached.std(0) - online.std(0)).abs() <= tol).all()
        # the flip matters here (two separated modes), so a cache without flips would fail the std check
        assert (online.std(0) > 2 * (std.mean(0) * prepare.VAE_SCALE)).any()
    a = prepare.sample_latents(cache, [0, 3, 1], torch.Generator().manual_seed(7))
    b = prepare.sample_latents(cache, [0, 3, 1], torch.Generator().manual_seed(7))
    assert a.dtype == torch.float32 and a.shape == (3, 4, 2, 2) and torch.equal(a, b)


@pytest.mark.parametrize("noise_only", [False, True])
def test_train_reads_the_same_latents_from_the_cache_and_with_no_cache(tmp_path, noise_only):
    """train.batches, both ways: the same scale (x0.18215), the same flips and posterior noise, in distribution.
    noise_only: a VAE whose posterior is N(0.5, 1) for every image, so the latents' spread is the posterior noise alone."""
    import train
    folder = str(tmp_path / "pics")
    for i in range(4):
        save_image(os.path.join(folder, f"c{i % 2}", f"{i}.png"), 24 + 4 * i, 20 + 3 * i, i)
    vae = TinyVAE()
    if noise_only:
        with torch.no_grad():
            vae.conv.weight.zero_()
            vae.conv.bias.copy_(torch.tensor([0.1] * 4 + [0.0] * 4))  # mean 5 x 0.1 (TinyVAE), log-variance 0
    args = train.parser.parse_args(["--data", folder, "--data-dir", str(tmp_path / "data"), "--image-size", "16", "--vae", "tiny",
                                    "--num-workers", "0"])
    prepare.encode_cache(folder, args.data_dir, "train", 16, vae, "tiny", batch_size=2)
    torch.manual_seed(0)
    draw = lambda no_cache: torch.cat([x for (x, _), _ in zip(train.batches(argparse.Namespace(**{**vars(args), "no_cache": no_cache}),
                                                                             {}, 4, 0, vae, False, 0, 1, torch.device("cpu")), range(300))])
    cached, online = draw(False), draw(True)  # (1200, 4, 2, 2) each
    assert cached.shape == online.shape == (1200, 4, 2, 2)
    K = len(cached)
    se_mean = (cached.var(0) / K + online.var(0) / K).sqrt()
    assert ((cached.mean(0) - online.mean(0)).abs() <= 5 * se_mean).all()
    se_std = (std_error_of_std(cached) ** 2 + std_error_of_std(online) ** 2).sqrt()
    assert ((cached.std(0) - online.std(0)).abs() <= 5 * se_std + 1e-3 * online.std(0)).all()  # + float16 storage
    if noise_only:  # each way: N(0.5, 1) x 0.18215, so without the posterior noise the std would be 0
        for z in (cached, online):
            assert ((z.mean(0) - 0.5 * prepare.VAE_SCALE).abs() <= 5 * prepare.VAE_SCALE / K ** 0.5).all()
            assert ((z.std(0) - prepare.VAE_SCALE).abs() <= 5 * std_error_of_std(z)).all()

def test_fingerprint_refuses_other_settings_and_tracks_the_images(tmp_path, monkeypatch):
    folder, root = make_folder(str(tmp_path / "pics")), str(tmp_path / "data")
    base = prepare.encode_cache(folder, root, "train", 16, TinyVAE(), "a", batch_size=4)[:-4]
    prepare.open_cache(folder, root, "train", 16, "a")
    with pytest.raises(FileNotFoundError):  # another resolution
        prepare.open_cache(folder, root, "train", 32, "a")
    with pytest.raises(FileNotFoundError):  # another VAE
        prepare.open_cache(folder, root, "train", 16, "b")
    for ext in (".npy", ".labels.npy", ".json"):  # a cache file that claims to be something it is not
        shutil.copy(base + ext, base.replace("-16-a", "-32-b") + ext)
    with pytest.raises(ValueError, match="stale.*image_size: 16 .want 32.*vae: 'a' .want 'b'"):
        prepare.open_cache(folder, root, "train", 32, "b")
    monkeypatch.setattr(prepare, "CROP_VERSION", prepare.CROP_VERSION + "-next")
    with pytest.raises(ValueError, match="crop"):
        prepare.open_cache(folder, root, "train", 16, "a")
    monkeypatch.undo()
    vae = TinyVAE()
    prepare.encode_cache(folder, root, "train", 16, vae, "a", batch_size=4)
    assert vae.calls == 0  # up to date: nothing encoded
    save_image(os.path.join(folder, "dog", "new.jpg"), 30, 30, 7)  # the dataset changed: encoded again
    prepare.encode_cache(folder, root, "train", 16, vae, "a", batch_size=4)
    assert vae.calls > 0 and prepare.open_cache(folder, root, "train", 16, "a")["meta"]["n"] == 7
    calls = vae.calls
    save_image(os.path.join(folder, "cat", "truncated.jpg"), 30, 30, 8)  # an unreadable image repaired in place: encoded again
    prepare.encode_cache(folder, root, "train", 16, vae, "a", batch_size=4)
    assert vae.calls > calls and prepare.open_cache(folder, root, "train", 16, "a")["meta"]["skipped"] == ["dog/garbage.jpg"]
    root = str(tmp_path / "data2")  # latents encoded in bf16 serve bf16 runs, not fp32 ones; fp32 latents serve both
    for bf16, encodes, made in [(True, True, "bf16"), (True, False, "bf16"), (False, True, "fp32"), (True, False, "fp32")]:
        calls = vae.calls
        prepare.encode_cache(folder, root, "train", 16, vae, "a", batch_size=4, bf16=bf16)
        assert (vae.calls > calls) == encodes and prepare.open_cache(folder, root, "train", 16, "a")["meta"]["precision"] == made
    meta = prepare.cache_base(folder, root, "train", 16, "a") + ".json"  # a cache from before the field was kept: maybe bf16
    with open(meta) as f:
        old = {k: v for k, v in json.load(f).items() if k != "precision"}
    with open(meta, "w") as f:
        json.dump(old, f)
    for bf16, encodes in [(True, False), (False, True)]:
        calls = vae.calls
        prepare.encode_cache(folder, root, "train", 16, vae, "a", batch_size=4, bf16=bf16)
        assert (vae.calls > calls) == encodes


def test_a_folder_linked_back_up_is_read_once(tmp_path):
    folder = make_folder(str(tmp_path / "pics"))
    n = len(prepare.read_folder(folder)[0])
    os.symlink("..", os.path.join(folder, "cat", "sub", "loop"))  # cat/sub/loop -> cat: os.walk with followlinks would go round 40 times
    os.symlink(os.path.join(folder, "dog"), os.path.join(folder, "cat", "dogs"))  # a linked folder elsewhere is still read
    samples = prepare.read_folder(folder)[0]
    assert len(samples) == n + 4 and len({os.path.realpath(p) for p, _ in samples}) == n
    os.remove(os.path.join(folder, "cat", "dogs"))
    os.symlink("..", os.path.join(folder, "cat", "up"))  # cat/up -> the whole folder: dog's images would be cats too
    assert prepare.read_folder(folder)[0] == [(p, y) for p, y in samples if "dogs" not in p]


def test_an_image_is_read_as_a_viewer_shows_it(tmp_path):
    """EXIF orientation applied (a phone photo stored sideways), 16-bit greyscale scaled to 8 bits rather than clipped."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: shown turned 90 degrees clockwise
    img.save(tmp_path / "phone.png", exif=exif)
    Image.fromarray(np.arange(0, 65536, 257, dtype=np.uint16).reshape(16, 16)).save(tmp_path / "grey16.png")  # 0 .. 65535
    ds = prepare.ImageDataset([(str(tmp_path / "phone.png"), 0), (str(tmp_path / "grey16.png"), 0)], ["a"], 16, str(tmp_path))
    upright = prepare.center_crop_arr(img.transpose(Image.Transpose.ROTATE_270), 16)
    assert torch.equal(ds[0][0], torch.from_numpy(np.array(upright)).permute(2, 0, 1))
    grey = ds[1][0]
    assert torch.equal(grey[0], grey[2]) and grey.min() < 20 and grey.max() > 235 and grey.float().mean().sub(127.5).abs() < 10


def test_a_folders_classes_are_its_sub_folders_with_images(tmp_path, monkeypatch):
    folder = make_folder(str(tmp_path / "pics"))
    save_image(os.path.join(folder, "cat", ".thumbnails", "t.jpg"), 20, 20, 1)  # a viewer's hidden cache inside a class: not images
    assert len(prepare.read_folder(folder)[0]) == 8
    os.makedirs(os.path.join(folder, "emu"))  # a class with nothing to learn from
    with pytest.raises(ValueError, match=r"class folders without an image \(1: emu\): remove them"):
        prepare.read_folder(folder)
    save_image(str(tmp_path / "loose" / "a.jpg"), 20, 20, 1)
    with pytest.raises(FileNotFoundError, match="move its 1 loose images into one sub-folder per class"):
        prepare.read_folder(str(tmp_path / "loose"))
    # a folder of split folders: train.py and prepare.py read <folder>/<split>, not the splits as two classes
    for split in ("Train", "test"):  # any case
        make_folder(str(tmp_path / "splits" / split))
    ds = prepare.open_dataset(str(tmp_path / "splits"), str(tmp_path / "data"), "train", 16)
    assert ds.classes == ["cat", "dog"] and all(p.startswith(str(tmp_path / "splits" / "Train")) for p, _ in ds.samples)
    with pytest.raises(FileNotFoundError, match="holds the split folders Train, test but no val/"):
        prepare.open_dataset(str(tmp_path / "splits"), str(tmp_path / "data"), "val", 16)
    for c in ("test", "train"):  # classes that happen to be called so hold images, not class folders: they are classes
        save_image(str(tmp_path / "named" / c / "0.jpg"), 20, 20, 1)
    assert prepare.open_dataset(str(tmp_path / "named"), str(tmp_path / "data"), "train", 16).classes == ["test", "train"]
    scandir = os.scandir  # a folder the user may not read: os.walk would drop its images without a word
    monkeypatch.setattr(os, "scandir", lambda p=".": (_ for _ in ()).throw(PermissionError(13, "Permission denied", p))
                        if str(p).endswith("sub") else scandir(p))
    with pytest.raises(OSError, match="cannot read .*cat/sub: Permission denied: make it readable"):
        prepare.read_folder(folder)


def test_folders_of_one_name_keep_their_caches_apart(tmp_path):
    a, b = make_folder(str(tmp_path / "a" / "train")), make_folder(str(tmp_path / "b" / "train"))
    root = str(tmp_path / "data")
    assert prepare.dataset_dir(a, root) != prepare.dataset_dir(b, root) and prepare.dataset_dir(a, root) == prepare.dataset_dir(a + "/", root)
    with pytest.raises(ValueError, match="--data-dir .*: inside --data .*, where its caches would be read as a class"):
        prepare.dataset_dir(a, os.path.join(a, "data"))


def test_interrupted_encode_resumes_from_finished_chunks(tmp_path):
    folder, root = make_folder(str(tmp_path / "pics")), str(tmp_path / "data")  # 8 listed images -> 4 chunks of 2
    ref = prepare.encode_cache(folder, str(tmp_path / "ref"), "train", 16, TinyVAE(), "t", batch_size=2, chunk_size=2)
    with pytest.raises(KeyboardInterrupt):
        prepare.encode_cache(folder, root, "train", 16, TinyVAE(fail_at=3), "t", batch_size=2, chunk_size=2)
    assert not os.path.exists(os.path.join(prepare.dataset_dir(folder, root), "cache-train-16-t.json"))  # nothing half-finished is visible
    with pytest.raises(FileNotFoundError):
        prepare.open_cache(folder, root, "train", 16, "t")
    vae = TinyVAE()
    path = prepare.encode_cache(folder, root, "train", 16, vae, "t", batch_size=2, chunk_size=2)
    assert vae.calls == 2  # chunks 0 and 1 were kept; chunks 2 and 3 (one VAE call each) were encoded
    assert np.array_equal(np.load(path), np.load(ref)) and not any(".parts" in f for f in os.listdir(os.path.dirname(path)))


def test_ranks_write_disjoint_shards_and_rank0_finishes(tmp_path):
    folder, root = make_folder(str(tmp_path / "pics")), str(tmp_path / "data")
    ref = prepare.encode_cache(folder, str(tmp_path / "ref"), "train", 16, TinyVAE(), "t", batch_size=2, chunk_size=2)
    vae1, vae0 = TinyVAE(), TinyVAE()
    prepare.encode_cache(folder, root, "train", 16, vae1, "t", batch_size=2, chunk_size=2, rank=1, world=2)
    parts = [p for p in os.listdir(prepare.dataset_dir(folder, root)) if ".parts" in p]
    assert sorted(os.listdir(os.path.join(prepare.dataset_dir(folder, root), parts[0]))) == ["000000002-000000004.npz", "000000006-000000008.npz"]
    assert vae1.calls == 2 and not os.path.exists(ref.replace(str(tmp_path / "ref"), root))  # rank 1 does not finish
    path = prepare.encode_cache(folder, root, "train", 16, vae0, "t", batch_size=2, chunk_size=2, rank=0, world=2)
    assert vae0.calls == 2  # only its own chunks 0 and 2
    assert np.array_equal(np.load(path), np.load(ref))
    assert np.array_equal(np.load(path[:-4] + ".labels.npy"), np.load(ref[:-4] + ".labels.npy"))

SLOW_RANK0 = """
import datetime, os, sys, time
sys.path[:0] = [sys.argv[3], os.path.join(sys.argv[3], "tests")]
import torch.distributed as dist
import prepare
from test_prepare import TinyVAE
class SlowVAE(TinyVAE):  # rank 0 encodes slower than the group's timeout allows anyone to wait
    def encode(self, x):
        time.sleep(4 if dist.get_rank() == 0 else 0)
        return super().encode(x)
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=2))
print(prepare.encode_cache(sys.argv[1], sys.argv[2], "train", 16, SlowVAE(), "t", batch_size=2, chunk_size=2,
                           rank=dist.get_rank(), world=dist.get_world_size()))
"""

def test_ranks_wait_for_a_slow_rank0_longer_than_the_process_group_timeout(tmp_path):
    """Rank 0 alone writes the cache (ImageNet at 512 px: 168 GB) while the others wait: their barriers must outlast the
    training group's timeout (NCCL: 10 min; here 2 s against rank 0's 8 s)."""
    import subprocess, sys
    folder, root = make_folder(str(tmp_path / "pics")), str(tmp_path / "data")
    (tmp_path / "slow.py").write_text(SLOW_RANK0)
    root_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(tmp_path / "slow.py"),
                        folder, root, root_dir], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ref = prepare.encode_cache(folder, str(tmp_path / "ref"), "train", 16, TinyVAE(), "t", batch_size=2, chunk_size=2)
    assert np.array_equal(np.load(os.path.join(prepare.dataset_dir(folder, root), "cache-train-16-t.npy")), np.load(ref))

def test_export_writes_a_toy_domain_as_class_folders(tmp_path, capsys):
    out = tmp_path / "toy-art"
    prepare.main(prepare.parser.parse_args(["--data", "toy-art", "--export", str(out)]))
    names = sorted(os.listdir(out / "test"))
    assert names == sorted(os.listdir(out / "train")) and len(names) == 10
    # what fid.py and train.py read back from the folder is what toy.py drew
    ds = prepare.open_dataset(str(out / "test"), str(tmp_path), image_size=32)
    images, labels = prepare.open_dataset("toy-art", str(tmp_path), split="test").tensors
    order = torch.argsort(labels, stable=True)
    assert len(ds) == len(images) and all(torch.equal(ds[i][0], images[order[i]]) and ds[i][1] == labels[order[i]] for i in range(0, len(ds), 97))
