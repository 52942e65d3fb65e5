"""strsr.py: the losses against independent computations and properties, the gradient routing of the G and D terms,
the VLM input layout, stage 1 -> stage 2 in one folder, tiled sampling with one VLM pass."""
import dataclasses, math

import pytest
import torch
import torch.nn.functional as F

import common as C
import strsr as S


@pytest.fixture(scope="module")
def tiny():
    cfg = S.resolve(C.configure(S.Config, model="tiny"))
    torch.manual_seed(0)
    dit, vae, cond = S.build_generator(cfg, torch.device("cpu"))
    disc = S.Discriminator(True, cfg.disc_width)
    lpips = C.load_lpips(torch.device("cpu"))
    return cfg, dit, vae, cond, disc, lpips


# --------------------------------------------------------------------------- losses
def test_ragan_equal_logits_is_log2_and_pushes_real_up_fake_down():
    r = torch.full((4, 6), 1.3)  # D cannot tell real from fake: every logit the same
    assert S.ragan_loss([r], [r.clone()]).item() == pytest.approx(math.log(2), abs=1e-6)
    assert S.ragan_loss([r], [r.clone()], g_form=True).item() == pytest.approx(math.log(2), abs=1e-6)
    c = torch.full((3, 5), 0.7)  # summed over levels: 2 levels -> 2 log 2
    assert S.ragan_loss([c, c[:, :1]], [c, c[:, :1]]).item() == pytest.approx(2 * math.log(2), abs=1e-6)
    real, fake = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    S.ragan_loss([real], [fake]).backward()
    assert (real.grad < 0).all() and (fake.grad > 0).all()  # descent raises real logits, lowers fake ones
    real.grad = fake.grad = None
    S.ragan_loss([real], [fake], g_form=True).backward()
    assert (real.grad > 0).all() and (fake.grad < 0).all()  # G pulls the other way


def test_ragan_matches_the_sigmoid_formula():
    """Eq. (7) with D_Ra(a, b) = sigmoid(C(a) - E C(b)) written out with logs."""
    r, f = torch.randn(5, 7), torch.randn(5, 7)
    dra_rf, dra_fr = torch.sigmoid(r - f.mean(0)), torch.sigmoid(f - r.mean(0))
    d = -0.5 * (torch.log(dra_rf).mean() + torch.log(1 - dra_fr).mean())
    g = -0.5 * (torch.log(dra_fr).mean() + torch.log(1 - dra_rf).mean())
    torch.testing.assert_close(S.ragan_loss([r], [f]), d)
    torch.testing.assert_close(S.ragan_loss([r], [f], g_form=True), g)


def test_r1_is_zero_for_constant_d_and_the_release_noise_for_linear_d():
    """The release's noise, torch.rand_like(x) * 0.005 on [-1, 1] images, is U[0, 0.0025) on [0, 1]: for a linear
    C(x) = <w, x>, E (w.n)^2 = a^2 (||w||^2 / 12 + (sum w)^2 / 4) with a = 0.0025 (one-sided: the mean counts)."""
    x = torch.rand(4096, 3, 4, 4)
    const = lambda x: [torch.full((x.shape[0], 5), 0.3), torch.full((x.shape[0], 1), -1.0)]
    assert S.r1_loss(const, x, const(x)).item() == 0.0
    w = torch.randn(48, generator=torch.Generator().manual_seed(1)) + 0.5
    lin = lambda x: [x.flatten(1) @ w[:, None]]
    torch.manual_seed(0)
    got = S.r1_loss(lin, x, lin(x), noise_scale=0.005).item()
    a = 0.005 / 2
    want = a ** 2 * (w.pow(2).sum().item() / 12 + w.sum().item() ** 2 / 4)
    assert got == pytest.approx(want, rel=0.05)
    seen = []
    S.r1_loss(lambda x: seen.append(x) or lin(x), x, lin(x))
    n = seen[0] - x
    assert n.min() >= 0 and n.max() < a  # one-sided


