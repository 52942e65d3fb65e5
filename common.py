"""
What the four method scripts share and none of the papers describes: the base models (each
family's loading, latents, velocity call and prompts, LoRA), the pretrained networks a run needs
(checked before anything is built, `python common.py prefetch`), image files, distributed training,
checkpoints, tiled sampling, configuration and logging, and the mini bases this project pretrains
itself.

Every velocity call speaks one convention (rectified flow, sigma form):
    z_t = (1 - t) z_0 + t eps,   t in [0, 1],   v = eps - z_0,   Euler step: z_s = z_t - (t - s) v
on (B, C, H, W) latents, whatever the family does inside (packing, position ids, its own timestep
scale). Images are (B, 3, H, W) floats in [0, 1] everywhere outside the VAE.

The Config fields read here: the contract a copied method's dataclass keeps (degrade.make_loader
also reads batch_size, micro_batch, num_workers and seed).
    model, model_path, out_dir, seed      loading, set-up, logging, checkpoints
    train_base, zero_init, grad_ckpt      check_zero_init, checkpointing
    lpips_weights, ema_decay              lpips_weights, start_ema
    stage (if the method has stages)      configure: a preset's dict values are per stage
    ckpt, steps, ema, tile, overlap and SampleFlags' fields (inherited): sampler_setup
"""
import contextlib, dataclasses, functools, glob, hashlib, json, logging, math, os, re, shutil, sys, time, warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

# bitsandbytes (imported by peft) warns at import that a CPU kernel nothing here uses is missing
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

# ------------------------------------------------------------ presets
FAMILIES = {  # family: (transformer class, VAE class, pipeline class), all in diffusers
    "flux1": ("FluxTransformer2DModel", "AutoencoderKL", "FluxPipeline"),
    "flux2": ("Flux2Transformer2DModel", "AutoencoderKLFlux2", "Flux2KleinPipeline"),
    "zimage": ("ZImageTransformer2DModel", "AutoencoderKL", "ZImagePipeline"),
    "sd3": ("SD3Transformer2DModel", "AutoencoderKL", "StableDiffusion3Pipeline"),
    "qwen": ("QwenImageTransformer2DModel", "AutoencoderKLQwenImage", "QwenImagePipeline"),
}
PIXEL_MULTIPLE = 16  # every family: VAE factor 8 x patch 2 (FLUX.2 patchifies 2x2 in latent space)
_KL4 = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=8)

@dataclasses.dataclass(frozen=True)
class Preset:
    family: str
    # hub id of the real weights; None: built here (tiny: random, mini: pretrained here)
    hub: str | None
    size: str                # transformer parameters
    dit: dict | None = None  # tiny / mini: the transformer's config
    vae: dict | None = None  # tiny: the VAE's config; mini: the mini autoencoder's
    pretrain: bool = False   # mini: pretrained here on first use, cached under MINI_DIR
    vae_steps: int = 2000    # mini: the autoencoder's pretraining steps (ours)
    dit_steps: int = 300     # mini: the DiT's pretraining steps (ours: every method starts at z_lr, --zero_init)

_F1 = dict(in_channels=64, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True)
_F2 = dict(in_channels=128, joint_attention_dim=32, guidance_embeds=False)
_ZI = dict(in_channels=16, n_refiner_layers=1, cap_feat_dim=32)
_SD = dict(sample_size=32, in_channels=16, joint_attention_dim=32, pooled_projection_dim=16, out_channels=16)
_QW = dict(in_channels=64, out_channels=16, joint_attention_dim=32)
# ours: a linear code needs FLUX.2's 32 channels to decode edges without ringing
_MINI_AE = dict(latent_channels=32)
PRESETS = {
    "flux1-dev": Preset("flux1", "black-forest-labs/FLUX.1-dev", "12B"),
    "flux2-klein": Preset("flux2", "black-forest-labs/FLUX.2-klein-4B", "4B"),
    "flux2-klein-base": Preset("flux2", "black-forest-labs/FLUX.2-klein-base-4B", "4B"),  # undistilled
    "zimage": Preset("zimage", "Tongyi-MAI/Z-Image-Turbo", "6B"),
    "sd35-medium": Preset("sd3", "stabilityai/stable-diffusion-3.5-medium", "2.5B"),
    "qwen-image": Preset("qwen", "Qwen/Qwen-Image-2512", "20B"),
    # tiny: the same classes, 1-2 blocks, head dim 16, random weights: the code path, not the method
    "tiny-flux1": Preset("flux1", None, "81k", dict(_F1, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, axes_dims_rope=(4, 6, 6)), dict(_KL4, latent_channels=16, scaling_factor=0.3611,
        shift_factor=0.1159)),
    "tiny-flux2": Preset("flux2", None, "69k", dict(_F2, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4)),
        dict(_KL4, latent_channels=32)),
    "tiny-zimage": Preset("zimage", None, "348k", dict(_ZI, dim=32, n_layers=1, n_heads=2, n_kv_heads=2,
        axes_dims=[4, 6, 6], axes_lens=[256, 128, 128]), dict(_KL4, latent_channels=16, scaling_factor=0.3611,
        shift_factor=0.1159)),
    "tiny-sd3": Preset("sd3", None, "80k", dict(_SD, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        caption_projection_dim=32, pos_embed_max_size=64), dict(_KL4, latent_channels=16, scaling_factor=1.5305,
        shift_factor=0.0609)),
    "tiny-qwen": Preset("qwen", None, "92k", dict(_QW, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        axes_dims_rope=(4, 6, 6)), dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1)),
    # mini: the same classes at ~2M parameters, pretrained here on the sample photos
    "mini-flux1": Preset("flux1", None, "2.4M", dict(_F1, in_channels=128, num_layers=2, num_single_layers=4,
        attention_head_dim=32, num_attention_heads=4, axes_dims_rope=(8, 12, 12)), _MINI_AE, pretrain=True),
    "mini-flux2": Preset("flux2", None, "2.0M", dict(_F2, num_layers=2, num_single_layers=4, attention_head_dim=32,
        num_attention_heads=4, timestep_guidance_channels=64, axes_dims_rope=(8, 8, 8, 8)),
        dict(_MINI_AE, batch_norm_eps=1e-4), pretrain=True),
    "mini-zimage": Preset("zimage", None, "2.0M", dict(_ZI, in_channels=32, dim=128, n_layers=4, n_heads=4,
        n_kv_heads=4, axes_dims=[8, 12, 12], axes_lens=[256, 256, 256]), _MINI_AE, pretrain=True),
    "mini-sd3": Preset("sd3", None, "2.3M", dict(_SD, in_channels=32, out_channels=32, num_layers=4,
        attention_head_dim=32, num_attention_heads=4, caption_projection_dim=128, pos_embed_max_size=128), _MINI_AE,
        pretrain=True),
    "mini-qwen": Preset("qwen", None, "2.5M", dict(_QW, in_channels=128, out_channels=32, num_layers=4,
        attention_head_dim=32, num_attention_heads=4, axes_dims_rope=(8, 12, 12)), dict(_MINI_AE, per_channel=True),
        pretrain=True),
}

def resolve_preset(model, default):
    """`--model tiny` / `--model mini`: the tiny / mini preset of the method's default family."""
    if model not in PRESETS and model not in ("tiny", "mini"):
        raise SystemExit(f"unknown --model {model!r}; choose from tiny, mini, {', '.join(PRESETS)}")
    return model + "-" + PRESETS[default].family if model in ("tiny", "mini") else model

def random_prompt(cfg):
    """Tiny and mini bases have no text encoders: their prompts are fixed random stand-ins."""
    return PRESETS[cfg.model].hub is None and not cfg.model_path

# ------------------------------------------------------------ loading
def _load(cls_name, preset, path, sub, config, dtype):
    import diffusers
    p = PRESETS[preset]
    cls = mini_vae_class() if p.pretrain and sub == "vae" else getattr(diffusers, cls_name)
    if path is None and p.pretrain:
        path = os.path.join(MINI_DIR, preset)
        if not os.path.exists(os.path.join(path, "pretrain.json")):
            raise SystemExit(f"--model {preset}: no pretrained base in {path}; a method's training run makes it "
                             f"first (common.prepare_base)")
    if path is None and p.hub is None:
        with torch.random.fork_rng(devices=[]):  # tiny weights: random but the same every run
            torch.manual_seed(0)
            model = cls(**config)
            return model if dtype == torch.float32 else model.to(dtype)
    src = local_copy(path or p.hub)  # a pipeline folder keeps each model in a subfolder
    sub = sub if path is None or os.path.isdir(os.path.join(src, sub)) else None
    return cls.from_pretrained(src, subfolder=sub, torch_dtype=dtype)

def local_copy(source):
    """A cached hub id -> its snapshot folder, so loading never asks the hub (diffusers asks for a
    sharded model's files even when they are cached); anything else as given."""
    if not source or os.path.exists(source) or source.startswith(("/", ".", "~", "http")):
        return source
    return hub_snapshot(source) or source  # not cached: from_pretrained downloads it

