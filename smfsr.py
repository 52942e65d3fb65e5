"""
SMFSR: Noise-Started One-Step Real-World Super-Resolution via LR-Conditioned SplitMeanFlow and GAN Refinement
(Zhu, Zhang, Zheng, Luo, Guo, Yang; arXiv:2605.09328; github.com/wzhu121/SMFSR releases inference only). This file
implements all three training stages from the paper.

An LR-conditioned SD3.5-Medium predicts the average velocity u(z_t, r, t) over [r, t]; one jump from pure noise
(r = 0, t = 1) gives the HR latent, so different seeds give different plausible outputs. Stage 0 (`--stage teacher`)
trains an LR-conditioned flow-matching teacher, stage 1 (`--stage isc`) distils it into the average-velocity student
with Interval Splitting Consistency (Algorithm 1), stage 2 (`--stage gan`) refines the one-step output with
reconstruction, VSD and a DINOv3 GAN. Notation (rectified flow, t = 1 is noise): z_hr, z_lr the latents of the HR
image and of the bicubic x4 LR image, c the caption, eps ~ N(0, I).
    (1)  z_t = (1 - t) z_hr + t eps            (2)  v = eps - z_hr
    (3)  L_FM = || v_theta(z_t, t) - (eps - z_hr) ||^2                        (stage 0, the teacher)
    (5)  u(z_t, r, t) = 1/(t - r) int_r^t v(z_tau, tau) dtau                  (average velocity)
    (8)  (t - r) u(z_t, r, t) = (s - r) u(z_s, r, s) + (t - s) u(z_t, s, t),   r <= s <= t
    (10) z_s = z_t - (t - s) u(z_t, s, t)
    (11) L_ISC = || u(z_t, r, t) - sg[(1 - lam) u(z_s, r, s) + lam u(z_t, s, t)] ||^2,  s = (1 - lam) t + lam r
    (12) L_bnd = || u(z_t, t, t) - v_phi^w(z_t, t) ||^2                       (boundary, frozen teacher phi)
    (13) v_phi^w = w v_phi(z_t, t; z_lr, c) + (1 - w) v_phi(z_t, t; z_lr)
    (14) z0_hat = eps - u(eps, 0, 1)                                          (the one-step sampler)
    (15) grad_theta L_VSD = E[ w(t) (v_phi(z0_hat_t, t) - v_phi'(z0_hat_t, t)) dz0_hat_t/dtheta ],
         z0_hat_t = (1 - t) z0_hat + t eps
    (16) L_diff = || v_phi'(z0_hat_t, t) - (eps - sg(z0_hat)) ||^2              (fake score phi', a LoRA)
    (17) L_adv^G = -E[D(x_sr)]      (18) L_adv^D = E[max(0, 1 - D(x_hr))] + E[max(0, 1 + D(x_sr))]
    (19) L_Rec = MSE(x_sr, x_hr) + LPIPS(x_sr, x_hr),   x_sr = VAE-decode(z0_hat)
    (20) L_stu = 1.0 L_ISC + 1.0 L_Rec + 1.0 L_VSD + 0.5 L_adv^G
Algorithm 1 (stage 1): sample r <= t, lam ~ U(0, 1), eps, q ~ U(0, 1); z_t by Eq. 1; with probability p = 0.6 the
boundary branch (Eq. 12), else the splitting branch (lines 9-13, Eqs. 10-11).

    python smfsr.py --stage teacher --data LSDIR_FFHQ10k.txt --captions captions.tsv   # -> out/smfsr-teacher
    python smfsr.py --stage isc --data LSDIR_FFHQ10k.txt    # starts from out/smfsr-teacher -> out/smfsr-isc
    python smfsr.py --stage gan --data LSDIR_FFHQ10k.txt    # starts from out/smfsr-isc -> out/smfsr-gan
    torchrun --nproc_per_node=4 smfsr.py --stage teacher ...    # Sec. 4: 4 GPUs, any stage
    python smfsr.py --sample --ckpt out/smfsr-gan --input lr/ --output sr/ [--steps 4] [--seed 1] [--start lr]
    python smfsr.py --model mini --stage teacher && ... --stage isc && ... --stage gan   # CPU: the mini base

What differs from the paper, and why:
- LR injection. DiT4SR adds a third (LR) stream to every MM-DiT block with its own projections and MLP, the LR
  tokens join the joint attention, and a cross-stream convolution adds the LR stream to the noise stream. Here the
  LR latent goes through the base's own patch embedding (same 2-D positions), each block modulates the LR tokens
  with its image adaLN and projects them with LR-specific key/value layers (copies of the block's image k/v at
  init), and the image queries attend over [image, text, LR] in one joint softmax. A zero-initialised per-head gate
  mixes that with the base attention: o = o_base + gate (o_joint - o_base), so gate = 1 is DiT4SR's joint attention
  and gate = 0 the base. Each block also adds a cross-stream convolution (3x3 depthwise, then 1x1 zero-initialised)
  of the LR patch embeddings (without positions) to its image tokens: the local "same place" path that attention
  over SD3's absolute positions has to learn. Both are zero at init, so the wrapped model is the base bit for bit.
  The LR tokens are not updated block to block (no LR MLP stream) and text tokens do not see them: fewer parameters
  (~180M on SD3.5-M against the paper's 366M trainable), one extra attention call per block. By default the base
  stays frozen (one bf16 copy for teacher, student and fake score); `--train_base lora` also trains a LoRA on it
  (the paper: "LR parameters and LoRA"), `full` all of it (the mini). Teacher and student then own a copy each.
- (r, t) embedding: e_{r,t} = e_t + MLP([e_r, e_t]) with the MLP's last layer zero-initialised, so the student starts
  as the teacher: u(z, r, t) = v(z, t) (the paper gives only Linear-SiLU-Linear).
- Algorithm 1 writes the splitting branch under q < p, Sec. 4 calls p = 0.6 "the probability of using the boundary
  branch": we follow Sec. 4. The branch is drawn per micro-batch (the paper: per step).
- Unknown in the paper (`# ours` in Config): the (r, t) law of Algorithm 1 (logit-normal(0, 1), sorted), stage-2
  learning rates, the VSD t law and w(t), the fake-score LoRA, the DINOv3 size, layers and heads, the micro-batch,
  the tile. The teacher's t follows Eq. 3, U(0, 1); --teacher_t logit-normal is SD3's pretraining law (an option).
- Pixel ranges: L_Rec's MSE (Eq. 19) is taken on [0, 1] images, the range every image has here outside the VAE and
  the one PSNR is measured on; the paper does not say. On [-1, 1] the MSE would be 4x larger, i.e. its weight
  lambda_2 4x heavier against L_ISC, L_VSD and the GAN.
- VSD: w(t) = t / mean|z0_hat - x0_phi| (DMD's normaliser written for velocities: x0_phi' - x0_phi =
  t (v_phi - v_phi')); the (1 - t) of dz0_hat_t/dz0_hat is folded into it. One fake-score forward at (z0_hat_t, t)
  serves both Eq. 15 (detached) and Eq. 16 (through its LoRA).
- Captions are optional (a tab-separated file; the paper captions the LR with LLaVA, and Table 8 shows the empty
  prompt does about as well); the sampler uses the empty prompt.
- `--start lr` (ours): start at z_t0 = (1 - t0) z_lr + t0 eps with t0 = --start_t (Eq. 1 with z_lr in place of z_hr)
  and jump to 0 along the average velocity; t0 = 1 is the paper's noise start.
- `--steps K` on a teacher checkpoint takes K Euler steps (a teacher ignores r: u = v).
"""
import contextlib, copy, dataclasses, os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common
from common import bc
from degrade import PRESETS as DEGRADE, check_preset, degrade

