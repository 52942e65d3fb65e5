"""
SMFSR: Noise-Started One-Step Real-World Super-Resolution via LR-Conditioned SplitMeanFlow and
GAN Refinement (Zhu, Zhang, Zheng, Luo, Guo, Yang; arXiv:2605.09328; github.com/wzhu121/SMFSR
releases inference only).

An LR-conditioned SD3.5-Medium predicts the average velocity u(z_t, r, t) over [r, t]; one jump from
pure noise gives the HR latent (other seeds, other plausible outputs). All three training stages are
here: `--stage teacher` (0) trains an LR-conditioned flow-matching teacher, `--stage isc` (1)
distils it into the average-velocity student by Interval Splitting Consistency (Algorithm 1),
`--stage gan` (2) refines the one jump with reconstruction, VSD and a DINOv3 GAN. Rectified flow,
t = 1 is noise; z_hr, z_lr: the latents of the HR and of the bicubic x4 LR; c: the caption.
    (1)  z_t = (1 - t) z_hr + t eps     (2)  v = eps - z_hr     (3)  L_FM = || v_theta(z_t, t) - (eps - z_hr) ||^2
    (5)  u(z_t, r, t) = 1/(t - r) int_r^t v(z_tau, tau) dtau  (average velocity)   (10) z_s = z_t - (t - s) u(z_t, s, t)
    (8)  (t - r) u(z_t, r, t) = (s - r) u(z_s, r, s) + (t - s) u(z_t, s, t),   r <= s <= t
    (11) L_ISC = || u(z_t, r, t) - sg[(1 - lam) u(z_s, r, s) + lam u(z_t, s, t)] ||^2,  s = (1 - lam) t + lam r
    (12) L_bnd = || u(z_t, t, t) - v_phi^w(z_t, t) ||^2                       (boundary, frozen teacher phi)
    (13) v_phi^w = w v_phi(z_t, t; z_lr, c) + (1 - w) v_phi(z_t, t; z_lr)
    (14) z0_hat = eps - u(eps, 0, 1)  (the one-step sampler),   z0_hat_t = (1 - t) z0_hat + t eps  (re-noised)
    (15) grad_theta L_VSD = E[ w(t) (v_phi(z0_hat_t, t) - v_phi'(z0_hat_t, t)) dz0_hat_t/dtheta ]
    (16) L_diff = || v_phi'(z0_hat_t, t) - (eps - sg(z0_hat)) ||^2              (fake score phi', a LoRA)
    (17) L_adv^G = -E[D(x_sr)]      (18) L_adv^D = E[max(0, 1 - D(x_hr))] + E[max(0, 1 + D(x_sr))]
    (19) L_Rec = MSE(x_sr, x_hr) + LPIPS(x_sr, x_hr),   x_sr = VAE-decode(z0_hat)
    (20) L_stu = 1.0 L_ISC + 1.0 L_Rec + 1.0 L_VSD + 0.5 L_adv^G
Algorithm 1: draw r <= t, lam, q ~ U(0, 1), eps; z_t by (1); then w.p. 0.6 Eq. 12, else Eqs. 10-11.

    python smfsr.py --stage teacher --data LSDIR_FFHQ10k.txt --captions captions.tsv
    python smfsr.py --stage isc --data LSDIR_FFHQ10k.txt   # then gan; each from out/smfsr-<prev>
    torchrun --nproc_per_node=4 smfsr.py --stage teacher ...    # Sec. 4: 4 GPUs, any stage
    python smfsr.py --sample --ckpt out/smfsr-gan --input lr/ --output sr/ [--steps 4] [--seed 1] [--start lr]
    python smfsr.py --model mini --stage teacher && ... --stage isc && ... --stage gan   # on CPU

What differs from the paper, and why:
- LR injection, lighter than DiT4SR's third stream (~180M trainable on SD3.5-M, not 366M): the LR
  tokens (the base's patch embedding, same positions, the image adaLN) and LR copies of each block's
  image k/v join the image queries' softmax behind a per-head gate from zero: o = o_base + gate
  (o_joint - o_base). No LR MLP; text sees no LR.
- DiT4SR's cross-stream convolution (3x3 depthwise, 1x1 from zero) adds the LR patch embeddings to
  the image tokens, the local path SD3's absolute positions would have to learn. Both start at zero,
  so the wrapped model is the base.
- --train_base none (default): one frozen bf16 base for teacher, student and fake score; lora (the
  paper's "LR parameters and LoRA") or full (the mini) train it too, and teacher and student then
  own a copy each.
- e_{r,t} = e_t + MLP([e_r, e_t]), its last layer zeroed so the student starts as the teacher (the
  paper specifies only the MLP, Linear-SiLU-Linear).
- p = 0.6, per micro-batch, is the boundary branch's chance (Sec. 4; Algorithm 1 splits on q < p).
- Unknown in the paper (`# ours` in Config): the (r, t) law (logit-normal(0, 1), sorted), stage-2
  learning rates, the VSD t law and w(t), the fake-score LoRA, the DINOv3 size, layers and heads,
  the micro-batch, the tile.
- L_Rec's MSE (Eq. 19) on [0, 1] images, as PSNR: the paper does not say (on [-1, 1] it weighs 4x).
- VSD: w(t) = t / mean|z0_hat - x0_phi|, DMD's normaliser for velocities with the (1 - t) of
  dz0_hat_t/dz0_hat folded in; one fake-score forward serves Eq. 15 (detached) and Eq. 16.
- Captions optional (a TSV; paper: LLaVA); sampling uses the empty prompt (Table 8: about as good).
- --start lr (ours): start at z_t0 = (1 - t0) z_lr + t0 eps, t0 = --start_t (the paper: t0 = 1).
- --steps K on a teacher checkpoint takes K Euler steps (a teacher ignores r: u = v).
- --zero_init (ours, the mini): u = (z_t - z_lr) + the DiT's output, that layer from zero: at t = 1
  the jump of Eq. 14 lands on z_lr (bicubic) whatever eps, as StrSR's; the network learns the detail
  instead of cancelling eps exactly.
"""
import contextlib, copy, dataclasses, os, types

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import bc
from degrade import PRESETS as DEGRADE, ImageDataset, check_preset, degrade, make_loader