def load_dit(preset, path=None, dtype=torch.float32):
    """The family's transformer: from the hub, a local `path`, tiny random or mini pretrained."""
    return _load(FAMILIES[PRESETS[preset].family][0], preset, path, "transformer", PRESETS[preset].dit, dtype)

def load_vae(preset, path=None, dtype=torch.float32, device=None, tiling=False):
    """The family's frozen VAE on `device`; `tiling` bounds a real VAE's memory on large images."""
    vae = _load(FAMILIES[PRESETS[preset].family][1], preset, path, "vae", PRESETS[preset].vae, dtype)
    if tiling and PRESETS[preset].hub is not None:
        vae.enable_tiling()
    return vae.requires_grad_(False).eval().to(device or "cpu")

def weight_dtype(device):
    """Frozen weights in bf16 on GPU, fp32 on CPU (bf16 matmuls are slow there)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32

# ------------------------------------------------------------ latents and velocity
def patchify(z):  # (B, C, H, W) -> (B, 4C, H/2, W/2), channel order (C, 2, 2) as FLUX.2
    B, C, H, W = z.shape
    return z.view(B, C, H // 2, 2, W // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(B, C * 4, H // 2, W // 2)

def unpatchify(z):
    B, C, H, W = z.shape
    return z.view(B, C // 4, 2, 2, H, W).permute(0, 1, 4, 2, 5, 3).reshape(B, C // 4, H * 2, W * 2)

def latent_stats(vae, family, z):
    """(mean, std) that normalise this family's raw VAE latents, broadcastable to z."""
    c, col = vae.config, lambda v: torch.as_tensor(v).view(1, -1, 1, 1).to(z)
    if family == "qwen":
        return col(c.latents_mean), col(c.latents_std)
    if family == "flux2":  # BatchNorm running stats of the patchified latents
        return col(vae.bn.running_mean), col((vae.bn.running_var + c.batch_norm_eps).sqrt())
    return col(c.shift_factor or 0.0), col(1 / c.scaling_factor)

# (z_hr, z_lr): the HR and its bicubic x4 LR in one encoder pass
def encode_pair(vae, family, x_hr, x_lr):
    return encode(vae, family, torch.cat([x_hr, upsample_lr(x_lr)])).chunk(2)

def encode(vae, family, x, sample=False, generator=None):
    """Images in [0, 1] -> normalised latents (B, C, H/8, W/8), FLUX.2's (B, 128, H/16, W/16)."""
    x = (x * 2 - 1).to(vae.dtype)
    # Qwen's video VAE: one frame
    dist_ = vae.encode(x.unsqueeze(2) if family == "qwen" else x).latent_dist
    z = dist_.sample(generator) if sample else dist_.mode()
    if family == "flux2":
        z = patchify(z)
    if family == "qwen":  # the video VAE's frame dimension
        z = z[:, :, 0]
    mean, std = latent_stats(vae, family, z)
    return ((z - mean) / std).float()

def decode(vae, family, z):
    """Normalised latents -> images in [0, 1] (not clamped, so losses keep their gradient)."""
    mean, std = latent_stats(vae, family, z)
    z = (z * std + mean).to(vae.dtype)
    z = unpatchify(z) if family == "flux2" else z
    x = vae.decode(z.unsqueeze(2)).sample[:, :, 0] if family == "qwen" else vae.decode(z).sample
    return (x.float() + 1) / 2

def pack(z):  # (B, C, H, W) -> (B, H/2 * W/2, 4C): FLUX.1 / Qwen-Image 2x2 tokens
    B, C, H, W = z.shape
    return z.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, H * W // 4, C * 4)