def test_fdl_zero_on_identical_and_grows_with_blur(capsys):
    import torchvision.transforms.functional as TF
    phi = S.FDLFeatures("random", projections=32)
    x = C.sample_photos(["brick"])[0][None, :, :64, :64]
    assert S.fdl_loss(phi, x, x.clone()).item() == 0.0
    losses = [S.fdl_loss(phi, x, TF.gaussian_blur(x, 15, s)).item() for s in (0.5, 1.0, 2.0, 4.0)]
    assert all(a < b for a, b in zip(losses, losses[1:])), losses
    # the phase term counts: dropping it lowers the loss
    assert S.fdl_loss(phi, x, TF.gaussian_blur(x, 15, 2.0), phase_weight=0.0).item() < losses[2]


# --------------------------------------------------------------------------- model
@pytest.mark.parametrize("preset,n_lora", [("tiny-flux2", 10), ("tiny-zimage", 21)])
def test_lora_targets_and_one_step(preset, n_lora):
    """The official target modules get LoRA; x0_hat = z_lr - 0.8 v(z_lr, 0.8) (B = 0 at init: the base)."""
    fam = C.PRESETS[preset].family
    torch.manual_seed(0)
    dit = C.add_lora(C.load_dit(preset), "lora", 8, 8, S.LORA_TARGETS[fam])
    assert sum(n.endswith("lora_A") for n, _ in dit.named_modules()) == n_lora
    base = C.load_dit(preset)
    z = torch.randn(1, 128 if fam == "flux2" else 16, 4, 4)
    cond = C.tiny_cond(base, fam)
    with torch.no_grad():
        v = C.velocity(fam, base, z, torch.tensor([0.8]), cond)
        torch.testing.assert_close(S.one_step(dit, fam, z, cond, 0.8), z - 0.8 * v, atol=1e-5, rtol=1e-5)
        two = S.one_step(base, fam, z, cond, 0.8, steps=2)
        z_mid = z - 0.4 * v
        torch.testing.assert_close(two, z_mid - 0.4 * C.velocity(fam, base, z_mid, torch.tensor([0.4]), cond))


def test_vlm_pixels_match_the_qwen_image_processor(tiny):
    from transformers import Qwen2VLImageProcessor
    vlm = tiny[3].vlm
    proc = Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                                 image_std=[0.5] * 3, size={"shortest_edge": 64, "longest_edge": 1024 * 1024})
    for shape in ((2, 3, 16, 24), (1, 3, 13, 30)):  # divisible, and resized by smart_resize
        x = torch.rand(shape)
        ref = proc(images=list(x), do_rescale=False, return_tensors="pt")
        patches, grid = vlm.pixels(x)
        torch.testing.assert_close(grid, ref["image_grid_thw"])
        torch.testing.assert_close(patches, ref["pixel_values"], atol=1e-5, rtol=1e-5)


def test_condition_modes(tiny):
    cfg, dit, _, cond, _, _ = tiny
    x = torch.rand(2, 3, 16, 16)
    c = cond(x)["embeds"]  # the prompt's tokens only: no image tokens (official)
    assert c.shape == (2, len(cond.vlm.pre) + len(cond.vlm.post), dit.config.joint_attention_dim)
    assert c.requires_grad and not any(p.requires_grad for p in cond.vlm.parameters())
    assert [m.out_features for m in cond.mlp if isinstance(m, torch.nn.Linear)] == [16, 32]  # d/2, d
    none = S.Condition("none", 32)
    assert none(x)["embeds"].abs().sum() == 0 and "embeds" in none.state_dict()  # checkpoints carry it
    _, _, text = S.build_generator(dataclasses.replace(cfg, cond="text"), torch.device("cpu"))
    torch.testing.assert_close(text(x)["embeds"][:1], C.tiny_cond(dit, "flux2")["embeds"])