UNSUPPORTED = {"fsdp": "SD3.5-M fits one GPU for all roles; its blocks run piece by piece, unseen by FSDP's hooks"}

# ------------------------------------------------------------ config
@dataclasses.dataclass
class Config(common.SampleFlags):  # + the shared sampling flags
    model: str = "sd35-medium"    # Sec. 4: SD3.5-Medium
    model_path: str = ""          # local folder of the base (else the preset's hub id)
    stage: str = "teacher"        # Sec. 4: teacher (0) -> isc (1, Alg. 1) -> gan (2, Eq. 20)
    init_ckpt: str = ""           # the previous stage's checkpoint (default out/smfsr-<it>)
    teacher_ckpt: str = ""        # the frozen stage-0 teacher; default: isc's init, gan: isc's
    data: str = "sample"          # Sec. 4: LSDIR + the first 10k FFHQ (a folder or a file list)
    data_root: str = "data"       # folder of the named datasets
    degrade: str = "realesrgan"   # degrade.PRESETS name of the LR (paper: Real-ESRGAN)
    captions: str = ""            # optional "<file stem>\t<caption>" lines (Sec. 4: LLaVA)
    cache_dir: str = "out/cache"  # ours: encoded captions
    out_dir: str = ""             # default out/smfsr-<stage>
    lr: float = 5e-5              # Sec. 4: AdamW, fixed lr (stages 0 and 1; ours for stage 2)
    lr_fake: float = 5e-5         # ours: the fake-score LoRA (Eq. 16)
    lr_d: float = 5e-5            # ours: the discriminator heads (Eq. 18)
    grad_clip: float = 1.0        # ours
    lr_decay: float = 0.0         # ours: half-cosine decay to 0 over this last fraction; 0: none
    zero_init: bool = False       # ours: u = (z_t - z_lr) + the DiT, output layer zeroed
    p_boundary: float = 0.6       # Sec. 4: probability of the boundary branch
    teacher_cfg: float = 1.0      # Eq. 13: w of every teacher call; 1: no CFG (Table 6)
    p_drop: float = 0.2           # Sec. 4.4: caption dropout
    teacher_t: str = "uniform"    # Eq. 3: t ~ U(0, 1); logit-normal: SD3's (t_mean, t_std)
    t_mean: float = 0.0           # ours: logit-normal(t_mean, t_std) of stage 1's (r, t)
    t_std: float = 1.0            # ours
    w_isc: float = 1.0            # Sec. 4: lambda_1 (Eq. 20)
    w_rec: float = 1.0            # Sec. 4: lambda_2
    w_lpips: float = 1.0          # Eq. 19: L_Rec = MSE + LPIPS
    lpips_weights: str = ""       # a local torchvision VGG16 file for LPIPS (default: torch hub's)
    w_vsd: float = 1.0            # Sec. 4: lambda_3
    w_gan: float = 0.5            # Sec. 4: lambda_4
    vsd_t_min: float = 0.02       # ours: t ~ U(vsd_t_min, vsd_t_max) in Eqs. 15-16 (DMD's range)
    vsd_t_max: float = 0.98       # ours
    fake_rank: int = 64           # ours: LoRA rank (= alpha) of the fake score v_phi'
    train_base: str = "none"      # paper: none, only the LR layers; lora: + a LoRA; full (ours)
    lora_rank: int = 128          # ours: rank (= alpha) of --train_base lora
    disc_model: str = "facebook/dinov3-vitb16-pretrain-lvd1689m"  # ours: DINOv3 ViT-B/16 (hub id or local folder)
    disc_width: int = 256         # ours: channels of each discriminator head
    max_steps: int = 0            # 0: Sec. 4 for the stage (80k, 40k, 10k)
    batch_size: int = 0           # 0: Sec. 4 for the stage (32, 16, 8); global batch
    micro_batch: int = 2          # ours: per rank per forward
    crop: int = 512               # Sec. 4: 512 HR crops
    seed: int = 0                 # ours
    log_every: int = 10           # ours
    save_every: int = 1000        # ours
    grid_every: int = 500         # ours
    num_workers: int = 2          # ours: data loader processes
    grad_ckpt: bool = True        # ours: gradient checkpointing of the DiT blocks (GPU only)
    sample: bool = False          # sample instead of training: --ckpt, --input, --output
    ckpt: str = ""                # checkpoint folder or out_dir; default out/smfsr-gan
    input: str = ""               # LR image or folder
    output: str = "out/smfsr/sr"  # folder of the SR images
    steps: int = 1                # Eq. 14: one jump; 2 or 4 along the average velocity (Table 7)
    start: str = "noise"          # noise (Eq. 14) | lr (ours, see the docstring)
    start_t: float = 0.8          # ours: t0 of --start lr
    tile: int = 0                 # latent tile; 0: ours, 64 (512 px, the training crop)
    overlap: int = 0              # latent overlap; 0: ours, 16 (128 px)
    eval_heldout: bool = False    # ours: at the end, the held-out photo scored against bicubic
    ema_decay: float = 0.0        # paper: 0 (no EMA); ours: e.g. 0.999, the trained weights' EMA
    ema: bool = True              # ours: --sample uses the checkpoint's EMA weights when saved
    val_every: int = 0            # ours: validate every N steps on --val (0: never)
    val: str = ""                 # ours: HR image or folder to validate on; "": the held-out photo

# Sec. 4: iterations, batch
STAGES = {"teacher": (80_000, 32), "isc": (40_000, 16), "gan": (10_000, 8)}
# --model tiny / mini (ours): these values for every flag not given; a dict holds them per --stage
TINY = dict(crop=64, max_steps=4, batch_size=2, micro_batch=1, fake_rank=4, disc_width=16, tile=8, overlap=2)
# mini: the whole base trains (a frozen 2M base cannot undo the noise start), from z0_hat = z_lr
# (--zero_init); stage 2 is the MSE alone with a decaying lr (VSD, the GAN and LPIPS need real
# networks; L_ISC would keep a 2M teacher's noise)
MINI = dict(crop=128, max_steps={"teacher": 1000, "isc": 200, "gan": 1200}, batch_size=4, micro_batch=4,
            lr={"teacher": 3e-3, "isc": 3e-4, "gan": 3e-4}, lr_fake=3e-4, lr_d=1e-4, fake_rank=16, disc_width=32,
            tile=32, overlap=8, grid_every=300, save_every=300, eval_heldout=True, degrade="bicubic",
            train_base="full", zero_init=True, w_isc={"gan": 0.0}, w_vsd={"gan": 0.0}, w_gan={"gan": 0.0},
            w_lpips={"gan": 0.0}, lr_decay={"gan": 0.5})