UNSUPPORTED = {"fsdp": "SD3.5-Medium (2.5B) fits one GPU, shared by teacher, student and fake score, and the blocks "
                       "are called piece by piece (the LR tokens), which FSDP's per-module hooks do not see"}


# ----------------------------------------------------------------------------- config
@dataclasses.dataclass
class Config:
    model: str = "sd35-medium"    # Sec. 4: SD3.5-Medium
    model_path: str = ""          # local folder of the base (else the preset's hub id)
    stage: str = "teacher"        # Sec. 4: teacher (stage 0) -> isc (stage 1, Alg. 1) -> gan (stage 2, Eq. 20)
    init_ckpt: str = ""           # the previous stage's checkpoint; default out/smfsr-<previous stage>
    teacher_ckpt: str = ""        # the frozen stage-0 teacher (isc, gan); default isc's init, for gan what isc used
    data: str = "sample"          # Sec. 4: LSDIR + the first 10k FFHQ (a folder or a file list)
    data_root: str = "data"       # folder of the named datasets
    degrade: str = "realesrgan"   # LR of training and eval: a degrade.PRESETS name (paper: Real-ESRGAN)
    captions: str = ""            # optional "<image file stem>\t<caption>" lines (Sec. 4: LLaVA); none: empty prompt
    cache_dir: str = "out/cache"  # ours: encoded captions
    out_dir: str = ""             # default out/smfsr-<stage>
    lr: float = 5e-5              # Sec. 4: AdamW, fixed lr (stages 0 and 1; ours for stage 2)
    lr_fake: float = 5e-5         # ours: the fake-score LoRA (Eq. 16)
    lr_d: float = 5e-5            # ours: the discriminator heads (Eq. 18)
    grad_clip: float = 1.0        # ours
    lr_decay: float = 0.0         # ours: the lr falls on a half cosine to 0 over this last fraction; 0: constant
    p_boundary: float = 0.6       # Sec. 4: probability of the boundary branch
    teacher_cfg: float = 1.0      # Eq. 13: w for every teacher call; 1 = no CFG, the paper's choice (Table 6)
    p_drop: float = 0.2           # Sec. 4.4: caption dropout
    teacher_t: str = "uniform"    # Eq. 3: the teacher's t ~ U(0, 1); logit-normal: SD3's law (t_mean, t_std)
    t_mean: float = 0.0           # ours: logit-normal(t_mean, t_std) for stage 1's sorted (r, t) (and --teacher_t)
    t_std: float = 1.0            # ours
    w_isc: float = 1.0            # Sec. 4: lambda_1 (Eq. 20)
    w_rec: float = 1.0            # Sec. 4: lambda_2
    w_lpips: float = 1.0          # Eq. 19: L_Rec = MSE + LPIPS
    lpips_weights: str = ""       # a local torchvision VGG16 file for LPIPS (default: torch hub's cache)
    w_vsd: float = 1.0            # Sec. 4: lambda_3
    w_gan: float = 0.5            # Sec. 4: lambda_4
    vsd_t_min: float = 0.02       # ours: t ~ U(vsd_t_min, vsd_t_max) in Eqs. 15-16 (DMD's range)
    vsd_t_max: float = 0.98       # ours
    fake_rank: int = 64           # ours: LoRA rank (= alpha) of the fake score v_phi'
    train_base: str = "none"      # paper: none, only the LR layers train; lora: and a LoRA on the base; full (ours)
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
    eval_heldout: bool = False    # ours: at the end, eval.py on the held-out sample photo against bicubic