def test_vlm_condition_reads_the_non_image_tokens_of_the_last_hidden_state(tiny):
    """As the release: the last hidden state at the positions where the attention mask is on and the id is not the
    image token (computed here from a plain Qwen3VLModel call), at most 512; the same length for any LR size."""
    vlm = tiny[3].vlm
    x = torch.rand(1, 3, 24, 16)
    patches, grid = vlm.pixels(x)
    n = int(grid[0, 1] * grid[0, 2]) // 4
    ids = torch.tensor([vlm.pre + [vlm.image_token] * n + vlm.post])
    with torch.no_grad():
        h = vlm.model(input_ids=ids, pixel_values=patches, image_grid_thw=grid, mm_token_type_ids=(ids == 100).int(),
                      attention_mask=torch.ones_like(ids)).last_hidden_state
        want = h[0][(ids[0] != vlm.image_token)][None]
        torch.testing.assert_close(vlm(x), want)
        assert vlm(torch.rand(1, 3, 64, 48)).shape == want.shape  # 48 image tokens instead of 6: the same length
        vlm.pre = vlm.pre[:2] + [7] * 600 + vlm.pre[2:]
        assert vlm(x).shape[1] == 512
        vlm.pre = vlm.pre[:2] + vlm.pre[-1:]


def test_discriminator_heads_follow_the_release():
    """BlurPool (the binomial [1, 3, 3, 1]^2 / 64, zero padding 2) -> SN conv 3x3 stride 2, padding 0 -> LeakyReLU ->
    BlurPool (padding 1) -> SN conv 1x1 stride 2: a 1024 px crop's 256/128/64 px feature maps give 64/32/16 px of
    logits (the release's 5377 per image, with the pooled one)."""
    import torch.nn as nn
    blur = S.Blur(1, 2)
    k = torch.tensor([1.0, 3.0, 3.0, 1.0])
    torch.testing.assert_close(blur.k[0, 0], k[:, None] * k[None] / 64)
    impulse = torch.zeros(1, 1, 9, 9)
    impulse[0, 0, 4, 4] = 1
    out = blur(impulse)
    assert out.shape[-1] == 10 and out.sum() == pytest.approx(1.0)  # H + 2 * 2 - 4 + 1, mass kept
    heads = [S.head(c, 8) for c in (4, 4, 4)]
    sizes = [hd(torch.randn(1, 4, s, s)).shape[-1] for hd, s in zip(heads, (256, 128, 64))]
    assert sizes == [64, 32, 16] and 64 ** 2 + 32 ** 2 + 16 ** 2 + 1 == 5377
    convs = [m for m in heads[0] if isinstance(m, nn.Conv2d)]
    assert [(c.kernel_size, c.stride, c.padding) for c in convs] == [((3, 3), (2, 2), (0, 0)), ((1, 1), (2, 2), (0, 0))]