def resolve(cfg):
    """cfg checked, with the concrete preset and the stage's steps, batch and folder (Sec. 4)."""
    preset = common.resolve_preset(cfg.model, Config.model)
    if common.PRESETS[preset].family != "sd3":
        raise SystemExit(f"--model {cfg.model}: SMFSR is built on SD3.5 (MM-DiT joint attention, pooled text)")
    common.check_choices(cfg, stage=tuple(STAGES), start=("noise", "lr"), train_base=("none", "lora", "full"),
                         teacher_t=("uniform", "logit-normal"))
    check_preset(cfg.degrade)
    common.check_zero_init(cfg)
    if cfg.crop % 16 or cfg.steps < 1 or not 0 < cfg.start_t <= 1:
        raise SystemExit(f"--crop {cfg.crop} --steps {cfg.steps} --start_t {cfg.start_t}: expected a multiple of 16, "
                         f"at least one step, 0 < start_t <= 1")
    cfg = dataclasses.replace(cfg, model=preset, max_steps=cfg.max_steps or STAGES[cfg.stage][0],
                              batch_size=cfg.batch_size or STAGES[cfg.stage][1], tile=cfg.tile or 64,
                              overlap=cfg.overlap or 16, out_dir=cfg.out_dir or f"out/smfsr-{cfg.stage}")
    if cfg.tile % 2 or cfg.overlap % 2 or not 2 <= cfg.overlap <= cfg.tile // 2:
        raise SystemExit(f"--tile {cfg.tile} --overlap {cfg.overlap}: expected even, 2 <= overlap <= tile / 2")
    return cfg

def pretrained(cfg):
    """Every pretrained network a run of cfg loads: checked before anything is built, fetched by
    `python common.py prefetch --method smfsr`. The text encoders encode each prompt once."""
    needs = [common.base_weights(cfg, text=True)]
    if cfg.stage == "gan" and cfg.w_gan:
        needs.append(common.Weights("DINOv3 (the discriminator, Eqs. 17-18)", cfg.disc_model, "disc_model",
                                    ("config.json", "model.safetensors"), ("*.json", "*.safetensors")))
    return needs + ([common.lpips_weights(cfg)] if cfg.stage == "gan" and cfg.w_lpips else [])

# ------------------------------------------------------------ model: LR injection, (r, t) embedding
FAKE_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                     "attn.add_v_proj", "attn.to_add_out")  # ours: every linear of the joint attention
# --train_base lora: every linear of the joint blocks' attention and MLPs (ours)
BASE_LORA_TARGETS = FAKE_LORA_TARGETS + ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")

class LRBranch(nn.Module):
    """One block's LR parts: gated copies of the image k/v (as DiT4SR's), the cross-stream conv."""

    def __init__(self, attn):
        super().__init__()
        base = lambda m: getattr(m, "base_layer", m)  # the linear under a LoRA
        self.to_k, self.to_v = copy.deepcopy(base(attn.to_k)).float(), copy.deepcopy(base(attn.to_v)).float()
        self.gate, dim = nn.Parameter(torch.zeros(attn.heads)), attn.to_k.in_features
        self.conv = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, groups=dim), nn.Conv2d(dim, dim, 1))
        nn.init.zeros_(self.conv[1].weight)
        nn.init.zeros_(self.conv[1].bias)

    def cross_stream(self, m_lr):
        """(B, D, h, w) LR patch embeddings -> (B, h w, D), a local path for the image tokens."""
        return self.conv(m_lr.to(self.conv[1].weight.dtype)).flatten(2).transpose(1, 2).to(m_lr.dtype)

def joint_attention(attn, lr, x, c, x_lr):
    """SD3's joint attention with the image queries also on the LR tokens, behind a gate:
    o = o_base + gate (o_joint - o_base)."""
    B, N, _ = x.shape
    # (B, heads, L, d)
    heads = lambda y: y.view(B, -1, attn.heads, y.shape[-1] // attn.heads).transpose(1, 2)
    q, k, v = heads(attn.to_q(x)), heads(attn.to_k(x)), heads(attn.to_v(x))
    cq, ck, cv = heads(attn.add_q_proj(c)), heads(attn.add_k_proj(c)), heads(attn.add_v_proj(c))
    k_lr, v_lr = heads(lr.to_k(x_lr)), heads(lr.to_v(x_lr))
    if attn.norm_q is not None:  # SD3.5: RMS qk-norm, the LR keys share the image keys' norm
        q, k, k_lr = attn.norm_q(q), attn.norm_k(k), attn.norm_k(k_lr)
    if attn.norm_added_q is not None:
        cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
    K, V = torch.cat([k, ck], 2), torch.cat([v, cv], 2)
    o = F.scaled_dot_product_attention(torch.cat([q, cq], 2), K, V)  # the base's [image, text]
    # + LR tokens
    o_joint = F.scaled_dot_product_attention(q, torch.cat([K, k_lr], 2), torch.cat([V, v_lr], 2))
    o_x = o[:, :, :N] + lr.gate.view(1, -1, 1, 1).to(o.dtype) * (o_joint - o[:, :, :N])
    flat = lambda y: y.transpose(1, 2).reshape(B, -1, y.shape[1] * y.shape[-1])
    out_c = None if attn.context_pre_only else attn.to_add_out(flat(o[:, :, N:]))
    return attn.to_out[0](flat(o_x)), out_c

def block_forward(block, lr, x, c, x_lr, temb, m_lr):
    """diffusers' JointTransformerBlock.forward, with the LR tokens in its attention and the
    cross-stream convolution added to the image tokens."""
    mod = block.norm1(x, emb=temb)  # adaLN-zero; SD3.5's dual-attention blocks return two more
    nx, g_msa, sh_mlp, sc_mlp, g_mlp = mod[:5]
    nx_lr = block.norm1(x_lr, emb=temb)[0]  # the LR tokens take the image tokens' modulation
    if block.context_pre_only:
        nc = block.norm1_context(c, temb)
    else:
        nc, cg_msa, csh_mlp, csc_mlp, cg_mlp = block.norm1_context(c, emb=temb)
    a, ca = joint_attention(block.attn, lr, nx, nc, nx_lr)
    x = x + g_msa.unsqueeze(1) * a
    if block.use_dual_attention:
        x = x + mod[6].unsqueeze(1) * block.attn2(hidden_states=mod[5])
    n = block.norm2(x) * (1 + sc_mlp[:, None]) + sh_mlp[:, None]
    x = x + g_mlp.unsqueeze(1) * block.ff(n) + lr.cross_stream(m_lr)
    if block.context_pre_only:
        return None, x
    c = c + cg_msa.unsqueeze(1) * ca
    n = block.norm2_context(c) * (1 + csc_mlp[:, None]) + csh_mlp[:, None]
    return c + cg_mlp.unsqueeze(1) * block.ff_context(n), x

class RTEmbed(nn.Module):
    """e_{r,t} = e_t + MLP([e_r, e_t]) (Fig. 2), its last layer zeroed (ours): u = v at init."""

    def __init__(self, dim):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, e_r, e_t):
        return e_t + self.mlp(torch.cat([e_r, e_t], -1))

