"""smfsr.py: Algorithm 1 on flows whose average velocity is known in closed form, the stop-gradient of the splitting
target, the wrapped SD3 (exactly the base at init, the LR tokens in one joint softmax), the sampler (Eq. 14), VSD
(Eqs. 15-16), the hinge GAN (Eqs. 17-18), captions, the stages' hand-over (--train_base lora), the sampler's seeds."""
import glob, os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import common as C
import degrade as D
import smfsr as M
from common import bc




# --------------------------------------------------------------------------- closed-form flows
# Data N(a, sigma^2 I) with independent noise: the flow's trajectories are z_tau = a + (z_t - a) s(tau)/s(t),
# s(tau)^2 = (1 - tau)^2 sigma^2 + tau^2, so u(z_t, r, t) = (z_t - z_r)/(t - r) (Eq. 5) is known exactly.
# sigma = 0 is a point mass: straight lines, u = v = (z_t - a)/t for every r.
def flow(a, sigma):
    s = lambda tau: ((1 - tau) ** 2 * sigma ** 2 + tau ** 2).sqrt()

    def v(z, t):  # dz/dt along the trajectory
        return (z - a) * bc((t - (1 - t) * sigma ** 2) / s(t) ** 2)

    def u(z, r, t):
        same = bc(t - r).abs() < 1e-12
        avg = (z - a) * bc((1 - s(r) / s(t)) / (t - r).where(~same.flatten(), torch.ones_like(t)))
        return torch.where(same, v(z, t), avg)
    return u, v, s


def times(B, g):
    r, t = torch.rand(2, B, generator=g, dtype=torch.float64).mul(0.96).add(0.02).sort(0).values
    return r, t, torch.rand(B, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("sigma", [0.0, 0.5, 2.0])
def test_isc_and_boundary_are_zero_on_the_true_average_velocity(sigma):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1, 4, 3, 3, generator=g, dtype=torch.float64)
    u, v, s = flow(a, sigma)
    z_t = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64)
    r, t, lam = times(6, g)
    lam[0], r[1] = 0.0, t[1]  # the interval ends: s = t, and r = t
    assert M.isc_loss(u, z_t, r, t, lam).item() < 1e-28  # Eq. 11: the split target equals the prediction
    assert M.boundary_loss(u, v, z_t, t).item() == 0.0  # Eq. 12: u(z, t, t) = v
    # the limit r -> t of the closed form is v: the boundary branch anchors the right field
    torch.testing.assert_close(u(z_t, t - 1e-7, t), v(z_t, t), atol=1e-5, rtol=1e-5)
    if sigma > 0:  # curved flow: the instantaneous velocity is not the average one
        assert M.isc_loss(lambda z, r_, t_: v(z, t_), z_t, r, t, lam).item() > 1e-4
    z_hr = a + sigma * torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64)  # Eq. 3 with the exact conditional velocity
    oracle = lambda z, r_, t_: (z - z_hr) / bc(t_)
    assert M.fm_loss(oracle, z_hr, eps, t).item() < 1e-28


def test_the_teacher_draws_t_uniformly_as_eq3():
    """Eq. 3: t ~ U(0, 1) (mean 1/2, variance 1/12, a tenth below 0.1); --teacher_t logit-normal is the option, with
    little mass near the ends (1.4% below 0.1)."""
    seen = []
    u = lambda z, r, t: seen.append(t) or torch.zeros_like(z)
    z = torch.zeros(20000, 1, 1, 1)
    for law in ("uniform", "logit-normal"):
        torch.manual_seed(0)
        M.teacher_losses(u, z, torch.randn_like(z), M.resolve(C.configure(M.Config, model="tiny", teacher_t=law)))
    uniform, logit = seen
    assert abs(uniform.mean() - 0.5) < 0.01 and abs(uniform.var() - 1 / 12) < 0.003
    assert abs((uniform < 0.1).float().mean() - 0.1) < 0.01 and (logit < 0.1).float().mean() < 0.03


