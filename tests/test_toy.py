"""
Tests of toy.py: the domains are deterministic, their splits disjoint, exports round-trip, and the shipped judge
reads every domain's real test images, needs a class's shape and fill both right, and stays in fp32 under autocast;
`python toy.py` with bad flags says so in one `error:` line (exit code 2) and writes nothing.

    python -m pytest tests/test_toy.py
"""
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import toy  # noqa: E402

needs_judge = pytest.mark.skipif(not os.path.exists(toy.JUDGE_PATH), reason="no assets/toy_judge.pt (python toy.py --train-judge)")


def digests(images):
    return {hashlib.sha1(im.tobytes()).hexdigest() for im in images.numpy()}


@pytest.mark.parametrize("domain", list(toy.DOMAINS))
def test_domain_matches_its_facts(domain):
    info = toy.DOMAINS[domain]
    for split in ("train", "test"):
        images, labels = toy.load(domain, split)
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64
        assert images.shape == (info["classes"] * info[split], info["size"], info["size"], 3)
        assert torch.equal(torch.bincount(labels), torch.full((info["classes"],), info[split]))
    assert info["names"] == sorted(info["names"]) and len(set(info["names"])) == info["classes"]


def test_domains_are_deterministic():
    # drawn again from scratch (not the in-memory cache), the same images
    for domain in ("toy", "toy-art", "toy-64"):
        images, labels = toy.load(domain, "test")
        again, labels_again = toy._load.__wrapped__(domain, "test")
        assert torch.equal(images, again) and torch.equal(labels, labels_again)


def test_load_returns_copies():
    images, _ = toy.load("toy", "test")
    images.zero_()
    assert toy.load("toy", "test")[0].any()


@pytest.mark.parametrize("domain", list(toy.DOMAINS))
def test_splits_are_disjoint(domain):
    train, test = digests(toy.load(domain, "train")[0]), digests(toy.load(domain, "test")[0])
    assert not train & test
    assert len(test) == toy.DOMAINS[domain]["classes"] * toy.DOMAINS[domain]["test"]  # no duplicates inside a split either


def test_target_classes_are_new_combinations_of_source_parts():
    source, target = set(toy.SOURCE), set(toy.HELD_OUT)
    assert not source & target
    assert {s for s, _ in target} <= {s for s, _ in source} and {f for _, f in target} <= {f for _, f in source}
    assert set(toy.ART) <= source


