"""strsr.py: the losses against independent computations and properties, gradient routing of the
G and D steps, the VLM input layout, exact resume, both stages end to end (torchrun), sampling."""
import dataclasses, math, os, socket, sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common as C
import strsr as S

from helpers import run


@pytest.fixture(scope="module")
def tiny():
    cfg = S.resolve(S.Config(model="tiny"))
    torch.manual_seed(0)
    dit, vae, cond = S.build_generator(cfg, torch.device("cpu"))
    disc = S.Discriminator(True, cfg.disc_width)
    lpips = C.load_lpips(torch.device("cpu"), pretrained=False)
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
    assert S.r1_approx(const, x, const(x)).item() == 0.0
    # linear C(x) = <w, x>: E (w.n)^2 = ||w||^2 a^2 / 3 for n ~ U[-a, a], a = 0.005 / 2 on [0, 1] images
    w = torch.randn(48)
    lin = lambda x: [x.flatten(1) @ w[:, None]]
    torch.manual_seed(0)
    got = S.r1_approx(lin, x, lin(x), noise_scale=0.005).item()
    want = w.pow(2).sum().item() * (0.005 / 2) ** 2 / 3
    assert got == pytest.approx(want, rel=0.1)


def test_fdl_zero_on_identical_and_grows_with_blur(capsys):
    import torchvision.transforms.functional as TF
    phi = S.FDLFeatures(pretrained=False, projections=32)
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
    dit = C.add_lora(C.load_dit(preset), 8, 8, S.LORA_TARGETS[fam])
    assert sum(n.endswith("lora_A") for n, _ in dit.named_modules()) == n_lora
    base = C.load_dit(preset)
    z = torch.randn(1, 128 if fam == "flux2" else 16, 4, 4)
    cond = C.tiny_cond(base, fam)
    with torch.no_grad():
        v = C.velocity(fam, base, z, torch.tensor([0.8]), cond)
        torch.testing.assert_close(S.generate(dit, fam, z, cond, 0.8), z - 0.8 * v, atol=1e-5, rtol=1e-5)
        two = S.generate(base, fam, z, cond, 0.8, steps=2)
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


def test_g_step_and_d_step_send_gradients_only_where_the_paper_does(tiny):
    cfg, dit, vae, cond, disc, lpips = tiny
    g_params = [p for p in list(dit.parameters()) + list(cond.parameters()) if p.requires_grad]
    torch.manual_seed(0)
    x_hr = torch.rand(2, 3, 64, 64)
    x_lr = F.interpolate(x_hr, scale_factor=0.25, mode="area")
    loss_g, terms, x_sr, fr, ff = S.g_step(dit, vae, cond, disc, lpips, None, "flux2", x_lr, x_hr, cfg)
    loss_d, _ = S.d_step(disc, x_hr, fr, ff, cfg)
    assert set(terms) == {"l1", "lpips", "gan"}  # stage 1: no FDL
    loss_g.backward()
    assert all(p.grad is None for p in disc.parameters()), "G step reached D"
    assert sum(float(p.grad.abs().sum()) for p in g_params if p.grad is not None) > 0
    assert cond.mlp[0].weight.grad is not None
    for p in g_params:
        p.grad = None
    loss_d.backward()
    assert all(p.grad is None for p in g_params), "D step reached G"
    assert all(p.grad is not None for p in disc.trainable())
    assert all(p.grad is None for p in list(disc.trunk.parameters()) + list(disc.proj.parameters()))
    for p in disc.trainable():
        p.grad = None


def test_g_step_without_lpips_needs_no_vgg(tiny):
    """--w_lpips 0 (the mini default): no LPIPS network at all, and Eq. (11) loses exactly that term."""
    cfg, dit, vae, cond, disc, _ = tiny
    cfg = dataclasses.replace(cfg, w_lpips=0.0)
    torch.manual_seed(0)
    x_hr = torch.rand(2, 3, 64, 64)
    x_lr = F.interpolate(x_hr, scale_factor=0.25, mode="area")
    with torch.no_grad():
        loss, terms, *_ = S.g_step(dit, vae, cond, disc, None, None, "flux2", x_lr, x_hr, cfg)
    assert set(terms) == {"l1", "gan"}
    torch.testing.assert_close(loss, cfg.w_l1 * terms["l1"] + cfg.w_gan * terms["gan"])


# --------------------------------------------------------------------------- training and sampling
def _train(out, steps, **kw):
    cfg = S.Config(model="tiny", out_dir=str(out), max_steps=steps, batch_size=2, num_workers=0, log_every=1, **kw)
    S.train(cfg)
    return C.latest_checkpoint(str(out))


def test_exact_resume(tmp_path):
    from safetensors.torch import load_file
    a = _train(tmp_path / "a", 2)
    _train(tmp_path / "b", 1)
    b = _train(tmp_path / "b", 2)
    assert a.endswith("ckpt-0000002") and b.endswith("ckpt-0000002")
    for f in ("pytorch_lora_weights.safetensors", "cond.safetensors", "disc.safetensors"):
        sa, sb = load_file(os.path.join(a, f)), load_file(os.path.join(b, f))
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], atol=1e-6, rtol=0, msg=f"{f}:{k}")
    oa, ob = (torch.load(os.path.join(c, "state.pt"), weights_only=True)["optimizers"] for c in (a, b))
    for k in ("g", "d"):
        for i, st in oa[k]["state"].items():
            torch.testing.assert_close(st["exp_avg_sq"], ob[k]["state"][i]["exp_avg_sq"], atol=1e-9, rtol=1e-6)


def test_two_stages_torchrun_then_sample(tmp_path):
    out = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--model", "tiny", "--out_dir", str(out), "--batch_size", "2", "--log_every", "1"]
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
         "strsr.py", *args, "--max_steps", "2"])
    r = run([sys.executable, "strsr.py", *args, "--stage", "2", "--max_steps", "1"])
    lines = [l for l in (out / "log.txt").read_text().splitlines() if l.startswith("step ")]
    assert [l.split(" |")[0] for l in lines] == ["step 1/2", "step 2/2", "step 3/3"]
    terms = [l.replace("(", " ").split() for l in lines]
    assert all(k in t for t in terms for k in ("l1", "lpips", "gan", "d_gan", "r1"))
    assert ["fdl" in t for t in terms] == [False, False, True]  # stage 2 adds FDL
    assert "stage 1 -> stage 2" in r.stdout
    assert C.load_config(str(out / "ckpt-0000003"))["stage"] == 2
    assert (out / "grids" / "step-0000002.png").exists() and (out / "grids" / "step-0000003.png").exists()
    # CLI sampling: odd sizes, gray and RGBA inputs
    inp = tmp_path / "in"
    inp.mkdir()
    Image.new("L", (13, 11), 120).save(inp / "gray.png")
    Image.new("RGBA", (9, 17), (10, 200, 30, 128)).save(inp / "rgba.png")
    run([sys.executable, "strsr.py", "--sample", "--ckpt", str(out), "--input", str(inp), "--output", str(tmp_path / "sr")])
    assert Image.open(tmp_path / "sr" / "gray.png").size == (52, 44)
    assert Image.open(tmp_path / "sr" / "rgba.png").size == (36, 68)
    # tiled sampling in latent space; the VLM sees the whole LR image exactly once
    sr = S.build_sampler(str(out), tile=4, overlap=2)
    seen = []
    h = sr.cond.vlm.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    y = sr(torch.rand(1, 3, 37, 29))
    h.remove()
    assert y.shape == (1, 3, 148, 116) and 0 <= y.min() and y.max() <= 1
    assert seen == [(1, 3, 37, 29)]