def unpack(x, H, W):
    B, N, D = x.shape
    return x.view(B, H // 2, W // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, D // 4, H, W)

def grid_ids(h, w, ndim, device):
    """Position ids (h*w, ndim) = (0, row, col[, 0]) for image tokens."""
    ii, jj = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    ids = torch.zeros(h * w, ndim, device=device)
    ids[:, 1], ids[:, 2] = ii.flatten(), jj.flatten()
    return ids

def velocity(family, dit, z, t, cond, guidance=3.5):
    """v(z_t, t) = eps - z_0 for z_t (B, C, H, W), t (B,) in [0, 1]. The DiT gets the timestep as
    its pipeline computes it from the scheduler's fp32 1000 t: FLUX.1, FLUX.2 and Qwen-Image round
    it to the latents' dtype and divide by 1000; Z-Image uses (1000 - 1000 t) / 1000, SD3 1000 t."""
    B, C, H, W = z.shape
    t1000 = (t.expand(B) if t.numel() == 1 else t).float() * 1000  # the scheduler's timesteps
    dt, emb, dev = dit.dtype, cond["embeds"].to(dit.dtype), z.device
    t = t1000.to(dt) / 1000  # FLUX.1, FLUX.2, Qwen-Image: rounded twice, as their pipelines
    g = torch.full((B,), guidance, device=dev) if getattr(dit.config, "guidance_embeds", False) else None
    if family == "flux1":
        out = dit(hidden_states=pack(z).to(dt), encoder_hidden_states=emb, pooled_projections=cond["pooled"].to(dt),
                  timestep=t, img_ids=grid_ids(H // 2, W // 2, 3, dev), txt_ids=torch.zeros(emb.shape[1], 3,
                  device=dev), guidance=g, return_dict=False)[0]
        return unpack(out.float(), H, W)
    if family == "flux2":
        txt_ids = torch.zeros(B, emb.shape[1], 4, device=dev)
        txt_ids[..., 3] = torch.arange(emb.shape[1], device=dev)
        out = dit(hidden_states=z.flatten(2).transpose(1, 2).to(dt), encoder_hidden_states=emb, timestep=t,
                  img_ids=grid_ids(H, W, 4, dev).expand(B, -1, -1), txt_ids=txt_ids, guidance=g, return_dict=False)[0]
        return out.float().transpose(1, 2).reshape(B, C, H, W)
    if family == "zimage":  # takes 1 - sigma, a list of (C, 1, H, W), and returns -v
        out = dit(list(z.to(dt).unsqueeze(2).unbind(0)), (1000 - t1000) / 1000, list(emb.unbind(0)),
                  return_dict=False)[0]
        return -torch.stack(out)[:, :, 0].float()
    if family == "sd3":  # takes sigma * 1000
        return dit(hidden_states=z.to(dt), encoder_hidden_states=emb, pooled_projections=cond["pooled"].to(dt),
                   timestep=t1000, return_dict=False)[0].float()
    out = dit(hidden_states=pack(z).to(dt), encoder_hidden_states=emb, encoder_hidden_states_mask=cond.get("mask"),
              timestep=t, img_shapes=[[(1, H // 2, W // 2)]] * B, return_dict=False)[0]  # qwen
    return unpack(out.float(), H, W)

def bc(t):
    """(B,) times -> (B, 1, 1, 1), to broadcast over (B, C, H, W) latents."""
    return t.view(-1, 1, 1, 1)

# ------------------------------------------------------------ prompts and LoRA
def expand_cond(cond, B):  # a batch-1 condition -> batch B (a view)
    return {k: v.expand(B, *v.shape[1:]) for k, v in cond.items()}

def tiny_cond(dit, family, length=8):
    """Fixed random prompt embeddings of the right shape, for bases without text encoders."""
    c, g = dit.config, torch.Generator().manual_seed(1234)
    width = c.cap_feat_dim if family == "zimage" else c.joint_attention_dim
    cond = {"embeds": torch.randn(1, length, width, generator=g)}
    if family in ("flux1", "sd3"):
        cond["pooled"] = torch.randn(1, c.pooled_projection_dim, generator=g)
    return cond | ({"mask": torch.ones(1, length, dtype=torch.long)} if family == "qwen" else {})

def prompt_cond(preset, prompt, cache_dir, device, path=None):
    """Encode a prompt once with the family's own text encoders, cache it, free the encoders."""
    from safetensors.torch import load_file, save_file
    family, key = PRESETS[preset].family, hashlib.sha1(f"{preset}|{path}|{prompt}".encode()).hexdigest()[:16]
    file = os.path.join(cache_dir, f"prompt-{family}-{key}.safetensors")
    if not os.path.exists(file):
        import diffusers
        pipe = getattr(diffusers, FAMILIES[family][2]).from_pretrained(
            local_copy(path or PRESETS[preset].hub), transformer=None, vae=None, torch_dtype=torch.bfloat16).to(device)
        with torch.no_grad():
            if family in ("flux1", "sd3"):
                out = (pipe.encode_prompt(prompt, prompt_2=None, device=device) if family == "flux1" else
                       pipe.encode_prompt(prompt, None, None, device=device, do_classifier_free_guidance=False))
                cond = {"embeds": out[0], "pooled": out[1 if family == "flux1" else 2]}
            elif family == "flux2":
                cond = {"embeds": pipe.encode_prompt(prompt, device=device)[0]}
            elif family == "zimage":  # a list of (L, D), unpadded
                e = pipe.encode_prompt(prompt, device=device, do_classifier_free_guidance=False)[0]
                cond = {"embeds": e[0][None]}
            else:
                e, m = pipe.encode_prompt(prompt, device=device)
                cond = {"embeds": e, "mask": m if m is not None else torch.ones(e.shape[:2], dtype=torch.long)}
        del pipe
        os.makedirs(cache_dir, exist_ok=True)
        save_file({k: v.float().cpu().contiguous() for k, v in cond.items()}, file + ".tmp")
        os.replace(file + ".tmp", file)
    return {k: v.to(device) for k, v in load_file(file).items()}

def fixed_prompt(cfg, dit, device, cache_dir, prompt=""):
    """One fixed prompt's condition (the papers': empty), encoded by rank 0, cached for the
    others; an all-ones mask is dropped, so attention runs unmasked (the fast kernels)."""
    if random_prompt(cfg):
        cond = tiny_cond(dit, PRESETS[cfg.model].family)
    else:
        cond = prompt_cond(cfg.model, prompt, cache_dir, device, cfg.model_path or None) if rank() == 0 else None
        if dist.is_initialized():
            dist.barrier()  # rank 0 has written the cache
        cond = cond or prompt_cond(cfg.model, prompt, cache_dir, device, cfg.model_path or None)
    return {k: v.to(device) for k, v in cond.items() if k != "mask" or not bool(v.bool().all())}

def add_lora(dit, train_base, rank, alpha, targets, init="gaussian"):
    """--train_base: `lora` a peft LoRA (fp32) on the frozen DiT, `full` all (fp32), `none`."""
    if train_base == "full":
        return dit.float().requires_grad_(True)
    dit.requires_grad_(False)
    if train_base == "lora":
        from peft import LoraConfig
        dit.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=init, target_modules=targets))
        for p in trainable(dit):
            p.data = p.data.float()
    return dit

def lora_state(dit):
    """LoRA weights in the diffusers format that `pipe.load_lora_weights` accepts."""
    from peft.utils import get_peft_model_state_dict
    return {"transformer." + k: v.detach().contiguous() for k, v in get_peft_model_state_dict(dit).items()}

def load_lora_state(dit, sd):  # the inverse of lora_state
    from peft.utils import set_peft_model_state_dict
    res = set_peft_model_state_dict(dit, {k.removeprefix("transformer."): v for k, v in sd.items()})
    if getattr(res, "unexpected_keys", None):
        raise KeyError(f"LoRA keys that match no module: {res.unexpected_keys[:5]}")

def trainable(*modules):  # the parameters that train
    return [p for m in modules for p in m.parameters() if p.requires_grad]

@contextlib.contextmanager
def frozen(module, eval_mode=False):
    """Inside, the module's trained parameters take no gradient (a loss through it reaches only its
    inputs) and, with eval_mode, it runs in eval mode; both are restored on exit."""
    params, mode = trainable(module), module.training
    for p in params:
        p.requires_grad_(False)
    if eval_mode:
        module.eval()
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
        if eval_mode:
            module.train(mode)

# every method's --zero_init: a zeroed output layer is learned back only by a full base
def check_zero_init(cfg):
    if cfg.zero_init and cfg.train_base != "full":
        raise SystemExit("--zero_init zeroes the base's output layer: it needs --train_base full")

# --zero_init: the DiT's output layer (Z-Image's: per patch size) zeroed, its velocity 0
def zero_output(dit):
    for layer in [dit.proj_out] if hasattr(dit, "proj_out") else [f.linear for f in dit.all_final_layer.values()]:
        for p in layer.parameters():
            torch.nn.init.zeros_(p)

# ------------------------------------------------------------ pretrained networks
# torchvision's ImageNet VGG16: LPIPS
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
# torchvision's ImageNet VGG19: StrSR's FDL
VGG19_URL = "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"

WEIGHT_EXTS = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")

@dataclasses.dataclass(frozen=True)
class Weights:
    """A pretrained network a real-preset run loads."""
    name: str
    source: str        # a hub repo id, a URL (torch hub's cache), a local path or "random"
    flag: str          # the flag that gives a local copy
    files: tuple = ()  # hub or folder: its files (and weights beside each config.json)
    fetch: tuple = ()  # hub: the patterns prefetch downloads (default: files)
    sample: bool = False  # the sampler loads it too (beside the base's transformer and VAE)

    def where(self):  # random, url, local or hub: a path never passes for a hub id ("org/name")
        s = self.source
        if s == "random" or s.startswith(("http://", "https://")):
            return "random" if s == "random" else "url"
        path = s.startswith(("/", ".", "~")) or s.count("/") != 1 or s.endswith(WEIGHT_EXTS) or os.path.exists(s)
        return "local" if path else "hub"

    def problem(self):
        """Why it cannot be loaded from disk as it is (None: it can); nothing is downloaded."""
        where = self.where()
        if where == "random":
            return "(a random network) stands in only on the tiny and mini presets"
        if where == "url" and not os.path.exists(hub_file(self.source)):
            return f"is not in torch hub's cache ({torch.hub.get_dir()})"
        if where == "url":
            return None
        path = os.path.expanduser(self.source) if where == "local" else hub_snapshot(self.source)
        if path is None:
            return "is not in the Hugging Face cache" + ("" if is_repo_id(self.source) else " (nor a valid hub id)")
        if not os.path.exists(path):
            return "does not exist"
        if os.path.isfile(path) or not self.files:
            return None if os.path.isfile(path) else "is a folder, not a weights file"
        lacking = [f for f in self.files if not os.path.exists(os.path.join(path, f))]
        lacking += [os.path.join(os.path.dirname(f), "weights") for f in self.files
                    if os.path.basename(f) == "config.json" and f not in lacking and not has_weights(path, f)]
        return f"lacks {', '.join(lacking)} (in {path})" if lacking else None

def hub_file(url):  # where torch hub keeps a URL's download
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))

def hub_snapshot(repo):
    """A hub repo's folder in the Hugging Face cache, found without the network; None if absent."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    try:
        return snapshot_download(repo, local_files_only=True)
    except (HFValidationError, LocalEntryNotFoundError):
        return None

def is_repo_id(s):
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id
    try:
        validate_repo_id(s)
        return True
    except HFValidationError:
        return False

def has_weights(root, config):
    """The folder of `config` (under root) holds a weights file, or every shard its index names."""
    folder = os.path.join(root, os.path.dirname(config))
    indexes = glob.glob(os.path.join(folder, "*.index.json"))
    if indexes:
        shards = [set((read_json(i) or {}).get("weight_map", {}).values()) for i in indexes]
        return any(s and all(os.path.exists(os.path.join(folder, f)) for f in s) for s in shards)
    return any(f.endswith(WEIGHT_EXTS) and os.path.exists(os.path.join(folder, f)) for f in os.listdir(folder))

def base_weights(cfg, text=False):
    """cfg.model's pipeline (hub or --model_path): transformer, VAE, with `text` text encoders."""
    n = {"flux1": 2, "flux2": 1, "zimage": 1, "sd3": 3, "qwen": 1}[PRESETS[cfg.model].family] if text else 0
    parts = ["transformer", "vae"] + ["text_encoder" + s for s in ("", "_2", "_3")[:n]]
    return Weights(f"{cfg.model} ({', '.join(parts)})", cfg.model_path or PRESETS[cfg.model].hub or cfg.model,
                   "model_path", ("model_index.json",) + tuple(f"{p}/config.json" for p in parts),
                   ("model_index.json", "scheduler/*", *(p + "/*" for p in parts)) + (("tokenizer*/*",) if n else ()))

def lpips_weights(cfg):
    return Weights("VGG16 of LPIPS", cfg.lpips_weights or VGG16_URL, "lpips_weights")

def check_weights(cfg, needs):
    """A real preset's networks must all be on disk before anything is built: else exit, listing
    each missing one, why, and how to fetch it (never a download, never a random stand-in)."""
    checked = [(w, w.problem()) for w in needs] if PRESETS[cfg.model].hub else []
    missing = [(w, why) for w, why in checked if why]
    if missing:
        method = os.path.splitext(os.path.basename(sys.modules[type(cfg).__module__].__file__))[0]
        raise SystemExit("missing pretrained weights (nothing was built or downloaded):\n" + "".join(
            f"  - {w.name}: {w.source} {why}; or give a local copy: --{w.flag} PATH\n" for w, why in missing)
            + "fetch them on a machine with internet (the same HF_HOME and TORCH_HOME), then train with "
            f"HF_HUB_OFFLINE=1:\n  python common.py prefetch --method {method} --model {cfg.model}")

def size_text(n):  # bytes, in the unit that shows them
    return next(f"{n / 10**e:.2f} {u}" for e, u in ((9, "GB"), (6, "MB"), (3, "kB"), (0, "B")) if n >= 10**e or not e)

def disk_size(path, patterns=()):
    """Bytes on disk of a file, or of a folder's files matching `patterns`; a blob counted once."""
    import fnmatch
    if os.path.isfile(path):
        return os.path.getsize(path)
    files = {os.path.realpath(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs
             if not patterns or any(fnmatch.fnmatch(os.path.relpath(os.path.join(d, f), path), p) for p in patterns)}
    return sum(os.path.getsize(f) for f in files if os.path.exists(f))

def prefetch(needs):
    """Download `needs` into the standard caches, printing each one's size on disk; returns the
    failures, each reason whole (wrapped)."""
    import textwrap
    from huggingface_hub import snapshot_download
    failed = []
    for w in needs:
        try:
            if w.where() == "url" and not os.path.exists(hub_file(w.source)):
                os.makedirs(os.path.dirname(hub_file(w.source)), exist_ok=True)
                torch.hub.download_url_to_file(w.source, hub_file(w.source))
            path = {"local": w.source, "url": hub_file(w.source)}.get(w.where()) or snapshot_download(
                w.source, allow_patterns=list(w.fetch or w.files))
            print(f"{w.name}: {w.source} ({size_text(disk_size(path, w.fetch or w.files))} in {path})")
        except Exception as e:
            why = " ".join(f"{w.name}: {w.source}: {type(e).__name__}: {e}".split())
            failed.append(textwrap.fill(why, 116, subsequent_indent="    "))
            print("failed: " + failed[-1])
    return failed

def load_lpips(device, weights="random"):
    """VGG LPIPS on [0, 1] images: lpips' heads on torchvision's VGG16 from `weights` (a file;
    "": torch hub's cache) or "random", a VGG16 from seed 0 (tiny and mini presets, LPIPS-rand)."""
    import lpips
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        net = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    if weights != "random":  # torchvision's features.<i> are the slices' <i>
        sd = torch.load(weights or hub_file(VGG16_URL), map_location="cpu", weights_only=True)
        net.net.load_state_dict({k: sd["features." + k.split(".", 1)[1]] for k in net.net.state_dict()})
    net = net.to(device).eval().requires_grad_(False)
    return lambda x, y: net(x * 2 - 1, y * 2 - 1, normalize=False).mean()

# ------------------------------------------------------------ data
IMG_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
NAMED_DATASETS = ("LSDIR", "FFHQ", "Aesthetic-4K", "DIV2K")  # folders under --data_root
# real photos shipped inside the scikit-image wheel (offline); astronaut is held out for eval
SAMPLE_PHOTOS = ["coffee", "chelsea", "rocket", "hubble_deep_field", "retina", "immunohistochemistry", "camera",
                 "coins", "brick", "grass", "gravel", "moon", "text", "stereo_motorcycle"]
SAMPLE_HELDOUT = ["astronaut"]

def to_rgb(img):
    """A PIL image of any mode (gray, RGBA over white, palette, 16-bit) -> (3, H, W) in [0, 1]."""
    if img.mode.startswith("I"):
        a = np.asarray(img, dtype=np.float32)
        a = np.clip(a / (255.0 if img.mode == "I" and a.max() <= 255 else 65535.0), 0, 1)
        return torch.from_numpy(a).expand(3, -1, -1).clone()
    if img.mode in ("RGBA", "LA", "P", "PA"):
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1).contiguous()

def load_image(path):
    with Image.open(path) as img:
        return to_rgb(img)

def save_image(x, path):
    """(3, H, W) or (1, 3, H, W) in [0, 1] -> an 8-bit file."""
    x = x.detach().float().squeeze(0).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(x).save(path)

def read_json(path):
    """A JSON file's content, or None where it is missing or damaged."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

def sample_photos(names=SAMPLE_PHOTOS):
    import skimage.data
    photos = [getattr(skimage.data, n)() for n in names]
    # stereo: the left view
    return [to_rgb(Image.fromarray(a[0] if isinstance(a, tuple) else a)) for a in photos]

def random_crop(x, crop, seed):
    """A crop x crop window of x (3, H, W), mirrored half the time: a pure function of `seed`."""
    g = torch.Generator().manual_seed(seed)
    top, left = (int(torch.randint(0, n - crop + 1, (1,), generator=g)) for n in x.shape[1:])
    x = x[:, top:top + crop, left:left + crop]
    return x.flip(-1) if torch.rand(1, generator=g) < 0.5 else x

def list_images(src, data_root="data"):
    """`src`: a folder (searched recursively), a text file of paths, an image, or a dataset name."""
    src = os.path.join(data_root, src) if src in NAMED_DATASETS else src
    if not os.path.exists(src):
        raise SystemExit(f"--data {src!r} not found: a folder, a file list, an image or a dataset downloaded to "
                         f"--data_root (README, data and benchmarks)")
    if os.path.isdir(src):
        files = sorted(p for p in glob.glob(os.path.join(src, "**", "*"), recursive=True)
                       if p.lower().endswith(IMG_EXTS))
    else:
        files = [src] if src.lower().endswith(IMG_EXTS) else [l.strip() for l in open(src) if l.strip()]
    if not files:
        raise SystemExit(f"--data {src!r}: no images ({', '.join(IMG_EXTS)}) found")
    return files

# ------------------------------------------------------------ training
def rank():  # this process's rank, 0 without torchrun
    return dist.get_rank() if dist.is_initialized() else 0

def compute_init(seed=0):
    """(rank, world, device); RANK in the environment means torchrun."""
    ddp, cuda = "RANK" in os.environ, torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if ddp and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    # the loops seed each micro-batch's draws (micro_batch_seed); this, the rest (model init)
    torch.manual_seed(seed)
    return (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), device) if ddp else (0, 1, device)

def setup(cfg, needs=()):
    """A run's start: `needs` checked, distributed init, the mini base prepared, the rank-0 logger,
    whose first line is the config. Returns (rank, world, device, log)."""
    check_weights(cfg, needs)
    r, world, device = compute_init(cfg.seed)
    prepare_base(cfg.model)
    log = Logger(cfg.out_dir, r == 0, device)
    log(json.dumps(dataclasses.asdict(cfg)))
    stand_ins = [w.name for w in needs if w.flag != "model_path"]
    if PRESETS[cfg.model].hub is None and stand_ins:
        log(f"{cfg.model}: random stand-ins, nothing downloaded, for {', '.join(stand_ins)}")
    return r, world, device, log

def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()

def lr_factor(step, max_steps, decay):
    """The lr multiplier at step 1..max_steps: 1, then a half cosine to 0 over the last `decay`."""
    if not 0 <= decay <= 1:
        raise SystemExit(f"--lr_decay {decay}: expected a fraction of the steps, 0 to 1")
    start = (1 - decay) * max_steps
    return 1.0 if decay == 0 or step <= start else 0.5 * (1 + math.cos(math.pi * (step - start) / (max_steps - start)))

def set_lr(optimizers, step, max_steps, decay):
    """Each group's lr: its base lr (kept in `initial_lr`, saved with the optimizer) * lr_factor."""
    for group in (g for opt in optimizers for g in opt.param_groups):
        group["lr"] = group.setdefault("initial_lr", group["lr"]) * lr_factor(step, max_steps, decay)

def optimizer_step(optimizers, clip):
    """One update: gradients averaged over ranks (one all-reduce, not DDP: the methods call a model
    several times per step, in different roles), clipped per optimizer, stepped, cleared. Returns
    each optimizer's gradient norm before clipping."""
    groups = [[p for g in opt.param_groups for p in g["params"]] for opt in optimizers]
    grads = [p.grad for group in groups for p in group if p.grad is not None and type(p.grad) is torch.Tensor]
    # FSDP reduces its own (sharded) gradients
    if dist.is_initialized() and dist.get_world_size() > 1 and grads:
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        for g, f in zip(grads, torch.split(flat / dist.get_world_size(), [g.numel() for g in grads])):
            g.copy_(f.view_as(g))
    norms = []  # each optimizer's gradient norm before clipping, for the log
    for group, opt in zip(groups, optimizers):
        norms.append(torch.nn.utils.clip_grad_norm_(group, clip))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return norms

def shard_fsdp2(dit, log):
    """FSDP2 for bases too big for one GPU: each block, then the root, sharded over the ranks; the
    LoRA stays whole on each rank, so optimizer states and checkpoints are an unsharded run's."""
    from torch.distributed.fsdp import fully_shard
    if not dist.is_initialized():
        log("--fsdp: one process, nothing to shard over")
        return dit
    keep = set(trainable(dit))
    blocks = [b for n in ("transformer_blocks", "single_transformer_blocks", "layers") for b in getattr(dit, n, [])]
    for block in blocks:
        fully_shard(block, ignored_params=keep)
    log(f"FSDP2: {len(blocks)} blocks and the root sharded over {dist.get_world_size()} ranks")
    return fully_shard(dit, ignored_params=keep)

def autocast(device):
    """bf16 autocast on GPU; full precision on CPU (bf16 matmuls are slow there)."""
    return torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

def checkpointing(cfg, device, *modules):
    """--grad_ckpt: gradient checkpointing of these modules on GPU (memory is no limit on CPU)."""
    for m in modules if cfg.grad_ckpt and device.type == "cuda" else ():
        m.enable_gradient_checkpointing()

def micro_batch_seed(seed, step, position):
    """A micro-batch's seed from its place in the run: a resume, any number of ranks or accumulation
    steps draw the same numbers, and checkpoints need no RNG state."""
    return ((seed * 1_000_003 + step) * 1_000_003 + position) % 2**62

# an interval's work (grid, checkpoint) at this step: every `every` steps and at the end
def due(step, every, end):
    return step % every == 0 or step == end

class EMA:
    """--ema_decay d: after each update w_ema = d w_ema + (1 - d) w, in fp32, for each trained
    weight but the discriminator's (it never samples). Saved as ema.safetensors."""

    def __init__(self, models, decay):
        self.decay = decay
        self.params = {f"{name}.{k}": p for name, m in models.items() if name != "disc"
                       for k, p in m.named_parameters() if p.requires_grad}
        self.shadow = {k: p.detach().float().clone() for k, p in self.params.items()}

    @torch.no_grad()
    def update(self):
        for k, p in self.params.items():
            self.shadow[k].lerp_(p.detach().float(), 1 - self.decay)

    def state_dict(self):
        return {k: v.contiguous() for k, v in self.shadow.items()}

    def load_state_dict(self, sd):
        if missing := self.shadow.keys() - sd.keys():
            raise KeyError(f"ema.safetensors lacks {sorted(missing)[:5]}: trained with other models or --train_base?")
        for k, v in self.shadow.items():
            v.copy_(sd[k])

def start_ema(cfg, models):
    """The run's EMA (None for --ema_decay 0): the latest checkpoint's, else the weights now."""
    if not 0 <= cfg.ema_decay <= 1:
        raise SystemExit(f"--ema_decay {cfg.ema_decay}: expected 0 (off) to 1")
    if not cfg.ema_decay:
        return None
    from safetensors.torch import load_file
    ema, ckpt = EMA(models, cfg.ema_decay), latest_checkpoint(cfg.out_dir)
    file = os.path.join(ckpt, "ema.safetensors") if ckpt else ""
    if os.path.exists(file):
        ema.load_state_dict(load_file(file))
    return ema

def validate(cfg, step, models, saved, ema, val, log):
    """--val_every: the trained weights (and EMA) saved to out_dir/val; then rank 0's `val(ckpt)`
    (the method's sampler on the validation images) gives ({metric: score}, {metric: bicubic's})."""
    t0 = time.time()
    ckpt = save_checkpoint(os.path.join(cfg.out_dir, "val"), step, cfg, models, {}, saved, keep=1, ema=ema)
    if val:
        scores, bicubic = val(ckpt)
        log(f"val step {step} | " + " ".join(f"{k} {v:.4g}" for k, v in scores.items()) + " | bicubic: " +
            " ".join(f"{k} {v:.4g}" for k, v in bicubic.items()) + f" | {time.time() - t0:.1f} s")
        log.scalars(step, {f"val/{k}": v for k, v in scores.items()})
        log.scalars(step, {f"val/bicubic_{k}": v for k, v in bicubic.items()})
        plot_curves(cfg.out_dir)
    log.t0 += time.time() - t0  # not a training step's time

# ------------------------------------------------------------ checkpoints
def _lora_file(name):  # the dit's LoRA under the name pipe.load_lora_weights looks for
    return "pytorch_lora_weights.safetensors" if name == "dit" else f"{name}_lora.safetensors"

def save_checkpoint(out_dir, step, config, models, optimizers, extra=None, keep=2, ema=None):
    """What each model learns (trained weights and buffers; LoRA in the diffusers format), the EMA,
    optimizers and config, in a temp folder renamed when complete; only the last `keep` stay.
    Every rank calls, rank 0 writes."""
    from safetensors.torch import save_file
    final, tmp = os.path.join(out_dir, f"ckpt-{step:07d}"), os.path.join(out_dir, f".tmp-ckpt-{step:07d}")
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for name, m in models.items():
            # with its rank and alpha where pipe.load_lora_weights reads them
            if getattr(m, "peft_config", None):
                meta = {f"transformer.{k}": v for k, v in m.peft_config["default"].to_dict().items()}
                save_file(lora_state(m), os.path.join(tmp, _lora_file(name)),
                          metadata={"lora_adapter_metadata": json.dumps(meta, default=list)})
            frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
            sd = {k: v.detach().contiguous() for k, v in m.state_dict().items() if k not in frozen and "lora_" not in k}
            if sd:
                save_file(sd, os.path.join(tmp, f"{name}.safetensors"))
        if ema:
            save_file(ema.state_dict(), os.path.join(tmp, "ema.safetensors"))
        torch.save({"step": step, "optimizers": {k: o.state_dict() for k, o in optimizers.items()}, **(extra or {})},
                   os.path.join(tmp, "state.pt"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config, f, indent=1)
        os.replace(tmp, final)
        for old in sorted(glob.glob(os.path.join(out_dir, "ckpt-*")))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return final

def latest_checkpoint(path):
    """`path` if it is a checkpoint, else the latest ckpt-* in it, else None."""
    if not path:
        return None
    if os.path.exists(os.path.join(path, "state.pt")):
        return path
    found = sorted(glob.glob(os.path.join(path, "ckpt-*")))
    return found[-1] if found else None

def load_checkpoint(ckpt, models, optimizers=None, ema=False):
    """Load what save_checkpoint wrote and return its state (safetensors, weights_only: never code
    execution). ema: the trained weights replaced by their EMA where saved (the samplers' --ema)."""
    from safetensors.torch import load_file

    def load_into(m, name, sd, file):  # what a model learns; a key it lacks means another model
        if unexpected := m.load_state_dict(sd, strict=False).unexpected_keys:
            raise KeyError(f"{file}: keys that match nothing in {name}: {unexpected[:5]}")
    ema_file = os.path.join(ckpt, "ema.safetensors")
    averages = load_file(ema_file) if ema and os.path.exists(ema_file) else {}  # read once, for every model
    for name, m in models.items():
        if os.path.exists(os.path.join(ckpt, _lora_file(name))):
            load_lora_state(m, load_file(os.path.join(ckpt, _lora_file(name))))
        file = os.path.join(ckpt, f"{name}.safetensors")
        if os.path.exists(file):
            load_into(m, name, load_file(file), file)
        if averages:
            load_into(m, name, {k[len(name) + 1:]: v for k, v in averages.items() if k.startswith(name + ".")},
                      ema_file)
    state = torch.load(os.path.join(ckpt, "state.pt"), weights_only=True)
    for k, o in (optimizers or {}).items():
        o.load_state_dict(state["optimizers"][k])
    return state

def resume(out_dir, models, optimizers, log):
    """(step, state) of out_dir's latest checkpoint loaded into models and optimizers; else (0, {})."""
    if not (ckpt := latest_checkpoint(out_dir)):
        return 0, {}
    state = load_checkpoint(ckpt, models, optimizers)
    log(f"resumed from {ckpt} at step {state['step']}")
    return state["step"], state

RENAMED = {"lr_g": "lr", "lam": "w_tv_lpips", "gamma": "tv_gamma", "mu": "w_adl", "lambda_cons": "w_cons",
           "lambda_data": "w_data", "lambda_lpips": "w_lpips", "lambda_adv": "w_adv", "lambda_rect": "w_rect"}

def load_config(ckpt):
    """A checkpoint's config.json as a dict, older flags translated to today's."""
    with open(os.path.join(ckpt, "config.json")) as f:
        c = {RENAMED.get(k, k): v for k, v in json.load(f).items()}
    if "stage" in c:  # older runs saved it as a number
        c["stage"] = str(c["stage"])
    if "train_base" in c:
        return c
    # older flags: SMFSR --base_rank (-1 none, 0 full, r LoRA), TEASR --train_noise, --lora_rank 0
    rank, noise = c.pop("base_rank", None), c.pop("train_noise", None)
    if rank is not None:
        c["train_base"] = {-1: "none", 0: "full"}.get(rank, "lora")
        if rank > 0:
            c["lora_rank"] = rank
    elif noise is not None:
        c["train_base"] = "full" if noise else "none"
    else:
        c["train_base"] = "full" if c.get("lora_rank") == 0 else "lora"
    return c

def checkpoint_config(ckpt, cls):
    """(folder, config as `cls`) of ckpt's latest checkpoint, without fields `cls` no longer has."""
    if not (found := latest_checkpoint(ckpt)):
        raise SystemExit(f"--ckpt {ckpt!r}: no checkpoint (a ckpt-* folder or an out_dir holding them)")
    names = {f.name for f in dataclasses.fields(cls)}
    return found, cls(**{k: v for k, v in load_config(found).items() if k in names})

# ------------------------------------------------------------ sampling
@dataclasses.dataclass
class SampleFlags:
    """The sampling flags every method's Config inherits, applied alike by finish_sampler."""
    color_fix: str = "none"       # paper: none; ours: wavelet (the bicubic LR's low band) or adain (its mean and std)
    scale: float = 4.0            # ours: output side / input side, any S >= 1 (the x4 model's output resized)
    dtype: str = ""               # ours: sampling precision bf16 | fp16 | fp32; "": bf16 on GPU, fp32 on CPU
    fuse_lora: bool = False       # ours: the LoRA merged into the base before sampling (peft's merge)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

def sampler_setup(flags, resolve, pretrained, device=None, own=()):
    """A sampler's (checkpoint, its training config with the sampling flags of `flags`, device,
    dtype); the base and the method's `pretrained` networks marked `sample` checked before anything
    is built. own: the method's own sampling flags."""
    path, cfg = checkpoint_config(flags.ckpt or flags.out_dir, type(flags))
    given = {k: getattr(flags, k) for k in ("steps", "seed", "ema", *own)}
    given.update({k: getattr(flags, k) for k in ("tile", "overlap") if getattr(flags, k)})
    given.update({f.name: getattr(flags, f.name) for f in dataclasses.fields(SampleFlags)})
    cfg = resolve(dataclasses.replace(cfg, **given))
    check_choices(cfg, color_fix=("none", "wavelet", "adain"), dtype=("", *DTYPES))
    if not cfg.scale >= 1:
        raise SystemExit(f"--scale {cfg.scale}: expected S >= 1 (the output is round(S x input) on each side)")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    check_weights(cfg, [base_weights(cfg)] + [w for w in pretrained(cfg) if w.sample])
    return path, cfg, device, DTYPES[cfg.dtype] if cfg.dtype else weight_dtype(device)

def sampling_weights(cfg, dtype, dit):
    """--fuse_lora, then --dtype, on a sampler's DiT: the LoRA merged into the base; a given dtype
    casts every weight, trained fp32 ones too (without it, the LoRA runs fp32 under autocast)."""
    if cfg.fuse_lora and getattr(dit, "peft_config", None):
        dit.fuse_lora()
        dit.unload_lora()
    if cfg.dtype:
        torch.nn.Module.to(dit, dtype)  # not diffusers' .to, which warns at every cast
    return dit

def pad_to_multiple(x, m=PIXEL_MULTIPLE):
    """Reflect-pad right/bottom to a multiple of m; returns (padded, (H, W)) to crop back."""
    (H, W), (ph, pw) = x.shape[-2:], (-x.shape[-2] % m, -x.shape[-1] % m)
    # reflect needs the pad smaller than the image
    mode = "reflect" if ph < H and pw < W else "replicate"
    return (F.pad(x, (0, pw, 0, ph), mode=mode) if ph or pw else x), (H, W)

def _ramp(n, overlap, rise, fall, device):  # a tile's blending weights along one axis
    w, r = torch.ones(n, device=device), torch.linspace(0, 1, overlap, device=device)
    if rise:  # up from the previous tile
        w[:overlap] = r
    if fall:  # down into the next
        w[n - overlap:] = torch.minimum(w[n - overlap:], r.flip(0))
    return w

def tiled(fn, z, tile, overlap):
    """fn (latent -> latent) over overlapping tiles of z (B, C, H, W), blended by linear ramps that
    reach 0 at a tile's inner edges: memory bounded by the tile, exact for a receptive radius of 1
    (a 3x3 conv), an approximation for a DiT."""
    B, C, H, W = z.shape
    if H <= tile and W <= tile:
        return fn(z)
    assert 2 <= overlap <= tile // 2, "tiling needs 2 <= overlap <= tile / 2"
    starts = lambda n: [0] if n <= tile else sorted(set(range(0, n - tile, tile - overlap)) | {n - tile})
    out, wsum, th, tw = 0, 0, min(tile, H), min(tile, W)
    for top, left in [(top, left) for top in starts(H) for left in starts(W)]:
        w = _ramp(th, overlap, top > 0, top + th < H, z.device)[:, None] * _ramp(tw, overlap, left > 0, left + tw < W,
                                                                                  z.device)[None]
        # the tile's values in the whole frame
        place = lambda x: F.pad(x, (left, W - left - tw, top, H - top - th))
        out, wsum = out + place(fn(z[:, :, top:top + th, left:left + tw]) * w), wsum + place(w)
    return out / wsum

def tiled_pair(fn, z, z_lr, tile, overlap):
    """tiled() for fn(z, z_lr) of two aligned latents: each tile sees its slice of both."""
    C = z.shape[1]
    return tiled(lambda zz: fn(zz[:, :C], zz[:, C:]), torch.cat([z, z_lr], 1), tile, overlap)

def upsample_lr(x_lr, scale=4):
    """The papers' LR input: bicubic upsampling to the HR size."""
    return F.interpolate(x_lr, scale_factor=scale, mode="bicubic", align_corners=False).clamp(0, 1)

def resize(x, size):
    """Bicubic to size (H, W), antialiased when it shrinks."""
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=shrink)

@torch.no_grad()
def super_resolve(vae, family, x_lr, latent_fn, generator=None):
    """Every sampler's frame: x_lr (1, 3, h, w) -> bicubic x4, padded, encoded (the mode, or a draw
    from `generator`) -> latent_fn(z_lr) = z0_hat -> decoded, cropped to (1, 3, 4h, 4w); under
    autocast to the VAE's dtype unless fp32."""
    p = next(vae.parameters())
    x, (H, W) = pad_to_multiple(upsample_lr(x_lr.to(p.device).float()))
    with torch.autocast(p.device.type, p.dtype, enabled=p.dtype != torch.float32):
        z0_hat = latent_fn(encode(vae, family, x, generator is not None, generator))
        return decode(vae, family, z0_hat)[..., :H, :W].clamp(0, 1).float().cpu()

# the [1, 2, 1] / 4 binomial in both axes, taps d apart (a trous), reflected at the borders
def _blur(x, d):
    k = x.new_tensor([1.0, 2.0, 1.0]) / 4
    k = (k[:, None] * k[None]).expand(x.shape[1], 1, 3, 3)
    # reflect needs the pad smaller than the image
    mode = "reflect" if d < min(x.shape[-2:]) else "replicate"
    return F.conv2d(F.pad(x, (d, d, d, d), mode=mode), k, dilation=d, groups=x.shape[1])

def wavelet_low(x, levels=5):
    """The low band of an a trous wavelet decomposition: `levels` binomial blurs, taps 1, 2, 4, ...
    apart. A checkerboard's low band is 0, a constant's is itself."""
    for i in range(levels):
        x = _blur(x, 2**i)
    return x

def color_fix(x_sr, x_ref, how):
    """--color_fix: `wavelet` x_sr's high band + x_ref's low band; `adain` x_sr given x_ref's
    per-channel mean and std; `none` x_sr. x_ref: the bicubic LR at x_sr's size. Not clamped."""
    if how == "wavelet":
        return x_sr - wavelet_low(x_sr) + wavelet_low(x_ref)
    if how == "adain":
        mu, sd = x_sr.mean((-2, -1), keepdim=True), x_sr.std((-2, -1), keepdim=True)
        return (x_sr - mu) / sd.clamp_min(1e-6) * x_ref.std((-2, -1), keepdim=True) + x_ref.mean((-2, -1), True)
    return x_sr

def finish_sampler(sr, cfg):
    """A method's x4 sampler with --scale and --color_fix: its output resized to round(scale * h) x
    round(scale * w), colour-fixed against the bicubic LR at that size, clamped to [0, 1]."""
    @functools.wraps(sr)  # keeps what the method hangs on it (StrSR's .cond)
    def fn(x_lr):
        # halves up
        size = (int(cfg.scale * x_lr.shape[-2] + 0.5), int(cfg.scale * x_lr.shape[-1] + 0.5))
        x_sr = sr(x_lr)
        if x_sr.shape[-2:] != size:
            x_sr = resize(x_sr, size)
        if cfg.color_fix == "none":
            return x_sr.clamp(0, 1)
        return color_fix(x_sr, resize(x_lr.float(), size).clamp(0, 1), cfg.color_fix).clamp(0, 1)
    return fn

def sample_files(sr_fn, inp, output):
    """--sample: sr_fn (x_lr (1, 3, h, w) -> its output) over an image or a folder, to PNGs."""
    from tqdm import tqdm
    if not inp or not os.path.exists(inp):
        raise SystemExit(f"--sample needs --input: an LR image or a folder of them (got {inp!r})")
    files = list_images(inp) if os.path.isdir(inp) else [inp]
    for f in tqdm(files, desc="sr", disable=len(files) < 2):
        with torch.no_grad():
            y = sr_fn(load_image(f)[None])
        save_image(y, os.path.join(output, os.path.splitext(os.path.basename(f))[0] + ".png"))
    print(f"{len(files)} images -> {output}")
    return len(files)

# ------------------------------------------------------------ configuration and logging
def configure(cls, **given):
    """A Config: the defaults (the paper's), then a tiny / mini preset's TINY / MINI values (a dict:
    per --stage), then `given`: a flag the user sets always wins."""
    cfg = cls(**given)
    p = PRESETS[resolve_preset(cfg.model, cls.model)]
    small = {}
    if p.pretrain:
        small = getattr(sys.modules[cls.__module__], "MINI", {})
    elif p.hub is None:
        small = getattr(sys.modules[cls.__module__], "TINY", {})
    for k, v in small.items():
        if k not in given and (not isinstance(v, dict) or cfg.stage in v):
            setattr(cfg, k, v[cfg.stage] if isinstance(v, dict) else v)
    return cfg

def check_choices(cfg, **allowed):
    """A clear error for a flag outside its choices: check_choices(cfg, stage=("1", "2"))."""
    for flag, choices in allowed.items():
        if getattr(cfg, flag) not in choices:
            raise SystemExit(f"--{flag} {getattr(cfg, flag)}: expected one of {', '.join(map(str, choices))}")

def _comments(cls):
    """{field: the source comment on its line} of a Config dataclass."""
    import inspect
    # SampleFlags' too
    src = "".join(inspect.getsource(c) for c in cls.__mro__ if dataclasses.is_dataclass(c))
    return dict(re.findall(r"^\s+(\w+):[^=\n]+=[^#\n]*#\s*(.*)$", src, re.M))

def parse_config(cls, argv=None):
    """The command line: flags are the Config's fields (`--lr 1e-5`, `--fsdp true`)."""
    import argparse
    mod, notes, argv = sys.modules[cls.__module__], _comments(cls), sys.argv[1:] if argv is None else argv
    # flags this method deliberately lacks
    for flag, why in getattr(mod, "UNSUPPORTED", {}).items():
        if f"--{flag}" in argv:
            raise SystemExit(f"--{flag}: {os.path.basename(mod.__file__)} does not support it: {why}")
    p = argparse.ArgumentParser(description=(mod.__doc__ or "").strip().split("\n")[0],
                                usage=f"python {os.path.basename(mod.__file__)} [--flag value ...]",
                                argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(cls):
        kw = dict(type=lambda s: s.lower() in ("1", "true", "yes"), nargs="?", const=True) if f.type is bool else \
            dict(type=f.type)
        p.add_argument(f"--{f.name}", metavar=f.type.__name__, help=f"{notes.get(f.name, '')} (default: {f.default})"
                       .replace("%", "%%"), **kw)
    return configure(cls, **vars(p.parse_args(argv)))

class Logger:
    """Rank-0 lines to the console and out_dir/log.txt; scalars and images to TensorBoard in
    out_dir/tb, opened on first use."""

    def __init__(self, out_dir, master, device=torch.device("cpu")):
        self.master, self.file, self.device = master, os.path.join(out_dir, "log.txt"), device
        self.t0, self.steps, self.tb, self.board = 0, 0, os.path.join(out_dir, "tb"), None
        os.makedirs(out_dir, exist_ok=True)

    def __call__(self, msg):
        if self.master:
            print(msg, flush=True)
            with open(self.file, "a") as f:
                f.write(msg + "\n")

    def start_clock(self):  # the first interval's ms/step counts from here
        self.t0, self.steps = time.time(), 0

    def writer(self):
        if self.board is None:
            from torch.utils.tensorboard import SummaryWriter
            self.board = SummaryWriter(self.tb)
        return self.board

    def scalars(self, step, values):
        if self.master:
            for k, v in values.items():
                self.writer().add_scalar(k, v, step)
            self.board.flush()

    def image(self, tag, x, step):  # x (3, H, W) in [0, 1]
        if self.master:
            self.writer().add_image(tag, x.clamp(0, 1), step)
            self.board.flush()

    def step(self, step, max_steps, losses, every, optimizers=None, norms=()):
        """Every rank, after each update; each `every` steps a line: losses averaged over ranks, ms
        per step, peak memory; TensorBoard also gets each optimizer's lr and gradient norm."""
        self.t0, self.steps = self.t0 or time.time(), self.steps + 1
        if step % every and step != max_steps:
            return
        t = torch.tensor([float(v) for v in losses.values()], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(t)
            t /= dist.get_world_size()
        values = t.tolist()
        ms, self.t0, self.steps = 1000 * (time.time() - self.t0) / self.steps, time.time(), 0
        terms = " ".join(f"{k} {v:.4g}" for k, v in list(zip(losses, values))[1:])
        mem = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else peak_rss_gb()
        self(f"step {step}/{max_steps} | {next(iter(losses))} {values[0]:.4g} ({terms}) | {ms:.0f} ms/step | "
             f"mem {mem:.2f} GB")
        board = {f"loss/{k}": v for k, v in zip(losses, values)} | {"time/s_per_step": ms / 1000, "memory/peak_GB": mem}
        for (name, opt), norm in zip((optimizers or {}).items(), norms):
            board |= {f"lr/{name}": opt.param_groups[0]["lr"], f"grad_norm/{name}": float(norm)}
        self.scalars(step, board)

def peak_rss_gb():  # this process's peak resident memory
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

def save_grid(out_dir, step, x_lr, out, x_hr):
    """out_dir/grids/step-<step>.png, a row per image (at most 4): LR upsampled | output | HR."""
    import torchvision
    path = os.path.join(out_dir, "grids", f"step-{step:07d}.png")
    up = F.interpolate(x_lr[:4].float(), size=out.shape[-2:], mode="bicubic", align_corners=False)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    grid = torchvision.utils.make_grid(torch.cat([up, out[:4].detach().float(), x_hr[:4].float()], -1).clamp(0, 1),
                                       nrow=1, padding=2)
    torchvision.utils.save_image(grid, path)
    return grid.cpu()

def read_log(out_dir):
    """(losses, val, bicubic) from out_dir/log.txt: {term: {step: value}}, {metric: {step: value}}
    and bicubic's {metric: value}; a step logged twice (a resumed run) keeps its last value."""
    losses, val, bicubic = {}, {}, {}
    pairs = lambda text: zip(text.split()[::2], map(float, text.split()[1::2]))
    for line in open(os.path.join(out_dir, "log.txt")):
        if m := re.match(r"step (\d+)/\d+ \| (\S+ \S+) \((.*)\) \|", line):
            for k, v in pairs(m[2] + " " + m[3]):
                losses.setdefault(k, {})[int(m[1])] = v
        elif m := re.match(r"val step (\d+) \| (.*) \| bicubic: (.*) \|", line):
            for k, v in pairs(m[2]):
                val.setdefault(k, {})[int(m[1])] = v
            bicubic.update(pairs(m[3]))
    return losses, val, bicubic

def smooth(values, weight=0.9):
    """TensorBoard's smoothing: an exponential moving average, debiased at the start."""
    out, avg = [], 0.0
    for i, v in enumerate(values):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** (i + 1)))
    return out

def plot_curves(out_dir):
    """out_dir/curves.png: each loss term (raw, faint, and smoothed) and each validation score, with
    bicubic's dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    losses, val, bicubic = read_log(out_dir)
    if not losses:
        return None
    pad = [None] * (-len(losses) % 4)  # the scores start a row of their own
    panels = [("loss", k, v) for k, v in losses.items()] + pad + [("val", k, v) for k, v in val.items()]
    rows = math.ceil(len(panels) / 4)
    fig, axes = plt.subplots(rows, 4, figsize=(12.8, 2.4 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels + [None] * (axes.size - len(panels))):
        if panel is None:
            ax.axis("off")
            continue
        kind, name, series = panel
        x = sorted(series)
        y = [series[i] for i in x]
        if kind == "loss":
            ax.plot(x, y, color="C0", alpha=0.25, lw=0.8)
            ax.plot(x, smooth(y), color="C0", lw=1.5)
            ax.set_yscale("log" if min(y) > 0 and max(y) > 20 * min(y) else "linear")
        else:
            ax.plot(x, y, "o-", color="C1", ms=3, label="model")
            if name in bicubic:
                ax.axhline(bicubic[name], color="gray", ls="--", label="bicubic")
            ax.legend(fontsize=7)
        ax.set_title(f"{kind}: {name}", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("step", fontsize=7)
    fig.tight_layout()
    path = os.path.join(out_dir, "curves.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path

# ------------------------------------------------------------ mini bases
# Bases pretrained here, so that `--model mini` learns on a CPU: the family's DiT class at ~2M
# parameters and, as a diffusers AutoencoderKL learns too slowly on two cores, a linear lapped
# autoencoder with the family's conventions.
MINI_DIR = os.environ.get("MINI_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights"))
MINI_VERSION = 4  # the recipe's version: a base pretrained by an older recipe is pretrained again

@functools.cache
def mini_vae_class():  # built on first use: `import common` stays free of diffusers
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config
    from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
    from diffusers.models.modeling_outputs import AutoencoderKLOutput

    class LappedVAE(ModelMixin, ConfigMixin):
        """Latent cell (i, j) codes the 16x16 window centred on its 8x8 patch, linearly; the decoder
        writes it back over the window, so a latent error decodes to a smooth bump, not a square.
        Deterministic (the mode is the code); normalised as its family."""

        @register_to_config
        def __init__(self, latent_channels=16, scaling_factor=1.0, shift_factor=0.0, per_channel=False,
                     latents_mean=None, latents_std=None, batch_norm_eps=None):
            super().__init__()
            C, nn = latent_channels, torch.nn
            self.enc, self.dec = nn.Conv2d(3, C, 16, 8, padding=4), nn.ConvTranspose2d(C, 3, 16, 8, padding=4)
            self.bn = nn.BatchNorm2d(4 * C, eps=batch_norm_eps, affine=False) if batch_norm_eps else None

        def enable_gradient_checkpointing(self):  # two convs: nothing worth recomputing
            pass

        def encode(self, x):  # (B, 3, H, W) or (B, 3, 1, H, W) in [-1, 1]
            z = self.enc(x[:, :, 0]).unsqueeze(2) if x.dim() == 5 else self.enc(x)
            return AutoencoderKLOutput(DiagonalGaussianDistribution(torch.cat([z, torch.zeros_like(z)], 1), True))

        def decode(self, z):
            return DecoderOutput(sample=self.dec(z[:, :, 0]).unsqueeze(2) if z.dim() == 5 else self.dec(z))

    return LappedVAE

@torch.no_grad()
def flatten_constant(vae):
    """Project the decoder so that a constant field in its first half of channels decodes to a
    constant image: the 4 overlapping parts of each 16x16 atom sum to one 8x8 block everywhere."""
    a = vae.dec.weight[: vae.config.latent_channels // 2].view(-1, 3, 2, 8, 2, 8)
    parts = a.sum((2, 4), keepdim=True)
    a -= (parts - parts.mean((3, 5), keepdim=True)) / 4

def pca_init(vae, x):
    """Encoder and decoder = w * the top-C right singular vectors of x's 16x16 patches at stride 8,
    windowed by the sine w: a truncated lapped transform (w(i)^2 + w(i + 8)^2 = 1)."""
    C, w = vae.config.latent_channels, torch.sin(math.pi * (torch.arange(16.0) + 0.5) / 16)
    w = (w[:, None] * w[None]).to(x)
    # order (c, i, j)
    patches = F.unfold(x, 16, stride=8, padding=4).transpose(1, 2).reshape(-1, 3, 16, 16) * w
    basis = torch.linalg.svd(patches.flatten(1), full_matrices=False)[2][:C].view(C, 3, 16, 16) * w
    with torch.no_grad():
        vae.enc.weight.copy_(basis)
        vae.enc.bias.zero_()
        vae.dec.weight.copy_(basis)
        vae.dec.bias.zero_()

def set_latent_stats(vae, family, z):
    """Store the normalisation of raw latents z (N, C, h, w) in the family's convention."""
    if family == "flux2":
        vae.bn.running_mean.copy_(patchify(z).mean((0, 2, 3)))
        vae.bn.running_var.copy_(patchify(z).var((0, 2, 3)))
    elif vae.config.per_channel:
        vae.register_to_config(latents_mean=z.mean((0, 2, 3)).tolist(), latents_std=z.std((0, 2, 3)).tolist())
    else:
        vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1 / z.std()))

