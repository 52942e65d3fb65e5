"""common.py: presets, latent conventions, velocity calls, loading, data, the lr schedule, checkpoints, tiling."""
import json, os, sys

import numpy as np
import pytest
import torch
from PIL import Image

import common as C
import degrade as D

from helpers import hub_repo, run
TINY = ["tiny-flux1", "tiny-flux2", "tiny-zimage", "tiny-sd3", "tiny-qwen"]




# --------------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def tiny_models():
    return {p: (C.load_dit(p), C.load_vae(p)) for p in TINY}


def test_import_does_no_work():
    r = run([sys.executable, "-X", "importtime", "-c", "import common"])
    heavy = [l for l in r.stderr.splitlines() if l.rstrip().endswith(("diffusers", "transformers", "peft", "lpips"))]
    assert not heavy, heavy


def test_common_imports_no_project_module_outside_its_main():
    """common.py is copied alone: a project import (degrade, eval, a method) only under `if __name__ == "__main__"`."""
    import ast
    tree = ast.parse(open(C.__file__).read())
    main = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
    allowed = {id(n) for m in main for n in ast.walk(m)}
    project = {"degrade", "eval", "strsr", "fluxsr", "smfsr", "teasr"}
    found = [(n.lineno, ast.unparse(n)) for n in ast.walk(tree) if id(n) not in allowed and (
        isinstance(n, ast.Import) and any(a.name in project for a in n.names)
        or isinstance(n, ast.ImportFrom) and n.module in project
        or isinstance(n, ast.Call) and "import_module" in ast.unparse(n.func))]
    assert not found, found


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


class _Stop(Exception):
    pass