def test_g_pass_runs_the_heads_in_eval_mode_fdl_on_minus_one_to_one_and_z_lr_is_drawn(tiny):
    """As the release: D's heads in eval mode for the generator's terms, in train mode for D's; FDL on [-1, 1]
    images (--fdl_01: [0, 1]); z_lr a draw of the VAE's latent distribution, not its mode; StrSR-Z's raw latent."""
    cfg, dit, vae, cond, disc, lpips = tiny
    calls = []
    hooks = [h.register_forward_pre_hook(lambda m, a: calls.append((m.training, a[0].requires_grad)))
             for h in disc.heads]
    x_hr = torch.rand(2, 3, 64, 64)
    x_lr = F.interpolate(x_hr, scale_factor=0.25, mode="area")
    disc.train()
    S.strsr_losses(dit, vae, cond, disc, lpips, None, "flux2", x_lr, x_hr, cfg)
    for h in hooks:
        h.remove()
    assert {tr for tr, grad in calls if grad} == {False} and {tr for tr, grad in calls if not grad} >= {True}
    assert disc.training
    phi = S.FDLFeatures("random", 32)
    seen = []
    phi.register_forward_pre_hook(lambda m, a: seen.append((float(a[0].min()), float(a[0].max()))))
    with torch.no_grad():
        cfg2 = dataclasses.replace(cfg, stage="2")
        S.strsr_losses(dit, vae, cond, disc, lpips, phi, "flux2", x_lr, x_hr, cfg2)
        assert min(lo for lo, _ in seen[1::2]) < -0.5  # the HR (every second call) in [-1, 1]
        seen.clear()
        S.strsr_losses(dit, vae, cond, disc, lpips, phi, "flux2", x_lr, x_hr, dataclasses.replace(cfg2, fdl_01=True))
        assert min(lo for lo, _ in seen[1::2]) >= 0
    zvae = C.load_vae("tiny-zimage")
    g = lambda: torch.Generator().manual_seed(5)
    with torch.no_grad():
        z = S.lr_latent(vae, "flux2", x_lr, g())
        torch.testing.assert_close(z, C.encode(vae, "flux2", C.upsample_lr(x_lr), True, g()))
        assert not torch.allclose(z, C.encode(vae, "flux2", C.upsample_lr(x_lr)))  # a draw, not the mode
        raw = zvae.encode(C.upsample_lr(x_lr) * 2 - 1).latent_dist.sample(g())  # no shift, no scale
        torch.testing.assert_close(S.lr_latent(zvae, "zimage", x_lr, g()), raw, atol=1e-5, rtol=1e-5)
    assert S.Config.model == "flux2-klein-base" and C.PRESETS["flux2-klein-base"].hub.endswith("klein-base-4B")


def test_g_and_d_terms_send_gradients_only_where_the_paper_does(tiny):
    """L_Gen reaches the generator (LoRA and condition MLP), never D; L_Dis reaches D's heads, never G or the frozen
    backbone. Their sum, which the training step back-propagates, gives each side exactly its own term's gradient."""
    cfg, dit, vae, cond, disc, lpips = tiny
    g_params = [p for p in list(dit.parameters()) + list(cond.parameters()) if p.requires_grad]
    torch.manual_seed(0)
    x_hr = torch.rand(2, 3, 64, 64)
    x_lr = F.interpolate(x_hr, scale_factor=0.25, mode="area")
    loss, terms, x_sr = S.strsr_losses(dit, vae, cond, disc, lpips, None, "flux2", x_lr, x_hr, cfg)
    assert set(terms) == {"loss", "l1", "lpips", "gan", "d", "d_gan", "r1"}  # stage 1: no FDL
    torch.testing.assert_close(terms["loss"], cfg.w_l1 * terms["l1"] + cfg.w_lpips * terms["lpips"]
                               + cfg.w_gan * terms["gan"])  # Eq. (11)
    torch.testing.assert_close(terms["d"], terms["d_gan"] + cfg.w_r1 * terms["r1"])  # Eq. (9)
    grads = lambda ps, t: [g for g in torch.autograd.grad(t, ps, retain_graph=True, allow_unused=True)]
    assert all(g is None for g in grads(disc.trainable(), terms["loss"])), "L_Gen reached D"
    assert all(g is None for g in grads(g_params, terms["d"])), "L_Dis reached G"
    g_gen, g_sum = grads(g_params, terms["loss"]), grads(g_params, loss)
    assert sum(float(g.abs().sum()) for g in g_gen if g is not None) > 0
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(g_gen, g_sum))
    d_dis, d_sum = grads(disc.trainable(), terms["d"]), grads(disc.trainable(), loss)
    assert all(a is not None and torch.equal(a, b) for a, b in zip(d_dis, d_sum))
    frozen = list(disc.trunk.parameters()) + list(disc.proj.parameters())
    assert not any(p.requires_grad for p in frozen)
    loss.backward()
    assert cond.mlp[0].weight.grad is not None
    for p in g_params + disc.trainable():
        p.grad = None