def prepare_base(preset):
    """A mini preset's base, pretrained now (said) unless MINI_DIR holds it; a lock makes concurrent
    processes wait for one pretraining."""
    import fcntl
    folder, info = os.path.join(MINI_DIR, preset), os.path.join(MINI_DIR, preset, "pretrain.json")
    p = PRESETS[preset]  # a base of another recipe is stale
    current = lambda: (read_json(info) or {}).get("recipe") == [MINI_VERSION, p.vae_steps, p.dit_steps]
    if p.pretrain and not current():
        os.makedirs(MINI_DIR, exist_ok=True)
        with open(os.path.join(MINI_DIR, f".{preset}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not current():
                print(f"{preset}: no pretrained base of this recipe in {folder}; pretraining it now, once")
                pretrain(preset)

def pretrain(preset, vae_steps=None, dit_steps=None, batch=16, lr=5e-4, seed=0, out=None):
    """A mini base from the sample photos (not the held-out one): the autoencoder from the SVD, then
    fine-tuned; the DiT by flow matching on its latents (v = eps - z_0, tiny_cond's prompt)."""
    import diffusers
    from tqdm import tqdm
    p, t_start, g = PRESETS[preset], time.time(), torch.Generator().manual_seed(seed)
    out = out or os.path.join(MINI_DIR, preset)
    vae_steps, dit_steps = vae_steps or p.vae_steps, dit_steps or p.dit_steps
    torch.manual_seed(seed)
    photos, held = sample_photos(), torch.stack(sample_photos(SAMPLE_HELDOUT))
    draw = lambda m: int(torch.randint(m, (1,), generator=g))
    # ours: 128 px crops
    batch_of = lambda n: torch.stack([random_crop(photos[draw(len(photos))], 128, draw(2**31)) for _ in range(n)])
    vae = mini_vae_class()(**p.vae)
    pca_init(vae, batch_of(256) * 2 - 1)
    recon = lambda x: (vae.decode(vae.encode(x * 2 - 1).latent_dist.mode()).sample + 1) / 2
    opt, diffs = torch.optim.Adam(vae.parameters(), lr=1e-3), lambda x: (x.diff(dim=-1), x.diff(dim=-2))  # ours
    flatten_constant(vae)
    # MSE + MSE of pixel steps: sharp edges, no grid (ours)
    for _ in tqdm(range(vae_steps), desc=f"{preset} vae"):
        x = batch_of(8)
        r = recon(x)
        loss = F.mse_loss(r, x) + sum(F.mse_loss(a, b) for a, b in zip(diffs(r), diffs(x)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        flatten_constant(vae)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        vae_psnr = float(-10 * torch.log10(F.mse_loss(recon(held).clamp(0, 1), held)))
        z = torch.cat([vae.encode(batch_of(32) * 2 - 1).latent_dist.mode() for _ in range(4)])
        set_latent_stats(vae, p.family, z)
    dit = getattr(diffusers, FAMILIES[p.family][0])(**p.dit)
    cond, ema = tiny_cond(dit, p.family), None
    opt = torch.optim.AdamW(dit.parameters(), lr=lr, weight_decay=0.0)  # ours
    # ours: 100-step warm-up
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 100))
    bar = tqdm(range(dit_steps), desc=f"{preset} dit")
    for _ in bar:
        with torch.no_grad():
            z_0 = encode(vae, p.family, batch_of(batch))
        # ours: as SD3
        eps, t = torch.randn(z_0.shape, generator=g), torch.sigmoid(torch.randn(batch, generator=g))
        loss = F.mse_loss(velocity(p.family, dit, (1 - bc(t)) * z_0 + bc(t) * eps, t, expand_cond(cond, batch)),
                          eps - z_0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.set_postfix(fm_loss=f"{ema:.4f}")
    tmp = out + ".tmp"  # written whole, then renamed
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(os.path.join(tmp, "vae"))
    dit.save_pretrained(os.path.join(tmp, "transformer"))
    info = dict(recipe=[MINI_VERSION, vae_steps, dit_steps], seed=seed, vae_psnr=vae_psnr, fm_loss=ema,
                minutes=(time.time() - t_start) / 60)
    with open(os.path.join(tmp, "pretrain.json"), "w") as f:
        json.dump(info, f, indent=1)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"{preset}: pretrained in {info['minutes']:.1f} min -> {out} (autoencoder: held-out PSNR {vae_psnr:.2f} dB, "
          f"DiT: flow-matching loss {ema:.4f})")
    return out

if __name__ == "__main__":  # the command line imports a method and eval.py; the module never does
    import argparse, importlib
    ap = argparse.ArgumentParser(description="prefetch --method M [--model P] [M's flags]: download what M needs")
    ap.add_argument("command", choices=["prefetch"])
    ap.add_argument("--method", required=True, help="strsr, fluxsr, smfsr or teasr")
    ap.add_argument("--model", default=None)
    a, rest = ap.parse_known_args()
    mod = importlib.import_module(a.method)
    cfg = parse_config(mod.Config, (["--model", a.model] if a.model else []) + rest)
    needs = {w.source: w for st in getattr(mod, "STAGES", [None]) for w in mod.pretrained(mod.resolve(
        dataclasses.replace(cfg, stage=st) if st else cfg))}  # every stage's networks
    if failed := prefetch(needs.values()) + importlib.import_module("eval").prefetch():
        raise SystemExit(f"prefetch: {len(failed)} could not be downloaded (this needs the internet):\n  "
                         + "\n  ".join(failed))
    print("all there: train with HF_HUB_OFFLINE=1 (HF_HOME and TORCH_HOME as now)")

