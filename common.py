"""
What the four method scripts share and none of the papers describes: the base models (each family's loading,
latents, velocity call and prompts, LoRA), data, distributed training, checkpoints, tiled sampling, configuration
and logging, and the mini bases this project pretrains itself (`python common.py pretrain --model mini-<family>`).

Every velocity call speaks one convention (rectified flow, sigma form):
    z_t = (1 - t) z_0 + t eps,   t in [0, 1],   v = eps - z_0,   Euler step: z_s = z_t - (t - s) v
on (B, C, H, W) latents, whatever the family does inside (packing, position ids, its own timestep scale).
Images are (B, 3, H, W) floats in [0, 1] everywhere outside the VAE.
"""
import contextlib, dataclasses, functools, glob, hashlib, json, logging, math, os, re, shutil, sys, time, warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

# bitsandbytes (pulled in by pyiqa, imported by peft) warns at import that an optional CPU kernel package is
# missing; nothing here uses it
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

# ----------------------------------------------------------------------------- presets
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
    hub: str | None         # hub id of the real weights; None: built here (tiny: random, mini: pretrained here)
    size: str               # transformer parameters, for the README
    dit: dict | None = None  # tiny / mini: the transformer's config
    vae: dict | None = None  # tiny: the VAE's config; mini: the MiniVAE's
    pretrain: bool = False  # mini: pretrained by `python common.py pretrain`, cached under MINI_DIR
    dit_steps: int = 1000   # mini: the DiT's pretraining steps (ours)


PRESETS = {
    "flux1-dev": Preset("flux1", "black-forest-labs/FLUX.1-dev", "12B"),
    "flux2-klein": Preset("flux2", "black-forest-labs/FLUX.2-klein-4B", "4B"),
    "flux2-klein-base": Preset("flux2", "black-forest-labs/FLUX.2-klein-base-4B", "4B"),  # undistilled
    "zimage": Preset("zimage", "Tongyi-MAI/Z-Image-Turbo", "6B"),
    "sd35-medium": Preset("sd3", "stabilityai/stable-diffusion-3.5-medium", "2.5B"),
    "qwen-image": Preset("qwen", "Qwen/Qwen-Image-2512", "20B"),
    "tiny-flux1": Preset("flux1", None, "81k", dict(
        in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
        dict(_KL4, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159)),
    "tiny-flux2": Preset("flux2", None, "69k", dict(
        in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False),
        dict(_KL4, latent_channels=32)),
    "tiny-zimage": Preset("zimage", None, "348k", dict(
        in_channels=16, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
        axes_dims=[4, 6, 6], axes_lens=[256, 128, 128]),
        dict(_KL4, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159)),
    "tiny-sd3": Preset("sd3", None, "80k", dict(
        sample_size=32, in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16, out_channels=16,
        pos_embed_max_size=64),
        dict(_KL4, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609)),
    "tiny-qwen": Preset("qwen", None, "92k", dict(
        in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 6, 6)),
        dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1)),
    # mini: the same transformer classes at ~2M parameters, pretrained here on the sample photos (README, mini)
    "mini-flux1": Preset("flux1", None, "2.3M", dict(
        in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=32, num_attention_heads=4,
        joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(8, 12, 12)),
        dict(latent_channels=16), pretrain=True,
        dit_steps=8000),  # ours: FluxSR learns from this base's generations only; at 1000 steps they are mosaics
    "mini-flux2": Preset("flux2", None, "2.0M", dict(
        in_channels=128, num_layers=2, num_single_layers=4, attention_head_dim=32, num_attention_heads=4,
        joint_attention_dim=32, timestep_guidance_channels=64, axes_dims_rope=(8, 8, 8, 8), guidance_embeds=False),
        dict(latent_channels=32, batch_norm_eps=1e-4), pretrain=True),
    "mini-zimage": Preset("zimage", None, "1.9M", dict(
        in_channels=16, dim=128, n_layers=4, n_refiner_layers=1, n_heads=4, n_kv_heads=4, cap_feat_dim=32,
        axes_dims=[8, 12, 12], axes_lens=[256, 256, 256]), dict(latent_channels=16), pretrain=True),
    "mini-sd3": Preset("sd3", None, "2.3M", dict(
        sample_size=32, in_channels=16, num_layers=4, attention_head_dim=32, num_attention_heads=4,
        joint_attention_dim=32, caption_projection_dim=128, pooled_projection_dim=16, out_channels=16,
        pos_embed_max_size=128), dict(latent_channels=16), pretrain=True),
    "mini-qwen": Preset("qwen", None, "2.5M", dict(
        in_channels=64, out_channels=16, num_layers=4, attention_head_dim=32, num_attention_heads=4,
        joint_attention_dim=32, axes_dims_rope=(8, 12, 12)), dict(latent_channels=16, per_channel=True),
        pretrain=True),
}


def resolve_preset(model, default):
    """`--model tiny` / `--model mini`: the tiny / mini preset of the method's default family."""
    if model in ("tiny", "mini"):
        return model + "-" + PRESETS[default].family
    if model not in PRESETS:
        raise SystemExit(f"unknown --model {model!r}; choose from tiny, mini, {', '.join(PRESETS)}")
    return model


def random_prompt(cfg):
    """True where the base has no text encoders (tiny and mini presets): prompts are fixed random stand-ins."""
    return PRESETS[cfg.model].hub is None and not cfg.model_path


# ----------------------------------------------------------------------------- loading
def _load(cls_name, preset, path, sub, config, dtype):
    import diffusers
    p = PRESETS[preset]
    cls = mini_vae_class() if p.pretrain and sub == "vae" else getattr(diffusers, cls_name)
    if path is None and p.pretrain:
        path = os.path.join(MINI_DIR, preset)
        if not os.path.exists(os.path.join(path, "pretrain.json")):
            raise SystemExit(f"--model {preset}: no pretrained base in {path}; the method scripts make it on first "
                             f"use, or run: python common.py pretrain --model {preset}")
    if path is None and p.hub is None:
        with torch.random.fork_rng(devices=[]):  # tiny weights: random but the same every run
            torch.manual_seed(0)
            m = cls(**config)
            return m if dtype == torch.float32 else m.to(dtype)
    src = path or p.hub  # a pipeline folder (or the hub repo) keeps each model in a subfolder
    sub = sub if path is None or os.path.isdir(os.path.join(src, sub)) else None
    return cls.from_pretrained(src, subfolder=sub, torch_dtype=dtype)


def load_dit(preset, path=None, dtype=torch.float32):
    """The family's transformer: hub weights, a local folder (`path`), tiny random or the mini pretrained here."""
    return _load(FAMILIES[PRESETS[preset].family][0], preset, path, "transformer", PRESETS[preset].dit, dtype)


def load_vae(preset, path=None, dtype=torch.float32, device=None, tiling=False):
    """The family's frozen VAE (on `device`); `tiling` on real presets bounds the memory of large images."""
    vae = _load(FAMILIES[PRESETS[preset].family][1], preset, path, "vae", PRESETS[preset].vae, dtype)
    if tiling and PRESETS[preset].hub is not None:
        vae.enable_tiling()
    return vae.requires_grad_(False).eval().to(device or "cpu")


