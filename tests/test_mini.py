"""The mini bases: PatchVAE math, the family latent conventions, pretraining and its cache, the
--model mini defaults, and eval.py's bicubic-vs-method table with the offline LPIPS-rand."""
import json, os, sys

import pytest
import torch
import torch.nn.functional as F

import common as C

from helpers import run


def test_pca_init_is_the_truncated_svd():
    """Eckart-Young: with the residual branch at zero, the PCA-initialised autoencoder's squared error on
    its own patches equals the energy of the discarded singular values."""
    torch.manual_seed(0)
    vae = C.mini_vae_class()(latent_channels=5, patch=4)
    x = torch.randn(3, 3, 16, 16) * torch.linspace(0.1, 2, 16)  # patches of unequal energy
    C.pca_init(vae, x)
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
    s = torch.linalg.svdvals(F.unfold(x, 4, stride=4).transpose(1, 2).reshape(-1, 48))
    assert torch.allclose(((rec - x) ** 2).sum(), (s[5:] ** 2).sum(), rtol=1e-4)
    assert vae.encode(x).latent_dist.mode().shape == (3, 5, 4, 4)


def test_patch_vae_frame_dim_and_residual_starts_at_zero():
    vae = C.mini_vae_class()(latent_channels=4)
    x = torch.rand(2, 3, 1, 16, 24) * 2 - 1  # Qwen's video VAE call: (B, C, T=1, H, W)
    z = vae.encode(x).latent_dist.mode()
    assert z.shape == (2, 4, 1, 2, 3)
    with torch.no_grad():
        assert torch.equal(vae.decode(z).sample[:, :, 0], vae.dec(z[:, :, 0]))


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
    assert torch.allclose(C.decode(vae, fam, z), C.decode(vae, fam, C.encode(vae, fam, C.decode(vae, fam, z))), atol=1e-4)


def test_pretrain_writes_a_base_that_loads_and_is_reused(tmp_path, monkeypatch):
    """`common.py pretrain` runs a few steps, writes safetensors + JSON; load_dit/load_vae then read that
    cache without pretraining again (and the weights are the saved ones)."""
    r = run([sys.executable, "common.py", "pretrain", "--model", "mini-flux2", "--vae_steps", "2", "--dit_steps", "3",
             "--out", str(tmp_path / "mini-flux2")])
    assert "held-out PSNR" in r.stdout and "flow-matching loss" in r.stdout
    info = json.load(open(tmp_path / "mini-flux2" / "pretrain.json"))
    assert info["dit_steps"] == 3 and info["vae_psnr_svd"] > 28  # the SVD alone already reconstructs the photo
    assert os.path.exists(tmp_path / "mini-flux2" / "samples.png")
    assert os.path.exists(tmp_path / "mini-flux2" / "transformer" / "diffusion_pytorch_model.safetensors")
    monkeypatch.setattr(C, "MINI_DIR", str(tmp_path))
    monkeypatch.setattr(C, "pretrain", lambda *a, **k: pytest.fail("the cached base was not reused"))
    with pytest.warns(UserWarning, match="pretrained 3 DiT steps; mini-flux2 is now 1000"):  # a stale base is said
        C.prepare_base("mini-flux2")
    dit, vae = C.load_dit("mini-flux2"), C.load_vae("mini-flux2")
    assert C.PRESETS["mini-flux1"].dit_steps == 8000  # FluxSR's base (README, mini)
    assert isinstance(vae, C.mini_vae_class()) and vae.bn.running_var.mean() != 1  # the stored latent statistics
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "mini-flux2" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in dit.state_dict().items())
    z = C.encode(vae, "flux2", torch.rand(1, 3, 64, 64))
    v = C.velocity("flux2", dit, z, torch.tensor([0.5]), C.tiny_cond(dit, "flux2"))
    assert v.shape == z.shape and torch.isfinite(v).all()


def test_loading_never_trains(tmp_path, monkeypatch):
    """A mini preset without its base is a clear error from the loader; pretraining is prepare_base's, announced."""
    monkeypatch.setattr(C, "MINI_DIR", str(tmp_path))
    monkeypatch.setattr(C, "pretrain", lambda *a, **k: pytest.fail("a loader pretrained"))
    with pytest.raises(SystemExit, match="python common.py pretrain --model mini-sd3"):
        C.load_dit("mini-sd3")


def test_mini_presets_per_method_and_stage():
    import smfsr, strsr, teasr
    assert C.resolve_preset("mini", "sd35-medium") == "mini-sd3"
    cfg = lambda mod, **kw: mod.resolve(C.configure(mod.Config, model="mini", **kw))
    teacher, isc = cfg(smfsr, stage="teacher"), cfg(smfsr, stage="isc", max_steps=50)
    assert (teacher.max_steps, teacher.lr) == (1000, 3e-3) and (isc.max_steps, isc.lr) == (50, 3e-4)
    assert teacher.train_base == isc.train_base == "full" and smfsr.Config().train_base == "none"  # the mini trains it
    gan = cfg(smfsr, stage="gan")  # stage 2 of the mini: MSE and a tenth of L_ISC; the paper's weights untouched
    assert (gan.max_steps, gan.w_isc, gan.w_vsd, gan.w_gan, gan.w_lpips, gan.w_rec) == (600, 0.1, 0, 0, 0, 1.0)
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
    with pytest.raises(SystemExit, match="mini presets"):
        C.pretrain("tiny-flux2")


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