class SRNet(nn.Module):
    """LRBranches (+ RTEmbed: student) on a borrowed SD3: roles share it, checkpoints skip it."""

    def __init__(self, dit, two_times, skip=False):
        super().__init__()
        self.lr = nn.ModuleList(LRBranch(b.attn) for b in dit.transformer_blocks)
        self.rt, self.skip = RTEmbed(dit.inner_dim) if two_times else None, skip
        self.requires_grad_(True)

    def forward(self, dit, z_t, r, t, z_lr, cond):
        """u(z_t, r, t; z_lr, c): (B, C, H, W) latents, r, t (B,) in [0, 1]; a teacher ignores r."""
        (B, _, H, W), dt, p = z_t.shape, dit.dtype, dit.config.patch_size
        # (B, N, D): patches + the same positions
        x, x_lr = (dit.pos_embed(z.to(dt)).contiguous() for z in (z_t, z_lr))
        # (B, D, H/p, W/p): the patch embedding alone, for the convolutions
        m_lr = dit.pos_embed.proj(z_lr.to(dt))
        # text tokens, pooled text
        c, pooled = dit.context_embedder(cond["embeds"].to(dt)), cond["pooled"].to(dt)
        # e_t: timestep (fp32, as SD3's pipeline) + pooled text
        temb = dit.time_text_embed(t.float() * 1000, pooled)
        if self.rt is not None:
            temb = self.rt(dit.time_text_embed(r.float() * 1000, pooled), temb)  # e_{r,t}
        run = (dit._gradient_checkpointing_func if dit.gradient_checkpointing and torch.is_grad_enabled() else
               lambda f, *args: f(*args))  # --grad_ckpt: each block recomputed in the backward pass
        for block, lr in zip(dit.transformer_blocks, self.lr):
            c, x = run(block_forward, block, lr, x, c, x_lr, temb, m_lr)
        # (B, h, w, p, p, C)
        x = dit.proj_out(dit.norm_out(x, temb)).view(B, H // p, W // p, p, p, -1)
        x = x.permute(0, 5, 1, 3, 2, 4).reshape(B, -1, H, W).float()  # unpatchify as diffusers does
        # --zero_init: a residual on the straight path to z_lr
        return x + (z_t - z_lr).float() if self.skip else x

def teacher_velocity(teacher, dit, z_lr, cond, null, w):
    """v_phi^w(z, t) of the frozen teacher (Eq. 13); w != 1: with and without c in one call."""
    if w == 1:
        return lambda z, t: teacher(dit, z, t, t, z_lr, cond)
    two, both = lambda a: torch.cat([a, a]), {k: torch.cat([cond[k], null[k].expand_as(cond[k])]) for k in cond}
    def v(z, t):
        v_c, v_u = teacher(dit, two(z), two(t), two(t), two(z_lr), both).chunk(2)
        return w * v_c + (1 - w) * v_u  # Eq. (13)
    return v

@contextlib.contextmanager
def fake_score(dit):
    """Inside: v_phi' = teacher + LoRA, trainable (peft ties requires_grad to the switch)."""
    dit.enable_adapters()
    try:
        yield
    finally:  # an exception inside must not leave the teacher with the fake score's LoRA on
        dit.disable_adapters()

def load_base(cfg, dtype, train_base, rank, ckpt=None, name=None, train=False, fuse=True, ema=False):
    """The SD3 a model runs on: `none`, the frozen base all roles share; else the base carrying the
    model's weights (a rank-r LoRA, or all), from `<name>_base` in ckpt if given (ema: the EMA)."""
    dit = common.load_dit(cfg.model, cfg.model_path or None, dtype).requires_grad_(False).eval()
    if train_base == "none":
        return dit
    # B = 0: the base at init; full: fp32
    common.add_lora(dit, train_base, rank, rank, BASE_LORA_TARGETS)
    if ckpt:
        file = f"{name}_base{'_lora' if train_base == 'lora' else ''}.safetensors"
        if not os.path.exists(os.path.join(ckpt, file)):
            raise SystemExit(f"{ckpt}: no {file} (expected a checkpoint trained with --train_base {train_base})")
        common.load_checkpoint(ckpt, {f"{name}_base": dit}, ema=ema)
    # frozen: a teacher's LoRA merged (the fake score's goes on top), full's fp32 cast back
    if not train:
        if train_base == "lora" and fuse:  # a sampler: its --fuse_lora
            dit.fuse_lora()
            dit.unload_lora()
        # cast only if needed: diffusers warns at any .to(dtype)
        if dit.requires_grad_(False).dtype != dtype:
            dit.to(dtype)
    return dit

def load_net(ckpt, name, net, ema=False):
    """The trained part of a stage (`teacher` or `student`) from its checkpoint folder (ema: its EMA
    where saved); returns the folder's state."""
    if not os.path.exists(os.path.join(ckpt, f"{name}.safetensors")):
        raise SystemExit(f"{ckpt}: no {name}.safetensors (expected a checkpoint of the {name})")
    return common.load_checkpoint(ckpt, {name: net}, ema=ema)

RANDOM_DINO = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                   num_register_tokens=4)  # tiny/mini: a small random DINOv3