def test_splitting_target_gets_no_gradient():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    w = torch.nn.Parameter(torch.tensor([0.3, -0.7]))
    u = lambda z, r, t: conv(z) * (1 + w[0] * bc(r) + w[1] * bc(t))
    params = list(conv.parameters()) + [w]
    z_t = torch.randn(3, 4, 5, 5)
    r, t, lam = (x.float() for x in times(3, torch.Generator().manual_seed(1)))

    def grads(loss):
        return torch.autograd.grad(loss, params)
    got = grads(M.isc_loss(u, z_t, r, t, lam))
    s = (1 - lam) * t + lam * r  # an independent target, built outside the graph
    with torch.no_grad():
        u2 = u(z_t, s, t)
        target = (1 - bc(lam)) * u(z_t - bc(t - s) * u2, r, s) + bc(lam) * u2
    want = grads(F.mse_loss(u(z_t, r, t), target))
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(got, want))
    u2 = u(z_t, s, t)  # the same target with its graph kept: gradients differ, so the test can tell
    live = (1 - bc(lam)) * u(z_t - bc(t - s) * u2, r, s) + bc(lam) * u2
    assert not all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, grads(F.mse_loss(u(z_t, r, t), live))))


@pytest.mark.parametrize("sigma", [0.0, 0.5])
def test_sampler_lands_on_the_flow_endpoint_in_1_2_4_jumps(sigma):
    g = torch.Generator().manual_seed(2)
    a = torch.randn(1, 4, 3, 3, generator=g, dtype=torch.float64)
    u, v, s = flow(a, sigma)
    eps, z_lr = (torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64) for _ in range(2))
    one = torch.ones((), dtype=torch.float64)
    for steps in (1, 2, 4):
        torch.testing.assert_close(M.sample(u, eps, steps), a + (eps - a) * s(0 * one) / s(one))  # Eq. 14
        z0 = (1 - 0.7) * z_lr + 0.7 * eps  # --start lr: Eq. 1 with z_lr at t0 = 0.7, then the same flow
        torch.testing.assert_close(M.sample(u, eps, steps, z_lr, 0.7), a + (z0 - a) * s(0 * one) / s(0.7 * one))
    calls = []
    M.sample(lambda z, r, t: calls.append((r[0].item(), t[0].item())) or z, eps, 4)  # u(z, r, t): r < t
    assert calls == [(0.75, 1.0), (0.5, 0.75), (0.25, 0.5), (0.0, 0.25)]


# --------------------------------------------------------------------------- the wrapped SD3
def random_dit(**extra):
    import diffusers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        dit = diffusers.SD3Transformer2DModel(**{**C.PRESETS["tiny-sd3"].dit, **extra}).requires_grad_(False).eval()
        for p in dit.parameters():  # away from zero-initialised layers, so every path counts
            p.normal_(0, 0.2)
    return dit


@pytest.mark.parametrize("extra", [{}, dict(dual_attention_layers=(0,), qk_norm="rms_norm")], ids=["sd3", "sd3.5"])
def test_wrapped_model_is_the_base_at_init_and_reads_the_lr(extra):
    dit = random_dit(**extra)  # the second config has SD3.5-Medium's dual attention and RMS qk-norm
    cond = C.expand_cond(C.tiny_cond(dit, "sd3"), 2)
    g = torch.Generator().manual_seed(3)
    z, z_lr, z_lr2 = (torch.randn(2, 16, 8, 12, generator=g) for _ in range(3))
    t, r = torch.tensor([0.3, 0.9]), torch.tensor([0.1, 0.5])
    with torch.no_grad():
        v = C.velocity("sd3", dit, z, t, cond)
        teacher, student = M.SRNet(dit, False), M.SRNet(dit, True)
        assert torch.equal(teacher(dit, z, r, t, z_lr, cond), v)  # bit-identical
        assert torch.equal(student(dit, z, r, t, z_lr, cond), v)  # u(z, r, t) = v(z, t) for any r
        for b in teacher.lr:
            b.gate.fill_(1.0)
        a, b = teacher(dit, z, r, t, z_lr, cond), teacher(dit, z, r, t, z_lr2, cond)
    assert (a - v).abs().mean() > 1e-3 and (a - b).abs().mean() > 1e-3  # open gates: the output follows the LR
    # per block: k, v, gate, then the cross-stream convolution (3x3 depthwise, 1x1)
    assert sum(p.numel() for p in teacher.parameters()) == 2 * (2 * 32 * 32 + 2 * 32 + 2 + 32 * 10 + 32 * 33)


