"""
Tests of fid.py: the Inception and its statistics against pytorch-fid, the Fréchet distance, modes, inputs, downloads
and the toy mode (the toy judge). CPU, about a minute on 2 cores; no network (only a loopback server for the download tests):
    python -m pytest tests/test_fid.py
The real Inception weights are not needed: pytorch-fid (test-only, pip install pytorch-fid==0.3.0) and fid.py load
the same random weights in the published layout; the tests that need pytorch-fid skip themselves without it.
"""
import contextlib
import hashlib
import http.server
import os
import re
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import fid
import files
import toy
from conftest import ROOT

# -----------------------------------------------------------------------------
# fixtures: random Inception weights in the published layout, our net and pytorch-fid's

@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """(torch home, path, state dict): a seeded random 472-tensor state dict saved where torch.hub (and so pytorch-fid) looks."""
    torch.manual_seed(0)
    sd = {}
    for k, v in fid.FIDInception().state_dict().items():
        if k.endswith("num_batches_tracked"):  # the published file has none
            continue
        if k.endswith("conv.weight"):
            v = torch.randn_like(v) * (2 / v[0].numel()) ** 0.5  # He init: activations neither vanish nor explode
        elif k.endswith(("bn.weight", "running_var")):
            v = 0.5 + torch.rand_like(v)                         # BN stats randomised so BN is not the identity
        else:
            v = 0.1 * torch.randn_like(v)
        sd[k] = v
    home = tmp_path_factory.mktemp("torch_home")
    path = home / "hub" / "checkpoints" / fid.WEIGHTS_NAME
    path.parent.mkdir(parents=True)
    torch.save(sd, path)
    return home, str(path), sd

@pytest.fixture(scope="module")
def ours(weights):
    with pytest.warns(UserWarning, match="not 6726825d"):  # random weights: the hash check must notice
        return fid.load_inception(weights[1])

@pytest.fixture(scope="module")
def theirs(weights):
    """pytorch-fid's InceptionV3 (pool3) with the same weights, built without network."""
    inception = pytest.importorskip("pytorch_fid.inception")
    orig, inception.load_state_dict_from_url = inception.load_state_dict_from_url, lambda *a, **k: weights[2]
    try:
        return inception.InceptionV3([3]).eval(), inception.fid_inception_v3()
    finally:
        inception.load_state_dict_from_url = orig