def pipeline_call(fam, dit, vae, z, sigma, cond):
    """The transformer's call inside the family's own diffusers pipeline at sigma (one step, prompt embeddings given,
    no guidance): its keyword arguments and its output, captured by hooks (the run stops there)."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, QwenImagePipeline
    B, Cz, h, w = z.shape
    px = h * 16 if fam == "flux2" else h * 8
    sched = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)  # sigmas used as given
    n = {"flux1": 2, "sd3": 3}.get(fam, 1)  # the pipeline's text encoders: none needed, embeddings given
    text = {f"{k}{s}": None for s in ("", "_2", "_3")[:n] for k in ("text_encoder", "tokenizer")}
    pipe = getattr(diffusers, C.FAMILIES[fam][2])(scheduler=sched, vae=vae, transformer=dit, **text)
    e, dt = cond["embeds"].to(dit.dtype), dit.dtype
    kw = dict(height=px, width=px, num_inference_steps=1, sigmas=[sigma], output_type="latent")
    if fam == "flux1":
        kw.update(prompt_embeds=e, pooled_prompt_embeds=cond["pooled"].to(dt), guidance_scale=3.5,
                  latents=FluxPipeline._pack_latents(z, B, Cz, h, w).to(dt))
    elif fam == "flux2":
        kw.update(prompt_embeds=e, guidance_scale=1.0, latents=z.to(dt))
    elif fam == "zimage":
        kw.update(prompt_embeds=list(e.unbind(0)), guidance_scale=0.0, latents=z.to(dt))
    elif fam == "sd3":
        kw.update(prompt_embeds=e, pooled_prompt_embeds=cond["pooled"].to(dt), guidance_scale=1.0, latents=z.to(dt))
    else:
        kw.update(prompt_embeds=e, prompt_embeds_mask=cond["mask"], true_cfg_scale=1.0,
                  latents=QwenImagePipeline._pack_latents(z, B, Cz, h, w).to(dt))
    seen = {}

    def out_hook(m, args, kwargs, out):
        seen.update(kwargs=kwargs, args=args, out=out)
        raise _Stop
    h_ = dit.register_forward_hook(out_hook, with_kwargs=True)
    try:
        pipe(**kw)
    except _Stop:
        pass
    finally:
        h_.remove()
    return seen


def _timestep(call):  # the transformer's timestep argument (Z-Image's is its second positional one)
    return call["kwargs"]["timestep"] if "timestep" in call["kwargs"] else call["args"][1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("preset", TINY)
def test_velocity_matches_the_pipelines_call(tiny_models, preset, dtype):
    """common.velocity gives the transformer what the family's own diffusers pipeline gives it (hooks capture both
    calls): the same timestep tensor, dtype and bits (FLUX.1, FLUX.2, Qwen-Image: 1000 t rounded to the latents' dtype,
    then / 1000; Z-Image: (1000 - 1000 t) / 1000; SD3: 1000 t), the same output, and it returns the velocity the
    pipeline reads from that output (unpacked; Z-Image's negated). The times include ones where bf16 rounding of 1000 t
    and the Z-Image subtraction differ from the naive t and 1 - t."""
    from diffusers import FluxPipeline, QwenImagePipeline
    fam = C.PRESETS[preset].family
    dit, vae = (m.to(dtype) for m in tiny_models[preset])
    Cz = 128 if fam == "flux2" else 16
    z, cond = torch.randn(1, Cz, 4, 4, generator=torch.Generator().manual_seed(0)), C.tiny_cond(dit, fam)
    px = 64 if fam == "flux2" else 32
    try:
        for sigma in (0.3, 0.5371, 0.8, 0.8137, 0.85):
            ref = pipeline_call(fam, dit, vae, z, sigma, cond)
            ours = {}
            h = dit.register_forward_hook(lambda m, a, kw, o: ours.update(args=a, kwargs=kw, out=o), with_kwargs=True)
            with torch.no_grad():
                v = C.velocity(fam, dit, z, torch.tensor([sigma]), cond)
            h.remove()
            t_ref, t_ours = _timestep(ref), _timestep(ours)
            assert t_ours.dtype == t_ref.dtype and torch.equal(t_ours, t_ref), (sigma, t_ours, t_ref)
            out = ref["out"][0]
            if fam == "flux1":
                want = FluxPipeline._unpack_latents(out, px, px, 8)
            elif fam == "flux2":
                want = out.transpose(1, 2).reshape(1, Cz, 4, 4)
            elif fam == "zimage":
                want = -torch.stack(out)[:, :, 0]
            elif fam == "sd3":
                want = out
            else:
                want = QwenImagePipeline._unpack_latents(out, px, px, 8)[:, :, 0]
            assert torch.equal(v, want.float()), sigma
    finally:
        dit.float(), vae.float()


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


@pytest.mark.parametrize("old, new", [
    (dict(lr_g=1e-5, lam=2.0, gamma=0.5, mu=0.1, stage=2), dict(lr=1e-5, w_tv_lpips=2.0, tv_gamma=0.5, w_adl=0.1,
                                                              stage="2", train_base="lora")),
    (dict(lambda_cons=0.25, lambda_data=1.0, lambda_lpips=2.0, lambda_adv=0.3, lambda_rect=0.4, train_noise=False),
     dict(w_cons=0.25, w_data=1.0, w_lpips=2.0, w_adv=0.3, w_rect=0.4, train_base="none")),
    (dict(train_noise=True), dict(train_base="full")),
    (dict(base_rank=-1), dict(train_base="none")),
    (dict(base_rank=0), dict(train_base="full")),
    (dict(base_rank=8, lora_rank=64), dict(train_base="lora", lora_rank=8)),
    (dict(lora_rank=0), dict(train_base="full", lora_rank=0)),
    (dict(lora_rank=16, train_base="lora"), dict(lora_rank=16, train_base="lora")),  # today's flags pass through
])
def test_an_old_checkpoint_config_loads_as_todays_flags(tmp_path, old, new):
    """Checkpoints written before flags were renamed (the weights w_<term>, lr, --train_base) load with today's names:
    SMFSR's --base_rank (-1 frozen, 0 full, r a rank-r LoRA), TEASR's --train_noise, --lora_rank 0 (full)."""
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert C.load_config(str(tmp_path)) == new


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


def test_tiled_sampling_leaves_no_seam():
    """The samplers' frame (super_resolve) on a photo 32 latent cells wide, a lapped autoencoder fitted to it, and a
    stand-in DiT that mixes every cell of its tile by attention (non-local, as a DiT): tiles of 12 cells overlapping by
    4 stay within 28 dB of the untiled output; across the tiles' edges and overlap centres the output steps no more
    than the untiled one, and the tiling's error has no step at the centres (where a hard cut would be: overlap 2,
    whose ramp is a cut, is the control). Steps as eval.blockiness, pixel to pixel."""
    import eval as E
    photo = C.sample_photos(["astronaut"])[0][None]
    vae, x_lr = C.mini_vae_class()(latent_channels=32), C.resize(photo, (64, 64)).clamp(0, 1)  # -> 256 px, 32 cells
    C.pca_init(vae, photo * 2 - 1)

    def attention(z):  # every cell moves halfway to the attention-weighted mean of its tile's cells
        t = z.flatten(2).transpose(1, 2)  # (B, N, C)
        mixed = torch.softmax(t @ t.transpose(1, 2) / t.shape[-1] ** 0.5, -1) @ t
        return z + 0.5 * (mixed.transpose(1, 2).view_as(z) - z)
    untiled = C.super_resolve(vae, "flux1", x_lr, attention)
    seams = {}
    for overlap in (4, 2):
        tiled = C.super_resolve(vae, "flux1", x_lr, lambda z: C.tiled(attention, z, 12, overlap))
        starts = sorted(set(range(0, 32 - 12, 12 - overlap)) | {32 - 12})
        centres = [(b + a + 12) * 8 // 2 - 1 for a, b in zip(starts, starts[1:])]  # pixel lines, 8 px per cell
        seams[overlap] = float(E.step_ratio(0.5 + tiled - untiled, centres))
        if overlap == 4:
            assert 10 * torch.log10(1 / (tiled - untiled).pow(2).mean()) > 28
            edges = centres + [s * 8 - 1 for s in starts[1:]] + [(s + 12) * 8 - 1 for s in starts[:-1]]
            assert float(E.step_ratio(tiled, edges)) < float(E.step_ratio(untiled, edges)) + 0.03
    assert seams[4] < 1.2 and seams[2] > 1.5, seams


def test_pad_to_multiple_and_crop_back():
    x = torch.rand(1, 3, 37, 50)
    p, (H, W) = C.pad_to_multiple(x, 16)
    assert p.shape[-2:] == (48, 64) and torch.equal(p[..., :H, :W], x)
    tiny = torch.rand(1, 3, 5, 3)
    assert C.pad_to_multiple(tiny, 16)[0].shape[-2:] == (16, 16)


# --------------------------------------------------------------------------- sampling flags
def _smooth_photo(size=64):  # a photo, low-passed so that the test images stay inside (0, 1) after a shift
    x = C.sample_photos(["astronaut"])[0][None, :, ::4, ::4][..., :size, :size]
    return 0.25 + 0.5 * C.wavelet_low(x, 2)


def test_wavelet_color_fix_keeps_the_sr_high_band_and_the_lr_low_band():
    """x_sr = photo + a colour cast + a checkerboard (pure high band: its low band is exactly 0): the fix returns the
    photo + the checkerboard, its low band that of the reference, its high band that of x_sr."""
    ref = _smooth_photo()
    checker = 0.05 * (-1.0) ** (torch.arange(64)[:, None] + torch.arange(64)[None])  # (64, 64)
    x_sr = ref + torch.tensor([0.08, -0.05, 0.03]).view(1, 3, 1, 1) + checker
    assert C.wavelet_low(checker.expand(1, 3, 64, 64)).abs().max() < 1e-6
    out = C.color_fix(x_sr, ref, "wavelet")
    torch.testing.assert_close(out, ref + checker, atol=1e-5, rtol=0)
    torch.testing.assert_close(C.wavelet_low(out), C.wavelet_low(ref), atol=1e-5, rtol=0)
    torch.testing.assert_close(out - C.wavelet_low(out), x_sr - C.wavelet_low(x_sr), atol=1e-5, rtol=0)
    flat = torch.full((1, 3, 64, 64), 0.3)
    torch.testing.assert_close(C.wavelet_low(flat), flat)  # a constant is all low band


def test_adain_color_fix_has_the_reference_statistics_and_the_sr_shape():
    ref, x_sr = _smooth_photo(), torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    out = C.color_fix(x_sr, ref, "adain")
    for stat in (torch.mean, torch.std):
        torch.testing.assert_close(stat(out, (-2, -1)), stat(ref, (-2, -1)), atol=1e-5, rtol=0)
    for c in range(3):  # per channel an increasing affine map of x_sr: the same image, recoloured
        a = np.polyfit(x_sr[0, c].flatten().numpy(), out[0, c].flatten().numpy(), 1)[0]
        torch.testing.assert_close(out[0, c], a * (x_sr[0, c] - x_sr[0, c].mean()) + ref[0, c].mean(), atol=1e-5,
                                   rtol=0)
    assert torch.equal(C.color_fix(x_sr, ref, "none"), x_sr)


@pytest.mark.parametrize("scale", [2, 3, 3.5, 8])
def test_finish_sampler_scales_any_factor_and_fixes_against_bicubic(scale):
    """A stand-in x4 sampler (bicubic x4 + a colour cast): the output is round(S x side); wavelet takes the cast out, so
    the output is the bicubic LR at that size."""
    x_lr = _smooth_photo(21)[..., :17, :]  # (1, 3, 17, 21): odd sides
    x_ref = torch.nn.functional.interpolate(x_lr, size=(round(17 * scale), round(21 * scale)), mode="bicubic")
    cast = lambda x: (C.upsample_lr(x) + 0.05).clamp(0, 1)
    flags = C.SampleFlags(scale=scale, color_fix="wavelet")
    out = C.finish_sampler(cast, flags)(x_lr)
    assert out.shape[-2:] == (round(17 * scale), round(21 * scale))
    assert (C.finish_sampler(cast, C.SampleFlags(scale=scale))(x_lr) - x_ref).mean() > 0.04
    assert (out - x_ref.clamp(0, 1)).abs().mean() < 0.01


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
    the package's linear heads on top, the classifier's keys ignored; the result differs from the random stand-in
    (seed 0). The file has every key and shape of torchvision's; its features are drawn (seed 3), its 120M classifier
    weights are one stored zero each (expanded: a small file, not 528 MB written and read)."""
    import lpips, torchvision
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in torchvision.models.vgg16().state_dict().items()}
    with torch.random.fork_rng():
        torch.manual_seed(3)
        features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    sd = {k: features.state_dict()[k[len("features."):]] if k.startswith("features.") else torch.zeros(()).expand(v)
          for k, v in shapes.items()}
    assert all(sd[k].shape == v for k, v in shapes.items()) and any(k.startswith("classifier.") for k in sd)
    torch.save(sd, tmp_path / "vgg16.pth")
    x, y = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the random stand-in's draw (load_lpips("cpu"))
        ref = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    stand_in = float(ref(x * 2 - 1, y * 2 - 1).mean())
    for i, layer in enumerate(features[:30]):  # lpips' slices hold torchvision's features 0..29 by index
        slice_ = next(s for s in (ref.net.slice1, ref.net.slice2, ref.net.slice3, ref.net.slice4, ref.net.slice5)
                      if str(i) in s._modules)
        slice_._modules[str(i)] = layer
    want = ref(x * 2 - 1, y * 2 - 1).mean()
    got = C.load_lpips("cpu", str(tmp_path / "vgg16.pth"))(x, y)
    torch.testing.assert_close(got, want)
    assert abs(float(got) - stand_in) > 1e-4


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