def test_cross_stream_convolution_is_a_local_lr_path_that_learns_from_init():
    """The convolution reads the LR patch embeddings in the image tokens' order, is local on their grid,
    and, though zero at init, gets a gradient there, while the attention gates are still closed."""
    dit, g = random_dit(), torch.Generator().manual_seed(5)
    cond = C.expand_cond(C.tiny_cond(dit, "sd3"), 1)
    z, z_lr = torch.randn(1, 16, 8, 12, generator=g), torch.randn(1, 16, 8, 12, generator=g)
    # token order: pos_embed = patch embedding (flattened row-major) + positions
    m = dit.pos_embed.proj(z_lr) - dit.pos_embed.proj(torch.zeros_like(z_lr))
    torch.testing.assert_close(dit.pos_embed(z_lr) - dit.pos_embed(torch.zeros_like(z_lr)),
                               m.flatten(2).transpose(1, 2))
    lr = M.LRBranch(dit.transformer_blocks[0].attn)
    with torch.no_grad():
        lr.conv[1].weight.normal_(0, 0.2)
        m_lr = dit.pos_embed.proj(z_lr)  # (1, D, 4, 6)
        y = lr.cross_stream(m_lr)
        bumped = m_lr.clone()
        bumped[:, :, 1, 2] += 1.0  # one LR token
        changed = (lr.cross_stream(bumped) - y).abs().sum(-1).view(4, 6) > 0
    near = torch.zeros(4, 6, dtype=torch.bool)
    near[0:3, 1:4] = True  # its 3x3 neighbourhood
    assert torch.equal(changed, near)
    net = M.SRNet(dit, False)
    net(dit, z, torch.zeros(1), torch.full((1,), 0.7), z_lr, cond).square().sum().backward()
    for b in net.lr:
        assert b.conv[1].weight.grad.abs().sum() > 0 and b.gate.grad.abs().sum() > 0


def test_gated_joint_attention_is_one_softmax_over_image_text_and_lr():
    dit = random_dit(qk_norm="rms_norm")
    attn, g = dit.transformer_blocks[0].attn, torch.Generator().manual_seed(4)
    lr = M.LRBranch(attn)
    with torch.no_grad():
        for p in lr.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        lr.gate.copy_(torch.tensor([0.25, 0.8]))
        x, c, x_lr = (torch.randn(2, n, 32, generator=g) for n in (6, 5, 6))
        out_x, out_c = M.joint_attention(attn, lr, x, c, x_lr)
        heads = lambda y: y.view(2, -1, 2, 16).transpose(1, 2)
        q, k, vv = attn.norm_q(heads(attn.to_q(x))), attn.norm_k(heads(attn.to_k(x))), heads(attn.to_v(x))
        ck, cv = attn.norm_added_k(heads(attn.add_k_proj(c))), heads(attn.add_v_proj(c))
        kl, vl = attn.norm_k(heads(lr.to_k(x_lr))), heads(lr.to_v(x_lr))
        soft = lambda K, V: torch.softmax(q @ K.transpose(-1, -2) / 4.0, -1) @ V  # explicit, scale 1/sqrt(16)
        base = soft(torch.cat([k, ck], 2), torch.cat([vv, cv], 2))
        joint = soft(torch.cat([k, ck, kl], 2), torch.cat([vv, cv, vl], 2))
        o = base + lr.gate.view(1, 2, 1, 1) * (joint - base)
        want = attn.to_out[0](o.transpose(1, 2).reshape(2, 6, 32))
    torch.testing.assert_close(out_x, want, atol=1e-5, rtol=1e-5)
    assert out_c.shape == (2, 5, 32)


# --------------------------------------------------------------------------- VSD and GAN
def test_teacher_cfg_is_eq13_in_one_batched_call():
    dit = random_dit()
    teacher = M.SRNet(dit, False).requires_grad_(False)
    with torch.no_grad():
        for b in teacher.lr:
            b.gate.fill_(0.5)
    g = torch.Generator().manual_seed(7)
    cond = {"embeds": torch.randn(2, 8, 32, generator=g), "pooled": torch.randn(2, 16, generator=g)}
    null = {k: torch.zeros_like(v[:1]) for k, v in cond.items()}
    z, z_lr, t = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g), torch.tensor([0.4, 0.8])
    with torch.no_grad():
        v_c = teacher(dit, z, t, t, z_lr, cond)
        v_u = teacher(dit, z, t, t, z_lr, C.expand_cond(null, 2))  # the caption dropped, the LR kept
        assert torch.equal(M.teacher_velocity(teacher, dit, z_lr, cond, null, 1.0)(z, t), v_c)  # w = 1: no CFG
        torch.testing.assert_close(M.teacher_velocity(teacher, dit, z_lr, cond, null, 4.5)(z, t), 4.5 * v_c - 3.5 * v_u,
                                   atol=1e-4, rtol=1e-4)  # batched vs separate calls: float rounding
    assert (v_c - v_u).abs().mean() > 1e-3