def weight_dtype(device):
    """Frozen weights in bf16 on GPU, fp32 on CPU (bf16 matmuls are slow there)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# ----------------------------------------------------------------------------- latents
def patchify(z):  # (B, C, H, W) -> (B, 4C, H/2, W/2), channel order (C, 2, 2) as FLUX.2
    B, C, H, W = z.shape
    return z.view(B, C, H // 2, 2, W // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(B, C * 4, H // 2, W // 2)


def unpatchify(z):
    B, C, H, W = z.shape
    return z.view(B, C // 4, 2, 2, H, W).permute(0, 1, 4, 2, 5, 3).reshape(B, C // 4, H * 2, W * 2)


def latent_stats(vae, family, z):
    """(mean, std) that normalise this family's raw VAE latents, broadcastable to z."""
    c = vae.config
    if family == "qwen":
        return (torch.tensor(c.latents_mean).view(1, -1, 1, 1).to(z),
                torch.tensor(c.latents_std).view(1, -1, 1, 1).to(z))
    if family == "flux2":  # BatchNorm running stats of the patchified latents
        return vae.bn.running_mean.view(1, -1, 1, 1).to(z), (vae.bn.running_var + c.batch_norm_eps).sqrt().view(
            1, -1, 1, 1).to(z)
    one = z[:1, :1, :1, :1]
    return torch.full_like(one, c.shift_factor or 0.0), torch.full_like(one, 1 / c.scaling_factor)


def encode(vae, family, x, sample=False, generator=None):
    """Images in [0, 1] -> normalised latents (B, C, H/8, W/8) (FLUX.2: (B, 128, H/16, W/16)): the latent
    distribution's mode, or with `sample` a draw from it (from `generator`, else the global RNG)."""
    x = (x * 2 - 1).to(vae.dtype)
    dist = vae.encode(x.unsqueeze(2) if family == "qwen" else x).latent_dist  # Qwen's video VAE: one frame
    z = dist.sample(generator) if sample else dist.mode()
    z = z[:, :, 0] if family == "qwen" else z
    if family == "flux2":
        z = patchify(z)
    mean, std = latent_stats(vae, family, z)
    return ((z - mean) / std).float()


def decode(vae, family, z):
    """Normalised latents -> images in [0, 1] (not clamped, so losses keep their gradient)."""
    mean, std = latent_stats(vae, family, z)
    z = (z * std + mean).to(vae.dtype)
    if family == "flux2":
        z = unpatchify(z)
    x = vae.decode(z.unsqueeze(2)).sample[:, :, 0] if family == "qwen" else vae.decode(z).sample
    return (x.float() + 1) / 2


