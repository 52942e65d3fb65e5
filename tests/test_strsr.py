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
    assert S.ragan_loss([r], [r.clone()], generator=True).item() == pytest.approx(math.log(2), abs=1e-6)
    c = torch.full((3, 5), 0.7)  # summed over levels: 2 levels -> 2 log 2
    assert S.ragan_loss([c, c[:, :1]], [c, c[:, :1]]).item() == pytest.approx(2 * math.log(2), abs=1e-6)
    real, fake = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    S.ragan_loss([real], [fake]).backward()
    assert (real.grad < 0).all() and (fake.grad > 0).all()  # descent raises real logits, lowers fake ones
    real.grad = fake.grad = None
    S.ragan_loss([real], [fake], generator=True).backward()
    assert (real.grad > 0).all() and (fake.grad < 0).all()  # G pulls the other way


def test_ragan_matches_the_sigmoid_formula():
    """Eq. (7) with D_Ra(a, b) = sigmoid(C(a) - E C(b)) written out with logs."""
    r, f = torch.randn(5, 7), torch.randn(5, 7)
    dra_rf, dra_fr = torch.sigmoid(r - f.mean(0)), torch.sigmoid(f - r.mean(0))
    d = -0.5 * (torch.log(dra_rf).mean() + torch.log(1 - dra_fr).mean())
    g = -0.5 * (torch.log(dra_fr).mean() + torch.log(1 - dra_rf).mean())
    torch.testing.assert_close(S.ragan_loss([r], [f]), d)
    torch.testing.assert_close(S.ragan_loss([r], [f], generator=True), g)


def test_r1_approx_zero_for_constant_d_and_equals_r1_for_linear_d():
    x = torch.rand(4096, 3, 4, 4)
    const = lambda x: [torch.full((x.shape[0], 5), 0.3), torch.full((x.shape[0], 1), -1.0)]
    assert S.r1_loss(const, x, const(x)).item() == 0.0
    # linear C(x) = <w, x>: E (w.n)^2 = ||w||^2 a^2 / 3 for n ~ U[-a, a], a = 0.005 / 2 on [0, 1] images
    w = torch.randn(48)
    lin = lambda x: [x.flatten(1) @ w[:, None]]
    torch.manual_seed(0)
    got = S.r1_loss(lin, x, lin(x), noise_scale=0.005).item()
    want = w.pow(2).sum().item() * (0.005 / 2) ** 2 / 3
    assert got == pytest.approx(want, rel=0.1)


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
        torch.testing.assert_close(S.generator(dit, fam, z, cond, 0.8), z - 0.8 * v, atol=1e-5, rtol=1e-5)
        two = S.generator(base, fam, z, cond, 0.8, steps=2)
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
    c = cond(x)["embeds"]  # image tokens (16/4/2)^2 = 4, plus the prompt's ids
    assert c.shape == (2, len(cond.vlm.pre) + 4 + len(cond.vlm.post), dit.config.joint_attention_dim)
    assert c.requires_grad and not any(p.requires_grad for p in cond.vlm.parameters())
    assert [m.out_features for m in cond.mlp if isinstance(m, torch.nn.Linear)] == [16, 32]  # d/2, d
    none = S.Condition("none", 32)
    assert none(x)["embeds"].abs().sum() == 0 and "embeds" in none.state_dict()  # checkpoints carry it
    _, _, text = S.build_generator(dataclasses.replace(cfg, cond="text"), torch.device("cpu"))
    torch.testing.assert_close(text(x)["embeds"][:1], C.tiny_cond(dit, "flux2")["embeds"])


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