STAGES = {"teacher": (80_000, 32), "isc": (40_000, 16), "gan": (10_000, 8)}  # Sec. 4: iterations, batch
PREVIOUS = {"isc": "teacher", "gan": "isc"}
# --model tiny / mini (ours): these values for every flag not given; a dict holds them per --stage
TINY = dict(crop=64, max_steps=4, batch_size=2, micro_batch=1, fake_rank=4, disc_width=16, tile=8, overlap=2)
# mini: the base trains (a frozen 2M base cannot cancel the noise the one step starts from); the teacher at a higher
# lr; stage 2 keeps L_Rec's MSE and a tenth of L_ISC: on the 2M base VSD (towards its grainy teacher), the GAN (a
# random DINOv3 offline) and LPIPS (a random VGG) cost PSNR
MINI = dict(crop=128, max_steps={"teacher": 1000, "isc": 200, "gan": 600}, batch_size=4, micro_batch=2,
            lr={"teacher": 3e-3, "isc": 3e-4, "gan": 3e-4}, lr_fake=3e-4, lr_d=1e-4, fake_rank=16, disc_width=32,
            tile=32, overlap=8, grid_every=100, save_every=100, eval_heldout=True, degrade="bicubic",
            train_base="full", w_isc={"gan": 0.1}, w_vsd={"gan": 0.0}, w_gan={"gan": 0.0}, w_lpips={"gan": 0.0})

def resolve(cfg):
    """The concrete preset, and the stage's steps, batch and folder (0 defaults: Sec. 4); the flags checked."""
    preset = common.resolve_preset(cfg.model, Config.model)
    if common.PRESETS[preset].family != "sd3":
        raise SystemExit(f"--model {cfg.model}: SMFSR is built on SD3.5 (MM-DiT joint attention, pooled text)")
    common.check_choices(cfg, stage=tuple(STAGES), start=("noise", "lr"), train_base=("none", "lora", "full"),
                         teacher_t=("uniform", "logit-normal"))
    check_preset(cfg.degrade)
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
    """Every pretrained network a run of cfg loads: checked before anything is built, fetched by `python common.py
    prefetch --method smfsr`. The text encoders encode the captions (or the empty prompt) once."""
    needs = [common.base_weights(cfg, text=True)]
    if cfg.stage == "gan" and cfg.w_gan:
        needs.append(common.Weights("DINOv3 (the discriminator, Eqs. 17-18)", cfg.disc_model, "disc_model",
                                    ("config.json", "model.safetensors"), ("*.json", "*.safetensors")))
    if cfg.stage == "gan" and cfg.w_lpips:
        needs.append(common.lpips_weights(cfg))
    return needs


# ----------------------------------------------------------------------------- model: LR injection, (r, t) embedding
FAKE_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                     "attn.add_v_proj", "attn.to_add_out")  # ours: every linear of the joint attention
# --train_base lora: every linear of the joint blocks' attention and MLPs (ours)
BASE_LORA_TARGETS = FAKE_LORA_TARGETS + ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")

class LRBranch(nn.Module):
    """What one block adds for the LR tokens: (1) their part of the joint attention, LR-specific key/value projections,
    copies of the block's image ones at init (DiT4SR initialises its LR stream from the noise stream), mixed in by a
    zero-initialised per-head gate; (2) DiT4SR's cross-stream convolution, a 3x3 depthwise then a zero-initialised 1x1
    convolution of the LR patch embeddings (no positions) on their 2-D grid, added to the image tokens."""

    def __init__(self, attn):
        super().__init__()
        base = lambda m: getattr(m, "base_layer", m)  # the linear itself where the base carries a LoRA
        self.to_k, self.to_v = copy.deepcopy(base(attn.to_k)).float(), copy.deepcopy(base(attn.to_v)).float()
        self.gate = nn.Parameter(torch.zeros(attn.heads))
        dim = attn.to_k.in_features
        self.conv = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, groups=dim), nn.Conv2d(dim, dim, 1))
        nn.init.zeros_(self.conv[1].weight)
        nn.init.zeros_(self.conv[1].bias)

    def cross_stream(self, m_lr):
        """(B, D, h, w) LR patch embeddings -> (B, h w, D) added to the image tokens: the local path."""
        return self.conv(m_lr.to(self.conv[1].weight.dtype)).flatten(2).transpose(1, 2).to(m_lr.dtype)

def joint_attention(attn, lr, x, c, x_lr):
    """SD3's joint attention (diffusers' JointAttnProcessor2_0, written out) in which the image queries also attend to
    the LR tokens: o = o_base + gate (o_joint - o_base). Returns (image, text) outputs."""
    B, N, _ = x.shape
    heads = lambda y: y.view(B, -1, attn.heads, y.shape[-1] // attn.heads).transpose(1, 2)  # (B, heads, L, d)
    q, k, v = heads(attn.to_q(x)), heads(attn.to_k(x)), heads(attn.to_v(x))
    cq, ck, cv = heads(attn.add_q_proj(c)), heads(attn.add_k_proj(c)), heads(attn.add_v_proj(c))
    k_lr, v_lr = heads(lr.to_k(x_lr)), heads(lr.to_v(x_lr))
    if attn.norm_q is not None:  # SD3.5: RMS qk-norm, the LR keys share the image keys' norm
        q, k, k_lr = attn.norm_q(q), attn.norm_k(k), attn.norm_k(k_lr)
    if attn.norm_added_q is not None:
        cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
    K, V = torch.cat([k, ck], 2), torch.cat([v, cv], 2)
    o = F.scaled_dot_product_attention(torch.cat([q, cq], 2), K, V)  # the base: [image, text] tokens
    o_x = o[:, :, :N]
    o_joint = F.scaled_dot_product_attention(q, torch.cat([K, k_lr], 2), torch.cat([V, v_lr], 2))  # + LR tokens
    o_x = o_x + lr.gate.view(1, -1, 1, 1).to(o_x.dtype) * (o_joint - o_x)
    flat = lambda y: y.transpose(1, 2).reshape(B, -1, y.shape[1] * y.shape[-1])
    out_c = None if attn.context_pre_only else attn.to_add_out(flat(o[:, :, N:]))
    return attn.to_out[0](flat(o_x)), out_c

def block_forward(block, lr, x, c, x_lr, temb, m_lr):
    """diffusers' JointTransformerBlock.forward, written out, with the LR tokens in its attention and the
    cross-stream convolution of m_lr (the LR patch embeddings on their 2-D grid) added to the image tokens."""
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
    """e_{r,t} from the base's own embeddings e_r, e_t (Fig. 2): Linear(2D -> D) -> SiLU -> Linear(D -> D), as
    e_t + MLP([e_r, e_t]) with the last layer zero-initialised (ours): u(z, r, t) = v(z, t) at init."""

    def __init__(self, dim):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, e_r, e_t):
        return e_t + self.mlp(torch.cat([e_r, e_t], -1))