# ----------------------------------------------------------------------------- velocity
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
    """v(z_t, t) with v = eps - z_0, for z_t (B, C, H, W) and t (B,) in [0, 1]. The timestep goes in as fp32, as the
    pipelines give it (FLUX.1, FLUX.2 and Qwen-Image cast it to their dtype themselves; Z-Image and SD3 keep it)."""
    B, C, H, W = z.shape
    t = (t.expand(B) if t.numel() == 1 else t).float()
    dt, emb, dev = dit.dtype, cond["embeds"].to(dit.dtype), z.device
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
        out = dit(list(z.to(dt).unsqueeze(2).unbind(0)), 1 - t, list(emb.unbind(0)), return_dict=False)[0]
        return -torch.stack(out)[:, :, 0].float()
    if family == "sd3":  # takes sigma * 1000
        return dit(hidden_states=z.to(dt), encoder_hidden_states=emb, pooled_projections=cond["pooled"].to(dt),
                   timestep=t * 1000, return_dict=False)[0].float()
    if family == "qwen":
        out = dit(hidden_states=pack(z).to(dt), encoder_hidden_states=emb, encoder_hidden_states_mask=cond.get("mask"),
                  timestep=t, img_shapes=[[(1, H // 2, W // 2)]] * B, return_dict=False)[0]
        return unpack(out.float(), H, W)
    raise ValueError(family)


# ----------------------------------------------------------------------------- prompts
def bc(t):
    """(B,) times -> (B, 1, 1, 1), to broadcast over (B, C, H, W) latents."""
    return t.view(-1, 1, 1, 1)


def expand_cond(cond, B):
    return {k: v.expand(B, *v.shape[1:]) for k, v in cond.items()}


def tiny_cond(dit, family, length=8):
    """Fixed random 'prompt embeddings' of the right shape, for bases without text encoders (tiny, mini)."""
    c, g = dit.config, torch.Generator().manual_seed(1234)
    width = c.cap_feat_dim if family == "zimage" else c.joint_attention_dim
    cond = {"embeds": torch.randn(1, length, width, generator=g)}
    if family in ("flux1", "sd3"):
        cond["pooled"] = torch.randn(1, c.pooled_projection_dim, generator=g)
    if family == "qwen":
        cond["mask"] = torch.ones(1, length, dtype=torch.long)
    return cond


def prompt_cond(preset, prompt, cache_dir, device, path=None):
    """Encode a prompt once with the family's own text encoders, cache it, free the encoders."""
    from safetensors.torch import load_file, save_file
    family = PRESETS[preset].family
    key = hashlib.sha1(f"{preset}|{path}|{prompt}".encode()).hexdigest()[:16]
    file = os.path.join(cache_dir, f"prompt-{family}-{key}.safetensors")
    if os.path.exists(file):
        return {k: v.to(device) for k, v in load_file(file).items()}
    import diffusers
    pipe = getattr(diffusers, FAMILIES[family][2]).from_pretrained(
        path or PRESETS[preset].hub, transformer=None, vae=None, torch_dtype=torch.bfloat16).to(device)
    with torch.no_grad():
        if family == "flux1":
            e, p, _ = pipe.encode_prompt(prompt, prompt_2=None, device=device)
            cond = {"embeds": e, "pooled": p}
        elif family == "flux2":
            cond = {"embeds": pipe.encode_prompt(prompt, device=device)[0]}
        elif family == "zimage":  # a list of (L, D), unpadded
            cond = {"embeds": pipe.encode_prompt(prompt, device=device, do_classifier_free_guidance=False)[0][0][None]}
        elif family == "sd3":
            e, _, p, _ = pipe.encode_prompt(prompt, None, None, device=device, do_classifier_free_guidance=False)
            cond = {"embeds": e, "pooled": p}
        else:
            e, m = pipe.encode_prompt(prompt, device=device)
            cond = {"embeds": e, "mask": m if m is not None else torch.ones(e.shape[:2], dtype=torch.long)}
    del pipe
    cond = {k: v.float().cpu().contiguous() for k, v in cond.items()}
    os.makedirs(cache_dir, exist_ok=True)
    save_file(cond, file + ".tmp")
    os.replace(file + ".tmp", file)
    return {k: v.to(device) for k, v in cond.items()}


def fixed_prompt(cfg, dit, device, cache_dir, prompt=""):
    """The condition of one fixed prompt (the papers': empty), encoded once by rank 0; the other ranks then read its
    cache. An all-ones mask is dropped, so attention runs unmasked (the fast kernels)."""
    if random_prompt(cfg):
        cond = tiny_cond(dit, PRESETS[cfg.model].family)
    else:
        if rank() == 0:
            cond = prompt_cond(cfg.model, prompt, cache_dir, device, cfg.model_path or None)
        if dist.is_initialized():
            dist.barrier()
        if rank() != 0:
            cond = prompt_cond(cfg.model, prompt, cache_dir, device, cfg.model_path or None)
    cond = {k: v.to(device) for k, v in cond.items()}
    if "mask" in cond and bool(cond["mask"].bool().all()):
        del cond["mask"]
    return cond


# ----------------------------------------------------------------------------- LoRA
def add_lora(dit, train_base, rank, alpha, targets, init="gaussian"):
    """How much of the (frozen) transformer trains: `lora` injects a peft LoRA (its weights train, in fp32), `full`
    trains every weight in fp32 (ours: the mini bases, where a LoRA learns far slower than a CPU run allows; the
    checkpoint then holds the whole DiT), `none` trains nothing of it."""
    if train_base == "full":
        return (dit if dit.dtype == torch.float32 else dit.float()).requires_grad_(True)
    dit.requires_grad_(False)
    if train_base == "lora":
        from peft import LoraConfig
        dit.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=init, target_modules=targets))
        for p in dit.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    return dit


def lora_state(dit):
    """LoRA weights in the diffusers format that `pipe.load_lora_weights` accepts."""
    from peft.utils import get_peft_model_state_dict
    return {"transformer." + k: v.detach().contiguous() for k, v in get_peft_model_state_dict(dit).items()}


def load_lora_state(dit, sd):
    from peft.utils import set_peft_model_state_dict
    res = set_peft_model_state_dict(dit, {k.removeprefix("transformer."): v for k, v in sd.items()})
    if getattr(res, "unexpected_keys", None):
        raise KeyError(f"LoRA keys that match no module: {res.unexpected_keys[:5]}")


def trainable(*modules):
    return [p for m in modules for p in m.parameters() if p.requires_grad]


def check_choices(cfg, **allowed):
    """A clear error for a flag outside its choices: check_choices(cfg, stage=("1", "2"))."""
    for flag, choices in allowed.items():
        if getattr(cfg, flag) not in choices:
            raise SystemExit(f"--{flag} {getattr(cfg, flag)}: expected one of {', '.join(map(str, choices))}")


# ----------------------------------------------------------------------------- data
IMG_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
NAMED_DATASETS = ("LSDIR", "FFHQ", "Aesthetic-4K", "DIV2K")  # folders under --data_root
# Real photos shipped inside the scikit-image wheel (offline). astronaut is held out for eval.
SAMPLE_PHOTOS = ["coffee", "chelsea", "rocket", "hubble_deep_field", "retina", "immunohistochemistry", "camera",
                 "coins", "brick", "grass", "gravel", "moon", "text", "stereo_motorcycle"]
SAMPLE_HELDOUT = ["astronaut"]


def to_rgb(img):
    """PIL image of any mode (gray, RGBA, palette, 16-bit) -> float (3, H, W) in [0, 1]."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float32)
        a = a / (65535.0 if img.mode != "I" or a.max() > 255 else 255.0)
        return torch.from_numpy(np.clip(a, 0, 1)).expand(3, -1, -1).clone()
    if img.mode in ("RGBA", "LA", "P", "PA"):  # composite transparency over white
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
    a = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


def load_image(path):
    with Image.open(path) as img:
        return to_rgb(img)


def save_image(x, path):
    """(3, H, W) or (1, 3, H, W) in [0, 1] -> 8-bit file."""
    x = x.detach().float().squeeze(0).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(x).save(path)


def sample_photos(names=SAMPLE_PHOTOS):
    import skimage.data
    out = []
    for n in names:
        a = getattr(skimage.data, n)()
        out.append(to_rgb(Image.fromarray(a[0] if isinstance(a, tuple) else a)))  # stereo pair: left view
    return out


def list_images(src, data_root="data"):
    """`src` is a folder (recursive), a text file of paths, or a dataset name under data_root."""
    if src in NAMED_DATASETS:
        src = os.path.join(data_root, src)
        if not os.path.isdir(src):
            raise SystemExit(f"dataset folder {src} not found: download it there (see README, Datasets)")
    if os.path.isfile(src) and not src.lower().endswith(IMG_EXTS):
        with open(src) as f:
            files = [line.strip() for line in f if line.strip()]
    elif os.path.isdir(src):
        files = sorted(p for p in glob.glob(os.path.join(src, "**", "*"), recursive=True)
                       if p.lower().endswith(IMG_EXTS))
    elif os.path.isfile(src):
        files = [src]
    else:
        raise SystemExit(f"--data {src!r}: no such folder, file list or dataset name")
    if not files:
        raise SystemExit(f"--data {src!r}: no images ({', '.join(IMG_EXTS)}) found")
    return files


class ImageDataset(torch.utils.data.Dataset):
    """Random crop + flip of an image source. Items are keyed by (index, seed), so a crop is a pure function of the
    data position: resume and any number of ranks see the same samples."""

    def __init__(self, src="sample", crop=512, data_root="data"):
        self.crop = crop
        self.items = sample_photos() if src == "sample" else list_images(src, data_root)
        self.bad, self.warned = set(), set()

    def __len__(self):
        return len(self.items)

    def _read(self, i):
        item = self.items[i]
        if torch.is_tensor(item):
            return item
        try:
            return load_image(item)
        except Exception as e:  # unreadable: skip, say so once
            if item not in self.bad:
                self.bad.add(item)
                print(f"warning: skipping unreadable image {item}: {e}", file=sys.stderr)

    def __getitem__(self, key):
        i, seed = key
        g = torch.Generator().manual_seed(seed)
        for _ in range(len(self.items)):  # fall through to the next image if this one is unreadable
            x = self._read(i)
            if x is not None:
                break
            i = (i + 1) % len(self.items)
        else:
            raise RuntimeError("no readable image in the data source")
        H, W = x.shape[1:]
        if min(H, W) < self.crop:  # upscale small images, once-per-image warning
            if i not in self.warned:
                self.warned.add(i)
                print(f"warning: image {i} is {W}x{H}, smaller than crop {self.crop}: upscaling", file=sys.stderr)
            s = self.crop / min(H, W)
            x = F.interpolate(x[None], size=(max(self.crop, round(H * s)), max(self.crop, round(W * s))),
                              mode="bicubic", align_corners=False)[0].clamp(0, 1)
            H, W = x.shape[1:]
        top = int(torch.randint(0, H - self.crop + 1, (1,), generator=g))
        left = int(torch.randint(0, W - self.crop + 1, (1,), generator=g))
        x = x[:, top:top + self.crop, left:left + self.crop]
        return x.flip(-1) if torch.rand(1, generator=g) < 0.5 else x


class StepSampler(torch.utils.data.Sampler):
    """Infinite, resumable, rank-aware sampler (DistributedSampler plus an exact data position): the global batch of
    step s is positions [s*GB, (s+1)*GB), shuffled per epoch with seed + epoch; rank r takes its contiguous share of
    each global batch. Yields (index, seed) keys."""

    def __init__(self, n, global_batch, rank, world, seed, start_step=0):
        assert global_batch % world == 0, "global batch must divide by the number of ranks"
        self.n, self.gb, self.rank, self.world, self.seed, self.start = n, global_batch, rank, world, seed, start_step
        self._perm = (None, None)

    def _index(self, pos):
        epoch = pos // self.n
        if self._perm[0] != epoch:
            self._perm = (epoch, torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)))
        return int(self._perm[1][pos % self.n])

    def __iter__(self):
        per, step = self.gb // self.world, self.start
        while True:
            for j in range(per):
                pos = step * self.gb + self.rank * per + j
                yield self._index(pos), self.seed * 1_000_003 + pos
            step += 1


def make_loader(ds, cfg, rank, world, start_step):
    """Per-rank iterator of micro-batches of ds (items keyed by StepSampler's (index, seed)) and the number of
    gradient-accumulation steps: cfg.batch_size is the global batch, split over ranks and accumulation steps."""
    if cfg.batch_size % (world * cfg.micro_batch):
        raise SystemExit(f"--batch_size {cfg.batch_size} must divide by ranks {world} x --micro_batch "
                         f"{cfg.micro_batch}")
    sampler = StepSampler(len(ds), cfg.batch_size, rank, world, cfg.seed, start_step)
    # its own generator: a DataLoader otherwise draws a seed from the global RNG, which would make a resumed run
    # diverge from an uninterrupted one
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.micro_batch, sampler=sampler, num_workers=cfg.num_workers,
                                         persistent_workers=cfg.num_workers > 0, generator=torch.Generator())
    return iter(loader), cfg.batch_size // (world * cfg.micro_batch)


# ----------------------------------------------------------------------------- distributed training
def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def compute_init(seed=0):
    """(rank, world, device). RANK in the environment means torchrun. Training's random draws are seeded per
    micro-batch by train_loop; this seed only makes any draw outside it reproducible."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    r, local, world = (int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])) \
        if ddp else (0, 0, 1)
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if ddp and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(seed)
    return r, world, device


def setup(cfg, needs=()):
    """A training run's start: the pretrained networks `needs` checked (a real preset) or said to be random stand-ins
    (tiny, mini), before anything is built; distributed init; the mini base, pretrained now if it is not cached yet;
    the rank-0 logger with the config as its first line. Returns (rank, world, device, log)."""
    check_weights(cfg, needs)
    r, world, device = compute_init(cfg.seed)
    prepare_base(cfg.model)
    log = Logger(cfg.out_dir, r == 0, device)
    log(json.dumps(dataclasses.asdict(cfg)))
    if PRESETS[cfg.model].hub is None and [w for w in needs if w.flag != "model_path"]:
        log(f"{cfg.model}: random stand-ins, nothing downloaded, for "
            f"{', '.join(w.name for w in needs if w.flag != 'model_path')}")
    return r, world, device, log


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def allreduce_grads(params):
    """Average the gradients of the trainable parameters over ranks: DDP's reduction, done by hand because every
    method calls its model several times per step in different roles, which DDP's reducer does not allow. Sharded
    (FSDP, DTensor) gradients are FSDP's to reduce."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    grads = [p.grad for p in params if p.grad is not None and type(p.grad) is torch.Tensor]
    if grads:
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for g, f in zip(grads, torch.split(flat, [g.numel() for g in grads])):
            g.copy_(f.view_as(g))


def lr_factor(step, max_steps, decay):
    """The lr's multiplier at `step` (1..max_steps): 1, then over the last `decay` fraction of the run a half cosine
    to 0 at max_steps. decay 0: constant (the papers' schedule)."""
    if not 0 <= decay <= 1:
        raise SystemExit(f"--lr_decay {decay}: expected a fraction of the steps, 0 to 1")
    start = (1 - decay) * max_steps
    if decay == 0 or step <= start:
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (step - start) / (max_steps - start)))


def set_lr(optimizers, step, max_steps, decay):
    """Every group of every optimizer at its base lr (kept in `initial_lr`, saved with the optimizer's state, so a
    resume continues the same schedule) times lr_factor: a pure function of the step."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group.setdefault("initial_lr", group["lr"]) * lr_factor(step, max_steps, decay)


def optimizer_step(optimizers, clip):
    """One update: gradients averaged over ranks in one collective, each optimizer's parameters clipped to norm
    `clip`, each optimizer stepped and cleared."""
    groups = [[p for g in opt.param_groups for p in g["params"]] for opt in optimizers]
    allreduce_grads([p for group in groups for p in group])
    for group, opt in zip(groups, optimizers):
        torch.nn.utils.clip_grad_norm_(group, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)


def reduce_mean(stats):
    """Average a dict of floats over ranks (for logging)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return stats
    t = torch.tensor(list(stats.values()), dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(stats, (t / dist.get_world_size()).tolist()))


def shard_fsdp2(dit, log):
    """FSDP2 for bases that do not fit one GPU: each transformer block, then the root, sharded over the ranks. Only the
    frozen base is sharded: the trained weights (the LoRA) stay whole on every rank, their gradients averaged as
    without FSDP, so optimizer states and checkpoints are those of an unsharded run."""
    from torch.distributed.fsdp import fully_shard
    if not dist.is_initialized():
        log("--fsdp: one process, nothing to shard over")
        return dit
    keep = {p for p in dit.parameters() if p.requires_grad}
    blocks = [b for name in ("transformer_blocks", "single_transformer_blocks", "layers") for b in getattr(dit, name, [])]
    for block in blocks:
        fully_shard(block, ignored_params=keep)
    log(f"FSDP2: {len(blocks)} blocks and the root sharded over {dist.get_world_size()} ranks, "
        f"{len(keep)} trained tensors whole on each")
    return fully_shard(dit, ignored_params=keep)


def autocast(device, enabled=True):
    """bf16 autocast on GPU; full precision on CPU (bf16 matmuls are slow there)."""
    return torch.autocast("cuda", torch.bfloat16) if enabled and device.type == "cuda" else contextlib.nullcontext()


def checkpointing(cfg, device, *modules):
    """--grad_ckpt: gradient checkpointing of these modules on GPU (on CPU memory is not the limit)."""
    for m in modules if cfg.grad_ckpt and device.type == "cuda" else ():
        m.enable_gradient_checkpointing()


def micro_batch_seed(seed, step, position):
    """The seed of every random draw of one micro-batch (the degradation, noise, times), from its place in the run:
    step (1..N) and its position among the step's micro-batches over all ranks. So a resumed run, any number of
    ranks and any split into gradient-accumulation steps draw the same numbers, and checkpoints need no RNG state."""
    return ((seed * 1_000_003 + step) * 1_000_003 + position) % 2**62


def train_loop(cfg, log, loader, accum, micro_step, models, optimizers, step, end, first=0, extra=None):
    """Steps step+1 .. end. Each: `accum` micro-batches of micro_step(batch, scale) -> (terms, images), which
    back-propagates its loss times `scale` and returns its loss terms (the first is the headline) and a function
    giving (x_lr, x_sr, x_hr); then every optimizer's update and one log line; at their intervals an image grid and a
    checkpoint (with extra() in its state). `first`: the step the lr schedule counts from (StrSR's stage 2)."""
    opts = list(optimizers.values())
    log.start()
    while step < end:
        sums = {}
        for j in range(accum):
            torch.manual_seed(micro_batch_seed(cfg.seed, step + 1, rank() * accum + j))
            terms, images = micro_step(next(loader), 1 / accum)
            sums = {k: sums.get(k, 0) + v.detach() / accum for k, v in terms.items()}
        set_lr(opts, step + 1 - first, end - first, cfg.lr_decay)
        optimizer_step(opts, cfg.grad_clip)
        step += 1
        log.step(step, end, sums, cfg.log_every)
        if log.master and (step % cfg.grid_every == 0 or step == end):
            save_grid(os.path.join(cfg.out_dir, "grids", f"step-{step:07d}.png"), *images())
        if step % cfg.save_every == 0 or step == end:
            save_checkpoint(cfg.out_dir, step, cfg, models, optimizers, extra and extra())
    return step


# ----------------------------------------------------------------------------- checkpoints
def _trainable_state(m):
    """Everything a module learns: trainable params and buffers (e.g. spectral-norm vectors), never its frozen
    weights; LoRA weights are stored separately in the diffusers format."""
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    return {k: v.detach().contiguous() for k, v in m.state_dict().items() if k not in frozen and "lora_" not in k}


def _lora_file(name):
    return "pytorch_lora_weights.safetensors" if name == "dit" else f"{name}_lora.safetensors"


def save_checkpoint(out_dir, step, config, models, optimizers, extra=None, keep=2):
    """Atomic: all files go into a temp folder renamed into place when complete; the older ones beyond `keep` go.
    Call on every rank (rank 0 writes)."""
    from safetensors.torch import save_file
    r, world = rank(), dist.get_world_size() if dist.is_initialized() else 1
    final, tmp = os.path.join(out_dir, f"ckpt-{step:07d}"), os.path.join(out_dir, f".tmp-ckpt-{step:07d}")
    if r == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for name, m in models.items():
            if getattr(m, "peft_config", None):  # with its rank and alpha where pipe.load_lora_weights reads them
                meta = {f"transformer.{k}": v for k, v in m.peft_config["default"].to_dict().items()}
                save_file(lora_state(m), os.path.join(tmp, _lora_file(name)),
                          metadata={"lora_adapter_metadata": json.dumps(meta, default=list)})
            sd = _trainable_state(m)
            if sd:
                save_file(sd, os.path.join(tmp, f"{name}.safetensors"))
        torch.save({"step": step, "optimizers": {k: o.state_dict() for k, o in optimizers.items()}, **(extra or {})},
                   os.path.join(tmp, "state.pt"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config, f, indent=1)
        os.replace(tmp, final)
        for old in sorted(glob.glob(os.path.join(out_dir, "ckpt-*")))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if world > 1:
        dist.barrier()
    return final


def latest_checkpoint(path):
    """`path` is a checkpoint folder or an output folder holding ckpt-* folders (latest wins)."""
    if path and os.path.exists(os.path.join(path, "state.pt")):
        return path
    found = sorted(glob.glob(os.path.join(path, "ckpt-*"))) if path else []
    return found[-1] if found else None


def load_checkpoint(ckpt, models, optimizers=None):
    """Load what save_checkpoint wrote; returns the state dict (step, extras). Loading never executes code:
    safetensors for weights, torch.load(weights_only=True) for the rest."""
    from safetensors.torch import load_file
    for name, m in models.items():
        if os.path.exists(os.path.join(ckpt, _lora_file(name))):
            load_lora_state(m, load_file(os.path.join(ckpt, _lora_file(name))))
        file = os.path.join(ckpt, f"{name}.safetensors")
        if os.path.exists(file):
            missing, unexpected = m.load_state_dict(load_file(file), strict=False)
            if unexpected:
                raise KeyError(f"{file}: keys that match nothing in {name}: {unexpected[:5]}")
    state = torch.load(os.path.join(ckpt, "state.pt"), weights_only=True)
    for k, o in (optimizers or {}).items():
        o.load_state_dict(state["optimizers"][k])
    return state


def resume(out_dir, models, optimizers, log):
    """(step, state) of the latest checkpoint in out_dir, loaded into models and optimizers; (0, {}) for a new run."""
    ckpt = latest_checkpoint(out_dir)
    if not ckpt:
        return 0, {}
    state = load_checkpoint(ckpt, models, optimizers)
    log(f"resumed from {ckpt} at step {state['step']}")
    return state["step"], state


RENAMED = {"lr_g": "lr", "lam": "w_tv_lpips", "gamma": "tv_gamma", "mu": "w_adl", "lambda_cons": "w_cons",
           "lambda_data": "w_data", "lambda_lpips": "w_lpips", "lambda_adv": "w_adv", "lambda_rect": "w_rect"}


def load_config(ckpt):
    """A checkpoint's config.json as a dict, the flags of older checkpoints translated to today's names."""
    with open(os.path.join(ckpt, "config.json")) as f:
        c = {RENAMED.get(k, k): v for k, v in json.load(f).items()}
    if "train_base" not in c:  # older flags: SMFSR --base_rank, TEASR --train_noise, the others --lora_rank 0
        r, noise = c.pop("base_rank", None), c.pop("train_noise", None)
        if r is not None:
            c["train_base"] = {-1: "none", 0: "full"}.get(r, "lora")
            c["lora_rank"] = r if r > 0 else c.get("lora_rank", 128)
        elif noise is not None:
            c["train_base"] = "full" if noise else "none"
        else:
            c["train_base"] = "full" if c.get("lora_rank") == 0 else "lora"
    if isinstance(c.get("stage"), int):
        c["stage"] = str(c["stage"])
    return c


def checkpoint_config(ckpt, cls):
    """(folder, config) of the latest checkpoint under ckpt, the config as the dataclass `cls` (fields it no longer
    has are ignored)."""
    found = latest_checkpoint(ckpt)
    if not found:
        raise SystemExit(f"--ckpt {ckpt!r}: no checkpoint (a ckpt-* folder or an out_dir holding them)")
    names = {f.name for f in dataclasses.fields(cls)}
    return found, cls(**{k: v for k, v in load_config(found).items() if k in names})


# ----------------------------------------------------------------------------- sampling
def sampler_setup(flags, resolve, device=None):
    """A sampler's start: the latest checkpoint under flags.ckpt (or flags.out_dir) and its training config, with the
    sampling flags of `flags` (steps, seed and the like; tile and overlap where given), resolved; the device and the
    dtype of the frozen weights there."""
    path, cfg = checkpoint_config(flags.ckpt or flags.out_dir, type(flags))
    given = {k: getattr(flags, k) for k in ("steps", "seed", "start", "start_t") if hasattr(flags, k)}
    given.update({k: getattr(flags, k) for k in ("tile", "overlap") if getattr(flags, k)})
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return path, resolve(dataclasses.replace(cfg, **given)), device, weight_dtype(device)


def pad_to_multiple(x, m=PIXEL_MULTIPLE):
    """Reflect-pad right/bottom to a multiple of m; returns (padded, (H, W)) to crop back."""
    H, W = x.shape[-2:]
    ph, pw = (-H) % m, (-W) % m
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="reflect" if ph < H and pw < W else "replicate")
    return x, (H, W)


def _starts(size, tile, stride):
    return [0] if size <= tile else sorted(set(list(range(0, size - tile, stride)) + [size - tile]))


def _ramp(n, overlap, rise, fall, device):
    w, r = torch.ones(n, device=device), torch.linspace(0, 1, overlap, device=device)
    if rise:
        w[:overlap] = r
    if fall:
        w[n - overlap:] = torch.minimum(w[n - overlap:], r.flip(0))
    return w


def tiled(fn, z, tile, overlap):
    """Apply a latent->latent function over overlapping tiles of (B, C, H, W), blending with linear ramps that reach
    0 at a tile's inner edges, so memory is bounded by the tile. For a function of receptive radius 1 (a 3x3 conv)
    this equals fn(z) exactly; for a DiT it is the usual approximation, better with more overlap."""
    B, C, H, W = z.shape
    if H <= tile and W <= tile:
        return fn(z)
    assert 2 <= overlap <= tile // 2, "tiling needs 2 <= overlap <= tile / 2"
    out, wsum = None, torch.zeros(1, 1, H, W, device=z.device)
    th, tw = min(tile, H), min(tile, W)
    for top in _starts(H, tile, tile - overlap):
        for left in _starts(W, tile, tile - overlap):
            y = fn(z[:, :, top:top + th, left:left + tw])
            if out is None:
                out = torch.zeros(B, y.shape[1], H, W, device=z.device, dtype=y.dtype)
            w = (_ramp(th, overlap, top > 0, top + th < H, z.device)[:, None]
                 * _ramp(tw, overlap, left > 0, left + tw < W, z.device)[None])
            out[:, :, top:top + th, left:left + tw] += y * w
            wsum[:, :, top:top + th, left:left + tw] += w
    return out / wsum


def tiled_pair(fn, z, z_lr, tile, overlap):
    """tiled() for fn(z, z_lr) of two aligned latents (the LR-conditioned DiTs): each tile sees its slice of both."""
    C = z.shape[1]
    return tiled(lambda zz: fn(zz[:, :C], zz[:, C:]), torch.cat([z, z_lr], 1), tile, overlap)


def upsample_lr(x_lr, scale=4):
    """The papers' LR input: bicubic upsampling to the HR size."""
    return F.interpolate(x_lr, scale_factor=scale, mode="bicubic", align_corners=False).clamp(0, 1)


@torch.no_grad()
def super_resolve(vae, family, x_lr, latent_fn, generator=None):
    """The frame every sampler shares: x_lr (1, 3, h, w) in [0, 1] -> bicubic x4, padded to the model multiple,
    encoded (a draw of the latent distribution from `generator` where one is given, else its mode); latent_fn(z_lr)
    -> z0_hat (the method); decoded, cropped back to (4h, 4w)."""
    device = next(vae.parameters()).device
    x, (H, W) = pad_to_multiple(upsample_lr(x_lr.to(device).float()))
    with autocast(device):
        z0_hat = latent_fn(encode(vae, family, x, generator is not None, generator))
        return decode(vae, family, z0_hat)[..., :H, :W].clamp(0, 1).float().cpu()


def sample_files(sr_fn, inp, output):
    """--sample: run `sr_fn(x_lr (1,3,h,w)) -> (1,3,4h,4w)` over an image or a folder; write PNGs."""
    if not inp or not os.path.exists(inp):
        raise SystemExit(f"--sample needs --input: an LR image or a folder of them (got {inp!r})")
    files = list_images(inp) if os.path.isdir(inp) else [inp]
    from tqdm import tqdm
    for f in tqdm(files, desc="sr", disable=len(files) < 2):
        with torch.no_grad():
            y = sr_fn(load_image(f)[None])
        save_image(y, os.path.join(output, os.path.splitext(os.path.basename(f))[0] + ".png"))
    print(f"{len(files)} images -> {output}")
    return len(files)


# ----------------------------------------------------------------------------- configuration and logging
def _comments(cls):
    """{field: the source comment on its line} of a Config dataclass."""
    import inspect
    return dict(re.findall(r"^\s+(\w+):[^=\n]+=[^#\n]*#\s*(.*)$", inspect.getsource(cls), re.M))


def configure(cls, **given):
    """A method's Config: the dataclass defaults (the paper's), then for --model tiny / mini its module's TINY / MINI
    values (a dict value holds them per --stage), then `given`. A flag the user sets always wins over a preset."""
    cfg = cls(**given)
    p = PRESETS[resolve_preset(cfg.model, cls.model)]
    small = "MINI" if p.pretrain else "TINY" if p.hub is None else None
    for k, v in getattr(sys.modules[cls.__module__], small, {}).items() if small else ():
        if k not in given and (not isinstance(v, dict) or cfg.stage in v):
            setattr(cfg, k, v[cfg.stage] if isinstance(v, dict) else v)
    return cfg


def parse_config(cls, argv=None):
    """The command line: flags are the Config's field names (`--lr 1e-5`; booleans take true/false), applied over
    the defaults and presets by configure(). --help lists each flag with its default and its source comment."""
    import argparse
    mod, notes = sys.modules[cls.__module__], _comments(cls)
    argv = sys.argv[1:] if argv is None else argv
    for flag, why in getattr(mod, "UNSUPPORTED", {}).items():  # flags this method deliberately lacks
        if f"--{flag}" in argv:
            raise SystemExit(f"--{flag}: {os.path.basename(mod.__file__)} does not support it: {why}")
    p = argparse.ArgumentParser(description=(mod.__doc__ or "").strip().split("\n")[0],
                                usage=f"python {os.path.basename(mod.__file__)} [--flag value ...]",
                                argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(cls):
        help = f"{notes.get(f.name, '')} (default: {f.default})".replace("%", "%%")
        if f.type is bool:
            p.add_argument(f"--{f.name}", type=lambda s: s.lower() in ("1", "true", "yes"), nargs="?", const=True,
                           metavar="bool", help=help)
        else:
            p.add_argument(f"--{f.name}", type=f.type, metavar=f.type.__name__, help=help)
    return configure(cls, **vars(p.parse_args(argv)))


class Logger:
    """Rank-0 lines to the console and out_dir/log.txt."""

    def __init__(self, out_dir, master, device=torch.device("cpu")):
        self.master, self.file, self.device = master, os.path.join(out_dir, "log.txt"), device
        if master:
            os.makedirs(out_dir, exist_ok=True)
        self.start()

    def start(self):
        """Start the step timer (just before the training loop)."""
        self.t0, self.steps = time.time(), 0

    def __call__(self, msg):
        if self.master:
            print(msg, flush=True)
            with open(self.file, "a") as f:
                f.write(msg + "\n")

    def step(self, step, max_steps, losses, every):
        """Call on every rank after each optimizer step. Every `every` steps and at the last, one line: the losses
        averaged over ranks, ms per step since the last line, peak memory."""
        self.steps += 1
        if step % every and step != max_steps:
            return
        losses = reduce_mean({k: float(v) for k, v in losses.items()})
        ms, self.t0, self.steps = 1000 * (time.time() - self.t0) / self.steps, time.time(), 0
        (head, value), rest = next(iter(losses.items())), list(losses.items())[1:]
        terms = " ".join(f"{k} {v:.4g}" for k, v in rest)
        mem = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else peak_rss_gb()
        self(f"step {step}/{max_steps} | {head} {value:.4g} ({terms}) | {ms:.0f} ms/step | mem {mem:.2f} GB")


def peak_rss_gb():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def save_grid(path, x_lr, out, x_hr):
    """One row per image: LR (bicubic-upsampled) | output | HR."""
    import torchvision
    n = min(4, out.shape[0])
    up = F.interpolate(x_lr[:n].float(), size=out.shape[-2:], mode="bicubic", align_corners=False)
    rows = torch.cat([up, out[:n].detach().float(), x_hr[:n].float()], dim=-1).clamp(0, 1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torchvision.utils.save_image(rows, path, nrow=1, padding=2)


# ----------------------------------------------------------------------------- pretrained networks
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"  # torchvision's ImageNet VGG16: LPIPS
VGG19_URL = "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"  # torchvision's ImageNet VGG19: StrSR's FDL


@dataclasses.dataclass(frozen=True)
class Weights:
    """A pretrained network a real-preset run loads, from `source`: a hub repo id (`files` must be in the Hugging Face
    cache, `a|b` either of two; prefetch downloads the `fetch` patterns, or those files), a URL (torch hub's cache),
    or a local path given by `flag`."""
    name: str
    source: str
    flag: str
    files: tuple = ()
    fetch: tuple = ()

    def cache(self):
        if self.source.startswith(("/", ".", "~")) or os.path.exists(self.source):
            return "(a local path)"
        return torch.hub.get_dir() if self.source.startswith("http") else "the Hugging Face cache"

    def found(self):
        """Whether it is there to load (nothing is downloaded)."""
        if self.cache() == "(a local path)":
            return os.path.exists(os.path.expanduser(self.source))
        if self.source.startswith("http"):
            return os.path.exists(hub_file(self.source))
        from huggingface_hub import try_to_load_from_cache
        return all(any(isinstance(try_to_load_from_cache(self.source, f), str) for f in alternatives.split("|"))
                   for alternatives in self.files)


def hub_file(url):
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def base_weights(cfg, text=False):
    """The base pipeline of cfg.model (its hub id, or --model_path): transformer and VAE, and with `text` the text
    encoders and tokenizers that encode the run's prompt."""
    n = {"flux1": 2, "flux2": 1, "zimage": 1, "sd3": 3, "qwen": 1}[PRESETS[cfg.model].family] if text else 0
    parts = ["transformer", "vae"] + ["text_encoder" + s for s in ("", "_2", "_3")[:n]]
    return Weights(f"{cfg.model} ({', '.join(parts)})", cfg.model_path or PRESETS[cfg.model].hub or cfg.model,
                   "model_path", ("model_index.json",) + tuple(f"{p}/config.json" for p in parts),
                   ("model_index.json", "scheduler/*", *(p + "/*" for p in parts)) + (("tokenizer*/*",) if n else ()))


def check_weights(cfg, needs):
    """On a real preset, every pretrained network the run needs must be there before anything is built: nothing is
    downloaded, nothing replaced by a random stand-in. A clear exit lists each missing one and how to fetch it."""
    missing = [w for w in needs if not w.found()] if PRESETS[cfg.model].hub else []
    if missing:
        method = os.path.splitext(os.path.basename(sys.modules[type(cfg).__module__].__file__))[0]
        raise SystemExit("missing pretrained weights (nothing was built or downloaded):\n" + "".join(
            f"  - {w.name}: {w.source} is not in {w.cache()}; or give a local copy: --{w.flag} PATH\n"
            for w in missing) + "fetch them on a machine with internet (the same HF_HOME and TORCH_HOME), then train "
            f"with HF_HUB_OFFLINE=1:\n  python common.py prefetch --method {method} --model {cfg.model}")


def prefetch(needs):
    """Download every network of `needs` into the standard caches, printing each with its size; the failures."""
    from huggingface_hub import hf_hub_download, snapshot_download
    failed = []
    for w in needs:
        try:
            if w.cache() == "(a local path)":
                print(f"{w.name}: {w.source} (local, given by --{w.flag})")
                continue
            if w.source.startswith("http"):
                os.makedirs(os.path.dirname(hub_file(w.source)), exist_ok=True)
                if not os.path.exists(hub_file(w.source)):
                    torch.hub.download_url_to_file(w.source, hub_file(w.source))
                paths = [hub_file(w.source)]
            elif w.fetch:
                folder = snapshot_download(w.source, allow_patterns=list(w.fetch))
                paths = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs]
            else:
                paths = []
                for alternatives in w.files:
                    for i, f in enumerate(alternatives.split("|")):
                        try:
                            paths.append(hf_hub_download(w.source, f))
                            break
                        except Exception:
                            if i == alternatives.count("|"):
                                raise
            print(f"{w.name}: {w.source} ({sum(os.path.getsize(p) for p in paths) / 1e9:.2f} GB)")
        except Exception as e:
            failed.append(f"{w.name}: {w.source}: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}")
            print("failed: " + failed[-1])
    return failed


def load_lpips(device, weights="random"):
    """VGG LPIPS on images in [0, 1]: the lpips package's linear heads on torchvision's ImageNet VGG16 read from
    `weights` (a file, "" torch hub's cache), or, with "random", on a random VGG16 drawn from seed 0: the tiny and
    mini presets' stand-in and eval.py's offline LPIPS-rand, one fixed network."""
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


def lpips_weights(cfg):
    return Weights("VGG16 of LPIPS", cfg.lpips_weights or VGG16_URL, "lpips_weights")


# ----------------------------------------------------------------------------- mini bases
# A base this project pretrains, so that `--model mini` really learns on a CPU: the family's own DiT class at ~2M
# parameters, and (a diffusers AutoencoderKL trained from scratch learns too slowly on two cores) a patch-PCA
# autoencoder behind the same encode/decode interface and latent conventions.
MINI_DIR = os.environ.get("MINI_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights"))
MINI_CROP = 128  # ours: pretraining crop (16x16 latents)


@functools.cache
def mini_vae_class():  # built on first use: `import common` stays free of diffusers
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config
    from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
    from diffusers.models.modeling_outputs import AutoencoderKLOutput

    class PatchVAE(ModelMixin, ConfigMixin):
        """Encoder: one linear map of each 8x8 patch to C latents (initialised from the SVD of training patches).
        Decoder: its transpose, plus a zero-initialised 3x3-conv residual that smooths patch seams. Deterministic
        (latent_dist.mode() is the code). Normalised in the family's convention: shift/scale (FLUX.1, Z-Image, SD3),
        per-channel mean/std (Qwen, which also has a frame axis), or BatchNorm stats of the 2x2-patchified latents
        (FLUX.2)."""

        @register_to_config
        def __init__(self, latent_channels=16, patch=8, width=32, scaling_factor=1.0, shift_factor=0.0,
                     per_channel=False, latents_mean=None, latents_std=None, batch_norm_eps=None):
            super().__init__()
            C, nn = latent_channels, torch.nn
            self.enc = nn.Conv2d(3, C, patch, stride=patch)
            self.dec = nn.ConvTranspose2d(C, 3, patch, stride=patch)
            self.refine = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.SiLU(),
                                        nn.Conv2d(width, width, 3, padding=1), nn.SiLU(), nn.Conv2d(width, 3, 3, padding=1))
            nn.init.zeros_(self.refine[-1].weight), nn.init.zeros_(self.refine[-1].bias)
            if batch_norm_eps is not None:
                self.bn = nn.BatchNorm2d(4 * C, eps=batch_norm_eps, affine=False)

        def enable_gradient_checkpointing(self):  # nothing worth recomputing: three convs
            pass

        def encode(self, x):  # (B, 3, H, W) or (B, 3, 1, H, W) in [-1, 1]
            z = self.enc(x[:, :, 0]) if x.dim() == 5 else self.enc(x)
            z = z.unsqueeze(2) if x.dim() == 5 else z
            return AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution(torch.cat([z, torch.zeros_like(z)], 1),
                                                                                True))

        def decode(self, z):
            x = self.dec(z[:, :, 0] if z.dim() == 5 else z)
            x = x + self.refine(x)
            return DecoderOutput(sample=x.unsqueeze(2) if z.dim() == 5 else x)

    return PatchVAE


