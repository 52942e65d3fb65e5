"""common.py: presets, latent conventions, velocity calls, loading, data, the lr schedule, checkpoints, tiling."""
import os, sys

import numpy as np
import pytest
import torch
from PIL import Image

import common as C
import degrade as D

from helpers import run
TINY = ["tiny-flux1", "tiny-flux2", "tiny-zimage", "tiny-sd3", "tiny-qwen"]




# --------------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def tiny_models():
    return {p: (C.load_dit(p), C.load_vae(p)) for p in TINY}


def test_import_does_no_work():
    r = run([sys.executable, "-X", "importtime", "-c", "import common"])
    heavy = [l for l in r.stderr.splitlines() if l.rstrip().endswith(("diffusers", "transformers", "peft", "lpips"))]
    assert not heavy, heavy


@pytest.mark.parametrize("preset", TINY)
def test_vae_roundtrip_and_normalisation(tiny_models, preset):
    """encode/decode are the raw VAE plus an exactly invertible per-family normalisation."""
    fam = C.PRESETS[preset].family
    _, vae = tiny_models[preset]
    x = torch.rand(2, 3, 48, 64)
    z = C.encode(vae, fam, x)
    assert z.shape[-2:] == ((3, 4) if fam == "flux2" else (6, 8))
    with torch.no_grad():
        raw_in = (x * 2 - 1).unsqueeze(2) if fam == "qwen" else x * 2 - 1
        raw = vae.decode(vae.encode(raw_in).latent_dist.mode()).sample
        raw = raw[:, :, 0] if fam == "qwen" else raw
        y = C.decode(vae, fam, z)
    assert y.shape == x.shape
    torch.testing.assert_close(y, (raw + 1) / 2, atol=1e-5, rtol=1e-5)


def test_latent_statistics_follow_each_family():
    """The normalisation constants are the ones each family's pipeline uses."""
    vae = C.load_vae("tiny-sd3")
    z = torch.randn(1, 16, 4, 4)
    mean, std = C.latent_stats(vae, "sd3", z)
    assert float(mean.flatten()[0]) == pytest.approx(0.0609) and float(std.flatten()[0]) == pytest.approx(1 / 1.5305)
    q = C.load_vae("tiny-qwen")
    mean, std = C.latent_stats(q, "qwen", z)
    assert torch.allclose(mean.flatten(), torch.tensor(q.config.latents_mean))
    assert torch.allclose(std.flatten(), torch.tensor(q.config.latents_std))


def test_patchify_roundtrip_and_pack_matches_pipelines():
    from diffusers import Flux2KleinPipeline, FluxPipeline, QwenImagePipeline
    z = torch.randn(2, 16, 6, 8)
    assert torch.equal(C.unpatchify(C.patchify(z)), z)
    assert torch.equal(C.patchify(z), Flux2KleinPipeline._patchify_latents(z))
    assert torch.equal(C.pack(z), FluxPipeline._pack_latents(z, 2, 16, 6, 8))
    assert torch.equal(C.pack(z), QwenImagePipeline._pack_latents(z, 2, 16, 6, 8))
    assert torch.equal(C.unpack(C.pack(z), 6, 8), z)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("preset", TINY)
