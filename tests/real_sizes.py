"""The real networks' architectures, built with random weights (no hub): the five bases' transformers and VAEs,
Qwen3-VL-4B (StrSR's condition), CLIP-ConvNeXt-XXLarge (StrSR's discriminator) and DINOv3 ViT-B/16 (SMFSR's). Used by
tests/test_real_sizes.py (parameter counts on the meta device against the published sizes) and tests/bench.py --gpu.

Each config is the published config.json of the hub repo (read from copies of it that name the official repo or
snapshot, cited per entry); `published` is the size its authors give (as written: "4B"), with its wording and source."""
import torch

REAL = {  # name: (library, class, config, published parameters, the published wording, source)
    "flux1-dev": ("diffusers", "FluxTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56)),
        "12B", '"a 12 billion parameter rectified flow transformer"',
        "huggingface.co/black-forest-labs/FLUX.1-dev (model card); config: its transformer/config.json"),
    "flux2-klein": ("diffusers", "Flux2Transformer2DModel", dict(
        patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256, mlp_ratio=3.0,
        axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=False),
        "4B", '"FLUX.2 [klein] 4B is a 4 billion parameter rectified flow transformer"',
        "build.nvidia.com/black-forest-labs/flux_2-klein-4b/modelcard (= the HF card); the base-4B has the same "
        "transformer config"),
    "zimage": ("diffusers", "ZImageTransformer2DModel", dict(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
        n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0,
        axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512]),
        "6.15B", '"6B parameters" (Tongyi-MAI model card); 6.15B to the next digit',
        "huggingface.co/Tongyi-MAI/Z-Image-Turbo; 6.15B: docs.rs/cortiq-engine (zimage.rs)"),
    "sd35-medium": ("diffusers", "SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
        joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
        "2.5B", '"2.5 billion parameters" (with the stored 384x384 position table)',
        "Stability AI's SD3.5 Medium release (dataconomy.com/2024/11/01/stable-diffusion-3-5-medium-is-launched)"),
    "qwen-image": ("diffusers", "QwenImageTransformer2DModel", dict(
        patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
        joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56)),
        "20B", '"Qwen-Image, a 20B MMDiT image foundation model"', "github.com/QwenLM/Qwen-Image (README)"),
    "qwen3-vl-4b": ("transformers", "Qwen3VLModel", dict(
        tie_word_embeddings=True,
        text_config=dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_act="silu",
                         max_position_embeddings=262144, rms_norm_eps=1e-6, attention_bias=False,
                         tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=5000000,
                         mrope_section=[24, 20, 20], mrope_interleaved=True)),
        vision_config=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, in_channels=3,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=2560,
                           num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17],
                           hidden_act="gelu_pytorch_tanh"),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653),
        "4.438B", '"4B" (Qwen card); 4.438B counted from the checkpoint\'s tensors',
        "huggingface.co/Qwen/Qwen3-VL-4B-Instruct; 4.438B: huggingface.co/OpenExplorer/Qwen3-VL-4B-Instruct"),
    "convnext-xxlarge": ("open_clip", "convnext_xxlarge", {}, "846.54M", "image tower 846.54M parameters",
                         "github.com/mlfoundations/open_clip docs/model_profile.csv (convnext_xxlarge)"),
    "dinov3-vitb16": ("transformers", "DINOv3ViTModel", dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16,
        image_size=224, num_register_tokens=4, layerscale_value=1.0, use_gated_mlp=False, hidden_act="gelu",
        layer_norm_eps=1e-5, rope_theta=100.0, query_bias=True, key_bias=False, value_bias=True, proj_bias=True,
        mlp_bias=True, pos_embed_rescale=2.0),
        "86M", '"ViT-B/16 distilled | 86M"', "github.com/facebookresearch/dinov3 (README)"),
}
# The VAEs, for the bench: FLUX.1's AutoencoderKL (also Z-Image's; SD3.5's with its own scaling), FLUX.2's, Qwen-Image's
_KL = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=16, norm_num_groups=32,
           sample_size=1024, use_quant_conv=False, use_post_quant_conv=False, force_upcast=True)
VAE = {"flux1": dict(_KL, scaling_factor=0.3611, shift_factor=0.1159),
       "zimage": dict(_KL, scaling_factor=0.3611, shift_factor=0.1159),
       "sd3": dict(_KL, scaling_factor=1.5305, shift_factor=0.0609),
       "flux2": dict(latent_channels=32, use_quant_conv=True, use_post_quant_conv=True, batch_norm_eps=1e-4),
       "qwen": dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                    temperal_downsample=[False, True, True], dropout=0.0)}


def build(name, device="meta", dtype=torch.float32):
    """The network `name` of REAL with random weights, built directly on `device` in `dtype`."""
    lib, cls, config = REAL[name][:3]
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            if lib == "diffusers":
                import diffusers
                return getattr(diffusers, cls)(**config)
            if lib == "transformers":
                import transformers
                conf = getattr(transformers, cls.replace("Model", "Config"))(**config)
                return getattr(transformers, cls)(conf)
            import open_clip
            return open_clip.create_model(cls, device=device).visual
    finally:
        torch.set_default_dtype(old)


def count(model):
    """Parameters, and the buffers a checkpoint stores as weights (SD3's position table)."""
    n = sum(p.numel() for p in model.parameters())
    return n + sum(b.numel() for name, b in model.named_buffers() if name.endswith("pos_embed.pos_embed"))