def _psnr(x, y):
    return float(-10 * torch.log10(F.mse_loss(x.clamp(0, 1), y).clamp_min(1e-10)))


def pca_init(vae, x):
    """Encoder = the top-C right singular vectors of the (uncentred) patches of x (B, 3, H, W) in [-1, 1], decoder =
    their transpose: the best rank-C linear autoencoder of those patches (Eckart-Young)."""
    p, C = vae.config.patch, vae.config.latent_channels
    patches = F.unfold(x, p, stride=p).transpose(1, 2).reshape(-1, 3 * p * p)  # (N, 3 p p), order (c, i, j)
    basis = torch.linalg.svd(patches, full_matrices=False)[2][:C]  # (C, 3 p p)
    with torch.no_grad():
        vae.enc.weight.copy_(basis.view(C, 3, p, p)), vae.enc.bias.zero_()
        vae.dec.weight.copy_(basis.view(C, 3, p, p)), vae.dec.bias.zero_()


def set_latent_stats(vae, family, z):
    """Store the normalisation of raw latents z (N, C, h, w) in the family's own convention, so that encode() gives
    unit-variance latents as the real VAEs' constants do."""
    if family == "flux2":
        zp = patchify(z)
        vae.bn.running_mean.copy_(zp.mean((0, 2, 3)))
        vae.bn.running_var.copy_(zp.var((0, 2, 3)))
    elif vae.config.per_channel:
        vae.register_to_config(latents_mean=z.mean((0, 2, 3)).tolist(), latents_std=z.std((0, 2, 3)).tolist())
    else:
        vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1 / z.std()))


