"""Tiny diffusers models built from configs (no downloads): a Stable-Diffusion-shaped UNet and an
SD3-shaped DiT, with inputs, and the module names a diffusion user adapts."""

from __future__ import annotations

import torch

# attention projections plus the ResNet convs and the transformer blocks' 1x1 in/out projections
UNET_TARGETS = ["to_q", "to_k", "to_v", "conv1", "conv2", "proj_in", "proj_out"]
DIT_TARGETS = ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"]


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ).eval()


def unet_inputs(batch: int = 2, size: int = 16, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(batch, 4, size, size, generator=g),
            "timestep": torch.randint(0, 1000, (batch,), generator=g),
            "encoder_hidden_states": torch.randn(batch, 5, 32, generator=g)}


def tiny_dit(seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32, out_channels=4,
    ).eval()


def dit_inputs(batch: int = 2, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, 4, 16, 16, generator=g),
            "encoder_hidden_states": torch.randn(batch, 5, 32, generator=g),
            "pooled_projections": torch.randn(batch, 32, generator=g),
            "timestep": torch.randint(0, 1000, (batch,), generator=g)}


MODELS = {"unet": (tiny_unet, unet_inputs, UNET_TARGETS), "dit": (tiny_dit, dit_inputs, DIT_TARGETS)}


def out(model, inputs: dict) -> torch.Tensor:
    return model(**inputs).sample