def test_strsr_losses_without_lpips_need_no_vgg(tiny):
    """--w_lpips 0 (the mini default): no LPIPS network at all, and Eq. (11) loses exactly that term."""
    cfg, dit, vae, cond, disc, _ = tiny
    cfg = dataclasses.replace(cfg, w_lpips=0.0)
    torch.manual_seed(0)
    x_hr = torch.rand(2, 3, 64, 64)
    x_lr = F.interpolate(x_hr, scale_factor=0.25, mode="area")
    with torch.no_grad():
        _, terms, _ = S.strsr_losses(dit, vae, cond, disc, None, None, "flux2", x_lr, x_hr, cfg)
    assert "lpips" not in terms
    torch.testing.assert_close(terms["loss"], cfg.w_l1 * terms["l1"] + cfg.w_gan * terms["gan"])


# --------------------------------------------------------------------------- training and sampling
def test_without_gan_no_discriminator_is_needed_or_built(tmp_path, monkeypatch):
    """Table 4's "w/o GAN" (--w_gan 0): the CLIP-ConvNeXt is not among the weights a run needs, no discriminator is
    built, and no optimizer for it is stepped or saved."""
    names = lambda cfg: [w.name for w in S.pretrained(cfg)]
    assert any("ConvNeXt" in n for n in names(S.Config()))
    assert not any("ConvNeXt" in n for n in names(S.Config(w_gan=0.0)))

    def no_disc(*a, **kw):
        raise AssertionError("a discriminator was built")
    monkeypatch.setattr(S, "Discriminator", no_disc)
    out = tmp_path / "run"
    S.train(C.configure(S.Config, model="tiny", out_dir=str(out), batch_size=2, num_workers=0, max_steps=1,
                        w_gan=0.0))
    ckpt = C.latest_checkpoint(str(out))
    assert not (out / ckpt / "disc.safetensors").exists()
    assert list(torch.load(f"{ckpt}/state.pt", weights_only=True)["optimizers"]) == ["g"]


def test_stage_1_then_stage_2_in_one_folder_then_tiled_sampling(tmp_path):
    """Stage 2 continues stage 1's run in its out_dir (step count, optimizers) and adds FDL; the sampler tiles in
    latent space and runs the VLM once, on the whole LR image."""
    out = tmp_path / "run"
    kw = dict(model="tiny", out_dir=str(out), batch_size=2, num_workers=0, log_every=1)
    S.train(C.configure(S.Config, **kw, max_steps=2))
    S.train(C.configure(S.Config, **kw, stage="2", max_steps=1))
    lines = [l for l in (out / "log.txt").read_text().splitlines() if l.startswith("step ")]
    assert [l.split(" |")[0] for l in lines] == ["step 1/2", "step 2/2", "step 3/3"]
    terms = [l.replace("(", " ").split() for l in lines]
    assert all(k in t for t in terms for k in ("l1", "lpips", "gan", "d_gan", "r1"))
    assert ["fdl" in t for t in terms] == [False, False, True]  # stage 2 adds FDL
    assert "stage 1 -> stage 2" in (out / "log.txt").read_text()
    assert C.load_config(str(out / "ckpt-0000003"))["stage"] == "2"
    with pytest.raises(SystemExit, match="stage-2 checkpoint"):
        S.train(C.configure(S.Config, **kw, max_steps=1))
    sr = S.build_sampler(S.Config(ckpt=str(out), tile=4, overlap=2))
    seen = []
    h = sr.cond.vlm.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    y = sr(torch.rand(1, 3, 37, 29))
    h.remove()
    assert y.shape == (1, 3, 148, 116) and 0 <= y.min() and y.max() <= 1
    assert seen == [(1, 3, 37, 29)]