def prepare_base(preset):
    """A mini preset's base, pretrained now (announced) if MINI_DIR does not hold it yet; nothing for the other
    presets. A lock file lets concurrent processes (torchrun ranks, parallel runs) wait for one pretraining."""
    import fcntl
    if not PRESETS[preset].pretrain:
        return
    folder = os.path.join(MINI_DIR, preset)
    if not os.path.exists(os.path.join(folder, "pretrain.json")):
        os.makedirs(MINI_DIR, exist_ok=True)
        with open(os.path.join(MINI_DIR, f".{preset}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not os.path.exists(os.path.join(folder, "pretrain.json")):
                print(f"{preset}: no pretrained base in {folder}; pretraining it now (once; README, mini bases)")
                pretrain(preset)
    with open(os.path.join(folder, "pretrain.json")) as f:
        steps = json.load(f)["dit_steps"]
    if steps != PRESETS[preset].dit_steps:
        warnings.warn(f"{folder}: a base pretrained {steps} DiT steps; {preset} is now {PRESETS[preset].dit_steps} "
                      f"(delete the folder to pretrain it again)")


def _batch(ds, n, g):
    keys = [(int(torch.randint(len(ds), (1,), generator=g)), int(torch.randint(2**31, (1,), generator=g)))
            for _ in range(n)]
    return torch.stack([ds[k] for k in keys])


def pretrain(preset, vae_steps=200, dit_steps=None, batch=16, lr=5e-4, seed=0, out=None):
    """Pretrain a mini base on the sample photos (held-out ones excluded): (1) the autoencoder, from the SVD of
    training patches, then fine-tuned on MSE; (2) the family's DiT by plain flow matching on its normalised latents,
    z_t = (1 - t) z_0 + t eps, target v = eps - z_0, with the fixed tiny_cond as the empty prompt. Writes vae/,
    transformer/ (safetensors + JSON), pretrain.json and samples.png (the base's generations)."""
    import diffusers
    from tqdm import tqdm
    p = PRESETS[preset]
    if not p.pretrain:
        raise SystemExit(f"--model {preset}: pretraining is for the mini presets "
                         f"({', '.join(k for k in PRESETS if PRESETS[k].pretrain)})")
    out, t_start, dit_steps = out or os.path.join(MINI_DIR, preset), time.time(), dit_steps or p.dit_steps
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    ds, held = ImageDataset("sample", MINI_CROP), sample_photos(SAMPLE_HELDOUT)

    # 1. autoencoder: SVD init, then MSE fine-tuning of encoder, decoder and the seam residual
    vae = mini_vae_class()(**p.vae)
    pca_init(vae, _batch(ds, 256, g) * 2 - 1)
    recon = lambda x: (vae.decode(vae.encode(x * 2 - 1).latent_dist.mode()).sample + 1) / 2
    with torch.no_grad():
        psnr_svd = sum(_psnr(recon(x[None]), x[None]) for x in held) / len(held)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)  # ours
    for _ in (bar := tqdm(range(vae_steps), desc=f"{preset} vae")):
        x = _batch(ds, 8, g)
        loss = F.mse_loss(recon(x), x)
        opt.zero_grad(set_to_none=True), loss.backward(), opt.step()
        bar.set_postfix(mse=f"{loss.item():.2e}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        psnr = sum(_psnr(recon(x[None]), x[None]) for x in held) / len(held)
        raw = torch.cat([vae.encode(_batch(ds, 32, g) * 2 - 1).latent_dist.mode() for _ in range(4)])
        set_latent_stats(vae, p.family, raw)
    print(f"{preset} vae: held-out PSNR {psnr_svd:.2f} dB (SVD) -> {psnr:.2f} dB ({vae_steps} steps)")

    # 2. DiT: plain flow matching on the normalised latents (the "text-to-image" pretraining)
    dit = getattr(diffusers, FAMILIES[p.family][0])(**p.dit)
    cond = tiny_cond(dit, p.family)
    opt = torch.optim.AdamW(dit.parameters(), lr=lr, weight_decay=0.0)  # ours
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 100))  # ours: 100-step warm-up
    ema = None
    for _ in (bar := tqdm(range(dit_steps), desc=f"{preset} dit")):
        with torch.no_grad():
            z_0 = encode(vae, p.family, _batch(ds, batch, g))
        eps = torch.randn(z_0.shape, generator=g)
        t = torch.sigmoid(torch.randn(batch, generator=g)).view(-1, 1, 1, 1)  # ours: logit-normal(0, 1), as SD3
        z_t = (1 - t) * z_0 + t * eps
        loss = F.mse_loss(velocity(p.family, dit, z_t, t.flatten(), expand_cond(cond, batch)), eps - z_0)
        opt.zero_grad(set_to_none=True), loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        opt.step(), sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.set_postfix(fm_loss=f"{ema:.4f}")
    print(f"{preset} dit: flow-matching loss {ema:.4f} ({dit_steps} steps)")

    # 3. save atomically, with 8 generations of the base (28 Euler steps from noise)
    dit.eval()
    with torch.no_grad():
        z, ts = torch.randn((8,) + z_0.shape[1:], generator=g), torch.linspace(1, 0, 29)
        for t, s in zip(ts[:-1], ts[1:]):
            z = z - (t - s) * velocity(p.family, dit, z, t.view(1), expand_cond(cond, 8))
        samples = decode(vae, p.family, z).clamp(0, 1)
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(os.path.join(tmp, "vae"))
    dit.save_pretrained(os.path.join(tmp, "transformer"))
    import torchvision
    torchvision.utils.save_image(samples, os.path.join(tmp, "samples.png"), nrow=4, padding=2)
    info = dict(preset=preset, command=f"python common.py pretrain --model {preset} --vae_steps {vae_steps} "
                f"--dit_steps {dit_steps}", vae_steps=vae_steps, dit_steps=dit_steps, batch=batch, lr=lr, seed=seed,
                heldout=SAMPLE_HELDOUT, vae_psnr_svd=psnr_svd, vae_psnr=psnr, fm_loss=ema,
                minutes=(time.time() - t_start) / 60)
    with open(os.path.join(tmp, "pretrain.json"), "w") as f:
        json.dump(info, f, indent=1)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"{preset}: pretrained in {info['minutes']:.1f} min -> {out} (samples.png: the base's generations)")
    return out


