"""
models.read_diffusers_dit / write_diffusers_dit against diffusers' own DiTTransformer2DModel and DiTPipeline, and the
pinned hashes of the published files. Tests that need diffusers skip themselves without it.

    python -m pytest tests/test_diffusers.py
"""
import contextlib
import http.server
import json
import os
import re
import threading

import pytest
import torch

import files
import models
from models import DiT, DiT_models, read_diffusers_dit, write_diffusers_dit

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)

@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")

def tiny(seed=0, **overrides):
    """A depth-2 width-64 DiT with every weight random N(0, 0.05²) (adaLN-Zero would make most of it trivially zero)."""
    torch.manual_seed(seed)
    model = DiT(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        for k, p in model.named_parameters():
            if k != "pos_embed":
                p.normal_(0, 0.05)
    return model

def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()

def with_dit_timestep_features(transformer):
    """diffusers' DiT embeds t with downscale_freq_shift=1; DiT with 0. Switch every block's copy to DiT's."""
    for block in transformer.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    return transformer

def inputs(K):
    """6 latents at steps 0..999 and labels that include the null class K."""
    torch.manual_seed(1)
    return torch.randn(6, 4, 8, 8), torch.tensor([0, 1, 10, 100, 500, 999]), torch.tensor([0, 3, K - 1, K, K, 5])

# -----------------------------------------------------------------------------
# parity with diffusers, both ways

@torch.no_grad()
def test_exported_dit_equals_diffusers_forward_given_dits_timestep_features(diffusers, tmp_path):
    model = tiny()
    write_diffusers_dit(model.state_dict(), TINY, str(tmp_path))
    theirs = with_dit_timestep_features(diffusers.DiTTransformer2DModel.from_pretrained(str(tmp_path)).eval())
    x, t, y = inputs(10)
    out = theirs(x, timestep=t, class_labels=torch.where(y == 10, 1000, y)).sample  # (N, 2C, H, W): [ε, v] as ours
    assert out.shape == (6, 8, 8, 8)
    assert rel_err(out, model(x, t, y)) <= 1e-5

@torch.no_grad()
def test_stock_diffusers_timestep_features_are_not_dits(diffusers, tmp_path):
    from diffusers.models.embeddings import get_timestep_embedding
    t = torch.tensor([0.0, 1.0, 10.0, 999.0])
    assert torch.allclose(models.timestep_embedding(t), get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0), atol=1e-6)
    stock = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=1)
    assert ((stock[3] - models.timestep_embedding(t)[3]).norm() / stock[3].norm()) > 0.5  # at t = 999: other features
    # so on the same weights stock diffusers computes another function (exact at t = 0; measured 2.3% at t = 999)
    model = tiny()
    write_diffusers_dit(model.state_dict(), TINY, str(tmp_path))
    theirs = diffusers.DiTTransformer2DModel.from_pretrained(str(tmp_path)).eval()
    assert theirs.transformer_blocks[0].norm1.emb.time_proj.downscale_freq_shift == 1  # if this fails, fix models.py's comment
    x, t, y = inputs(10)
    out = theirs(x, timestep=t, class_labels=torch.where(y == 10, 1000, y)).sample
    ours = model(x, t, y)
    assert rel_err(out[0], ours[0]) < 1e-6 and rel_err(out[5], ours[5]) > 1e-3  # t = 0: equal up to rounding

@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
@torch.no_grad()
def test_folder_written_by_diffusers_reads_into_an_equal_dit(diffusers, tmp_path, safe):
    torch.manual_seed(0)
    theirs = diffusers.DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
                                             sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_eps=1e-6).eval()
    sd = theirs.state_dict()  # random init gives every block its own embedders: make them one, as a converted DiT has
    theirs.load_state_dict({k: sd[re.sub(r"blocks\.\d+\.", "blocks.0.", k)] if ".norm1.emb." in k else v for k, v in sd.items()})
    theirs.save_pretrained(str(tmp_path), safe_serialization=safe)
    sd, config = read_diffusers_dit(str(tmp_path))
    assert config == dict(TINY, learn_sigma=True, class_dropout_prob=0.1)
    model = DiT(**config).eval()
    model.load_state_dict(sd, strict=True)
    x, t, y = inputs(10)
    assert rel_err(model(x, t, y), with_dit_timestep_features(theirs)(x, timestep=t, class_labels=y).sample) <= 1e-5

