"""fluxsr.py: the FTD algebra (Eqs. 13-18), TV-LPIPS, ADL and its hooks, the teacher sampler and its resumable pair
writer, and pairs that do not depend on the number of ranks (torchrun)."""
import dataclasses, glob, json, math, os, shutil, sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import common as C
import fluxsr as M

from helpers import run




def dyadic(*shape, g):
    """Values k/16, |k| <= 64: every sum, difference and scaling by 1/4 or 1/2 below is exact in fp32."""
    return torch.randint(-64, 65, shape, generator=g).float() / 16


# --------------------------------------------------------------------------- FTD (Eqs. 13-18)
@pytest.mark.parametrize("T_L", [0.25, 0.5])
def test_ftd_loss_exactly_zero_at_true_sr_velocity(T_L):
    g = torch.Generator().manual_seed(0)
    eps, z_0, z_L = (dyadic(2, 16, 4, 4, g=g) for _ in range(3))
    u_t = eps - z_0  # Alg. 1 line 6
    v_sr = (z_L - z_0) / T_L  # Eq. 13, third line: z_L - z_0 = u^SR T_L
    assert M.ftd_loss(u_t, v_sr, eps, z_L, T_L).item() == 0.0
    # off the optimum the loss is positive and equals T_L^2 ||v_sr - v||^2 (Eq. 17 simplified)
    delta = torch.randn(v_sr.shape, generator=g)
    loss = M.ftd_loss(u_t, v_sr + delta, eps, z_L, T_L)
    assert loss > 0
    torch.testing.assert_close(loss, T_L ** 2 * delta.pow(2).mean())


def test_ftd_loss_both_lines_of_eq17_agree_and_zero_in_float64():
    g = torch.Generator().manual_seed(1)
    T_L = 0.3
    eps, z_0, z_L, v = (torch.randn(2, 16, 4, 4, generator=g, dtype=torch.float64) for _ in range(4))
    u_t = eps - z_0
    v_phi = (u_t - v * T_L) / (1 - T_L)  # Eq. 15
    first_line = ((1 - T_L) * v_phi - (eps - z_L)).pow(2).mean()  # Eq. 17, first line
    torch.testing.assert_close(M.ftd_loss(u_t, v, eps, z_L, T_L), first_line)
    assert M.ftd_loss(u_t, (z_L - z_0) / T_L, eps, z_L, T_L) < 1e-28