def test_velocity_matches_the_pipelines_call(tiny_models, preset, dtype):
    """common.velocity against the call each diffusers pipeline makes (its own packing, ids, timestep convention and
    timestep dtype), written out independently here. In bf16 the timestep stays fp32 where the pipeline keeps it
    (Z-Image, SD3): at these times bf16 would round it (251.3 -> 251, 0.7487 -> 0.75)."""
    from diffusers import Flux2KleinPipeline, FluxPipeline, QwenImagePipeline
    fam = C.PRESETS[preset].family
    dit = tiny_models[preset][0].to(dtype)
    B, (H, W) = 2, ((4, 6) if fam == "flux2" else (8, 12))
    Cz = 128 if fam == "flux2" else 16
    z, t = torch.randn(B, Cz, H, W), torch.tensor([0.2513, 0.8377])
    cond = C.expand_cond(C.tiny_cond(dit, fam), B)
    e = cond["embeds"].to(dtype)
    lat = lambda x: x.to(dtype)  # the pipelines' latents are in the transformer's dtype (FLUX, Qwen)
    try:
        with torch.no_grad():
            v = C.velocity(fam, dit, z, t, cond)
            if fam == "flux1":
                out = dit(hidden_states=lat(FluxPipeline._pack_latents(z, B, Cz, H, W)), encoder_hidden_states=e,
                          pooled_projections=cond["pooled"].to(dtype), timestep=lat(t),
                          img_ids=FluxPipeline._prepare_latent_image_ids(B, H // 2, W // 2, "cpu", torch.float32),
                          txt_ids=torch.zeros(e.shape[1], 3), guidance=torch.full((B,), 3.5)).sample
                ref = FluxPipeline._unpack_latents(out.float(), H * 8, W * 8, 8)
            elif fam == "flux2":
                out = dit(hidden_states=lat(Flux2KleinPipeline._pack_latents(z)), encoder_hidden_states=e,
                          timestep=lat(t), img_ids=Flux2KleinPipeline._prepare_latent_ids(z),
                          txt_ids=Flux2KleinPipeline._prepare_text_ids(e)).sample
                ref = out.float().transpose(1, 2).reshape(B, Cz, H, W)
            elif fam == "zimage":  # pipeline: timestep (1000 - t)/1000 in fp32, prediction = -output
                out = dit(list(lat(z).unsqueeze(2).unbind(0)), 1 - t, list(e.unbind(0))).sample
                ref = -torch.stack(out)[:, :, 0].float()
            elif fam == "sd3":  # pipeline: the scheduler's fp32 timesteps
                ref = dit(hidden_states=lat(z), encoder_hidden_states=e, pooled_projections=cond["pooled"].to(dtype),
                          timestep=t * 1000).sample.float()
            else:
                out = dit(hidden_states=lat(QwenImagePipeline._pack_latents(z, B, Cz, H, W)), encoder_hidden_states=e,
                          encoder_hidden_states_mask=cond["mask"], timestep=lat(t),
                          img_shapes=[[(1, H // 2, W // 2)]] * B).sample
                ref = QwenImagePipeline._unpack_latents(out.float(), H * 8, W * 8, 8)[:, :, 0]
    finally:
        dit.float()
    assert v.shape == z.shape
    tol = 1e-5 if dtype == torch.float32 else 0
    torch.testing.assert_close(v, ref, atol=tol, rtol=tol)


def test_sigma_convention_euler_lands_on_data():
    """z_t = (1-t) z_0 + t eps with v = eps - z_0: an Euler step of size t with the true v
    lands on z_0, and a step to s lands on z_s (the convention all methods rely on)."""
    z0, eps = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    t, s = 0.7, 0.3
    z_t = (1 - t) * z0 + t * eps
    v = eps - z0
    torch.testing.assert_close(z_t - t * v, z0)
    torch.testing.assert_close(z_t - (t - s) * v, (1 - s) * z0 + s * eps)


def test_velocity_time_is_mapped_to_each_family_scale(tiny_models):
    """The timestep each model's embedder sees: sigma*1000 for SD3 (explicitly), 1 - sigma for Z-Image."""
    seen = {}
    for preset, attr in [("tiny-sd3", "time_text_embed"), ("tiny-zimage", "t_embedder")]:
        dit, _ = tiny_models[preset]
        fam = C.PRESETS[preset].family
        h = getattr(dit, attr).register_forward_hook(lambda m, a, o, p=preset: seen.update({p: a[0].clone()}))
        with torch.no_grad():
            C.velocity(fam, dit, torch.randn(1, 16, 4, 4), torch.tensor([0.3]), C.tiny_cond(dit, fam))
        h.remove()
    assert torch.allclose(seen["tiny-sd3"].float(), torch.tensor([300.0]))
    assert torch.allclose(seen["tiny-zimage"].float() / C.load_dit("tiny-zimage").config.t_scale, torch.tensor([0.7]))


def test_save_pretrained_loads_back_through_user_loader(tmp_path, tiny_models):
    """The hub code path: from_pretrained on a folder, flat or pipeline-style subfolders."""
    dit, vae = tiny_models["tiny-flux1"]
    dit.save_pretrained(tmp_path / "flat")
    vae.save_pretrained(tmp_path / "pipe" / "vae")
    dit.save_pretrained(tmp_path / "pipe" / "transformer")
    for d in [C.load_dit("tiny-flux1", path=str(tmp_path / name)) for name in ("flat", "pipe")]:
        for a, b in zip(d.state_dict().values(), dit.state_dict().values()):
            assert torch.equal(a, b)
    v2 = C.load_vae("tiny-flux1", path=str(tmp_path / "pipe"))
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(C.encode(v2, "flux1", x), C.encode(vae, "flux1", x))


def test_tiny_weights_are_deterministic():
    a, b = C.load_dit("tiny-qwen"), C.load_dit("tiny-qwen")
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_lora_roundtrip_in_diffusers_format(tmp_path):
    from safetensors.torch import load_file, save_file
    dit = C.add_lora(C.load_dit("tiny-flux1"), "lora", 4, 4, ["to_q", "to_k"])
    for n, p in dit.named_parameters():
        if "lora_B" in n:
            p.data.normal_()
    sd = C.lora_state(dit)
    assert sd and all(k.startswith("transformer.") and "lora_" in k for k in sd)
    assert all(v.dtype == torch.float32 for v in sd.values())
    save_file(sd, tmp_path / "l.safetensors")
    fresh = C.add_lora(C.load_dit("tiny-flux1"), "lora", 4, 4, ["to_q", "to_k"])
    C.load_lora_state(fresh, load_file(tmp_path / "l.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(C.lora_state(fresh).values(), sd.values()))


def test_diffusers_loads_our_lora_with_its_alpha(tmp_path):
    """A checkpoint's LoRA with alpha != rank, loaded by a diffusers pipeline (saved with save_pretrained) through
    pipe.load_lora_weights, gives our transformer: the rank and alpha travel in diffusers' metadata key."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    none = dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=C.load_vae("tiny-flux1"),
                 transformer=C.load_dit("tiny-flux1"), **none).save_pretrained(tmp_path / "pipe")
    ours = C.add_lora(C.load_dit("tiny-flux1"), "lora", 4, 8, ["to_q", "to_k", "to_v"])  # scale alpha / r = 2
    for n, p in ours.named_parameters():
        if "lora_" in n:
            p.data.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(n)))
    ckpt = C.save_checkpoint(str(tmp_path / "run"), 1, {}, {"dit": ours}, {})
    pipe = FluxPipeline.from_pretrained(tmp_path / "pipe", **none)
    pipe.load_lora_weights(ckpt)
    z, cond = torch.randn(1, 16, 4, 4), C.tiny_cond(ours, "flux1")
    with torch.no_grad():
        want = C.velocity("flux1", ours, z, torch.tensor([0.5]), cond)
        got = C.velocity("flux1", pipe.transformer, z, torch.tensor([0.5]), cond)
        base = C.velocity("flux1", C.load_dit("tiny-flux1"), z, torch.tensor([0.5]), cond)
    assert (want - base).abs().max() > 1e-2  # the LoRA matters
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_train_base_full_is_full_fine_tuning_and_checkpoints_the_whole_dit(tmp_path):
    dit = C.add_lora(C.load_dit("tiny-flux1"), "full", 0, 0, ["to_q"])
    assert not getattr(dit, "peft_config", None)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in dit.parameters())
    for p in dit.parameters():
        p.data.add_(0.01)  # a "trained" DiT differs from the base everywhere
    ck = C.save_checkpoint(str(tmp_path), 1, {}, {"dit": dit}, {})
    assert not os.path.exists(os.path.join(ck, "pytorch_lora_weights.safetensors"))
    fresh = C.add_lora(C.load_dit("tiny-flux1"), "full", 0, 0, ["to_q"])
    C.load_checkpoint(ck, {"dit": fresh})
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), dit.state_dict().values()))


# --------------------------------------------------------------------------- data
def _write(path, arr, mode=None):
    Image.fromarray(arr, mode) if mode else Image.fromarray(arr)
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(path)


def test_image_modes_load_as_rgb(tmp_path):
    rgb = (np.random.rand(20, 30, 3) * 255).astype(np.uint8)
    _write(tmp_path / "rgb.png", rgb)
    _write(tmp_path / "gray.png", rgb[..., 0])
    rgba = np.concatenate([rgb, np.full((20, 30, 1), 255, np.uint8)], -1)
    _write(tmp_path / "rgba.png", rgba)
    Image.fromarray(rgb).convert("P").save(tmp_path / "pal.png")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(tmp_path / "g16.png")
    ref = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(C.load_image(tmp_path / "rgb.png"), ref)
    torch.testing.assert_close(C.load_image(tmp_path / "rgba.png"), ref)  # opaque alpha: unchanged
    g = C.load_image(tmp_path / "gray.png")
    assert g.shape == (3, 20, 30) and torch.equal(g[0], g[2])
    torch.testing.assert_close(g[0], ref[0])
    torch.testing.assert_close(C.load_image(tmp_path / "g16.png")[0], ref[0], atol=1e-4, rtol=0)
    assert C.load_image(tmp_path / "pal.png").shape == (3, 20, 30)


def test_dataset_edge_cases(tmp_path, capsys):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    _write(d / "sub" / "ok.jpg", (np.random.rand(80, 90, 3) * 255).astype(np.uint8))
    _write(d / "small.png", (np.random.rand(20, 24, 3) * 255).astype(np.uint8))
    (d / "corrupt.png").write_bytes(b"not a png")
    (d / "notes.txt").write_text("ignored")
    ds = D.ImageDataset(str(d), crop=32)
    assert len(ds) == 3  # recursive, extensions only
    xs = [ds[(i, 7)] for i in range(3)] + [ds[(i, 7)] for i in range(3)]
    assert all(x.shape == (3, 32, 32) and 0 <= x.min() and x.max() <= 1 for x in xs)
    err = capsys.readouterr().err
    assert err.count("unreadable") == 1 and err.count("smaller than crop") == 1  # reported once each
    assert torch.equal(ds[(1, 5)], ds[(1, 5)])  # a crop is a function of (index, seed)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no images"):
        D.ImageDataset(str(tmp_path / "empty"))
    with pytest.raises(SystemExit, match="not found"):
        D.ImageDataset("LSDIR", data_root=str(tmp_path))
    lst = tmp_path / "list.txt"
    lst.write_text(str(d / "sub" / "ok.jpg") + "\n")
    assert len(D.ImageDataset(str(lst), crop=16)) == 1


def test_sample_data_is_real_photos():
    ds = D.ImageDataset("sample", crop=64)
    assert len(ds) == len(C.SAMPLE_PHOTOS) >= 10
    x = ds[(0, 0)]
    assert x.shape == (3, 64, 64) and x.std() > 0.01


def test_step_sampler_shards_and_resumes():
    full = D.StepSampler(10, 4, 0, 1, seed=3)
    r0, r1 = D.StepSampler(10, 4, 0, 2, seed=3), D.StepSampler(10, 4, 1, 2, seed=3)
    take = lambda s, n: [next(it) for it in [iter(s)] for _ in range(n)]
    a, b0, b1 = take(full, 12), take(r0, 6), take(r1, 6)
    assert a == [x for k in range(3) for x in b0[2 * k:2 * k + 2] + b1[2 * k:2 * k + 2]]
    assert sorted(i for i, _ in a[:10]) == list(range(10))  # an epoch sees each image once
    assert take(D.StepSampler(10, 4, 0, 1, seed=3, start_step=2), 4) == a[8:12]


def test_lr_factor_is_constant_then_a_half_cosine_to_zero():
    assert [C.lr_factor(s, 100, 0.0) for s in (1, 50, 100)] == [1.0, 1.0, 1.0]  # decay 0: constant
    f = [C.lr_factor(s, 100, 0.5) for s in range(1, 101)]
    assert f[:50] == [1.0] * 50 and all(a >= b for a, b in zip(f, f[1:]))
    assert f[74] == pytest.approx(0.5) and f[99] == pytest.approx(0.0, abs=1e-12)  # midway, end
    assert f[59] == pytest.approx((1 + np.cos(np.pi * 10 / 50)) / 2)
    with pytest.raises(SystemExit, match="--lr_decay 1.5"):
        C.lr_factor(1, 100, 1.5)
    w = torch.nn.Parameter(torch.zeros(1))
    opts = [torch.optim.AdamW([w], lr=1e-3), torch.optim.AdamW([w], lr=1e-4)]
    C.set_lr(opts, 75, 100, 0.5)
    assert [o.param_groups[0]["lr"] for o in opts] == pytest.approx([5e-4, 5e-5])
    fresh = torch.optim.AdamW([w], lr=7.0)  # a resume: the saved base lr wins over the new default
    fresh.load_state_dict(opts[0].state_dict())
    C.set_lr([fresh], 100, 100, 0.5)
    assert fresh.param_groups[0]["initial_lr"] == 1e-3 and fresh.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------- checkpoints
def test_crash_during_save_keeps_last_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch
    net = torch.nn.Linear(3, 3)
    opt = torch.optim.AdamW(net.parameters())
    C.save_checkpoint(str(tmp_path), 1, {"a": 1}, {"net": net}, {"opt": opt})
    w1 = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1)

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        C.save_checkpoint(str(tmp_path), 2, {"a": 1}, {"net": net}, {"opt": opt})
    monkeypatch.undo()
    ckpt = C.latest_checkpoint(str(tmp_path))
    assert ckpt.endswith("ckpt-0000001")
    fresh = torch.nn.Linear(3, 3)
    assert C.load_checkpoint(ckpt, {"net": fresh}, {"opt": torch.optim.AdamW(fresh.parameters())})["step"] == 1
    assert torch.equal(fresh.weight, w1)
    C.save_checkpoint(str(tmp_path), 3, {"a": 1}, {"net": net}, {"opt": opt})  # a later save still works
    assert C.latest_checkpoint(str(tmp_path)).endswith("ckpt-0000003")


def test_checkpoint_keeps_only_trainable_state(tmp_path):
    from safetensors.torch import load_file
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.utils.spectral_norm(torch.nn.Linear(4, 4)))
    net[0].requires_grad_(False)
    ck = C.save_checkpoint(str(tmp_path), 1, {}, {"d": net}, {})
    keys = set(load_file(os.path.join(ck, "d.safetensors")))
    assert not any(k.startswith("0.") for k in keys)  # frozen weights are not stored
    assert "1.weight_u" in keys  # spectral-norm state is (exact resume needs it)


def test_ema_is_the_weighted_sum_of_every_past_weight(tmp_path):
    """After n updates w_ema = d^n w_0 + sum_k (1 - d) d^(n-k) w_k (float64 here); the discriminator is left out,
    frozen weights too; save -> load_checkpoint(ema=True) puts the average into the model, without it the raw."""
    d, net, disc = 0.8, torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)
    net.bias.requires_grad_(False)
    ema = C.EMA({"net": net, "disc": disc}, d)
    assert list(ema.shadow) == ["net.weight"]
    seen = [net.weight.detach().double().clone()]
    for _ in range(5):
        with torch.no_grad():
            net.weight.add_(torch.randn_like(net.weight))
        ema.update()
        seen.append(net.weight.detach().double().clone())
    n = len(seen) - 1
    want = d ** n * seen[0] + sum((1 - d) * d ** (n - k) * w for k, w in enumerate(seen) if k > 0)
    torch.testing.assert_close(ema.shadow["net.weight"].double(), want, atol=1e-6, rtol=0)
    ck = C.save_checkpoint(str(tmp_path), 5, {}, {"net": net}, {}, ema=ema)
    raw, avg = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    C.load_checkpoint(ck, {"net": raw})
    C.load_checkpoint(ck, {"net": avg}, ema=True)
    assert torch.equal(raw.weight, net.weight) and torch.equal(avg.weight, ema.shadow["net.weight"])
    again = C.EMA({"net": net}, d)
    again.load_state_dict(ema.state_dict())
    assert torch.equal(again.shadow["net.weight"], ema.shadow["net.weight"])


def test_curves_read_the_log_and_smooth_as_tensorboard(tmp_path):
    """plot_curves reads log.txt's step and val lines (a step logged again after a resume keeps its last value) and
    draws curves.png; smooth() is TensorBoard's debiased exponential average."""
    lines = ["{}", "step 1/3 | loss 2 (l1 1.5 gan -0.5) | 10 ms/step | mem 1 GB",
             "step 2/3 | loss 1 (l1 0.5 gan 0.5) | 10 ms/step | mem 1 GB", "resumed from x at step 1",
             "step 2/3 | loss 0.9 (l1 0.4 gan 0.5) | 10 ms/step | mem 1 GB",
             "val step 2 | PSNR 27.5 SSIM 0.85 | bicubic: PSNR 27.08 SSIM 0.84 | 1.0 s"]
    (tmp_path / "log.txt").write_text("\n".join(lines) + "\n")
    losses, val, bicubic = C.read_log(str(tmp_path))
    assert losses == {"loss": {1: 2.0, 2: 0.9}, "l1": {1: 1.5, 2: 0.4}, "gan": {1: -0.5, 2: 0.5}}
    assert val == {"PSNR": {2: 27.5}, "SSIM": {2: 0.85}} and bicubic == {"PSNR": 27.08, "SSIM": 0.84}
    assert Image.open(C.plot_curves(str(tmp_path))).size[0] > 400
    y = [1.0, 3.0, 2.0]
    assert C.smooth(y, 0.5) == pytest.approx([1.0, (0.25 * 1 + 0.5 * 3) / 0.75, (0.125 + 0.75 + 1) / 0.875])


# --------------------------------------------------------------------------- tiling
def test_tiled_equals_untiled_for_local_function():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode="replicate")
    z = torch.randn(1, 4, 37, 50)
    with torch.no_grad():
        full = conv(z)
        for tile, ov in [(16, 4), (20, 2), (24, 8)]:
            torch.testing.assert_close(C.tiled(conv, z, tile, ov), full, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(C.tiled(lambda x: x * x.mean(), z, 16, 4), z * z.mean())  # non-local: differs


def test_pad_to_multiple_and_crop_back():
    x = torch.rand(1, 3, 37, 50)
    p, (H, W) = C.pad_to_multiple(x, 16)
    assert p.shape[-2:] == (48, 64) and torch.equal(p[..., :H, :W], x)
    tiny = torch.rand(1, 3, 5, 3)
    assert C.pad_to_multiple(tiny, 16)[0].shape[-2:] == (16, 16)


def test_parse_config_flags_are_field_names():
    import teasr
    c = C.parse_config(teasr.Config, ["--lr", "1e-5", "--sample", "--steps", "4", "--model", "zimage"])
    assert c == teasr.Config(lr=1e-5, model="zimage", sample=True, steps=4)
    assert C.parse_config(teasr.Config, ["--sample", "false"]).sample is False
    with pytest.raises(SystemExit):
        C.parse_config(teasr.Config, ["--no_such_flag", "1"])
    with pytest.raises(SystemExit, match="does not support it: the paper trains the 20B base on one GPU"):
        C.parse_config(teasr.Config, ["--fsdp", "true"])


def test_resolve_preset():
    assert C.resolve_preset("tiny", "flux2-klein") == "tiny-flux2"
    assert C.resolve_preset("zimage", "flux2-klein") == "zimage"
    with pytest.raises(SystemExit, match="unknown --model"):
        C.resolve_preset("sdxl", "flux2-klein")


def test_lpips_is_zero_on_identical_and_positive_otherwise():
    lp = C.load_lpips("cpu")
    x = torch.rand(1, 3, 32, 32)
    assert float(lp(x, x)) == pytest.approx(0, abs=1e-6)
    assert float(lp(x, x.flip(-1))) > 0


def test_lpips_reads_a_local_vgg16_file(tmp_path):
    """--lpips_weights FILE: torchvision's VGG16 state dict becomes LPIPS's backbone (features.<i> -> slice<n>.<i>),
    the package's linear heads on top; the result differs from the random stand-in."""
    import torchvision
    with torch.random.fork_rng():
        torch.manual_seed(3)
        vgg = torchvision.models.vgg16()
    torch.save(vgg.state_dict(), tmp_path / "vgg16.pth")
    x, y = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    import lpips
    ref = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    for i, layer in enumerate(vgg.features[:30]):  # lpips' slices hold torchvision's features 0..29 by index
        slice_ = next(s for s in (ref.net.slice1, ref.net.slice2, ref.net.slice3, ref.net.slice4, ref.net.slice5)
                      if str(i) in s._modules)
        slice_._modules[str(i)] = layer
    want = ref(x * 2 - 1, y * 2 - 1).mean()
    got = C.load_lpips("cpu", str(tmp_path / "vgg16.pth"))(x, y)
    torch.testing.assert_close(got, want)
    assert abs(float(got) - float(C.load_lpips("cpu")(x, y))) > 1e-4


def test_prefetch_without_internet_says_so(tmp_path):
    """Offline, `python common.py prefetch` fails with one clear message per network and no traceback."""
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"))
    import subprocess
    from helpers import ENV, ROOT
    r = subprocess.run([sys.executable, "common.py", "prefetch", "--method", "teasr"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**ENV, **{k: env[k] for k in ("HF_HOME", "TORCH_HOME")}})
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "could not be downloaded (this needs the internet)" in r.stderr
    assert "Qwen/Qwen-Image-2512" in r.stderr and "VGG16 of LPIPS" in r.stderr and "NIQE" in r.stderr
