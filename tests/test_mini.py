"""The mini bases: the lapped autoencoder's math, the family latent conventions, pretraining and its cache, the
--model mini defaults, and eval.py's bicubic-vs-method table with the offline LPIPS-rand."""
import json, os, sys

import pytest
import torch
import torch.nn.functional as F

import common as C

from helpers import run


def test_lapped_autoencoder_with_every_component_reconstructs_exactly():
    """Princen-Bradley: the sine windows' squares sum to 1 where two overlap, so the lapped transform with all
    3 x 16 x 16 components returns the image exactly away from the 4-px border (where one window covers)."""
    torch.manual_seed(0)
    vae = C.mini_vae_class()(latent_channels=768)
    x = torch.rand(4, 3, 128, 128) * 2 - 1
    C.pca_init(vae, x)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        rec = vae.decode(z).sample
    assert z.shape == (4, 768, 16, 16)
    assert torch.allclose(rec[..., 4:-4, 4:-4], x[..., 4:-4, 4:-4], atol=1e-4)
    assert not torch.allclose(rec[..., :4, :], x[..., :4, :], atol=1e-2)  # the border: one window only


def test_lapped_autoencoder_frame_dim_and_smooth_atoms():
    vae = C.mini_vae_class()(latent_channels=4)
    C.pca_init(vae, torch.rand(2, 3, 64, 64) * 2 - 1)
    x = torch.rand(2, 3, 1, 16, 24) * 2 - 1  # Qwen's video VAE call: (B, C, T=1, H, W)
    z = vae.encode(x).latent_dist.mode()
    assert z.shape == (2, 4, 1, 2, 3)
    with torch.no_grad():
        assert torch.equal(vae.decode(z).sample[:, :, 0], vae.dec(z[:, :, 0]))
        one = torch.zeros(1, 4, 4, 4)
        one[0, 0, 1, 1] = 1
        atom = (vae.decode(one).sample - vae.dec.bias.view(1, 3, 1, 1)).abs().sum(1)[0]  # one latent's footprint
    assert atom[8:16, 8:16].sum() > 0.5 * atom.sum()  # centred on its own 8x8 patch
    assert atom[4, 4:20].max() < 0.05 * atom.max()  # fading to ~0 at the window edge: no square


@pytest.mark.parametrize("preset", ["mini-flux1", "mini-flux2", "mini-qwen"])
def test_latent_stats_normalise_in_the_family_convention(preset):
    """After set_latent_stats, common.encode gives zero-mean unit-variance latents: globally (FLUX.1 shift/
    scale), per channel (Qwen latents_mean/std), per patchified channel (FLUX.2 BatchNorm stats)."""
    fam = C.PRESETS[preset].family
    vae = C.mini_vae_class()(**C.PRESETS[preset].vae).eval()
    x = torch.rand(8, 3, 64, 64) * torch.rand(8, 3, 1, 1)
    C.pca_init(vae, x * 2 - 1)
    with torch.no_grad():
        C.set_latent_stats(vae, fam, vae.encode(x * 2 - 1).latent_dist.mode())
    z = C.encode(vae, fam, x)
    dims = (0, 1, 2, 3) if fam == "flux1" else (0, 2, 3)
    assert torch.allclose(z.mean(dims), torch.zeros(()), atol=1e-4)
    assert torch.allclose(z.std(dims), torch.ones(()), atol=2e-2)
    assert torch.allclose(C.decode(vae, fam, z), vae.decode(vae.encode(x * 2 - 1).latent_dist.mode()).sample.add(1) / 2,
                          atol=1e-5)  # decode() undoes the normalisation


def test_pretrain_writes_a_base_that_loads_and_is_reused(tmp_path, monkeypatch, capsys):
    """prepare_base pretrains a missing base (announced), writes safetensors + JSON; then reuses it (the weights are
    the saved ones) until the preset's recipe changes."""
    import dataclasses
    monkeypatch.setattr(C, "MINI_DIR", str(tmp_path))
    monkeypatch.setitem(C.PRESETS, "mini-flux2", dataclasses.replace(C.PRESETS["mini-flux2"], vae_steps=2,
                                                                     dit_steps=3))
    C.prepare_base("mini-flux2")
    out = capsys.readouterr().out
    assert "pretraining it now" in out and "held-out PSNR" in out and "flow-matching loss" in out
    info = json.load(open(tmp_path / "mini-flux2" / "pretrain.json"))
    assert info["recipe"] == [C.MINI_VERSION, 2, 3] and info["vae_psnr"] > 25  # the SVD already reconstructs
    monkeypatch.setattr(C, "pretrain", lambda *a, **k: pytest.fail("the cached base was not reused"))
    C.prepare_base("mini-flux2")
    dit, vae = C.load_dit("mini-flux2"), C.load_vae("mini-flux2")
    assert isinstance(vae, C.mini_vae_class()) and vae.bn.running_var.mean() != 1  # the stored latent statistics
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "mini-flux2" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in dit.state_dict().items())
    z = C.encode(vae, "flux2", torch.rand(1, 3, 64, 64))
    v = C.velocity("flux2", dit, z, torch.tensor([0.5]), C.tiny_cond(dit, "flux2"))
    assert v.shape == z.shape and torch.isfinite(v).all()
    monkeypatch.setitem(C.PRESETS, "mini-flux2", dataclasses.replace(C.PRESETS["mini-flux2"], dit_steps=4))
    with pytest.raises(pytest.fail.Exception, match="not reused"):  # another recipe: pretrained again
        C.prepare_base("mini-flux2")