def test_generator_with_true_velocity_recovers_z0():
    g = torch.Generator().manual_seed(2)
    z_0, z_L = (torch.randn(2, 16, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    for T_L in (0.25, 0.5, 0.8):
        torch.testing.assert_close(M.G(z_L, (z_L - z_0) / T_L, T_L), z_0)  # Eq. 18
    gd = torch.Generator().manual_seed(3)
    z_0, z_L = dyadic(1, 16, 4, 4, g=gd), dyadic(1, 16, 4, 4, g=gd)
    assert torch.equal(M.G(z_L, (z_L - z_0) / 0.5, 0.5), z_0)


def test_z_t_hits_z_L_at_T_L_and_eps_at_1_and_moves_with_v_phi():
    g = torch.Generator().manual_seed(4)
    z_L, eps, z_0 = (torch.randn(3, 16, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    T_L = 0.4
    ones = torch.ones(3, dtype=torch.float64)
    assert torch.equal(M.ftd_z_t(z_L, eps, T_L * ones, T_L), z_L)  # Eq. 16 at t = T_L
    assert torch.equal(M.ftd_z_t(z_L, eps, ones, T_L), eps)  # and at t = 1
    # the segment's velocity dz_t/dt is the LR flow v_phi of Eq. 15 at the FTD optimum
    t, h = torch.tensor([0.5, 0.7, 0.9], dtype=torch.float64), 1e-6
    dz = (M.ftd_z_t(z_L, eps, t + h, T_L) - M.ftd_z_t(z_L, eps, t - h, T_L)) / (2 * h)
    v_phi = ((eps - z_0) - (z_L - z_0) / T_L * T_L) / (1 - T_L)
    torch.testing.assert_close(dz, v_phi, atol=1e-7, rtol=1e-7)


# --------------------------------------------------------------------------- TV-LPIPS (Eqs. 19-21)
def test_tv_of_constant_is_zero_and_known_images():
    assert torch.equal(M.tv(torch.full((2, 3, 16, 16), 0.37)), torch.zeros(2, 3, 15, 15))
    ramp = torch.arange(16.0).mul(0.25).expand(1, 3, 16, 16)  # columns step 0.25, rows constant
    assert torch.equal(M.tv(ramp), torch.full((1, 3, 15, 15), 0.25))
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None]).remainder(2).float().expand(1, 3, 16, 16)
    assert torch.equal(M.tv(checker), torch.full((1, 3, 15, 15), 2.0))  # |dy| + |dx| = 1 + 1


def test_tv_lpips_and_rec_loss_follow_eq19_and_eq21():
    torch.manual_seed(0)
    lpips = C.load_lpips(torch.device("cpu"))
    a, b = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    assert M.tv_lpips(lpips, a, a, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    base, tv_term = lpips(a, b), lpips(M.tv(a), M.tv(b))
    assert tv_term > 0
    torch.testing.assert_close(M.tv_lpips(lpips, a, b, 2.0), base + 2.0 * tv_term)
    rec, mse, tvl = M.rec_loss(lpips, a, b, 0.5, 2.0)
    torch.testing.assert_close(mse, (a - b).pow(2).mean())
    torch.testing.assert_close(rec, mse + 0.5 * (base + 2.0 * tv_term))
    rec0, mse0, tvl0 = M.rec_loss(None, a, b, 0.0, 2.0)  # lam 0 (mini): no LPIPS network is needed
    assert torch.equal(rec0, mse0) and torch.equal(mse0, mse) and tvl0.item() == 0.0


# --------------------------------------------------------------------------- ADL (Eqs. 22-23)
def test_adl_identical_tokens_one_orthogonal_near_zero_and_brute_force():
    g = torch.Generator().manual_seed(5)
    same = torch.randn(1, 1, 32, generator=g).expand(2, 50, 32)
    assert M.adl_loss([same, 3 * same]).item() == pytest.approx(1.0, abs=1e-6)
    for n in (64, 1024):  # N orthonormal tokens: cos to their mean is exactly 1/sqrt(N)
        q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
        assert M.adl_loss([q[None]]).item() == pytest.approx(1 / math.sqrt(n), rel=1e-6)
    assert M.adl_loss([q[None]]) < 0.05
    feats = [torch.randn(2, 10, 8, generator=g) + 0.5, torch.randn(2, 10, 8, generator=g)]
    ref = np.mean([np.mean([np.dot(a, f[b].mean(0)) / np.linalg.norm(a) / np.linalg.norm(f[b].mean(0)) for a in f[b]])
                   for f in (x.numpy() for x in feats) for b in range(2)])
    assert M.adl_loss(feats).item() == pytest.approx(ref, rel=1e-5)


def _hooked_step(grad_ckpt):
    torch.manual_seed(0)
    dit = C.add_lora(C.load_dit("tiny-flux1"), "lora", 4, 4, M.LORA_TARGETS)
    for n, p in dit.named_parameters():
        if "lora_B" in n:
            p.data.normal_(generator=torch.Generator().manual_seed(7))
    if grad_ckpt:
        dit.enable_gradient_checkpointing()
    feats = M.BlockFeatures(dit)
    before_norm_out = []
    dit.norm_out.register_forward_hook(lambda m, args, out: before_norm_out.append(args[0]))
    cond = C.expand_cond(C.tiny_cond(dit, "flux1"), 2)
    z, t = torch.randn(2, 16, 6, 8, generator=torch.Generator().manual_seed(8)), torch.tensor([0.3, 0.9])
    with feats.record() as A:
        C.velocity("flux1", dit, z, t, cond)
    n_img = 6 * 8 // 4
    loss = M.adl_loss([a[:, -n_img:] for a in A])
    loss.backward()
    C.velocity("flux1", dit, z, t, cond)  # outside record(): not collected
    grads = {n: p.grad.clone() for n, p in dit.named_parameters() if p.grad is not None}
    return A, before_norm_out[0], n_img, loss, grads


def test_adl_hooks_take_image_tokens_of_every_block_once_under_checkpointing():
    A, last_img, n_img, loss, grads = _hooked_step(grad_ckpt=False)
    A_ck, _, _, loss_ck, grads_ck = _hooked_step(grad_ckpt=True)
    # one entry per block (1 double + 1 single in tiny-flux1), also after checkpointing's recompute
    assert len(A) == 2 and len(A_ck) == 2
    assert all(a.shape == (2, n_img, 32) for a in A)
    # the single block's hooked output is the image stream that reaches norm_out: image tokens only
    torch.testing.assert_close(A[-1][:, -n_img:], last_img)
    torch.testing.assert_close(loss_ck, loss)
    assert grads and grads.keys() == grads_ck.keys()
    for k in grads:
        torch.testing.assert_close(grads_ck[k], grads[k], atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- teacher pairs
def test_flux_sigmas_match_diffusers_flux_schedule():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    sch = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                          base_image_seq_len=256, max_image_seq_len=4096)
    for steps, n in ((28, 4096), (4, 16)):
        sch.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(n))
        torch.testing.assert_close(M.flux_sigmas(steps, n), sch.sigmas.float(), atol=1e-6, rtol=1e-6)


def _pairs_cfg(data, n=4, **kw):
    return C.configure(M.Config, model="tiny", data=str(data), make_pairs=n, **kw)


def _read_pairs(folder):
    return {os.path.basename(f): load_file(f) for f in sorted(glob.glob(os.path.join(folder, "pair-*.safetensors")))}


@pytest.fixture(scope="module")
def clean_pairs(tmp_path_factory):
    d = tmp_path_factory.mktemp("clean")
    M.make_pairs(_pairs_cfg(d))
    return d


def test_pairs_are_the_teachers_euler_samples(clean_pairs):
    p = load_file(os.path.join(clean_pairs, "pair-000001.safetensors"))
    dit, vae = C.load_dit("tiny-flux1"), C.load_vae("tiny-flux1")
    eps = M.pair_noise(0, 1, (1, 16, 8, 8))
    assert torch.equal(p["eps"], eps[0])
    z = eps  # the Euler loop written out here, on the schedule checked against diffusers above
    sig = M.flux_sigmas(4, 16)
    for t, s in zip(sig[:-1], sig[1:]):
        z = z + (s - t) * C.velocity("flux1", dit, z, t.view(1), C.tiny_cond(dit, "flux1"))
    torch.testing.assert_close(p["z_0"], z[0].detach(), atol=1e-5, rtol=1e-5)
    x = C.decode(vae, "flux1", z).clamp(0, 1).mul(255).round()[0].detach()
    assert (p["x_0"].float() - x).abs().max() <= 1
    assert p["x_0"].dtype == torch.uint8 and p["x_0"].shape == (3, 64, 64)


def test_inverting_the_sampler_then_sampling_returns_the_latent():
    """teacher_sample(invert=True) runs the same Euler schedule backwards: sampling its eps returns z to first order in
    1/steps."""
    dit, z = C.load_dit("tiny-flux1"), torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = C.tiny_cond(dit, "flux1")
    err = {}
    for n in (8, 256):
        eps = M.teacher_sample(dit, z, cond, n, 3.5, invert=True)
        err[n] = float((M.teacher_sample(dit, eps, cond, n, 3.5) - z).norm() / z.norm())
    assert float((eps - z).norm() / z.norm()) > 0.3  # the flow moved: not a trivial round trip
    assert err[256] < 0.005 and err[256] < err[8] / 10


def test_pairs_from_photos_hold_the_photo_its_latent_and_the_inverted_noise(tmp_path):
    M.make_pairs(_pairs_cfg(tmp_path, n=2, pairs_from="sample"))
    p = load_file(os.path.join(tmp_path, "pair-000001.safetensors"))
    from degrade import ImageDataset
    x = ImageDataset("sample", 64)[(1, 1)]  # pair i: photo i, crop seed seed * 1_000_003 + i
    assert torch.equal(p["x_0"], x.mul(255).round().to(torch.uint8))
    dit, vae = C.load_dit("tiny-flux1"), C.load_vae("tiny-flux1")
    z = C.encode(vae, "flux1", x[None])
    torch.testing.assert_close(p["z_0"], z[0], atol=1e-5, rtol=1e-5)
    eps = M.teacher_sample(dit, z, C.tiny_cond(dit, "flux1"), 4, 3.5, invert=True)
    torch.testing.assert_close(p["eps"], eps[0], atol=1e-5, rtol=1e-5)
    assert json.loads(open(os.path.join(tmp_path, "pairs.json")).read())["pairs_from"] == "sample"


def test_make_pairs_resumes_after_kill_without_duplicates(tmp_path, monkeypatch, clean_pairs):
    written, real_write, real_sample = [], M.write_pair, M.teacher_sample

    def write(folder, i, *a):
        written.append(i)
        real_write(folder, i, *a)

    def crash_at_third(*a, **k):  # a kill while pair 2 is being sampled
        if len(written) == 2:
            raise KeyboardInterrupt
        return real_sample(*a, **k)

    monkeypatch.setattr(M, "write_pair", write)
    monkeypatch.setattr(M, "teacher_sample", crash_at_third)
    with pytest.raises(KeyboardInterrupt):
        M.make_pairs(_pairs_cfg(tmp_path))
    assert written == [0, 1]
    (tmp_path / ".tmp-pair-000002.safetensors").write_bytes(b"half a pair")  # a kill mid-write
    monkeypatch.setattr(M, "teacher_sample", real_sample)
    M.make_pairs(_pairs_cfg(tmp_path))
    assert written == [0, 1, 2, 3]  # each pair written once
    assert not glob.glob(str(tmp_path / ".tmp-*"))
    a, b = _read_pairs(tmp_path), _read_pairs(clean_pairs)
    assert a.keys() == b.keys() and len(a) == 4
    for k in a:
        assert all(torch.equal(a[k][n], b[k][n]) for n in ("eps", "z_0", "x_0"))
    with pytest.raises(SystemExit, match="other settings"):  # no mixing of teachers in one folder
        M.make_pairs(_pairs_cfg(tmp_path, guidance=2.0))


def test_damaged_pairs_are_named_at_start_and_made_again(tmp_path, clean_pairs):
    """A truncated pair file and a damaged pairs.json: training stops before anything is built, naming both and the
    command; --make_pairs writes exactly the damaged pair again (the others untouched) and the manifest; then the run
    trains."""
    for f in os.listdir(clean_pairs):
        shutil.copy(clean_pairs / f, tmp_path / f)
    data = (tmp_path / "pair-000002.safetensors").read_bytes()
    (tmp_path / "pair-000002.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "pairs.json").write_bytes(b"\x93\xff not json")
    kw = dict(model="tiny", data=str(tmp_path), out_dir=str(tmp_path / "run"), max_steps=1, batch_size=1, num_workers=0)
    with pytest.raises(SystemExit) as e:
        M.train(C.configure(M.Config, **kw))
    msg = str(e.value)
    assert "pair-000002.safetensors: truncated" in msg and "pairs.json: not a JSON manifest" in msg
    assert "--make_pairs 4" in msg and not (tmp_path / "run").exists()
    mtimes = {f: os.path.getmtime(tmp_path / f) for f in ("pair-000000.safetensors", "pair-000003.safetensors")}
    M.make_pairs(_pairs_cfg(tmp_path))
    assert all(os.path.getmtime(tmp_path / f) == t for f, t in mtimes.items())
    a, b = _read_pairs(tmp_path), _read_pairs(clean_pairs)
    assert all(torch.equal(a[k]["z_0"], b[k]["z_0"]) for k in b) and M.damaged_pairs(str(tmp_path)) == []
    M.train(C.configure(M.Config, **kw))
    assert "step 1/1" in (tmp_path / "run" / "log.txt").read_text()


def test_batched_teacher_calls_write_the_same_pairs(tmp_path, clean_pairs):
    """--pair_batch 3 over 4 pairs with pair 1 already on disk: pairs 0, 2, 3 in one teacher call,
    each equal to the one-at-a-time pair (a pair depends on its index, not on its batch)."""
    shutil.copy(clean_pairs / "pair-000001.safetensors", tmp_path / "pair-000001.safetensors")
    shutil.copy(clean_pairs / "pairs.json", tmp_path / "pairs.json")
    M.make_pairs(dataclasses.replace(_pairs_cfg(tmp_path), pair_batch=3))
    a, b = _read_pairs(tmp_path), _read_pairs(clean_pairs)
    assert a.keys() == b.keys() and len(a) == 4
    for k in a:
        assert torch.equal(a[k]["eps"], b[k]["eps"])
        torch.testing.assert_close(a[k]["z_0"], b[k]["z_0"], atol=1e-5, rtol=1e-5)
        assert (a[k]["x_0"].float() - b[k]["x_0"].float()).abs().max() <= 1
    with pytest.raises(SystemExit, match="pair_batch"):
        M.make_pairs(dataclasses.replace(_pairs_cfg(tmp_path), pair_batch=0))


def test_aligned_crops_of_pairs(clean_pairs):
    full = M.PairDataset(str(clean_pairs), 64)[(0, 0)]
    for seed in range(4):
        eps, z_0, x_0 = M.PairDataset(str(clean_pairs), 32)[(0, seed)]
        assert eps.shape == z_0.shape == (16, 4, 4) and x_0.shape == (3, 32, 32)
        hits = [(i, j) for i in (0, 16, 32) for j in (0, 16, 32) if torch.equal(full[2][:, i:i + 32, j:j + 32], x_0)]
        i, j = hits[0]  # the pixel crop sits on the token grid, the latent crop at the same place
        assert torch.equal(full[0][:, i // 8:i // 8 + 4, j // 8:j // 8 + 4], eps)
        assert torch.equal(full[1][:, i // 8:i // 8 + 4, j // 8:j // 8 + 4], z_0)


def test_a_pair_crop_is_a_function_of_its_key_alone(clean_pairs):
    """The same (index, seed) gives the same crop under any global RNG state (resume, another number of ranks)."""
    data = M.PairDataset(str(clean_pairs), 16)
    crops = []
    for state in range(6):
        torch.manual_seed(state)
        crops.append(data[(0, 3)][2])
    assert all(torch.equal(c, crops[0]) for c in crops)
    assert any(not torch.equal(data[(0, s)][2], crops[0]) for s in range(8))  # the seed does move it


def test_torchrun_writes_the_same_pairs(tmp_path, clean_pairs):
    """Pair i on rank i % 2 is the pair one process writes: it depends on its index only."""
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "fluxsr.py", "--model",
         "tiny", "--make_pairs", "4", "--data", str(tmp_path / "pairs")])
    a, b = _read_pairs(tmp_path / "pairs"), _read_pairs(clean_pairs)
    assert a.keys() == b.keys() and len(a) == 4 and all(torch.equal(a[k]["z_0"], b[k]["z_0"]) for k in a)


def test_mini_pairs_from_a_fresh_clone_pretrain_the_teacher_first(tmp_path, monkeypatch, capsys):
    """`--model mini --make_pairs N` is the first FluxSR command on a new machine: the base (the teacher) is pretrained
    first, announced, then the pairs (from the sample photos, as MINI says) are written."""
    monkeypatch.setattr(C, "MINI_DIR", str(tmp_path / "weights"))
    monkeypatch.setitem(C.PRESETS, "mini-flux1", dataclasses.replace(C.PRESETS["mini-flux1"], vae_steps=2,
                                                                     dit_steps=2))
    M.make_pairs(C.configure(M.Config, model="mini", data=str(tmp_path / "pairs"), make_pairs=1, teacher_steps=2))
    assert "pretraining it now" in capsys.readouterr().out
    assert json.load(open(tmp_path / "pairs" / "pairs.json"))["pairs_from"] == "sample"
    assert load_file(str(tmp_path / "pairs" / "pair-000000.safetensors"))["x_0"].shape == (3, 128, 128)