def test_weights_check_names_each_way_a_network_is_missing(tmp_path, monkeypatch):
    """Weights.problem, the one check of training, pair making and sampling: a path that does not exist is named and
    never taken for a hub id; a hub id neither cached nor valid is reported, not raised; a folder or a cached repo
    without its weights (or with a shard of an index missing) is reported; "random" is refused (the check runs on real
    presets only); a complete folder or cached repo passes."""
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    problem = lambda source, files=("config.json",): C.Weights("net", str(source), "flag", files).problem()
    for path in (tmp_path / "nope", "models/qwen/qwen3-vl", "vgg16.pth", "./org/name"):
        assert problem(path) == "does not exist", path
    assert problem("bad id!/x") == "is not in the Hugging Face cache (nor a valid hub id)"
    assert problem("org/not-cached") == "is not in the Hugging Face cache"
    assert "stands in only on the tiny and mini presets" in problem("random", ())
    folder = tmp_path / "vlm"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert problem(folder, ("config.json", "tokenizer.json")) == f"lacks tokenizer.json, weights (in {folder})"
    assert problem(folder, ()) == "is a folder, not a weights file"
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"x")
    assert problem(folder) == f"lacks weights (in {folder})"  # one shard of two
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"x")
    assert problem(folder) is None
    files = {"model_index.json": b"{}", "transformer/config.json": b"{}", "vae/config.json": b"{}",
             "vae/diffusion_pytorch_model.safetensors": b"v", "transformer/diffusion_pytorch_model.safetensors."
             "index.json": json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}).encode(),
             "transformer/s1.safetensors": b"1"}
    snap = hub_repo(tmp_path / "hub", "org/pipe", files)
    need = ("model_index.json", "transformer/config.json", "vae/config.json")
    assert problem("org/pipe", need) == f"lacks transformer/weights (in {snap})"
    hub_repo(tmp_path / "hub", "org/pipe", {"transformer/s2.safetensors": b"2"})
    assert problem("org/pipe", need) is None


