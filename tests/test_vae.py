"""
Tests for the SD VAE: equality with diffusers' AutoencoderKL (test-only dependency, built from a config
dict with random weights, never downloaded), the state-dict layout of sd-vae-ft-*, and the local loaders.

    python -m pytest tests/test_vae.py
"""

import pytest
import torch

from models import AutoencoderKL, VAE_SCALE, load_vae

diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

# a small config (2 levels -> factor 2, 8 groups) for speed, and the published sd-vae-ft-{ema,mse} config.json
SMALL = dict(in_channels=3, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4)
SD_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
              up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
              layers_per_block=2, latent_channels=4, norm_num_groups=32, act_fn="silu", sample_size=256)
OLD_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

def diffusers_vae(cfg):
    """diffusers' AutoencoderKL for one of our configs."""
    n = len(cfg["block_out_channels"])
    return diffusers.AutoencoderKL(out_channels=cfg["in_channels"], down_block_types=["DownEncoderBlock2D"] * n,
                                   up_block_types=["UpDecoderBlock2D"] * n, **cfg)

@pytest.fixture(scope="module")
def pair():
    """(ours, diffusers') small VAEs in eval mode holding the same random weights."""
    torch.manual_seed(0)
    ref = diffusers_vae(SMALL).eval()
    # default init leaves norms at (1, 0) and makes attention nearly uniform: perturb so every term matters
    sd = {k: v + 0.2 * torch.randn_like(v) if "norm" in k or k.endswith("bias") else 3 * v if "to_" in k else v
          for k, v in ref.state_dict().items()}
    ref.load_state_dict(sd)
    ours = AutoencoderKL(**SMALL).eval()
    ours.load_state_dict(sd, strict=True)
    return ours, ref

def rel_err(a, b):
    """max |a - b| relative to max |b|."""
    return ((a - b).abs().max() / b.abs().max()).item()

# -----------------------------------------------------------------------------
# architecture: equality with diffusers

def test_full_config_state_dict_matches_diffusers_sd_vae():
    with torch.device("meta"):  # shapes only, no 335 MB of weights
        ours, ref = AutoencoderKL(), diffusers.AutoencoderKL(**SD_VAE)
    ours_shapes = [(k, tuple(v.shape)) for k, v in ours.state_dict().items()]
    assert ours_shapes == [(k, tuple(v.shape)) for k, v in ref.state_dict().items()]  # same keys, shapes and order
    assert len(ours_shapes) == 248 and sum(p.numel() for p in ours.parameters()) == 83_653_863

def test_small_config_state_dict_matches_diffusers(pair):
    ours, ref = pair
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [(k, v.shape) for k, v in ref.state_dict().items()]

@torch.no_grad()
def test_encode_matches_diffusers(pair):
    ours, ref = pair
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mean, std = ours.encode(x)
    post = ref.encode(x).latent_dist
    assert mean.shape == std.shape == (2, 4, 16, 16)  # 2 levels: factor 2 (the full config's 4 levels: factor 8)
    assert rel_err(mean, post.mean) < 1e-5 and rel_err(std, post.std) < 1e-5

@torch.no_grad()
def test_decode_matches_diffusers(pair):
    ours, ref = pair
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2)) / VAE_SCALE  # as DiT decodes
    img = ours.decode(z)
    assert img.shape == (2, 3, 32, 32)
    assert rel_err(img, ref.decode(z).sample) < 1e-5

@torch.no_grad()
def test_channels_last_gives_same_result(pair):
    ours, _ = pair
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    m = AutoencoderKL(**SMALL).eval()
    m.load_state_dict(ours.state_dict())
    m = m.to(memory_format=torch.channels_last)
    xc = x.to(memory_format=torch.channels_last)
    assert rel_err(m.encode(xc)[0], ours.encode(x)[0]) < 1e-5
    assert rel_err(m.decode(m.encode(xc)[0]), ours.decode(ours.encode(x)[0])) < 1e-5

