"""TEASR (teasr.py): the dual-branch DiT against the base and diffusers' own forward, the math of each loss term
against independent computations, where each stop-gradient sends gradient, Algorithm 1's time arguments, the
any-step sampler and --train_base full on the tiny preset."""
import os, runpy, sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from helpers import ROOT
import common
import teasr
from teasr import (adv_loss, attach_cond_branch, consistency_loss, flow_loss, one_step, rectify_loss, sample,
                   split_modulation, tar_weight, v_theta)

def tiny_inputs(B=2, H=8, W=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    z_t, z_lr = torch.randn(B, 16, H, W, generator=g), torch.randn(B, 16, H, W, generator=g)
    return z_t, z_lr, torch.rand(B, generator=g), torch.rand(B, generator=g)


def tiny_cond(dit):
    return {"embeds": common.tiny_cond(dit, "qwen")["embeds"]}  # all-ones mask dropped, as common.fixed_prompt


# --------------------------------------------------------------------------- dual-branch DiT
@pytest.mark.parametrize("fused_t", [False, True])
def test_noise_branch_is_the_base_at_init(fused_t):
    """LoRA (up = 0) and the t_tar embedder (a copy; zero for --fused_t) at init: v_theta is bit-identical
    to the frozen base alone."""
    base, dit = split_modulation(common.load_dit("tiny-qwen")), common.load_dit("tiny-qwen")
    branch = attach_cond_branch(dit, 8, 8.0, fused_t=fused_t)
    z_t, z_lr, t, t_tar = tiny_inputs()
    cond = tiny_cond(dit)
    with torch.no_grad():
        ref = v_theta(base, None, z_t, t, z_lr, t if fused_t else t_tar, cond)  # fused at init: all tokens at t
        assert torch.equal(v_theta(dit, branch, z_t, t, z_lr, t_tar, cond), ref)


def test_dual_branch_matches_diffusers_forward():
    """The hand-written forward equals QwenImageTransformer2DModel.forward on the same [noise | LR] sequence,
    with its zero_cond_t (condition tokens at t = 0) and both token groups at the same RoPE positions."""
    ours, ref = split_modulation(common.load_dit("tiny-qwen")), common.load_dit("tiny-qwen")
    ref.zero_cond_t = True
    for b in ref.transformer_blocks:
        b.zero_cond_t = True
    rope = ref.pos_embed.forward  # diffusers puts a second image at frame 1; give it frame 0, as ours

    def same_positions(fhw, device=None, max_txt_seq_len=None):
        img, txt = rope([fhw[0][0]], device=device, max_txt_seq_len=max_txt_seq_len)
        return torch.cat([img, img]), txt
    ref.pos_embed.forward = same_positions
    z_t, z_lr, t, _ = tiny_inputs()
    cond, (B, _, H, W) = tiny_cond(ours), z_t.shape
    with torch.no_grad():
        out = ref(hidden_states=torch.cat([common.pack(z_t), common.pack(z_lr)], 1),
                  encoder_hidden_states=cond["embeds"].expand(B, -1, -1), timestep=t,
                  img_shapes=[[(1, H // 2, W // 2), (1, H // 2, W // 2)]] * B, return_dict=False)[0]
        expect = common.unpack(out[:, : H * W // 4], H, W)
        got = v_theta(ours, None, z_t, t, z_lr, torch.zeros(B), cond)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)


def test_lora_acts_on_condition_tokens_only():
    """With a trained (non-zero) LoRA every hooked Linear gives the base's output, bit for bit, on the noise
    half of the tokens and a different one on the condition half; gradients reach the branch, never the base."""
    base, dit = split_modulation(common.load_dit("tiny-qwen")), common.load_dit("tiny-qwen")
    torch.manual_seed(0)
    branch = attach_cond_branch(dit, 4, 4.0)
    with torch.no_grad():
        for p in branch.parameters():
            p.add_(0.1 * torch.randn_like(p))
    base_mods = dict(base.named_modules())
    for name, mod in dit.named_modules():
        if name.replace(".", "_") in branch.lora:
            x = torch.randn(2, 6, mod.in_features)  # tokens [noise (3) | condition (3)]
            with torch.no_grad():
                y, y0 = mod(x), base_mods[name](x)
            assert torch.equal(y[:, :3], y0[:, :3]), name
            assert not torch.allclose(y[:, 3:], y0[:, 3:]), name
    z_t, z_lr, t, t_tar = tiny_inputs()
    cond = tiny_cond(dit)
    v = v_theta(dit, branch, z_t, t, z_lr, t_tar, cond)
    assert not torch.allclose(v, v_theta(base, None, z_t, t, z_lr, t_tar, cond))
    v.square().mean().backward()
    assert all(p.grad is None for p in dit.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in branch.parameters())


def test_gradient_checkpointing_same_gradients():
    """The GPU path re-runs each block (and its LoRA hooks, which add in place) in backward: same gradients."""
    dit = common.load_dit("tiny-qwen")
    torch.manual_seed(0)
    branch = attach_cond_branch(dit, 4, 4.0)
    with torch.no_grad():
        for p in branch.lora.parameters():
            p.add_(0.1 * torch.randn_like(p))
    z_t, z_lr, t, t_tar = tiny_inputs()
    grads = []
    for ckpt in (False, True):
        dit.gradient_checkpointing = False
        if ckpt:
            dit.enable_gradient_checkpointing()
        branch.zero_grad()
        v_theta(dit, branch, z_t, t, z_lr, t_tar, tiny_cond(dit)).square().mean().backward()
        grads.append([p.grad.clone() for p in branch.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- losses
def test_tar_weight_values_and_guard():
    s = torch.tensor([1.0, 0.5, 0.25, 0.1])
    torch.testing.assert_close(tar_weight(s), torch.tensor([0.0, 0.5, 2.25, 8.1]))  # (1 - s)^2 / s
    w0 = tar_weight(torch.tensor([0.0, 1e-12, 0.05]), min_s=0.05)
    assert torch.isfinite(w0).all()
    torch.testing.assert_close(w0, torch.tensor([20.0, (1 - 1e-12) ** 2 / 0.05, 0.95 ** 2 / 0.05]))
    grid = torch.linspace(0, 1, 101)
    assert (tar_weight(grid).diff() <= 0).all()  # larger weight nearer the data (Sec. 3.2)
    assert torch.equal(tar_weight(s, const=True), torch.ones(4))


def straight(z_0):
    """The exact velocity of a straight flow to the data point z_0: v(z, t, .) = (z - z_0) / t."""
    return lambda z, t, t_tar: (z - z_0.repeat(z.shape[0] // z_0.shape[0], 1, 1, 1)) / t.view(-1, 1, 1, 1)


def test_flow_and_consistency_zero_for_a_straight_flow():
    g = torch.Generator().manual_seed(1)
    z_0, eps = torch.randn(3, 4, 6, 6, generator=g), torch.randn(3, 4, 6, 6, generator=g)
    t = torch.tensor([0.9, 0.5, 0.3])
    v = straight(z_0)
    assert flow_loss(v, z_0, t, eps) < 1e-10
    assert consistency_loss(v, z_0, t, t * torch.tensor([0.0, 0.5, 0.9]), eps) < 1e-10
    bent = lambda z, t, t_tar: v(z, t, t_tar) + (t - t_tar).view(-1, 1, 1, 1) * z  # depends on the step size
    assert consistency_loss(bent, z_0, t, t / 2, eps) > 1e-3


def test_consistency_loss_equations_1_to_4():
    """Against the hand-derived value for v(z, t, s) = (t - s) z:
    v1 = d z_t, v(z_t, t, m) = d/2 z_t, z_m = (1 - d^2/4) z_t, v2 = d/4 z_t (2 - d^2/4), d = t - s."""
    g = torch.Generator().manual_seed(2)
    z_0, eps = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    t, s = torch.tensor([0.8, 0.6]), torch.tensor([0.2, 0.5])
    v = lambda z, t, t_tar: (t - t_tar).view(-1, 1, 1, 1) * z
    d = (t - s).view(-1, 1, 1, 1)
    z_t = (1 - t.view(-1, 1, 1, 1)) * z_0 + t.view(-1, 1, 1, 1) * eps
    expect = ((d * z_t - d / 4 * z_t * (2 - d ** 2 / 4)) ** 2).mean()
    torch.testing.assert_close(consistency_loss(v, z_0, t, s, eps), expect)


class Toy(nn.Module):
    """A small velocity model v(z, t, t_tar) that records its time arguments."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.a, self.b = nn.Parameter(torch.tensor(0.3)), nn.Parameter(torch.tensor(-0.2))
        self.calls = []

    def forward(self, z, t, t_tar):
        self.calls.append((t.detach().clone(), t_tar.detach().clone()))
        return self.conv(z) + self.a * t.view(-1, 1, 1, 1) + self.b * t_tar.view(-1, 1, 1, 1) * z


def test_adv_loss_fake_trajectory_and_its_stop_gradient():
    """Eqs. 7-8: flow matching on the re-noised estimate with target time -t'; sg(z_fake) keeps the
    generator (here a separate module) out of the gradient, the velocity model receives it."""
    torch.manual_seed(3)
    v, gen = Toy(), nn.Conv2d(4, 4, 1)
    eps, eps_fake, t = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6), torch.tensor([0.3, 0.7])
    z_fake = gen(eps)
    loss = adv_loss(v, z_fake, t, eps_fake)
    assert torch.equal(v.calls[-1][1], -t) and torch.equal(v.calls[-1][0], t)
    z = t.view(-1, 1, 1, 1) * eps_fake + (1 - t.view(-1, 1, 1, 1)) * z_fake
    torch.testing.assert_close(loss, ((v(z, t, -t) - (eps_fake - z_fake)) ** 2).mean())
    loss.backward()
    assert all(p.grad is None for p in gen.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in v.parameters())


def test_rectify_loss_gradient_is_tar_weighted_score_difference():
    """Eqs. 9-11 + 14: only the one-step forward v_gen gets gradient, and it is 2 w(s) Delta / numel with
    Delta = v(z_s, s, -s) - v(z_s, s, s) computed here independently; the two score forwards and z_fake
    (through Eq. 9) get none."""
    torch.manual_seed(4)
    v, gen = Toy(), nn.Conv2d(4, 4, 1)
    eps, eps_rect, s = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6), torch.tensor([0.3, 0.02])
    v_gen = gen(eps)
    z_fake = eps - v_gen
    v_gen.retain_grad()
    rectify_loss(v, v_gen, z_fake, s, eps_rect, min_s=0.05).backward()
    assert torch.equal(v.calls[-1][1], torch.cat([-s, s])) and torch.equal(v.calls[-1][0], torch.cat([s, s]))
    assert all(p.grad is None for p in v.parameters())
    with torch.no_grad():
        z_s = s.view(-1, 1, 1, 1) * eps_rect + (1 - s.view(-1, 1, 1, 1)) * z_fake
        delta = v(z_s, s, -s) - v(z_s, s, s)
        w = torch.tensor([0.7 ** 2 / 0.3, 0.98 ** 2 / 0.05]).view(-1, 1, 1, 1)
    torch.testing.assert_close(v_gen.grad, 2 * w * delta / delta.numel())  # sg(v_gen) in the target too
    grads = [p.grad.clone() for p in gen.parameters()]
    gen.zero_grad()
    (gen(eps) * (2 * w * delta / delta.numel())).sum().backward()  # the same gradient, through v_gen alone
    for a, b in zip(grads, gen.parameters()):
        torch.testing.assert_close(a, b.grad)


def test_one_step_is_one_step_from_noise():
    torch.manual_seed(5)
    v, eps = Toy(), torch.randn(2, 4, 6, 6)
    z_fake, v_gen = one_step(v, eps)
    assert torch.equal(v.calls[-1][0], torch.ones(2)) and torch.equal(v.calls[-1][1], torch.zeros(2))
    torch.testing.assert_close(z_fake, eps - v(eps, torch.ones(2), torch.zeros(2)))


def test_data_loss_eq13_and_no_vgg_at_weight_zero():
    vae = common.load_vae("tiny-qwen")
    z, x_hr = torch.randn(1, 16, 4, 4), torch.rand(1, 3, 32, 32)
    x = common.decode(vae, "qwen", z)
    lp = lambda a, b: (a - b).abs().mean()  # any distance: Eq. 13 is the weighted sum
    l, mse, l_lp, x_sr = teasr.data_loss(vae, lp, z, x_hr, 0.5)
    torch.testing.assert_close(x_sr, x)
    torch.testing.assert_close(mse, (x - x_hr).pow(2).mean())
    torch.testing.assert_close(l, mse + 0.5 * (x - x_hr).abs().mean())
    l0, mse0, lp0, _ = teasr.data_loss(vae, None, z, x_hr, 0.0)  # the mini preset: no LPIPS network at all
    assert torch.equal(l0, mse0) and lp0.item() == 0.0


# --------------------------------------------------------------------------- sampler
def test_any_step_time_arguments_and_straight_line():
    """Algorithm 1: noise branch at tau_i, condition branch at tau_{i+1}; with the exact velocity of a
    straight flow every N lands on the data point."""
    v, eps = Toy(), torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        sample(v, eps, 4)
    torch.testing.assert_close(torch.stack([torch.cat(c) for c in v.calls]),
                               torch.tensor([[1.0, 0.75], [0.75, 0.5], [0.5, 0.25], [0.25, 0.0]]))
    g = torch.Generator().manual_seed(6)
    z_0, eps = torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 4, 6, 6, generator=g)
    outs = [sample(straight(z_0), eps, n) for n in (1, 2, 4, 7)]
    for out in outs:
        torch.testing.assert_close(out, z_0, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("teasr") / "run")
    teasr.train(common.configure(teasr.Config, model="tiny", num_workers=0, log_every=1, max_steps=2, out_dir=out))
    log = open(os.path.join(out, "log.txt")).read()
    assert "step 2/2" in log and "mem" in log and "adv" in log and "rect" in log
    return out


def test_any_step_sampling_cli_and_build_sampler(trained, tmp_path):
    """`--sample --steps 8` (the CLI) and 1, 2, 4, 8 steps through build_sampler; an odd size (not a multiple of 16
    after x4) and tiling (tiny latent tile 8) included."""
    lr_dir = tmp_path / "lr"
    common.save_image(torch.rand(3, 21, 30, generator=torch.Generator().manual_seed(7)), str(lr_dir / "x.png"))
    argv = sys.argv
    try:  # the CLI, in this process (one import of diffusers less)
        sys.argv = ["teasr.py", "--sample", "--ckpt", trained, "--input", str(lr_dir), "--output", str(tmp_path / "sr"),
                    "--steps", "8"]
        runpy.run_path(os.path.join(ROOT, "teasr.py"), run_name="__main__")
    finally:
        sys.argv = argv
    cli = np.asarray(Image.open(tmp_path / "sr" / "x.png"))
    assert cli.shape == (84, 120, 3)
    x_lr = common.load_image(str(lr_dir / "x.png"))[None]
    outs = {n: teasr.build_sampler(teasr.Config(ckpt=trained, steps=n))(x_lr) for n in (1, 2, 4, 8)}
    for n, y in outs.items():
        assert y.shape == (1, 3, 84, 120) and torch.isfinite(y).all() and 0 <= y.min() and y.max() <= 1
    assert not torch.equal(outs[1], outs[4])
    ours = (outs[8][0].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
    assert np.abs(ours.astype(int) - cli.astype(int)).max() <= 1  # the CLI is build_sampler
    with pytest.raises(SystemExit):
        teasr.build_sampler(teasr.Config(ckpt=trained, steps=0))


def test_train_base_full_trains_the_base_and_the_sampler_uses_it(trained, tmp_path):
    """Default: the base stays frozen and the checkpoint holds no copy of it. --train_base full: every base weight
    trains, the checkpoint holds the trained base (dit.safetensors), a resume restores it exactly, and the sampler
    runs on it (without that file it gives another image)."""
    import shutil
    from safetensors.torch import load_file
    assert not os.path.exists(os.path.join(trained, "ckpt-0000002", "dit.safetensors"))
    out = tmp_path / "tn"
    cfg = dict(model="tiny", num_workers=0, log_every=1, max_steps=2, save_every=1, train_base="full")
    teasr.train(common.configure(teasr.Config, **cfg, out_dir=str(out)))
    ck = out / "ckpt-0000002"
    sd, base = load_file(str(ck / "dit.safetensors")), common.load_dit("tiny-qwen").state_dict()
    assert sd.keys() == base.keys()
    assert any(not torch.equal(sd[k], base[k]) for k in sd)
    shutil.copytree(out / "ckpt-0000001", tmp_path / "resume" / "ckpt-0000001")
    teasr.train(common.configure(teasr.Config, **cfg, out_dir=str(tmp_path / "resume")))
    again = load_file(str(tmp_path / "resume" / "ckpt-0000002" / "dit.safetensors"))
    for k in sd:
        torch.testing.assert_close(again[k], sd[k], atol=1e-6, rtol=0)
    x_lr = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    y = teasr.build_sampler(teasr.Config(ckpt=str(ck)))(x_lr)
    os.remove(ck / "dit.safetensors")
    assert not torch.equal(teasr.build_sampler(teasr.Config(ckpt=str(ck)))(x_lr), y)