def test_loading_never_trains(tmp_path, monkeypatch):
    """A mini preset without its base is a clear error from the loader; pretraining is prepare_base's, announced."""
    monkeypatch.setattr(C, "MINI_DIR", str(tmp_path))
    monkeypatch.setattr(C, "pretrain", lambda *a, **k: pytest.fail("a loader pretrained"))
    with pytest.raises(SystemExit, match="no pretrained base"):
        C.load_dit("mini-sd3")


def test_mini_presets_per_method_and_stage():
    import smfsr, strsr, teasr
    assert C.resolve_preset("mini", "sd35-medium") == "mini-sd3"
    cfg = lambda mod, **kw: mod.resolve(C.configure(mod.Config, model="mini", **kw))
    teacher, isc = cfg(smfsr, stage="teacher"), cfg(smfsr, stage="isc", max_steps=50)
    assert (teacher.max_steps, teacher.lr) == (1000, 3e-3) and (isc.max_steps, isc.lr) == (50, 3e-4)
    assert teacher.train_base == isc.train_base == "full" and smfsr.Config().train_base == "none"  # the mini trains it
    gan = cfg(smfsr, stage="gan")  # stage 2 of the mini: the MSE alone; the paper's weights untouched
    assert (gan.max_steps, gan.w_isc, gan.w_vsd, gan.w_gan, gan.w_lpips, gan.w_rec) == (1200, 0, 0, 0, 0, 1.0)
    assert (isc.w_isc, smfsr.Config().w_vsd, smfsr.Config().w_gan, smfsr.Config().w_lpips) == (1.0, 1.0, 0.5, 1.0)
    t = cfg(teasr, lr=2e-3)
    assert t.model == "mini-qwen" and t.lr == 2e-3 and t.max_steps == teasr.MINI["max_steps"] and t.eval_heldout
    assert t.train_base == "full" and (t.tile, t.crop) == (16, 128) and teasr.Config().train_base == "none"
    assert t.lr_decay == 0.5 and teasr.Config().lr_decay == 0  # the mini's lr decays; the paper's is constant
    s = cfg(strsr)
    assert s.model == "mini-flux2" and s.crop == strsr.MINI["crop"] and s.lr == strsr.MINI["lr"]
    assert s.degrade == "bicubic" and s.train_base == "full" and strsr.Config().degrade == "realesrgan"
    with pytest.raises(SystemExit, match="--degrade 'jpeg'"):
        cfg(strsr, degrade="jpeg")


def test_lpips_rand_is_one_fixed_network():
    a, b = C.load_lpips("cpu"), C.load_lpips("cpu")
    x, y = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    assert float(a(x, y)) == float(b(x, y)) > 0 and float(a(x, x)) == 0


def test_eval_runs_several_methods_into_one_table(tmp_path):
    """--method bicubic,bicubic2 style: one row per method; LPIPS-rand needs no download."""
    import eval as E
    hr, sr = tmp_path / "HR", tmp_path / "SR"
    x = torch.rand(1, 3, 32, 32)
    C.save_image(x, str(hr / "a.png")), C.save_image(x, str(sr / "a.png"))
    rows = E.main(["--sr", str(sr), "--hr", str(hr), "--metrics", "PSNR,LPIPS-rand", "--out_dir", str(tmp_path / "o")])
    assert rows[0]["LPIPS-rand"] == 0 and rows[0]["PSNR"] > 60
    rows = E.main(["--method", "bicubic,bicubic", "--bench", "sample", "--limit", "1", "--metrics", "PSNR",
                   "--data_root", str(tmp_path / "data"), "--out_dir", str(tmp_path / "o2")])
    assert [r["method"] for r in rows] == ["bicubic", "bicubic"] and rows[0]["PSNR"] == rows[1]["PSNR"]
    with pytest.raises(SystemExit, match="--name"):
        E.main(["--method", "bicubic,strsr", "--name", "x"])