class SRNet(nn.Module):
    """Everything SMFSR adds to a frozen SD3 transformer: one LRBranch per block, and for the student the (r, t)
    embedding. The transformer is an argument, not a submodule, so teacher, student and fake score share one copy of
    the base weights and a checkpoint holds only what trains."""

    def __init__(self, dit, two_times):
        super().__init__()
        self.lr = nn.ModuleList(LRBranch(b.attn) for b in dit.transformer_blocks)
        self.rt = RTEmbed(dit.inner_dim) if two_times else None
        self.requires_grad_(True)

    def forward(self, dit, z_t, r, t, z_lr, cond):
        """u(z_t, r, t; z_lr, c) for (B, C, H, W) latents and r, t (B,) in [0, 1]; a teacher (no rt) ignores r and
        gives v(z_t, t; z_lr, c). The SD3 transformer takes sigma * 1000."""
        B, C, H, W = z_t.shape
        dt, p = dit.dtype, dit.config.patch_size
        x = dit.pos_embed(z_t.to(dt)).contiguous()  # (B, N, D): patches + 2-D sin-cos positions
        x_lr = dit.pos_embed(z_lr.to(dt)).contiguous()  # the same patch embedding at the same positions
        m_lr = dit.pos_embed.proj(z_lr.to(dt))  # (B, D, H/p, W/p): the patch embedding alone, for the convolutions
        pooled = cond["pooled"].to(dt)
        temb = dit.time_text_embed(t.float() * 1000, pooled)  # e_t: timestep (fp32, as SD3's pipeline) + pooled text
        if self.rt is not None:
            temb = self.rt(dit.time_text_embed(r.float() * 1000, pooled), temb)  # e_{r,t}
        c = dit.context_embedder(cond["embeds"].to(dt))
        for block, lr in zip(dit.transformer_blocks, self.lr):
            if dit.gradient_checkpointing and torch.is_grad_enabled():
                c, x = torch.utils.checkpoint.checkpoint(block_forward, block, lr, x, c, x_lr, temb, m_lr,
                                                         use_reentrant=False)
            else:
                c, x = block_forward(block, lr, x, c, x_lr, temb, m_lr)
        x = dit.proj_out(dit.norm_out(x, temb))  # (B, N, p * p * C)
        x = x.view(B, H // p, W // p, p, p, -1).permute(0, 5, 1, 3, 2, 4)  # unpatchify as diffusers does
        return x.reshape(B, -1, H, W).float()

def bind(net, dit, z_lr, cond):
    """u(z, r, t) with the LR latent and the caption fixed: what Algorithm 1 and the sampler call."""
    return lambda z, r, t: net(dit, z, r, t, z_lr, cond)

def teacher_velocity(teacher, dit, z_lr, cond, null, w):
    """v_phi^w(z, t) of the frozen teacher (Eq. 13). w = 1: the conditional teacher (no CFG, Table 6); otherwise one
    batched call for the captioned and the caption-free velocity (the LR stays)."""
    if w == 1:
        return lambda z, t: teacher(dit, z, t, t, z_lr, cond)

    def v(z, t):
        two = lambda a: torch.cat([a, a])
        both = {k: torch.cat([cond[k], null[k].expand_as(cond[k])]) for k in cond}
        v_c, v_u = teacher(dit, two(z), two(t), two(t), two(z_lr), both).chunk(2)
        return w * v_c + (1 - w) * v_u  # Eq. (13)
    return v

@contextlib.contextmanager
def fake_score(dit):
    """Inside: the fake score v_phi' = the teacher + its LoRA; outside the LoRA is off. peft ties the LoRA's
    requires_grad to this switch, so Eq. 16 is back-propagated inside the block."""
    dit.enable_adapters()
    try:
        yield
    finally:
        dit.disable_adapters()

def load_base(cfg, dtype, train_base, rank, ckpt=None, name=None, train=False):
    """The SD3 a model runs on. `none`: the frozen base, one copy that teacher, student and fake score share.
    Otherwise the base with the model's own weights on it (a rank-r LoRA, or all of them), read from `<name>_base` in
    ckpt when given. A frozen one (the teacher of stages 1-2) has its LoRA merged into the weights, so that the fake
    score's LoRA goes on top of the teacher."""
    dit = common.load_dit(cfg.model, cfg.model_path or None, dtype).requires_grad_(False).eval()
    if train_base == "none":
        return dit
    common.add_lora(dit, train_base, rank, rank, BASE_LORA_TARGETS)  # B = 0: the base at init; full: fp32
    if ckpt:
        file = f"{name}_base{'_lora' if train_base == 'lora' else ''}.safetensors"
        if not os.path.exists(os.path.join(ckpt, file)):
            raise SystemExit(f"{ckpt}: no {file} (expected a checkpoint trained with --train_base {train_base})")
        common.load_checkpoint(ckpt, {f"{name}_base": dit})
    if not train:
        if train_base == "lora":
            dit.fuse_lora()
            dit.unload_lora()
        dit.requires_grad_(False)
        if train_base == "full" and dtype != torch.float32:
            dit.to(dtype)  # all weights were trained in fp32
    return dit

def load_net(ckpt, name, net):
    """The trained part of a stage (`teacher` or `student`) from its checkpoint folder."""
    if not os.path.exists(os.path.join(ckpt, f"{name}.safetensors")):
        raise SystemExit(f"{ckpt}: no {name}.safetensors (expected a --stage "
                         f"{'teacher' if name == 'teacher' else 'isc/gan'} checkpoint)")
    common.load_checkpoint(ckpt, {name: net})

RANDOM_DINO = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                   num_register_tokens=4)  # tiny/mini: a small random DINOv3