@pytest.mark.parametrize("K", [10, 1000, 1200])
def test_roundtrip_ours_diffusers_ours_is_bit_identical(tmp_path, K):
    model = tiny(num_classes=K)
    write_diffusers_dit(model.state_dict(), dict(TINY, num_classes=K), str(tmp_path))
    sd, config = read_diffusers_dit(str(tmp_path))
    assert config == dict(TINY, num_classes=K, learn_sigma=True, class_dropout_prob=0.1)
    assert sd.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert sd[k].dtype == v.dtype and torch.equal(sd[k], v), k

def test_xl2_key_layout_matches_diffusers_both_ways(diffusers):
    with torch.device("meta"):  # shapes only: 675M parameters, no memory
        ours = DiT_models["DiT-XL/2"]()
        theirs = diffusers.DiTTransformer2DModel(out_channels=8)  # its defaults are the XL/2-256 config
    layout = models._to_diffusers(ours.state_dict(), ours.depth)
    assert {k: v.shape for k, v in layout.items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    back = models._from_diffusers(theirs.state_dict(), ours)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in ours.state_dict().items()}
    assert len(layout) == 28 * 19 + 6 and len(back) == 292  # 19 tensors a block there; the published checkpoint's 292 here

# -----------------------------------------------------------------------------
# what DiTPipeline does with an exported K-class model

@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 copy= warning inside diffusers' DPM-Solver
@torch.no_grad()
def test_dit_pipeline_samples_from_an_exported_k_class_folder(diffusers, tmp_path):
    write_diffusers_dit(tiny().state_dict(), TINY, str(tmp_path))
    transformer = diffusers.DiTTransformer2DModel.from_pretrained(str(tmp_path)).eval()
    assert transformer.config.num_embeds_ada_norm == 1000  # the table is padded to 1001 rows, null row at 1000 ...
    x, t, _ = inputs(10)
    null = transformer(x, timestep=t, class_labels=torch.full((6,), 1000)).sample
    for label in (10, 555, 999):  # ... and every unused id K..999 is a copy of it: the unconditional model
        assert torch.equal(transformer(x, timestep=t, class_labels=torch.full((6,), label)).sample, null)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2, layers_per_block=1,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8).eval()
    pipe = diffusers.DiTPipeline(transformer=transformer, vae=vae, scheduler=diffusers.DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=[0, 9], guidance_scale=4.0, num_inference_steps=3, generator=torch.manual_seed(0), output_type="np").images
    assert images.shape == (2, 16, 16, 3) and images.min() >= 0 and images.max() <= 1  # 8x8 latents, a 2x VAE
    assert pipe.labels == {}  # id2label is only get_label_ids' name -> id lookup; ids index the table directly

# -----------------------------------------------------------------------------
# refusals: one readable line each

def tamper(folder, **config):
    """Rewrite an exported folder's config.json with some keys changed."""
    path = os.path.join(folder, "config.json")
    c = json.load(open(path))
    json.dump({**c, **config}, open(path, "w"))

@pytest.mark.parametrize("kind", ["UNet2DModel", "AutoencoderKL"])
def test_unet_and_vae_folders_are_refused(diffusers, tmp_path, kind):
    small = dict(block_out_channels=(8, 16), norm_num_groups=8, layers_per_block=1)
    if kind == "UNet2DModel":
        m = diffusers.UNet2DModel(sample_size=8, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, **small)
    else:
        m = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, **small)
    m.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=f"^{tmp_path}: not a diffusers DiT: its config.json describes a {kind} \\(a DiT is") as e:
        read_diffusers_dit(str(tmp_path))
    assert "\n" not in str(e.value)