def write_pngs(folder, n, size, seed=0):
    """n random-but-structured RGB images (noise on a colour gradient), as PNGs in folder."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    ramp = np.linspace(0, 255, size)
    for i in range(n):
        img = rng.uniform(0.3, 1) * ramp[:, None, None] * rng.uniform(0, 1, 3) + rng.normal(0, 30, (size, size, 3))
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i:03d}.png"))

def run_main(*argv):
    return fid.main(fid.parser.parse_args([*argv, "--num-workers", "0", "--device", "cpu"]))

# -----------------------------------------------------------------------------
# the network and its features

def test_state_dict_keys_match_published_layout(ours, theirs):
    ref = {k: v.shape for k, v in theirs[1].state_dict().items() if not k.endswith("num_batches_tracked")}
    mine = {k: v.shape for k, v in ours.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(mine) == 472 and mine == ref

@pytest.mark.parametrize("size,n", [(299, 1), (256, 2), (64, 1), (512, 1)])
def test_features_match_pytorch_fid_exactly(ours, theirs, size, n):
    torch.manual_seed(size)
    images = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8)
    mine = fid.get_features(images, "legacy_pytorch", ours, batch_size=n)  # the full path: DataLoader, preprocess, net
    with torch.no_grad():  # pytorch-fid's input: ToTensor (contiguous NCHW / 255), its own resize and 2x - 1
        ref = theirs[0](images.permute(0, 3, 1, 2).contiguous().float() / 255)[0].flatten(1).double().numpy()
    assert mine.shape == (n, 2048) and mine.std() > 0.1
    assert np.array_equal(mine, ref), np.abs(mine - ref).max()

def test_statistics_match_pytorch_fid_save_stats(weights, theirs, tmp_path):
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    folder, theirs_npz, ours_npz = str(tmp_path / "imgs"), str(tmp_path / "theirs.npz"), str(tmp_path / "ours.npz")
    write_pngs(folder, 4, 48)
    # pytorch-fid's --save-stats (in-process: no second interpreter), loading its weights from our hub cache
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(weights[0]))
        fid_score.save_fid_stats([folder, theirs_npz], batch_size=2, device="cpu", dims=2048, num_workers=0)
    with pytest.warns(UserWarning, match="not 6726825d"):
        run_main(folder, "--save-stats", ours_npz, "--mode", "legacy_pytorch", "--weights", weights[1], "--batch-size", "2")
    with pytest.warns(UserWarning, match="assuming legacy_pytorch"):  # their file has no mode
        mu1, s1, meta1 = fid.load_stats(theirs_npz)
    mu2, s2, meta2 = fid.load_stats(ours_npz)
    assert np.array_equal(mu1, mu2) and np.array_equal(s1, s2)
    assert meta1["mode"] == meta2["mode"] == "legacy_pytorch" and meta2["num_images"] == 4
    mu3, s3 = fid_score.compute_statistics_of_path(ours_npz, None, 1, 2048, "cpu")  # and pytorch-fid reads our file
    assert np.array_equal(mu3, mu2) and np.array_equal(s3, s2)

def test_clean_resize_is_antialiased_bicubic():
    rng = np.random.default_rng(0)
    for size in (64, 512):
        img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        x = fid.preprocess(img, "clean") * 128 + 128  # back to the 0..255 scale
        ref = F.interpolate(torch.from_numpy(img).permute(2, 0, 1)[None].float(), size=(299, 299), mode="bicubic", antialias=True)[0]
        assert x.shape == (3, 299, 299) and (x - ref.clamp(0, 255)).abs().max() < 5e-3  # PIL's 'F' bicubic vs torch's (noise: worst case)
        assert (fid.preprocess(img, "legacy_pytorch") * 127.5 + 127.5 - x).abs().max() > 1  # the modes really differ

def test_missing_weights_give_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FID_INCEPTION_WEIGHTS", str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="nope.pth.*" + fid.WEIGHTS_URL):
        fid.load_inception()

# -----------------------------------------------------------------------------
# the Fréchet distance

def random_stats(n, d, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) / d**0.5 + shift
    return fid.statistics(x)

@pytest.mark.filterwarnings("ignore:The `disp` argument:DeprecationWarning")  # pytorch-fid's call, on scipy >= 1.16
def test_frechet_distance_matches_independent_computation():
    (mu1, s1), (mu2, s2) = random_stats(1000, 64, 0), random_stats(1000, 64, 1, shift=0.3)
    # independent: Tr (S1 S2)^1/2 = sum of the square roots of the eigenvalues of S1 S2 (real and >= 0)
    tr = np.sqrt(np.linalg.eigvals(s1 @ s2).astype(complex)).real.sum()
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr
    d = fid.frechet_distance(mu1, s1, mu2, s2)
    assert abs(d - ref) <= 1e-9 * ref and d == pytest.approx(fid.frechet_distance(mu2, s2, mu1, s1), rel=1e-9)
    assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-8
    assert fid.frechet_distance(mu1, s1, mu2, s1) == pytest.approx(((mu1 - mu2) ** 2).sum(), rel=1e-6)
    try:
        from pytorch_fid.fid_score import calculate_frechet_distance
    except ImportError:
        return
    assert d == pytest.approx(calculate_frechet_distance(mu1, s1, mu2, s2), rel=1e-9)

def test_few_samples_warn_and_stay_finite():
    (mu1, s1), (mu2, s2) = random_stats(40, 64, 0), random_stats(1000, 64, 1)
    with pytest.warns(UserWarning, match="40 samples <= 64 feature dims"):
        d = fid.compare((mu1, s1, dict(mode="clean", num_images=40)), (mu2, s2, dict(mode="clean", num_images=1000)))
    assert np.isfinite(d) and d > 0

def test_a_singular_product_is_regularised_inside_the_root_only(monkeypatch):
    (mu1, s1), (mu2, s2) = random_stats(40, 64, 0), random_stats(30, 64, 1)
    sqrtm, calls = fid.scipy.linalg.sqrtm, []
    monkeypatch.setattr(fid.scipy.linalg, "sqrtm", lambda a: calls.append(1) or (np.full_like(a, np.nan) if len(calls) == 1 else sqrtm(a)))
    with pytest.warns(UserWarning, match="not finite"):
        d = fid.frechet_distance(mu1, s1, mu2, s2, eps=1e-3)
    eye = 1e-3 * np.eye(64)  # as pytorch-fid: the offset goes into sqrtm's argument, the traces stay the data's
    ref = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(sqrtm((s1 + eye) @ (s2 + eye)).real)
    assert len(calls) == 2 and d == pytest.approx(ref, rel=1e-9)

def test_a_root_with_a_large_imaginary_part_is_refused_and_a_tiny_one_dropped(monkeypatch):
    (mu1, s1), (mu2, s2) = random_stats(40, 64, 0), random_stats(30, 64, 1)
    sqrtm, exact = fid.scipy.linalg.sqrtm, fid.frechet_distance(mu1, s1, mu2, s2)
    monkeypatch.setattr(fid.scipy.linalg, "sqrtm", lambda a: sqrtm(a) + 1e-5j * np.eye(len(a)))  # round-off: the real part counts
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-12)
    monkeypatch.setattr(fid.scipy.linalg, "sqrtm", lambda a: sqrtm(a) + 0.5j * np.eye(len(a)))  # not a covariance's root
    with pytest.raises(ValueError, match="imaginary component 0.5 in sqrtm"):
        fid.frechet_distance(mu1, s1, mu2, s2)

def test_the_command_line_warns_in_one_line(tmp_path):
    for name, mu in [("a.npz", np.zeros(128)), ("b.npz", np.ones(128))]:
        fid.save_stats(str(tmp_path / name), mu, np.eye(128), mode="toy", num_images=100)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "fid.py"), str(tmp_path / "a.npz"), str(tmp_path / "b.npz")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "FID 128.0000" in r.stdout
    assert r.stderr == "warning: 100 samples <= 128 feature dims: the covariance is singular and the FID unreliable (use well over 128)\n"

def test_mode_mismatch_is_refused(tmp_path):
    (mu1, s1), (mu2, s2) = random_stats(200, 8, 0), random_stats(200, 8, 1)
    fid.save_stats(tmp_path / "a.npz", mu1, s1, mode="clean", num_images=200)
    fid.save_stats(tmp_path / "b.npz", mu2, s2, mode="legacy_pytorch", num_images=200)
    a, b = fid.load_stats(tmp_path / "a.npz"), fid.load_stats(tmp_path / "b.npz")
    with pytest.raises(ValueError, match="mode mismatch: clean vs legacy_pytorch"):
        fid.compare(a, b)
    assert fid.compare(a, b, allow_mode_mismatch=True) == pytest.approx(fid.frechet_distance(mu1, s1, mu2, s2))
    with pytest.raises(ValueError, match="mode mismatch"):
        run_main(str(tmp_path / "a.npz"), "--ref", str(tmp_path / "b.npz"))
    np.savez(tmp_path / "pytorch_fid_style.npz", mu=mu2, sigma=s2)  # no mode recorded: assumed legacy_pytorch
    with pytest.warns(UserWarning, match="assuming legacy_pytorch"), pytest.raises(ValueError, match="mode mismatch"):
        fid.compare(a, fid.load_stats(tmp_path / "pytorch_fid_style.npz"))

# -----------------------------------------------------------------------------
# inputs and statistics files (toy mode: no Inception, so these are fast)

def toy_images(n, seed, kind):
    """n real test images of a toy domain ('toy' or 'toy-art'), from the seed-th on."""
    return toy.load(kind, "test")[0][seed:seed + n].numpy()

def test_toy_mode_is_the_judge_and_separates_domains():
    a, b, art = toy_images(200, 0, "toy"), toy_images(200, 200, "toy"), toy_images(200, 0, "toy-art")
    f = fid.get_features(a, "toy")
    assert f.shape == (200, 128) and f.dtype == np.float64 and np.array_equal(f, toy.judge_features(a)[0])
    same = fid.frechet_distance(*fid.statistics(f), *fid.statistics(fid.get_features(b, "toy")))
    other = fid.frechet_distance(*fid.statistics(f), *fid.statistics(fid.get_features(art, "toy")))
    assert other > 20 * same

def test_folder_is_read_recursively_with_any_case_of_extension(tmp_path):
    images = toy_images(5, 0, "toy")
    names = ["a.png", "sub/b.PNG", "sub/deeper/c.BMP", "d.TiFf", "sub/e.jpeg"]
    for name, img in zip(names, images):
        os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
        Image.fromarray(img).save(tmp_path / name)
    (tmp_path / "sub" / "notes.txt").write_text("not an image")
    files = fid.image_files(str(tmp_path))
    assert files == sorted(str(tmp_path / n) for n in names)
    decoded = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in files])
    assert np.allclose(fid.get_features(files, "toy", batch_size=2), toy.judge_features(decoded)[0], rtol=1e-5, atol=1e-6)  # batches of 2 vs 5

def test_a_samples_npz_gives_the_statistics_of_its_png_folder_and_stats_files_hold_no_pickle(tmp_path, capsys):
    images = toy_images(100, 0, "toy")
    # a samples .npz as sample.py and the ADM evaluator write it (arr_0: uint8 N,H,W,3) gives the same statistics as the
    # same images as a PNG folder; a statistics file is float64 mu/sigma + metadata as 0-d arrays, no pickle
    np.savez(tmp_path / "samples.npz", arr_0=images)
    for i, img in enumerate(images):
        os.makedirs(tmp_path / "pngs", exist_ok=True)
        Image.fromarray(img).save(tmp_path / "pngs" / f"{i:06d}.png")
    run_main(str(tmp_path / "samples.npz"), "--save-stats", str(tmp_path / "a.npz"), "--mode", "toy")
    run_main(str(tmp_path / "pngs"), "--save-stats", str(tmp_path / "b.npz"), "--mode", "toy")
    with np.load(tmp_path / "a.npz", allow_pickle=False) as f, np.load(tmp_path / "b.npz") as g:
        assert f["mu"].dtype == f["sigma"].dtype == np.float64 and f["mu"].shape == (128,) and f["sigma"].shape == (128, 128)
        assert f["mode"].item() == "toy" and f["num_images"].item() == 100
        assert np.array_equal(f["mu"], g["mu"]) and np.array_equal(f["sigma"], g["sigma"])
    with pytest.raises(ValueError, match="exists"):  # never overwritten
        fid.save_stats(tmp_path / "a.npz", np.zeros(128), np.eye(128), mode="toy")
    np.savez(tmp_path / "bad.npz", arr_0=images.astype(np.float32))  # a bad input gets a clear error
    with pytest.raises(ValueError, match="neither statistics"):
        run_main(str(tmp_path / "bad.npz"), "--ref", str(tmp_path / "a.npz"), "--mode", "toy")
    # and any two kinds of input can be scored against each other; the score is printed with its sample counts
    run_main(str(tmp_path / "pngs"), "--ref", str(tmp_path / "a.npz"), "--mode", "toy")
    assert re.search(r"^FID -?0\.0000  \(N = 100 vs 100, mode toy\)$", capsys.readouterr().out, re.M)

# -----------------------------------------------------------------------------
# downloads, against a loopback server

PAYLOAD = os.urandom(100_000)

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # /ok: the whole file; /cut: announces all of it, sends a tenth and closes (HTTP/1.0)
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        self.wfile.write(PAYLOAD if self.path == "/ok" else PAYLOAD[:10_000])

    def log_message(self, *args):
        pass

@contextlib.contextmanager
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()

def test_download_is_atomic_and_checked(tmp_path):
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    target = tmp_path / "w" / "weights.pth"
    with server() as url:
        with pytest.raises(ValueError, match="is not the expected"):  # checksum mismatch: nothing kept
            files.download(url + "/ok", str(target), sha256="0" * 64)
        assert not target.parent.exists()  # nor the folder the download made
        with pytest.raises(FileNotFoundError, match=f"could not download weights.pth from {url}/cut .*put the file at {target}"):
            files.download(url + "/cut", str(target))  # interrupted transfer: nothing half-written
        assert not target.parent.exists()  # nor the folder the download made
        files.download(url + "/ok", str(target), sha256=digest[:8])  # a prefix, as in torch.hub file names
        assert target.read_bytes() == PAYLOAD
    with socket.socket() as s:  # offline: a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(FileNotFoundError, match=f"could not download x.pth from http://127.0.0.1:{port}/x.pth .*put the file at"):
        files.download(f"http://127.0.0.1:{port}/x.pth", str(tmp_path / "x.pth"))
    assert not (tmp_path / "x.pth").exists()

def test_toy_mode_reads_the_classes_of_a_sample_set(tmp_path, capsys):
    """A sample set as sample.py writes it (sample i has class i mod K), as .npz and as its PNG folder: the judge's head
    reads its classes. Real test images are in that order, so they read as the judge reads them with their own labels;
    shifted by one class, as it reads them against the labels of their neighbours."""
    images, labels = (v[:80].numpy() for v in toy.load("toy", "test"))
    assert labels.tolist() == [i % 8 for i in range(80)]
    right, shifted = (toy.accuracy(toy.judge_features(x)[1], labels, "toy") for x in (images, np.roll(images, 1, axis=0)))
    assert right > 0.9 and shifted < 0.1  # the set's order matters to the measure
    np.savez(tmp_path / "right.npz", arr_0=images)
    np.savez(tmp_path / "shifted.npz", arr_0=np.roll(images, 1, axis=0))
    os.makedirs(tmp_path / "pngs")
    for i, img in enumerate(images):
        Image.fromarray(img).save(tmp_path / "pngs" / f"{i:06d}.png")
    for name, acc in [("right.npz", f"{right:.1%}"), ("shifted.npz", f"{shifted:.1%}"), ("pngs", f"{right:.1%}")]:
        run_main(str(tmp_path / name), "--ref", "toy", "--split", "test", "--mode", "toy")
        assert f"{tmp_path / name}: toy judge class accuracy {acc} (sample i has class i mod 8" in capsys.readouterr().out

def test_save_stats_makes_the_folders_it_needs(tmp_path):
    """--save-stats new/sub/s.npz: main checked the folder can be made, so it is made, not an error after the features."""
    fid.save_stats(tmp_path / "new" / "sub" / "s.npz", np.zeros(3), np.eye(3), mode="toy")
    mu, sigma, meta = fid.load_stats(str(tmp_path / "new" / "sub" / "s.npz"))
    assert np.array_equal(sigma, np.eye(3)) and meta["mode"] == "toy"