@torch.no_grad()
def test_bf16_autocast_is_close_and_returns_fp32(pair):
    ours, _ = pair
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    mean, std = ours.encode(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mean16, std16 = ours.encode(x)
        img16 = ours.decode(mean)
    assert mean16.dtype == std16.dtype == img16.dtype == torch.float32
    assert rel_err(mean16, mean) < 0.05 and rel_err(std16, std) < 0.05 and rel_err(img16, ours.decode(mean)) < 0.05

# -----------------------------------------------------------------------------
# loading local files

def old_layout(sd, conv):
    """The state dict as older diffusers files store it: query/key/value/proj_attn, optionally as 1x1 convs."""
    out = {}
    for k, v in sd.items():
        for new, old in OLD_NAMES.items():
            if ".attentions.0." + new + "." in k:
                k = k.replace("." + new + ".", "." + old + ".")
                v = v[:, :, None, None] if conv and v.ndim == 2 else v
        out[k] = v
    return out

@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("layout", ["new", "old", "old-conv"])
def test_load_vae_accepts_both_key_layouts(pair, tmp_path, fmt, layout):
    sd = pair[0].state_dict()
    file_sd = sd if layout == "new" else old_layout(sd, conv=layout == "old-conv")
    assert file_sd.keys() != sd.keys() or layout == "new"
    if layout == "old-conv":  # also an fp16 file: loads as fp32
        file_sd, sd = {k: v.half() for k, v in file_sd.items()}, {k: v.half().float() for k, v in sd.items()}
    path = str(tmp_path / f"diffusion_pytorch_model.{fmt}")
    if fmt == "safetensors":
        safetensors_torch.save_file({k: v.contiguous() for k, v in file_sd.items()}, path)
    else:
        torch.save(file_sd, path)
    for p in (path, str(tmp_path)):  # the file, or the folder holding it
        loaded = load_vae(p, **SMALL).state_dict()
        assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)

@pytest.mark.parametrize("safe", [True, False])
def test_load_vae_reads_diffusers_save_pretrained_folder(pair, tmp_path, safe):
    ours, ref = pair
    ref.save_pretrained(str(tmp_path), safe_serialization=safe)  # .safetensors or .bin, written by diffusers itself
    loaded = load_vae(str(tmp_path), **SMALL)
    assert all(torch.equal(v, ref.state_dict()[k]) and v.dtype == torch.float32 for k, v in loaded.state_dict().items())

PWNED = []

def _pwn():
    PWNED.append(1)

class Evil:
    """Pickles as 'call _pwn()' on load."""
    def __reduce__(self):
        return _pwn, ()

def test_bin_with_pickled_callable_is_refused(pair, tmp_path):
    path = str(tmp_path / "diffusion_pytorch_model.bin")
    torch.save({**pair[0].state_dict(), "evil": Evil()}, path)
    with pytest.raises(ValueError, match="refused") as e:
        load_vae(path, **SMALL)
    assert path in str(e.value) and "_pwn" in str(e.value) and "\n" not in str(e.value) and not PWNED

def test_bad_keys_give_one_clear_error(pair, tmp_path):
    sd = dict(pair[0].state_dict())
    del sd["encoder.conv_in.weight"]
    sd["encoder.extra"] = torch.zeros(1)
    path = str(tmp_path / "bad.safetensors")
    safetensors_torch.save_file(sd, path)
    with pytest.raises(ValueError) as e:
        load_vae(path, **SMALL)
    msg = str(e.value)
    assert path in msg and "encoder.conv_in.weight" in msg and "encoder.extra" in msg and "\n" not in msg
    path = str(tmp_path / "good.bin")
    torch.save(pair[0].state_dict(), path)
    with pytest.raises(ValueError, match="shape") as e:  # right keys, wrong config
        load_vae(path, **{**SMALL, "latent_channels": 8})
    assert "encoder.conv_out.weight" in str(e.value) and "\n" not in str(e.value)