def test_vsd_gradient_is_zero_when_the_fake_score_is_the_teacher():
    dit = random_dit()
    teacher = M.SRNet(dit, False).requires_grad_(False)
    with torch.no_grad():
        for b in teacher.lr:
            b.gate.fill_(0.5)
    C.add_lora(dit, "lora", 4, 4, M.FAKE_LORA_TARGETS)  # peft's B = 0: the fake score starts as the teacher
    dit.disable_adapters()
    cond, g = C.expand_cond(C.tiny_cond(dit, "sd3"), 2), torch.Generator().manual_seed(5)
    z_hat = torch.randn(2, 16, 8, 8, generator=g, requires_grad=True)
    z_lr, eps = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    t = torch.tensor([0.3, 0.7])
    z_hat_t = (1 - bc(t)) * z_hat.detach() + bc(t) * eps
    v_real = teacher(dit, z_hat_t, t, t, z_lr, cond).detach()
    with M.fake_score(dit):
        v_fake = teacher(dit, z_hat_t, t, t, z_lr, cond)
        M.fake_score_loss(v_fake, eps, z_hat).backward()  # Eq. 16 reaches the LoRA only
    assert torch.equal(v_fake, v_real)
    grad, = torch.autograd.grad(M.vsd_loss(z_hat, z_hat_t, t, v_real, v_fake.detach()), z_hat)
    assert torch.equal(grad, torch.zeros_like(grad))
    lora = [p for n, p in dit.named_parameters() if "lora_B" in n]
    assert all(p.grad is not None for p in lora) and not any(p.requires_grad for p in lora)  # off outside
    with torch.no_grad():
        for p in lora:
            p.add_(0.1)
        with M.fake_score(dit):
            assert not torch.equal(teacher(dit, z_hat_t, t, t, z_lr, cond), v_real)
        assert torch.equal(teacher(dit, z_hat_t, t, t, z_lr, cond), v_real)  # the teacher is the base + LR again
        with pytest.raises(RuntimeError, match="inside"):
            with M.fake_score(dit):
                raise RuntimeError("inside")
        assert torch.equal(teacher(dit, z_hat_t, t, t, z_lr, cond), v_real)  # adapters off after an exception


def test_vsd_gradient_value_and_direction():
    g = torch.Generator().manual_seed(6)
    z_hat, x_star, eps = (torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0.2, 0.8], dtype=torch.float64)
    z_t = (1 - bc(t)) * z_hat + bc(t) * eps
    v_real, v_fake = (z_t - x_star) / bc(t), (z_t - z_hat) / bc(t)  # teacher's x0 = x_star, fake's x0 = z_hat
    z = z_hat.clone().requires_grad_(True)
    grad, = torch.autograd.grad(M.vsd_loss(z, z_t, t, v_real, v_fake), z)
    w = bc(t) / (z_hat - x_star).abs().mean(dim=(1, 2, 3), keepdim=True)  # independent: x0_phi = x_star
    torch.testing.assert_close(grad, w * (v_real - v_fake) / z_hat.numel())  # Eq. 15
    after = z_hat - 1e-2 * z_hat.numel() * grad
    assert ((after - x_star).flatten(1).norm(dim=1) < (z_hat - x_star).flatten(1).norm(dim=1)).all()


def test_hinge_losses_on_separable_logits():
    real, fake = torch.tensor([1.0, 2.5, 7.0]), torch.tensor([-1.0, -3.0, -1.5])
    assert M.adv_d_loss(real, fake).item() == 0.0  # Eq. 18: margins met
    assert M.adv_d_loss(torch.zeros(3), torch.zeros(3)).item() == 2.0
    assert M.adv_d_loss(torch.tensor([0.5, 3.0]), torch.tensor([0.0, -2.0])).item() == pytest.approx(0.25 + 0.5)
    assert M.adv_g_loss(fake).item() == pytest.approx(11.0 / 6)  # Eq. 17: -E[D(x_hat)]
    disc = M.Discriminator(True, "", 8)
    x = torch.rand(2, 3, 64, 48, requires_grad=True)
    logits = disc(disc.features(x))
    assert logits.shape == (2, 4 * 4 * 3) and not disc.vit.training
    logits.mean().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is not None for p in disc.heads.parameters())