def test_64_is_the_source_scene_finer():
    # the 64x64 domain draws the same scenes as a 32x32 draw with the same seed: 2x2 means come close to it
    labels = torch.arange(40)
    big = toy.render(toy.SOURCE, labels, 64, "plain", seed=5)
    small = toy.render(toy.SOURCE, labels, 32, "plain", seed=5)
    down = torch.nn.functional.avg_pool2d(big.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    assert (down - small).abs().mean() < 0.02


def test_export_roundtrips(tmp_path):
    toy.export("toy", str(tmp_path))
    for split in ("train", "test"):
        images, labels = toy.load("toy", split)
        folders = sorted(os.listdir(tmp_path / split))
        assert folders == toy.DOMAINS["toy"]["names"]
        read, read_labels = [], []
        for y, name in enumerate(folders):  # sorted class folders = label order
            for f in sorted(os.listdir(tmp_path / split / name)):
                read.append(np.asarray(Image.open(tmp_path / split / name / f)))
                read_labels.append(y)
        order = torch.argsort(labels, stable=True)  # images of class 0 in their order, then class 1, ...
        assert np.array_equal(np.stack(read), images[order].numpy())
        assert read_labels == labels[order].tolist()


def test_unknown_domain_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown toy domain"):
        toy.load("imagenet")


def test_heads_tile_the_judge():
    covered = sorted({i for d in toy.DOMAINS for i in range(*toy.DOMAINS[d]["head"])})
    assert covered == list(range(toy.JUDGE_CLASSES))
    for d, info in toy.DOMAINS.items():
        assert info["head"][1] - info["head"][0] == info["classes"]


@needs_judge
def test_judge_is_small_and_loads_weights_only():
    assert os.path.getsize(toy.JUDGE_PATH) <= 5e6
    ckpt = torch.load(toy.JUDGE_PATH, map_location="cpu", weights_only=True)
    assert set(ckpt) == {"config", "model"}


@needs_judge
@pytest.mark.parametrize("domain", list(toy.DOMAINS))
def test_judge_reads_real_test_images(domain):
    images, labels = toy.load(domain, "test")
    feats, logits = toy.judge_features(images)
    assert feats.dtype == np.float64 and feats.shape == (len(images), 128)
    assert logits.shape == (len(images), toy.JUDGE_CLASSES)
    assert toy.accuracy(logits, labels, domain) >= 0.95


def test_accuracy_needs_the_right_fill_not_only_the_shape():
    """Each toy class has a shape of its own among the toy's 8 classes: a sample the judge reads as a source class (the
    same shape with a source fill) is wrong, even where its own class beats the toy's other 7."""
    toy_triangle = toy.HELD_OUT.index((toy.SHAPES.index("triangle"), toy.FILLS.index("vstripes")))
    source_triangle = toy.SOURCE.index((toy.SHAPES.index("triangle"), toy.FILLS.index("checker")))
    logits = torch.zeros(2, toy.JUDGE_CLASSES)
    logits[:, toy.DOMAINS["toy"]["head"][0] + toy_triangle] = 1.0
    logits[0, toy.DOMAINS["toy-source"]["head"][0] + source_triangle] = 2.0
    assert toy.accuracy(logits, [toy_triangle] * 2, "toy") == 0.5


@needs_judge
def test_judge_runs_in_fp32_under_bf16_autocast():
    images, _ = toy.load("toy", "test")
    feats, logits = toy.judge_features(images[:64])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats_ac, logits_ac = toy.judge_features(images[:64])
    assert logits_ac.dtype == torch.float32
    assert np.array_equal(feats, feats_ac) and torch.equal(logits, logits_ac)

def test_loading_the_judge_uses_no_random_numbers():
    """A training run loads the judge for its first measure: that must not change the noise it trains with."""
    toy.load_judge.cache_clear()
    torch.manual_seed(0)
    state = torch.get_rng_state()
    toy.load_judge()
    assert torch.equal(torch.get_rng_state(), state)


# -----------------------------------------------------------------------------
# the command line: bad flags give one `error:` line naming the flag and exit code 2, before anything is drawn or trained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_toy(*argv):
    return subprocess.run([sys.executable, "toy.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


BAD_FLAGS = [  # argv ({tmp}: a folder holding a file `afile` and a folder `d.png`), what the one error line must say
    ("--train-judge --judge-steps 0", ["--judge-steps 0", "at least 1 step"]),
    ("--show toy --out {tmp}/afile/x.png", ["--out", "is a file, not a folder"]),  # what /nonexist/x.png is for a user who cannot make /nonexist
    ("--show toy --out {tmp}", ["--out", "end the name in .png"]),
    ("--show toy --out {tmp}/d.png", ["--out", "a folder, not a file name"]),
    ("--show toy --out {tmp}/x.txt", ["--out", "end the name in .png"]),
    ("--show nope", ["--show", "invalid choice: 'nope'"]),
    ("", ["nothing to do", "--train-judge", "--show"]),
    ("--show toy --judge-steps 5 --out {tmp}/x.png", ["--judge-steps 5", "only --train-judge uses it"]),
    ("--out {tmp}/x.png", ["--out", "only --show uses it"]),
]


@pytest.mark.parametrize("argv, needles", BAD_FLAGS, ids=[a or "no flags" for a, _ in BAD_FLAGS])
def test_bad_flags_give_one_error_line_and_write_nothing(argv, needles, tmp_path):
    open(tmp_path / "afile", "w").close()
    os.mkdir(tmp_path / "d.png")
    before = sorted(os.listdir(tmp_path))
    r = run_toy(*argv.format(tmp=tmp_path).split())
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert all(n in lines[0] for n in needles), lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert sorted(os.listdir(tmp_path)) == before


def test_show_writes_a_png_grid_into_a_new_folder(tmp_path):
    out = tmp_path / "new" / "x.png"
    r = run_toy("--show", "toy", "--out", str(out))
    assert r.returncode == 0, r.stderr
    info = toy.DOMAINS["toy"]
    s = 4 * info["size"]  # 32 px shown 4x
    assert Image.open(out).format == "PNG" and Image.open(out).size == (8 * s, info["classes"] * s)
    assert np.array_equal(np.array(Image.open(out))[:s:4, :s:4], toy.load("toy", "train")[0][0].numpy())  # the first image, each pixel a 4x4 block
    assert os.listdir(tmp_path / "new") == ["x.png"]  # atomic_write left no .tmp behind

def test_a_judge_that_reads_real_images_badly_is_not_written(tmp_path):
    """Every toy measure trusts assets/toy_judge.pt: 3 training steps must not replace it (the check is on real test images)."""
    path = tmp_path / "judge.pt"
    with pytest.raises(ValueError, match=r"the judge reads real test images at \d+\.\d% in its worst domain \(under 99%\).*left as it was"):
        toy.train_judge(path=str(path), steps=3)
    assert not path.exists()

def test_a_damaged_judge_is_one_line_that_says_how_to_restore_it(tmp_path):
    path = tmp_path / "judge.pt"
    path.write_bytes(open(toy.JUDGE_PATH, "rb").read()[:1000])
    with pytest.raises(ValueError, match=r"toy judge .*judge.pt: unreadable, truncated.*git checkout assets/toy_judge.pt"):
        toy.load_judge(str(path))