if __name__ == "__main__":
    import argparse, importlib
    ap = argparse.ArgumentParser(description="python common.py pretrain --model mini-<family>: pretrain a mini base; "
                                 "python common.py prefetch --method M [--model P] [M's flags]: download what M needs")
    ap.add_argument("command", choices=["pretrain", "prefetch"])
    ap.add_argument("--model", default=None, help="pretrain: " + ", ".join(k for k in PRESETS if PRESETS[k].pretrain))
    ap.add_argument("--method", default=None, help="prefetch: strsr, fluxsr, smfsr or teasr")
    ap.add_argument("--vae_steps", type=int, default=200)
    ap.add_argument("--dit_steps", type=int, default=None, help="default: the preset's (1000; mini-flux1 8000)")
    ap.add_argument("--out", default=None, help=f"default: {MINI_DIR}/<model>")
    a, rest = ap.parse_known_args()
    if a.command == "pretrain":
        pretrain(a.model if a.model in PRESETS else "mini-" + a.model, a.vae_steps, a.dit_steps, out=a.out)
    else:  # the command line only imports a method and eval.py, the module never does
        mod = importlib.import_module(a.method)
        cfg = parse_config(mod.Config, (["--model", a.model] if a.model else []) + rest)
        stages = getattr(mod, "STAGES", [getattr(cfg, "stage", None)])  # every stage's networks
        needs = {w.source: w for st in stages for w in mod.pretrained(mod.resolve(
            dataclasses.replace(cfg, stage=st) if st else cfg))}
        failed = prefetch(needs.values()) + importlib.import_module("eval").prefetch()
        if failed:
            raise SystemExit(f"prefetch: {len(failed)} could not be downloaded (this needs the internet):\n  "
                             + "\n  ".join(failed))
        print(f"all there: train with HF_HUB_OFFLINE=1 (HF_HOME and TORCH_HOME as now)")