def test_config_weight_disagreement_is_refused(tmp_path):
    write_diffusers_dit(tiny().state_dict(), TINY, str(tmp_path))
    tamper(str(tmp_path), num_layers=3)
    with pytest.raises(ValueError, match=f"^{tmp_path}: the weights do not fit its config.json .*'depth': 3.*: missing transformer_blocks.2"):
        read_diffusers_dit(str(tmp_path))
    tamper(str(tmp_path), num_layers=2, attention_head_dim=8)
    with pytest.raises(ValueError, match=r"do not fit .*: shape pos_embed.proj.weight \(64, 4, 2, 2\) vs \(32, 4, 2, 2\), .*\(\+40 more\)"):
        read_diffusers_dit(str(tmp_path))
    tamper(str(tmp_path), attention_head_dim=16, norm_type="layer_norm")
    with pytest.raises(ValueError, match="describes a DiTTransformer2DModel with norm_type layer_norm"):
        read_diffusers_dit(str(tmp_path))

def test_differing_embedder_copies_are_refused(tmp_path):
    write_diffusers_dit(tiny().state_dict(), TINY, str(tmp_path))
    path = str(tmp_path / "diffusion_pytorch_model.safetensors")
    sd, meta = files.read_safetensors(path)
    sd["transformer_blocks.1.norm1.emb.timestep_embedder.linear_2.bias"] += 1e-3
    files.write_safetensors(path, sd, meta)
    with pytest.raises(ValueError, match=f"^{tmp_path}: the per-block copies of norm1.emb.timestep_embedder.linear_2.bias differ "
                                         r"\(transformer_blocks.1.* is not block 0's\)"):
        read_diffusers_dit(str(tmp_path))

def test_truncated_or_pickled_weights_are_refused(tmp_path):
    write_diffusers_dit(tiny().state_dict(), TINY, str(tmp_path))
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated: tensor .* the file is incomplete"):
        read_diffusers_dit(str(tmp_path))
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))
    os.remove(path)
    torch.save({"x": Evil()}, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="diffusion_pytorch_model.bin: refused.*GLOBAL posix.system"):
        read_diffusers_dit(str(tmp_path))
    assert not (tmp_path / "pwned").exists()

def test_export_refuses_what_diffusers_cannot_hold(tmp_path):
    model = tiny()
    gamma = dict(model.state_dict(), **{"blocks.0.gamma_attn": torch.ones(64)})
    with pytest.raises(ValueError, match=r"does not fit .*unexpected blocks.0.gamma_attn \(merge DiffFit's γ first: difffit.merge\)"):
        write_diffusers_dit(gamma, TINY, str(tmp_path))
    trick = dict(model.state_dict(), pos_embed=models.get_2d_sincos_pos_embed(64, 4, scale=2.0)[None])
    with pytest.raises(ValueError, match=r"pos_embed is not the standard 4x4 sin-cos table"):
        write_diffusers_dit(trick, TINY, str(tmp_path))
    no_null = tiny(class_dropout_prob=0.0)
    with pytest.raises(ValueError, match="a null class row"):
        write_diffusers_dit(no_null.state_dict(), dict(TINY, class_dropout_prob=0.0), str(tmp_path))
    assert os.listdir(tmp_path) == []  # nothing half-written

# -----------------------------------------------------------------------------
# pinned hashes