def test_prefetch_prints_whole_reasons_and_the_size_on_disk(tmp_path, monkeypatch, capsys):
    """A failure's whole reason on lines of at most 120 columns; a cached repo's size: the bytes of the files prefetch
    asked for, each blob once (two links to one blob), in a unit that shows them."""
    import huggingface_hub
    reason = "the hub could not be reached: " + " ".join(f"detail-{i}" for i in range(40)) + " (the end)."
    snap = hub_repo(tmp_path / "hub", "org/pipe", {"vae/a.safetensors": b"x" * 12000, "vae/config.json": b"y" * 340,
                                                    "text_encoder/big.bin": b"z" * 10**6})
    (snap / "vae" / "same.safetensors").symlink_to(os.readlink(snap / "vae" / "a.safetensors"))

    def download(repo, allow_patterns=()):
        if repo == "org/pipe":
            return str(snap)
        raise OSError(reason)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    failed = C.prefetch([C.Weights("base", "org/pipe", "model_path", ("vae/config.json",), ("vae/*",)),
                         C.Weights("other", "org/gone", "model_path", ("config.json",))])
    out = capsys.readouterr().out
    assert f"base: org/pipe (12.34 kB in {snap})" in out
    assert len(failed) == 1 and all(len(line) <= 120 for line in failed[0].splitlines())
    assert " ".join(failed[0].split()) == f"other: org/gone: OSError: {reason}"
