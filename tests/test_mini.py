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
    vae = C.PatchVAE(latent_channels=5, patch=4)
    x = torch.randn(3, 3, 16, 16) * torch.linspace(0.1, 2, 16)  # patches of unequal energy
    C.pca_init(vae, x)
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
    s = torch.linalg.svdvals(F.unfold(x, 4, stride=4).transpose(1, 2).reshape(-1, 48))
    assert torch.allclose(((rec - x) ** 2).sum(), (s[5:] ** 2).sum(), rtol=1e-4)
    assert vae.encode(x).latent_dist.mode().shape == (3, 5, 4, 4)


def test_patch_vae_frame_dim_and_residual_starts_at_zero():
    vae = C.PatchVAE(latent_channels=4)
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
    vae = C.PatchVAE(**C.PRESETS[preset].vae).eval()
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
        dit, vae = C.load_dit("mini-flux2"), C.load_vae("mini-flux2")
    assert C.PRESETS["mini-flux1"].dit_steps == 8000  # FluxSR's base (README, mini)
    assert isinstance(vae, C.PatchVAE) and vae.bn.running_var.mean() != 1  # the stored latent statistics
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "mini-flux2" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in dit.state_dict().items())
    z = C.encode(vae, "flux2", torch.rand(1, 3, 64, 64))
    v = C.velocity("flux2", dit, z, torch.tensor([0.5]), C.tiny_cond(dit, "flux2"))
    assert v.shape == z.shape and torch.isfinite(v).all()


def test_mini_model_flag_and_defaults():
    import smfsr, strsr, teasr
    assert C.resolve_preset("mini", "sd35-medium") == "mini-sd3"
    teacher, isc = smfsr.Config(model="mini", stage="teacher"), smfsr.Config(model="mini", stage="isc", max_steps=50)
    smfsr.resolve(teacher), smfsr.resolve(isc)
    assert (teacher.max_steps, teacher.lr) == (1000, 3e-3) and (isc.max_steps, isc.lr) == (50, smfsr.MINI["lr"])
    assert teacher.base_rank == isc.base_rank == 0 and smfsr.Config().base_rank == -1  # the mini's base trains
    gan = smfsr.Config(model="mini", stage="gan")
    smfsr.resolve(gan)  # stage 2 of the mini: MSE and a tenth of L_ISC; the paper's weights untouched
    assert (gan.max_steps, gan.w_isc, gan.w_vsd, gan.w_gan, gan.w_lpips, gan.w_rec) == (600, 0.1, 0, 0, 0, 1.0)
    assert (smfsr.Config().w_vsd, smfsr.Config().w_gan, smfsr.Config().w_lpips) == (1.0, 0.5, 1.0)
    cfg = teasr.Config(model="mini", lr=2e-3)
    assert teasr.resolve(cfg) == "mini-qwen"
    assert cfg.lr == 2e-3 and cfg.max_steps == teasr.MINI["max_steps"] and cfg.eval_heldout  # given flag kept
    assert cfg.train_noise and (cfg.tile, cfg.crop) == (16, 128) and not teasr.Config().train_noise  # paper: frozen
    assert cfg.lr_decay == 0.5 and teasr.Config().lr_decay == 0  # the mini's lr decays; the paper's is constant
    cfg = strsr.resolve(strsr.Config(model="mini"))
    assert cfg.model == "mini-flux2" and cfg.crop == strsr.MINI["crop"] and cfg.lr_g == strsr.MINI["lr_g"]
    assert cfg.degrade == "bicubic" and cfg.lora_rank == 0  # the classical LR, full fine-tuning
    assert strsr.Config().degrade == "realesrgan"  # the papers' runs are untouched
    with pytest.raises(SystemExit, match="--degrade 'jpeg'"):
        strsr.resolve(strsr.Config(model="mini", degrade="jpeg"))
    assert not C.is_tiny("mini-flux2") and C.is_tiny("tiny-flux2") and not C.is_tiny("flux2-klein")
    with pytest.raises(SystemExit, match="mini presets"):
        C.pretrain("tiny-flux2")


def test_lpips_rand_is_one_fixed_network():
    a, b = C.load_lpips("cpu", pretrained=False), C.load_lpips("cpu", pretrained=False)
    x, y = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    assert not a.pretrained and float(a(x, y)) == float(b(x, y)) > 0 and float(a(x, x)) == 0


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