def test_reconstruction_loss_is_mse_plus_weighted_lpips():
    a, b = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    lp = C.load_lpips("cpu")
    rec, mse, l = M.rec_loss(lp, a, b)
    assert mse == F.mse_loss(a, b) and l == lp(a, b) and rec == mse + l  # Eq. 19, the paper's weights
    rec0, mse0, l0 = M.rec_loss(None, a, b, 0.0)  # w_lpips 0 (mini): no LPIPS network is needed
    assert rec0 == mse0 == mse and l0 == 0
    assert M.rec_loss(None, b, b, 0.0)[0] == 0  # zero at the target


# --------------------------------------------------------------------------- training and sampling
def _state(out, name):
    return load_file(sorted(glob.glob(os.path.join(out, "ckpt-*")))[-1] + f"/{name}.safetensors")


def test_captions_follow_the_loaders_images(tmp_path):
    names = C.SAMPLE_PHOTOS
    (tmp_path / "cap.tsv").write_text("".join(f"{n}\tcaption {n}\n" for n in names[::2]))  # every other photo
    cfg = M.resolve(C.configure(M.Config, model="tiny", captions=str(tmp_path / "cap.tsv"), batch_size=4,
                                micro_batch=2, crop=32, p_drop=0.0, num_workers=0))
    loader, _ = D.make_loader(M.IndexedImages("sample", 32), cfg, 0, 1, 3)  # resumed at step 3
    caps = M.Captions(cfg, C.load_dit("tiny-sd3"), torch.device("cpu"), 0)
    keys, ds = iter(D.StepSampler(len(names), 4, 0, 1, cfg.seed, 3)), D.ImageDataset("sample", 32)
    for _ in range(4):
        k = [next(keys) for _ in range(2)]
        x, idx = next(loader)
        assert torch.equal(x, torch.stack([ds[key] for key in k])) and idx.tolist() == [i for i, _ in k]
        captioned = caps.batch(idx)["embeds"].flatten(1).abs().sum(1) > 0  # the caption of that very image
        assert captioned.tolist() == [i % 2 == 0 for i, _ in k]


@pytest.fixture(scope="module")
def isc_ckpt(tmp_path_factory):
    """A tiny teacher -> isc chain, in-process (2 steps each)."""
    d = tmp_path_factory.mktemp("chain")
    kw = dict(model="tiny", max_steps=2, num_workers=0)
    M.train(C.configure(M.Config, stage="teacher", out_dir=str(d / "teacher"), **kw))
    M.train(C.configure(M.Config, stage="isc", out_dir=str(d / "isc"), init_ckpt=str(d / "teacher"), **kw))
    return d / "isc"


def test_gan_stage_skips_the_terms_of_weight_zero(tmp_path, isc_ckpt):
    """w_vsd = w_gan = w_isc = w_lpips = 0 (the mini's stage 2: L_Rec's MSE alone): no fake score, no discriminator,
    no VGG is built, and the student still learns from L_Rec."""
    kw = dict(model="tiny", stage="gan", init_ckpt=str(isc_ckpt), num_workers=0, max_steps=2, lr=1e-2)
    M.train(C.configure(M.Config, out_dir=str(tmp_path / "g"), w_vsd=0.0, w_gan=0.0, w_isc=0.0, w_lpips=0.0, **kw))
    ckpt = C.latest_checkpoint(str(tmp_path / "g"))
    state = torch.load(ckpt + "/state.pt")
    assert "fake_lora" not in state and set(state["optimizers"]) == {"opt"}
    assert not os.path.exists(ckpt + "/disc.safetensors")
    before, after = load_file(str(isc_ckpt / "ckpt-0000002/student.safetensors")), _state(tmp_path / "g", "student")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    log = (tmp_path / "g" / "log.txt").read_text()
    assert "vsd 0 " in log and "adv 0 " in log and "d 0)" in log