class Discriminator(nn.Module):
    """Frozen DINOv3 ViT + trainable heads (Eqs. 17-18). Features: the patch tokens of 4 evenly spaced layers, as a
    grid (ours, as ADD's DINOv2 discriminator); per level SN-Conv3x3 -> LReLU(0.2) -> SN-Conv1x1 -> patch logits.
    Tiny presets: a random DINOv3 of the same class."""

    def __init__(self, random_net, hub, width):
        super().__init__()
        from transformers import DINOv3ViTConfig, DINOv3ViTModel
        vit = DINOv3ViTModel(DINOv3ViTConfig(**RANDOM_DINO)) if random_net else DINOv3ViTModel.from_pretrained(hub)
        self.vit = vit.requires_grad_(False).eval()
        n, d = vit.config.num_hidden_layers, vit.config.hidden_size
        self.levels = [n * (i + 1) // 4 for i in range(4)]
        sn = nn.utils.parametrizations.spectral_norm
        self.heads = nn.ModuleList(nn.Sequential(sn(nn.Conv2d(d, width, 3, padding=1)), nn.LeakyReLU(0.2),
                                                 sn(nn.Conv2d(width, 1, 1))) for _ in self.levels)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def train(self, mode=True):  # the backbone stays in eval mode (DINOv3 jitters its positions in training)
        super().train(mode)
        self.vit.eval()
        return self

    def features(self, x):
        """Images in [0, 1], sides multiples of 16 -> per level (B, D, H/16, W/16)."""
        hs = self.vit(pixel_values=(x - self.mean) / self.std, output_hidden_states=True).hidden_states
        skip, ps = 1 + self.vit.config.num_register_tokens, self.vit.config.patch_size  # CLS + registers first
        h, w = x.shape[-2] // ps, x.shape[-1] // ps
        return [hs[i][:, skip:].transpose(1, 2).reshape(x.shape[0], -1, h, w) for i in self.levels]

    def forward(self, feats):
        return torch.cat([head(f.float()).flatten(1) for head, f in zip(self.heads, feats)], 1)  # (B, levels h w)


# ----------------------------------------------------------------------------- losses
def logit_normal(n, cfg, device):
    return torch.sigmoid(cfg.t_mean + cfg.t_std * torch.randn(n, device=device))

def fm_loss(v, z_hr, eps, t):
    """Stage 0: LR-conditioned flow matching of the teacher, v(z, t) = u(z, t, t)."""
    z_t = (1 - bc(t)) * z_hr + bc(t) * eps  # Eq. (1)
    return F.mse_loss(v(z_t, t, t), eps - z_hr)  # Eq. (3)

def isc_loss(u, z_t, r, t, lam):
    """Interval Splitting Consistency, Algorithm 1 lines 9-13: the target is built without gradient."""
    s = (1 - lam) * t + lam * r  # line 4
    with torch.no_grad():
        u2 = u(z_t, s, t)  # line 9
        z_s = z_t - bc(t - s) * u2  # line 10, Eq. (10)
        u1 = u(z_s, r, s)  # line 11
        u_target = (1 - bc(lam)) * u1 + bc(lam) * u2  # line 12
    return F.mse_loss(u(z_t, r, t), u_target)  # line 13, Eq. (11)

def boundary_loss(u, v_teacher, z_t, t):
    """Boundary consistency, Algorithm 1 line 15: at r = t the average velocity is the teacher's v."""
    with torch.no_grad():
        v = v_teacher(z_t, t)
    return F.mse_loss(u(z_t, t, t), v)  # Eq. (12)

def rec_loss(lpips, x_sr, x_hr, w_lpips=1.0):
    """Eq. 19 on images in [0, 1]; returns (L_Rec, MSE, LPIPS). w_lpips 0: no VGG pass at all."""
    mse = F.mse_loss(x_sr, x_hr)
    lp = lpips(x_sr, x_hr) if w_lpips else mse.new_zeros(())
    return mse + w_lpips * lp, mse, lp  # Eq. (19)

def vsd_loss(z0_hat, z0_hat_t, t, v_real, v_fake):
    """Eq. 15 as a loss whose gradient on z0_hat is w(t) (v_phi - v_phi') / numel, w(t) = t / mean|z0_hat - x0_phi|
    (DMD's normaliser, ours). v_real, v_fake: the teacher's and the fake score's velocities at z0_hat_t (no gradient).
    Descent moves z0_hat towards the teacher's x0 and away from the fake's."""
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
    """Stage 0 (Eq. 3) on one micro-batch: flow matching with t ~ U(0, 1) (--teacher_t logit-normal: SD3's law)."""
    B = z_hr.shape[0]
    t = torch.rand(B, device=z_hr.device) if cfg.teacher_t == "uniform" else logit_normal(B, cfg, z_hr.device)
    l_fm = fm_loss(u, z_hr, eps, t)  # Eq. (3)
    return l_fm, {"loss": l_fm, "fm": l_fm}

def isc_losses(u, v_teacher, z_hr, eps, cfg, weight=1.0):
    """Stage 1, Algorithm 1 lines 3-15 on one micro-batch: the boundary branch with probability p_boundary, else the
    splitting branch. `weight` (stage 2's lambda_1): 0 computes no term."""
    B, device = z_hr.shape[0], z_hr.device
    r, t = logit_normal(2 * B, cfg, device).view(2, B).sort(0).values  # line 3: r <= t (ours: logit-normal)
    lam = torch.rand(B, device=device)  # line 4 (s inside isc_loss)
    q = torch.rand(())  # line 5
    z_t = (1 - bc(t)) * z_hr + bc(t) * eps  # line 7, Eq. (1)
    l_isc = torch.zeros((), device=device)
    if weight:
        l_isc = boundary_loss(u, v_teacher, z_t, t) if q < cfg.p_boundary else isc_loss(u, z_t, r, t, lam)
    return weight * l_isc, {"loss": weight * l_isc, "isc": l_isc}

def gan_losses(u, v_teacher, teacher, t_dit, disc, vae, lpips, z_lr, x_hr, cond, cfg, scale):
    """Stage 2's terms after L_ISC (Eq. 20: L_Rec, L_VSD, L_adv^G) and, alongside, the fake score's (Eq. 16, stepped
    back-propagated here, inside the LoRA's switch) and D's (Eq. 18). A term of weight 0 is not computed. Returns
    (the loss to back-propagate, its terms, x_sr)."""
    B, device = z_lr.shape[0], z_lr.device
    eps, ones = torch.randn_like(z_lr), torch.ones(B, device=device)
    z0_hat = eps - u(eps, 0 * ones, ones)  # Eq. (14)
    x_sr = common.decode(vae, "sd3", z0_hat).float()
    l_rec, l_mse, l_lpips = rec_loss(lpips, x_sr, x_hr, cfg.w_lpips)
    l_vsd = l_fake = l_adv = l_d = torch.zeros((), device=device)
    if cfg.w_vsd:
        eps_v = torch.randn_like(z_lr)
        t_v = cfg.vsd_t_min + (cfg.vsd_t_max - cfg.vsd_t_min) * torch.rand(B, device=device)
        z0_hat_t = (1 - bc(t_v)) * z0_hat.detach() + bc(t_v) * eps_v
        with torch.no_grad():
            v_real = v_teacher(z0_hat_t, t_v)
        with fake_score(t_dit):  # one fake-score pass: detached for Eq. 15, through its LoRA for Eq. 16
            v_fake = teacher(t_dit, z0_hat_t, t_v, t_v, z_lr, cond)
            l_fake = fake_score_loss(v_fake, eps_v, z0_hat)
            (l_fake * scale).backward()
        l_vsd = vsd_loss(z0_hat, z0_hat_t, t_v, v_real, v_fake.detach())  # Eq. (15)
    if cfg.w_gan:
        f_fake = disc.features(x_sr)
        with torch.no_grad():
            f_real = disc.features(x_hr)
        disc.heads.requires_grad_(False)  # L_adv^G reaches the generator only
        l_adv = adv_g_loss(disc(f_fake))
        disc.heads.requires_grad_(True)
        l_d = adv_d_loss(disc(f_real), disc([f.detach() for f in f_fake]))
    l_g = cfg.w_rec * l_rec + cfg.w_vsd * l_vsd + cfg.w_gan * l_adv  # Eq. (20), after L_ISC
    return l_g + l_d, {"loss": l_g, "mse": l_mse, "lpips": l_lpips, "vsd": l_vsd, "adv": l_adv, "fake": l_fake,
                       "d": l_d}, x_sr


# ----------------------------------------------------------------------------- sampler
def sample(u, eps, steps, z_lr=None, start_t=1.0):
    """Eq. 14 in `steps` jumps along the average velocity, t_k = t0 (1 - k/steps): z <- z - (t_k - t_k+1)
    u(z, t_k+1, t_k). From noise (z = eps, t0 = 1) or, given z_lr, from z = (1 - t0) z_lr + t0 eps (Eq. 1 with z_lr
    in place of z_hr; ours)."""
    t0 = 1.0 if z_lr is None else start_t
    z = eps if z_lr is None else (1 - t0) * z_lr + t0 * eps
    ts, ones = torch.linspace(t0, 0, steps + 1, device=eps.device), torch.ones(eps.shape[0], device=eps.device)
    for t, r in zip(ts[:-1], ts[1:]):
        z = z - (t - r) * u(z, r * ones, t * ones)
    return z

def build_sampler(flags, device=None):
    """fn(x_lr (1, 3, h, w) in [0, 1]) -> (1, 3, 4h, 4w) of the checkpoint flags.ckpt: bicubic x4, encode, `steps`
    jumps of Eq. 14 from noise seeded by flags.seed (each jump's velocity over overlapping latent tiles), decode."""
    flags = dataclasses.replace(flags, ckpt=flags.ckpt or flags.out_dir or "out/smfsr-gan")
    path, cfg, device, dtype = common.sampler_setup(flags, resolve, device)
    name = "teacher" if cfg.stage == "teacher" else "student"
    with torch.random.fork_rng(devices=[]):  # the init is overwritten; keep the caller's RNG as it was
        dit = load_base(cfg, dtype, cfg.train_base, cfg.lora_rank, path, name)
        net = SRNet(dit, two_times=name == "student")
    load_net(path, name, net)
    state = torch.load(os.path.join(path, "state.pt"), weights_only=True)
    dit, net = dit.to(device), net.to(device).eval()
    vae = common.load_vae(cfg.model, cfg.model_path or None, dtype, device, tiling=True)
    cond = {k: v.to(device) for k, v in state["cond"].items()}  # the empty prompt: no text encoder needed

    def latent(z_lr):
        eps = torch.randn(z_lr.shape, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
        u = lambda z, r, t: common.tiled_pair(lambda zz, ll: net(dit, zz, r, t, ll, cond), z, z_lr, cfg.tile,
                                              cfg.overlap)
        return sample(u, eps, cfg.steps, z_lr if cfg.start == "lr" else None, cfg.start_t)
    return lambda x_lr: common.super_resolve(vae, "sd3", x_lr, latent)


# ----------------------------------------------------------------------------- training
class Captions:
    """Per-image captions drawn with dropout (Sec. 4.4); '' and dropped captions are the empty prompt. Each caption
    is encoded once into common.prompt_cond's disk cache (rank 0 first) and read back per batch. Without text
    encoders (tiny, mini) any caption is common.tiny_cond, the empty prompt zeros. The loader yields images only, so
    a twin of its StepSampler yields the same (index, seed) keys, in step with it."""

    def __init__(self, cfg, dit, device, rank, world, start_step):
        self.random, self.cfg, self.device, self.text = common.random_prompt(cfg), cfg, device, []
        if self.random:
            self.prompt = {k: v.to(device) for k, v in common.tiny_cond(dit, "sd3").items()}
        if cfg.captions:
            with open(cfg.captions) as f:
                table = dict(line.rstrip("\n").split("\t", 1) for line in f if "\t" in line)
            names = (common.SAMPLE_PHOTOS if cfg.data == "sample" else
                     [os.path.splitext(os.path.basename(p))[0] for p in common.list_images(cfg.data, cfg.data_root)])
            self.text = [table.get(n, "").strip() for n in names]
            self.keys = iter(common.StepSampler(len(names), cfg.batch_size, rank, world, cfg.seed, start_step))
        if not self.random and rank == 0:
            for c in [""] + sorted(set(self.text)):  # loads the text encoders once per caption not yet cached
                self.encode(c)
        if dist.is_initialized():
            dist.barrier()
        self.empty = self.encode("")

    def encode(self, caption):
        if self.random:
            return self.prompt if caption else {k: torch.zeros_like(v) for k, v in self.prompt.items()}
        return common.prompt_cond(self.cfg.model, caption, self.cfg.cache_dir, self.device, self.cfg.model_path or None)

    def batch(self, B):
        """The conditions of the loader's next micro-batch (B, ...)."""
        if not self.text:
            return common.expand_cond(self.empty, B)
        idx = [next(self.keys)[0] for _ in range(B)]
        keep = (torch.rand(B) >= self.cfg.p_drop).tolist()  # caption dropout, p = 0.2
        conds = [self.encode(self.text[i]) if k and self.text[i] else self.empty for i, k in zip(idx, keep)]
        return {k: torch.cat([c[k] for c in conds]) for k in self.empty}

def stage_inputs(cfg):
    """(init, teacher) checkpoint folders of a stage: each stage starts from the previous one's output, and the
    teacher of stage 2 is the one stage 1 distilled (recorded in its config.json)."""
    if cfg.stage == "teacher":
        return None, None
    prev = PREVIOUS[cfg.stage]
    src = cfg.init_ckpt or f"out/smfsr-{prev}"
    init = common.latest_checkpoint(src)
    if not init:
        raise SystemExit(f"--stage {cfg.stage} starts from a --stage {prev} checkpoint and {src!r} holds none: "
                         f"run --stage {prev} first or pass --init_ckpt")
    src = cfg.teacher_ckpt or (init if cfg.stage == "isc" else common.load_config(init).get("teacher_ckpt", ""))
    teacher = common.latest_checkpoint(src)
    if not teacher:
        raise SystemExit(f"--teacher_ckpt {src!r}: no stage-0 teacher checkpoint there")
    return init, teacher

def build_models(cfg, init, teacher_ckpt, device):
    """The stage's trained net on its base (dit), the frozen teacher on its base (t_dit: the same object where the
    base is shared), the fake score's LoRA on t_dit, the discriminator and LPIPS; the same init on every rank."""
    dtype, gan = common.weight_dtype(device), cfg.stage == "gan"
    name, src = ("teacher", None) if cfg.stage == "teacher" else ("student", "teacher" if cfg.stage == "isc" else
                                                                  "student")
    base_of = lambda ckpt: (common.load_config(ckpt)["train_base"], common.load_config(ckpt).get("lora_rank", 128))
    if init and base_of(init) != (cfg.train_base, cfg.lora_rank):
        raise SystemExit(f"--train_base {cfg.train_base}: the stage continues {init}, trained with --train_base "
                         f"{base_of(init)[0]} (lora_rank {base_of(init)[1]})")
    disc = lpips = teacher = None
    random_nets = common.PRESETS[cfg.model].hub is None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        dit = load_base(cfg, dtype, cfg.train_base, cfg.lora_rank, init, src, train=True)
        net = SRNet(dit, two_times=name == "student")
        t_dit = dit  # the teacher's and the fake score's SD3
        if init and (cfg.train_base != "none" or base_of(teacher_ckpt)[0] != "none"):
            t_dit = load_base(cfg, dtype, *base_of(teacher_ckpt), teacher_ckpt, "teacher")
        if init:
            teacher = SRNet(t_dit, two_times=False).requires_grad_(False)
        if gan and cfg.w_vsd:
            common.add_lora(t_dit, "lora", cfg.fake_rank, cfg.fake_rank, FAKE_LORA_TARGETS)  # v_phi' = v_phi at init
        if gan and cfg.w_gan:
            disc = Discriminator(random_nets, cfg.disc_model, cfg.disc_width)
        if gan and cfg.w_lpips:
            lpips = common.load_lpips(device, "random" if random_nets else cfg.lpips_weights)
    if init:
        load_net(teacher_ckpt, "teacher", teacher)
        load_net(init, src, net)
    to = lambda m: m.to(device) if m is not None else None
    return name, to(net), to(dit), to(teacher), to(t_dit), to(disc), lpips

def train(cfg):
    cfg = resolve(cfg)
    init, teacher_ckpt = stage_inputs(cfg)
    cfg = dataclasses.replace(cfg, init_ckpt=init or "", teacher_ckpt=teacher_ckpt or "")  # config.json: gan reads it
    rank, world, device, log = common.setup(cfg, pretrained(cfg))
    gan = cfg.stage == "gan"

    # 1. models: one frozen SD3 (bf16 on GPU) shared by teacher, student and fake score with --train_base none; else
    #    the trained model's base is a copy (its LoRA or all its weights training), the teacher's another
    name, net, dit, teacher, t_dit, disc, lpips = build_models(cfg, init, teacher_ckpt, device)
    vae = common.load_vae(cfg.model, cfg.model_path or None, common.weight_dtype(device), device)
    common.checkpointing(cfg, device, dit, t_dit)  # SRNet.forward checkpoints each block when this is on

    # 2. optimizers: AdamW, a fixed lr per trained part (Sec. 4); the fake-score LoRA and D heads in stage 2
    models, params = {name: net}, common.trainable(net)
    if cfg.train_base != "none":
        models[f"{name}_base"] = dit
        params += common.trainable(dit)
    opts = {"opt": torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0)}
    if gan and cfg.w_vsd:
        fake_params = [p for n, p in t_dit.named_parameters() if "lora_" in n]
        t_dit.disable_adapters()
        opts["opt_fake"] = torch.optim.AdamW(fake_params, lr=cfg.lr_fake, betas=(0.9, 0.999), weight_decay=0.0)
    if gan and cfg.w_gan:
        models["disc"] = disc.heads
        opts["opt_d"] = torch.optim.AdamW(disc.heads.parameters(), lr=cfg.lr_d, betas=(0.9, 0.999), weight_decay=0.0)
    log(f"{cfg.model}: stage {cfg.stage}, {sum(p.numel() for p in params) / 1e6:.3g}M trainable ({name}); "
        f"init {init or cfg.model}, teacher {cfg.teacher_ckpt or '-'}")

    # 3. resume; 4. the loader and the captions, data position = step
    step, state = common.resume(cfg.out_dir, models, opts, log)
    if state and gan and cfg.w_vsd:
        common.load_lora_state(t_dit, state["fake_lora"])
    loader, accum = common.make_loader(common.ImageDataset(cfg.data, cfg.crop, cfg.data_root), cfg, rank, world, step)
    captions = Captions(cfg, dit, device, rank, world, step)
    log(f"batch {cfg.batch_size} = {world} ranks x {accum} accum x {cfg.micro_batch}, crop {cfg.crop}")

    # 5. loop. DiT passes per micro-batch: teacher 1; isc 2 (boundary: teacher + student) or 3 (split: two without
    #    gradient for the target); gan: isc + the one-step generator + teacher + fake score
    def micro_step(x, scale):
        with torch.no_grad(), common.autocast(device):  # Alg. 1 line 6: z_lr, z_hr = E(x_lr), E(x_hr)
            x_lr, x_hr = degrade(x.to(device), 4, DEGRADE[cfg.degrade])
            z_hr, z_lr = common.encode(vae, "sd3", torch.cat([x_hr, common.upsample_lr(x_lr)])).chunk(2)
        cond = captions.batch(z_hr.shape[0])
        u, eps = bind(net, dit, z_lr, cond), torch.randn_like(z_hr)  # Alg. 1 line 5
        with common.autocast(device):
            if cfg.stage == "teacher":
                loss, terms = teacher_losses(u, z_hr, eps, cfg)
            else:
                v_teacher = teacher_velocity(teacher, t_dit, z_lr, cond, captions.empty, cfg.teacher_cfg)
                loss, terms = isc_losses(u, v_teacher, z_hr, eps, cfg, cfg.w_isc if gan else 1.0)
        if gan:
            if loss.requires_grad:
                (loss * scale).backward()  # the ISC graph is freed before the generator's is built
            with common.autocast(device):
                loss, more, x_sr = gan_losses(u, v_teacher, teacher, t_dit, disc, vae, lpips, z_lr, x_hr, cond, cfg,
                                              scale)
            terms = {"loss": terms["loss"] + more.pop("loss"), "isc": terms["isc"], **more}
        (loss * scale).backward()

        @torch.no_grad()
        def preview():  # stages 0-1: the current model's sample of this micro-batch, from fixed noise
            eps_g = torch.randn(z_lr.shape, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
            with common.autocast(device):
                return x_lr, common.decode(vae, "sd3", sample(u, eps_g, cfg.steps)), x_hr
        return terms, (lambda: (x_lr, x_sr, x_hr)) if gan else preview

    def extra():
        out = {"cond": {k: v[:1].detach().cpu() for k, v in captions.empty.items()}}
        return {**out, "fake_lora": common.lora_state(t_dit)} if gan and cfg.w_vsd else out

    common.train_loop(cfg, log, loader, accum, micro_step, models, opts, step, cfg.max_steps, extra=extra)
    if rank == 0 and cfg.eval_heldout:
        import eval
        eval.heldout("smfsr", build_sampler, cfg.out_dir, cfg.degrade)

if __name__ == "__main__":
    cfg = common.parse_config(Config)
    if cfg.sample:
        common.sample_files(build_sampler(cfg), cfg.input, cfg.output)
    else:
        train(cfg)
    common.cleanup()