@contextlib.contextmanager
def serving(files):
    """A loopback HTTP server for {url path: bytes}; other paths get a 404."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path not in files:
                return self.send_error(404)
            self.send_response(200)
            self.send_header("Content-Length", str(len(files[self.path])))
            self.end_headers()
            self.wfile.write(files[self.path])
        def log_message(self, *args):
            pass
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()

def test_pinned_entry_refuses_a_wrong_file_and_leaves_nothing(tmp_path, monkeypatch):
    name = "sd-vae-ft-mse.safetensors"
    url, sha = files.PRETRAINED[name]
    assert sha == "a1d993488569e928462932c8c38a0760b874d166399b14414135bd9c42df5815"
    with serving({"/" + name: b"not the VAE" * 1000}) as server:
        monkeypatch.setattr(files, "PRETRAINED", {name: (server + "/" + name, sha)})
        monkeypatch.setattr(files, "PRETRAINED_DIR", str(tmp_path))
        with pytest.raises(ValueError, match="SHA-256 .* is not the expected a1d993488569e928...; download deleted"):
            files.pretrained_file(name)
    assert os.listdir(tmp_path) == []  # no file, no temp file, no recorded hash

def test_hub_name_is_downloaded_once_then_read_offline(tmp_path, monkeypatch):
    model = tiny()
    write_diffusers_dit(model.state_dict(), TINY, str(tmp_path / "repo"))
    hub = "/facebook/DiT-XL-2-256/resolve/main/transformer/"
    served = {hub + f: (tmp_path / "repo" / f).read_bytes() for f in ("config.json", "diffusion_pytorch_model.safetensors")}
    monkeypatch.setattr(files, "PRETRAINED_DIR", str(tmp_path / "pretrained"))
    with serving(served) as server:  # the hub's URLs, served from loopback
        monkeypatch.setattr(files, "PRETRAINED", {k: (url.replace("https://huggingface.co", server), sha)
                                                   for k, (url, sha) in files.PRETRAINED.items()})
        sd, config = read_diffusers_dit("facebook/DiT-XL-2-256")
    sd2, _ = read_diffusers_dit("facebook/DiT-XL-2-256")  # server gone: the downloaded folder is read
    assert config == dict(TINY, learn_sigma=True, class_dropout_prob=0.1)
    assert all(torch.equal(sd[k], v) and torch.equal(sd2[k], v) for k, v in model.state_dict().items())
    folder = tmp_path / "pretrained" / "facebook" / "DiT-XL-2-256" / "transformer"
    assert sorted(os.listdir(folder)) == ["config.json", "config.json.sha256", "diffusion_pytorch_model.safetensors",
                                          "diffusion_pytorch_model.safetensors.sha256"]  # no hash published: recorded

# -----------------------------------------------------------------------------
# the scripts: train from a diffusers folder, sample from the delta, export the result back

def test_train_sample_and_export_with_a_diffusers_base(diffusers, tmp_path, monkeypatch):
    import subprocess, sys
    from PIL import Image
    import sample, train
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for c in ("a", "b", "c"):
        os.makedirs(tmp_path / "imgs" / c)
        for i in range(2):
            Image.fromarray(torch.randint(0, 255, (64, 64, 3), dtype=torch.uint8).numpy()).save(tmp_path / "imgs" / c / f"{i}.png")
    write_diffusers_dit(tiny().state_dict(), TINY, str(tmp_path / "dit"))  # the base: a diffusers folder
    vae = models.AutoencoderKL(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)  # random, tiny
    monkeypatch.setattr(train, "load_vae", lambda name: vae)
    monkeypatch.setattr(sample, "load_vae", lambda name: vae)
    run_dir = train.main(train.parser.parse_args([
        "--data", str(tmp_path / "imgs"), "--data-dir", str(tmp_path / "data"), "--image-size", "64", "--ckpt", str(tmp_path / "dit"),
        "--results-dir", str(tmp_path / "results"), "--global-batch-size", "2", "--max-steps", "2", "--sample-steps", "2",
        "--num-workers", "0", "--precision", "fp32"]))
    delta = os.path.join(run_dir, "delta.safetensors")
    sample.main(sample.parser.parse_args(["--delta", delta, "--steps", "2", "--out", str(tmp_path / "s.png"), "--precision", "fp32"]))
    assert (tmp_path / "s.png").exists()
    r = subprocess.run([sys.executable, "difffit.py", "--export", delta, "--out", str(tmp_path / "out")], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    theirs = diffusers.DiTTransformer2DModel.from_pretrained(str(tmp_path / "out"))
    assert theirs.config.num_embeds_ada_norm == 1000 and theirs.config._difffit_num_classes == 3
    merged, _, _ = models.load_model(os.path.join(run_dir, "model.safetensors"))
    back, config = read_diffusers_dit(str(tmp_path / "out"))  # the exported folder is the merged model, exactly
    assert config["num_classes"] == 3 and all(torch.equal(back[k], v) for k, v in merged.state_dict().items())