class Discriminator(nn.Module):
    """D (Eqs. 17-18; ours, as ADD): frozen DINOv3, SN-Conv-LReLU-SN-Conv heads on 4 layers."""

    def __init__(self, random_net, hub, width):
        super().__init__()
        from transformers import DINOv3ViTConfig, DINOv3ViTModel
        vit = DINOv3ViTModel(DINOv3ViTConfig(**RANDOM_DINO)) if random_net else DINOv3ViTModel.from_pretrained(
            common.local_copy(hub))
        # for good: DINOv3 jitters its positions in training mode
        self.vit = vit.requires_grad_(False).eval()
        n, d, sn = vit.config.num_hidden_layers, vit.config.hidden_size, nn.utils.parametrizations.spectral_norm
        self.levels = [n * (i + 1) // 4 for i in range(4)]
        self.heads = nn.ModuleList(nn.Sequential(sn(nn.Conv2d(d, width, 3, padding=1)), nn.LeakyReLU(0.2),
                                                 sn(nn.Conv2d(width, 1, 1))) for _ in self.levels)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def features(self, x):
        """Images in [0, 1], sides multiples of 16 -> per level (B, D, H/16, W/16)."""
        hs = self.vit(pixel_values=(x - self.mean) / self.std, output_hidden_states=True).hidden_states
        # CLS + registers first
        skip, ps = 1 + self.vit.config.num_register_tokens, self.vit.config.patch_size
        h, w = x.shape[-2] // ps, x.shape[-1] // ps
        return [hs[i][:, skip:].transpose(1, 2).reshape(x.shape[0], -1, h, w) for i in self.levels]

    def forward(self, feats):
        # (B, levels h w)
        return torch.cat([head(f.float()).flatten(1) for head, f in zip(self.heads, feats)], 1)

# ------------------------------------------------------------ losses
def logit_normal(n, cfg, device):
    return torch.sigmoid(cfg.t_mean + cfg.t_std * torch.randn(n, device=device))

def fm_loss(v, z_hr, eps, t):
    """Stage 0: LR-conditioned flow matching of the teacher, v(z, t) = u(z, t, t)."""
    z_t = (1 - bc(t)) * z_hr + bc(t) * eps  # Eq. (1)
    return F.mse_loss(v(z_t, t, t), eps - z_hr)  # Eq. (3)

def isc_loss(u, z_t, r, t, lam):
    """Interval Splitting Consistency (Algorithm 1 lines 9-13); the target takes no gradient."""
    s = (1 - lam) * t + lam * r  # line 4
    with torch.no_grad():
        u2 = u(z_t, s, t)  # line 9
        z_s = z_t - bc(t - s) * u2  # line 10, Eq. (10)
        u1 = u(z_s, r, s)  # line 11
        u_target = (1 - bc(lam)) * u1 + bc(lam) * u2  # line 12
    return F.mse_loss(u(z_t, r, t), u_target)  # line 13, Eq. (11)

def boundary_loss(u, v_teacher, z_t, t):
    """Boundary consistency (Algorithm 1 line 15): at r = t, u is the teacher's v."""
    with torch.no_grad():
        v = v_teacher(z_t, t)
    return F.mse_loss(u(z_t, t, t), v)  # Eq. (12)

def rec_loss(lpips, x_sr, x_hr, w_lpips=1.0):
    """Eq. 19 on images in [0, 1]; returns (L_Rec, MSE, LPIPS). w_lpips 0: no VGG pass at all."""
    mse = F.mse_loss(x_sr, x_hr)
    lp = lpips(x_sr, x_hr) if w_lpips else mse.new_zeros(())
    return mse + w_lpips * lp, mse, lp  # Eq. (19)

def vsd_loss(z0_hat, z0_hat_t, t, v_real, v_fake):
    """Eq. 15 as a loss: gradient w(t) (v_phi - v_phi') / numel on z0_hat, toward the teacher's x0,
    off the fake's; w(t) = t / mean|z0_hat - x0_phi| (DMD's normaliser, ours), the v's detached."""
    x0_real = z0_hat_t - bc(t) * v_real  # the teacher's clean estimate
    w = bc(t) / (z0_hat - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-5)
    grad = w * (v_real - v_fake)  # Eq. (15)
    return 0.5 * F.mse_loss(z0_hat, (z0_hat - grad).detach())

def fake_score_loss(v_fake, eps, z0_hat):
    """Eq. 16: the fake score learns the flow of the generated latents (sg(z0_hat))."""
    return F.mse_loss(v_fake, eps - z0_hat.detach())  # Eq. (16)

def adv_g_loss(d_fake):
    return -d_fake.mean()  # Eq. (17)

def adv_d_loss(d_real, d_fake):
    return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()  # Eq. (18), hinge

def teacher_losses(u, z_hr, eps, cfg):
    """Stage 0 (Eq. 3) on a micro-batch: flow matching, t ~ U(0, 1) or --teacher_t logit-normal."""
    B = z_hr.shape[0]
    t = torch.rand(B, device=z_hr.device) if cfg.teacher_t == "uniform" else logit_normal(B, cfg, z_hr.device)
    l_fm = fm_loss(u, z_hr, eps, t)  # Eq. (3)
    return l_fm, {"loss": l_fm, "fm": l_fm}

def isc_losses(u, v_teacher, z_hr, eps, cfg, weight=1.0):
    """Stage 1 (Algorithm 1 lines 3-15): w.p. p_boundary Eq. 12, else Eq. 11; weight 0: neither."""
    B, device = z_hr.shape[0], z_hr.device
    # line 3: r <= t (ours: logit-normal)
    r, t = logit_normal(2 * B, cfg, device).view(2, B).sort(0).values
    lam, q = torch.rand(B, device=device), torch.rand(())  # lines 4-5 (s inside isc_loss)
    z_t = (1 - bc(t)) * z_hr + bc(t) * eps  # line 7, Eq. (1)
    l_isc = torch.zeros((), device=device)
    if weight:
        l_isc = boundary_loss(u, v_teacher, z_t, t) if q < cfg.p_boundary else isc_loss(u, z_t, r, t, lam)
    return weight * l_isc, {"loss": weight * l_isc, "isc": l_isc}

def gan_losses(u, v_teacher, teacher, phi_dit, disc, vae, lpips, z_lr, x_hr, cond, cfg):
    """Stage 2's terms after L_ISC (Eq. 20) and D's (Eq. 18), weight 0 skipped; the fake score's own
    loss (Eq. 16) is terms["fake"], for gan_step to back-propagate with the fake LoRA on."""
    B, device = z_lr.shape[0], z_lr.device
    z0_hat = sample(u, torch.randn_like(z_lr), 1)  # Eq. (14): one jump from noise
    x_sr = common.decode(vae, "sd3", z0_hat).float()
    l_rec, l_mse, l_lpips = rec_loss(lpips, x_sr, x_hr, cfg.w_lpips)
    l_vsd = l_fake = l_adv = l_d = torch.zeros((), device=device)
    if cfg.w_vsd:
        eps_v = torch.randn_like(z_lr)
        t_v = cfg.vsd_t_min + (cfg.vsd_t_max - cfg.vsd_t_min) * torch.rand(B, device=device)
        z0_hat_t = (1 - bc(t_v)) * z0_hat.detach() + bc(t_v) * eps_v
        with torch.no_grad():
            v_real = v_teacher(z0_hat_t, t_v)
        # one fake-score pass: detached for Eq. 15, through its LoRA for Eq. 16
        with fake_score(phi_dit):
            v_fake = teacher(phi_dit, z0_hat_t, t_v, t_v, z_lr, cond)
        l_fake = fake_score_loss(v_fake, eps_v, z0_hat)
        l_vsd = vsd_loss(z0_hat, z0_hat_t, t_v, v_real, v_fake.detach())  # Eq. (15)
    if cfg.w_gan:
        # the frozen backbone: no graph for x_hr
        f_fake, f_real = disc.features(x_sr), disc.features(x_hr)
        with common.frozen(disc.heads):  # L_adv^G reaches the generator only
            l_adv = adv_g_loss(disc(f_fake))
        l_d = adv_d_loss(disc(f_real), disc([f.detach() for f in f_fake]))
    l_g = cfg.w_rec * l_rec + cfg.w_vsd * l_vsd + cfg.w_gan * l_adv  # Eq. (20), after L_ISC
    return l_g + l_d, dict(loss=l_g, mse=l_mse, lpips=l_lpips, vsd=l_vsd, adv=l_adv, fake=l_fake, d=l_d), x_sr

# ------------------------------------------------------------ sampler
def sample(u, eps, steps, z_lr=None, start_t=1.0):
    """Eq. 14 in `steps` jumps, t_k = t0 (1 - k/steps): z <- z - (t_k - t_k+1) u(z, t_k+1, t_k).
    From noise (z = eps, t0 = 1) or, given z_lr, from Eq. 1 with z_lr for z_hr (ours)."""
    t0, z = (1.0, eps) if z_lr is None else (start_t, (1 - start_t) * z_lr + start_t * eps)
    ts, ones = torch.linspace(t0, 0, steps + 1, device=eps.device), torch.ones(eps.shape[0], device=eps.device)
    for t, r in zip(ts[:-1], ts[1:]):
        z = z - (t - r) * u(z, r * ones, t * ones)
    return z

def seeded_noise(z_lr, seed):  # eps drawn on the CPU: the same image on any device
    return torch.randn(z_lr.shape, generator=torch.Generator().manual_seed(seed)).to(z_lr.device)

def build_sampler(flags, device=None):
    """fn(x_lr (1, 3, h, w) in [0, 1]) -> (1, 3, 4h, 4w) of the checkpoint flags.ckpt: bicubic x4,
    encode, `steps` jumps of Eq. 14 from noise seeded by flags.seed (tiled, overlapping), decode."""
    flags = dataclasses.replace(flags, ckpt=flags.ckpt or flags.out_dir or "out/smfsr-gan")
    path, cfg, device, dtype = common.sampler_setup(flags, resolve, pretrained, device,
                                                    own=("start", "start_t"))
    name = "teacher" if cfg.stage == "teacher" else "student"
    # the init is overwritten; keep the caller's RNG as it was
    with torch.random.fork_rng(devices=[]):
        dit = load_base(cfg, dtype, cfg.train_base, cfg.lora_rank, path, name, fuse=False, ema=cfg.ema)
        net = SRNet(dit, two_times=name == "student", skip=cfg.zero_init)
    state = load_net(path, name, net, ema=cfg.ema)
    dit, net = common.sampling_weights(cfg, dtype, dit).to(device), net.to(device).eval()
    vae = common.load_vae(cfg.model, cfg.model_path or None, dtype, device, tiling=True)
    cond = {k: v.to(device) for k, v in state["cond"].items()}  # the empty prompt, no encoder

    def latent(z_lr):
        u = lambda z, r, t: common.tiled_pair(lambda zz, ll: net(dit, zz, r, t, ll, cond), z, z_lr, cfg.tile,
                                              cfg.overlap)
        return sample(u, seeded_noise(z_lr, cfg.seed), cfg.steps, z_lr if cfg.start == "lr" else None, cfg.start_t)
    return common.finish_sampler(lambda x_lr: common.super_resolve(vae, "sd3", x_lr, latent), cfg)

# ------------------------------------------------------------ training
class IndexedImages(ImageDataset):
    """The training crops with their index: a micro-batch's indices name its captions."""

    def __getitem__(self, key):
        return super().__getitem__(key), key[0]

class Captions:
    """Captions with dropout (Sec. 4.4), cached by rank 0, looked up by dataset index."""

    def __init__(self, cfg, dit, device, rank):
        stand_in, self.cfg, self.text = common.random_prompt(cfg), cfg, []
        if cfg.captions:
            with open(cfg.captions) as f:
                table = dict(line.rstrip("\n").split("\t", 1) for line in f if "\t" in line)
            names = (common.SAMPLE_PHOTOS if cfg.data == "sample" else
                     [os.path.splitext(os.path.basename(p))[0] for p in common.list_images(cfg.data, cfg.data_root)])
            self.text = [table.get(n, "").strip() for n in names]
        encode = lambda c: common.prompt_cond(cfg.model, c, cfg.cache_dir, device, cfg.model_path or None)
        # cached before the barrier
        for c in sorted(set(self.text) - {""}) if rank == 0 and not stand_in else ():
            encode(c)
        # the empty prompt (tiny, mini: a random stand-in)
        self.prompt = common.fixed_prompt(cfg, dit, device, cfg.cache_dir)
        self.empty = {k: torch.zeros_like(v) for k, v in self.prompt.items()} if stand_in else self.prompt
        self.encode = (lambda c: self.prompt) if stand_in else encode

    def batch(self, idx):
        """The conditions (B, ...) of the images with dataset indices idx (B,)."""
        B = len(idx)
        if not self.text:
            return common.expand_cond(self.empty, B)
        keep = (torch.rand(B) >= self.cfg.p_drop).tolist()  # caption dropout
        conds = [self.encode(self.text[i]) if k and self.text[i] else self.empty for i, k in zip(idx.tolist(), keep)]
        return {k: torch.cat([c[k] for c in conds]) for k in self.empty}

def trained_base(c):  # (train_base, lora_rank) of a checkpoint's config (common.load_config)
    return c["train_base"], c.get("lora_rank", 128)

def stage_inputs(cfg):
    """cfg with its inputs checked: the previous stage's checkpoint and the teacher (gan: isc's)."""
    if cfg.stage == "teacher":
        return dataclasses.replace(cfg, init_ckpt="", teacher_ckpt="")
    prev = {"isc": "teacher", "gan": "isc"}[cfg.stage]
    src = cfg.init_ckpt or f"out/smfsr-{prev}"
    if not (init := common.latest_checkpoint(src)):
        raise SystemExit(f"--stage {cfg.stage}: no --stage {prev} checkpoint in {src!r}; run it or pass --init_ckpt")
    init_cfg = common.load_config(init)
    if (base := trained_base(init_cfg)) != (cfg.train_base, cfg.lora_rank):
        raise SystemExit(f"--train_base {cfg.train_base}: {init} trained with --train_base {base[0]} (rank {base[1]})")
    if init_cfg.get("zero_init", False) != cfg.zero_init:  # changes the network's form
        raise SystemExit(f"--zero_init {cfg.zero_init}: {init} trained with --zero_init {not cfg.zero_init}")
    src = cfg.teacher_ckpt or (init if cfg.stage == "isc" else init_cfg.get("teacher_ckpt", ""))
    if not (teacher := common.latest_checkpoint(src)):
        raise SystemExit(f"--teacher_ckpt {src!r}: no stage-0 teacher checkpoint there")
    return dataclasses.replace(cfg, init_ckpt=init, teacher_ckpt=teacher)

def build_models(cfg, device):
    """The stage's networks, the same init on every rank: name, net (the SRNet that trains) on dit,
    the frozen teacher v_phi on phi_dit (with its LoRA on: the fake score v_phi'), disc, lpips."""
    dtype, gan, random_nets = common.weight_dtype(device), cfg.stage == "gan", common.PRESETS[cfg.model].hub is None
    init, t_ckpt = cfg.init_ckpt, cfg.teacher_ckpt
    name, src = "teacher" if cfg.stage == "teacher" else "student", {"isc": "teacher", "gan": "student"}.get(cfg.stage)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        dit = load_base(cfg, dtype, cfg.train_base, cfg.lora_rank, init, src, train=True)
        net = SRNet(dit, two_times=name == "student", skip=cfg.zero_init)
        if cfg.zero_init and not init:  # v = z_t - z_lr: from eps at t = 1 the jump lands on z_lr
            common.zero_output(dit)
        t_cfg = common.load_config(t_ckpt) if init else {}  # the teacher run's base and form
        # the teacher's own base where either run trains one; the fake score's LoRA goes on it
        own = init and (cfg.train_base != "none" or t_cfg["train_base"] != "none")
        phi_dit = load_base(cfg, dtype, *trained_base(t_cfg), t_ckpt, "teacher") if own else dit
        skip = t_cfg.get("zero_init", False)
        teacher = SRNet(phi_dit, two_times=False, skip=skip).requires_grad_(False) if init else None
        if gan and cfg.w_vsd:  # v_phi' = v_phi at init
            common.add_lora(phi_dit, "lora", cfg.fake_rank, cfg.fake_rank, FAKE_LORA_TARGETS).disable_adapters()
        disc = Discriminator(random_nets, cfg.disc_model, cfg.disc_width) if gan and cfg.w_gan else None
    lpips = common.load_lpips(device, "random" if random_nets else cfg.lpips_weights) if gan and cfg.w_lpips else None
    if init:
        load_net(t_ckpt, "teacher", teacher)
        load_net(init, src, net)
    to = lambda m: m if m is None else m.to(device)
    return types.SimpleNamespace(name=name, net=to(net), dit=to(dit), teacher=to(teacher), phi_dit=to(phi_dit),
                                 disc=to(disc), lpips=lpips)

def optimizers(cfg, m):
    """(models, opts): the trained parts by checkpoint name and their AdamW at a fixed lr (Sec. 4);
    stage 2 adds the fake-score LoRA's and the D heads'."""
    adam = lambda params, lr: torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    models = {m.name: m.net, **({f"{m.name}_base": m.dit} if cfg.train_base != "none" else {})}
    opts = {"opt": adam(common.trainable(*models.values()), cfg.lr)}
    if cfg.stage == "gan" and cfg.w_vsd:
        opts["opt_fake"] = adam([p for n, p in m.phi_dit.named_parameters() if "lora_" in n], cfg.lr_fake)
    if cfg.stage == "gan" and cfg.w_gan:
        models["disc"] = m.disc.heads
        opts["opt_d"] = adam(m.disc.heads.parameters(), cfg.lr_d)
    return models, opts

def bind(net, dit, z_lr, cond):
    """u(z, r, t) of the net on this micro-batch's LR latents and captions."""
    return lambda z, r, t: net(dit, z, r, t, z_lr, cond)

def gan_step(m, vae, u, v_teacher, isc_terms, z_lr, x_hr, cond, scale, cfg):
    """Stage 2 after L_ISC, back-propagated in two passes: the fake score's Eq. 16 with its LoRA on,
    then the rest of Eq. 20. Returns (the terms with L_ISC's, x_sr)."""
    with common.autocast(z_lr.device):
        loss, terms, x_sr = gan_losses(u, v_teacher, m.teacher, m.phi_dit, m.disc, vae, m.lpips, z_lr,
                                       x_hr, cond, cfg)
    terms = {"loss": isc_terms["loss"] + terms.pop("loss"), "isc": isc_terms["isc"], **terms}
    if cfg.w_vsd:
        with fake_score(m.phi_dit):  # Eq. 16 reaches the fake LoRA only while it is on
            (terms["fake"] * scale).backward()
    (loss * scale).backward()
    return terms, x_sr

def preview(u, vae, z_lr, cfg):
    """Stages 0-1's grid image: the current model's sample from fixed noise."""
    with torch.no_grad(), common.autocast(z_lr.device):
        return common.decode(vae, "sd3", sample(u, seeded_noise(z_lr, cfg.seed), cfg.steps))

def train(cfg):
    cfg = stage_inputs(resolve(cfg))  # config.json records the inputs: gan reads isc's teacher
    rank, world, device, log = common.setup(cfg, pretrained(cfg))
    gan = cfg.stage == "gan"

    # 1. models: with --train_base none, one frozen SD3 (bf16 on GPU) serves every role
    m = build_models(cfg, device)
    vae = common.load_vae(cfg.model, cfg.model_path or None, common.weight_dtype(device), device)
    common.checkpointing(cfg, device, m.dit, m.phi_dit)  # SRNet.forward reads the flag

    # 2. optimizers; 3. resume (the fake score's LoRA sits outside `models`); 4. the loader and the
    # captions, data position = step
    models, opts = optimizers(cfg, m)
    trained = sum(p.numel() for p in opts["opt"].param_groups[0]["params"]) / 1e6
    log(f"{cfg.model}: stage {cfg.stage}, {trained:.3g}M trainable ({m.name}); "
        f"init {cfg.init_ckpt or cfg.model}, teacher {cfg.teacher_ckpt or '-'}")
    step, state = common.resume(cfg.out_dir, models, opts, log)
    if state and gan and cfg.w_vsd:
        common.load_lora_state(m.phi_dit, state["fake_lora"])
    loader, accum = make_loader(IndexedImages(cfg.data, cfg.crop, cfg.data_root), cfg, rank, world, step)
    captions = Captions(cfg, m.dit, device, rank)
    log(f"batch {cfg.batch_size} = {world} ranks x {accum} accum x {cfg.micro_batch}, crop {cfg.crop}")

    # 5. loop: per micro-batch, seeded by its place in the run (a resume draws the same numbers):
    # the batch, its latents, the stage's losses (DiT passes: teacher 1, isc 2-3, gan +3), backward
    saved = {"cond": {k: v[:1].detach().cpu() for k, v in captions.empty.items()}}
    scale = 1 / accum
    import eval  # the held-out scores: --val_every, and --eval_heldout at the end
    val = eval.validation("smfsr", build_sampler, cfg, device) if rank == 0 and cfg.val_every else None
    ema = common.start_ema(cfg, models)
    log.start_clock()
    while step < cfg.max_steps:
        sums = {}
        for j in range(accum):
            torch.manual_seed(common.micro_batch_seed(cfg.seed, step + 1, rank * accum + j))
            x, idx = next(loader)
            with torch.no_grad(), common.autocast(device):  # Alg. 1 line 6: E(x_lr), E(x_hr)
                x_lr, x_hr = degrade(x.to(device), 4, DEGRADE[cfg.degrade])
                z_hr, z_lr = common.encode_pair(vae, "sd3", x_hr, x_lr)
            cond = captions.batch(idx)
            u, eps = bind(m.net, m.dit, z_lr, cond), torch.randn_like(z_hr)  # Alg. 1 line 5
            with common.autocast(device):
                if cfg.stage == "teacher":
                    loss, terms = teacher_losses(u, z_hr, eps, cfg)
                else:
                    v_teacher = teacher_velocity(m.teacher, m.phi_dit, z_lr, cond, captions.empty, cfg.teacher_cfg)
                    loss, terms = isc_losses(u, v_teacher, z_hr, eps, cfg, cfg.w_isc if gan else 1.0)
            if loss.requires_grad:  # not at --w_isc 0; gan: freed before gan_step builds its graph
                (loss * scale).backward()
            if gan:
                terms, x_sr = gan_step(m, vae, u, v_teacher, terms, z_lr, x_hr, cond, scale, cfg)
            sums = {k: sums.get(k, 0) + v.detach() / accum for k, v in terms.items()}
        common.set_lr(opts.values(), step + 1, cfg.max_steps, cfg.lr_decay)
        norms = common.optimizer_step(opts.values(), cfg.grad_clip)
        if ema:
            ema.update()
        step += 1
        log.step(step, cfg.max_steps, sums, cfg.log_every, opts, norms)
        if log.master and common.due(step, cfg.grid_every, cfg.max_steps):
            x_sr = x_sr if gan else preview(u, vae, z_lr, cfg)
            log.image("grid", common.save_grid(cfg.out_dir, step, x_lr, x_sr, x_hr), step)
        if common.due(step, cfg.save_every, cfg.max_steps):
            if gan and cfg.w_vsd:
                saved["fake_lora"] = common.lora_state(m.phi_dit)
            common.save_checkpoint(cfg.out_dir, step, cfg, models, opts, saved, ema=ema)
        if cfg.val_every and step % cfg.val_every == 0:
            common.validate(cfg, step, models, saved, ema, val, log)
    if log.master:
        common.plot_curves(cfg.out_dir)
    if rank == 0 and cfg.eval_heldout:
        eval.heldout("smfsr", build_sampler, cfg.out_dir, cfg.degrade, cfg.data_root)

if __name__ == "__main__":
    cfg = common.parse_config(Config)
    if cfg.sample:
        common.sample_files(build_sampler(cfg), cfg.input, cfg.output)
    else:
        train(cfg)
    common.cleanup()