def test_train_base_lora_is_inherited_by_the_next_stage_and_the_sampler(tmp_path):
    """--train_base lora: each stage's model trains a LoRA on its own copy of the base; the student starts as the
    teacher (the same LoRA), the frozen teacher runs with it merged into its weights and keeps it through stage 2,
    and the sampler rebuilds the trained model from the checkpoint alone."""
    kw = dict(model="tiny", max_steps=2, num_workers=0, train_base="lora", lora_rank=4, lr=1e-2)
    M.train(C.configure(M.Config, stage="teacher", out_dir=str(tmp_path / "teacher"), **kw))
    t_ckpt = C.latest_checkpoint(str(tmp_path / "teacher"))
    lora = load_file(t_ckpt + "/teacher_base_lora.safetensors")
    assert any("ff.net.2.lora_B" in k for k in lora)  # attention and MLPs
    assert all(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k and ".attn.to_" in k)  # B = 0 no more
    cfg = M.resolve(C.configure(M.Config, **kw))
    trained = M.load_base(cfg, torch.float32, "lora", 4, t_ckpt, "teacher", train=True)  # what isc starts from
    merged = M.load_base(cfg, torch.float32, "lora", 4, t_ckpt, "teacher")  # the frozen teacher of isc / gan
    plain = C.load_dit("tiny-sd3")
    assert not any(p.requires_grad for p in merged.parameters()) and not hasattr(merged, "peft_config")
    net = M.SRNet(plain, two_times=False)
    M.load_net(t_ckpt, "teacher", net)
    z, z_lr = torch.randn(2, 2, 16, 8, 8)
    cond, t = C.expand_cond(C.tiny_cond(plain, "sd3"), 2), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        v_trained, v_merged, v_plain = (net(d, z, t, t, z_lr, cond) for d in (trained, merged, plain))
    torch.testing.assert_close(v_merged, v_trained, atol=1e-5, rtol=1e-5)  # merging is exact
    assert (v_merged - v_plain).abs().mean() > 1e-4  # and the LoRA changed the base
    M.train(C.configure(M.Config, stage="isc", out_dir=str(tmp_path / "isc"), init_ckpt=str(tmp_path / "teacher"),
                        **kw))
    M.train(C.configure(M.Config, stage="gan", out_dir=str(tmp_path / "gan"), init_ckpt=str(tmp_path / "isc"), **kw))
    student = load_file(C.latest_checkpoint(str(tmp_path / "gan")) + "/student_base_lora.safetensors")
    assert student.keys() == lora.keys() and any(not torch.equal(student[k], lora[k]) for k in lora)  # it trained on
    y = M.build_sampler(M.Config(ckpt=str(tmp_path / "gan")))(torch.rand(1, 3, 16, 16))
    assert y.shape == (1, 3, 64, 64) and torch.isfinite(y).all()
    with pytest.raises(SystemExit, match="train_base"):  # a stage cannot change what its init trained
        M.train(C.configure(M.Config, stage="isc", out_dir=str(tmp_path / "isc0"), init_ckpt=str(tmp_path / "teacher"),
                            **{**kw, "train_base": "none"}))


def test_captions_with_cfg_then_sampler_seeds_and_lr_start(tmp_path, isc_ckpt):
    """An isc stage on captions with the teacher at CFG 4.5 (Eq. 13); then the sampler: the same seed gives the same
    image, another seed another one (Eq. 14 starts from noise), and --start lr yet another."""
    (tmp_path / "cap.tsv").write_text("".join(f"{n}\ta photo of {n}\n" for n in C.SAMPLE_PHOTOS[:8]))
    teacher = os.path.dirname(C.load_config(C.latest_checkpoint(str(isc_ckpt)))["init_ckpt"])
    M.train(C.configure(M.Config, model="tiny", stage="isc", max_steps=2, num_workers=0, out_dir=str(tmp_path / "isc"),
                        init_ckpt=teacher, captions=str(tmp_path / "cap.tsv"), teacher_cfg=4.5))
    assert "step 2/2" in (tmp_path / "isc" / "log.txt").read_text()
    x = torch.rand(1, 3, 20, 28, generator=torch.Generator().manual_seed(0))
    sr = lambda **kw: M.build_sampler(M.Config(ckpt=str(tmp_path / "isc"), **kw))(x)
    ys = [sr(seed=s) for s in (0, 0, 1)]
    assert ys[0].shape == (1, 3, 80, 112) and torch.equal(ys[0], ys[1])
    assert (ys[0] - ys[2]).abs().mean() > 1e-3
    assert (sr(steps=2, start="lr", start_t=0.5) - ys[0]).abs().mean() > 1e-3
    assert "rt.mlp.0.weight" in load_file(C.latest_checkpoint(str(tmp_path / "isc")) + "/student.safetensors")
