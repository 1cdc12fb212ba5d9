"""A tiny Stable Diffusion pipeline built from configs and saved as a normal local folder.

No Hub download: a CLIP tokenizer over single characters, a two-block UNet, a two-block VAE
and a one-layer text encoder, randomly initialised. ``width`` scales every part (8 for the
tests on the CPU; bench/gpu_check.py uses a wider one, so 4-bit layers have real work).
``checker_flags`` adds a tiny safety checker that flags every picture (True) or none (False).
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any


def _tiny_tokenizer(folder: Path) -> tuple[Any, int]:
    """A CLIP BPE tokenizer over single characters: buildable offline, good enough here."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for token in ["<|startoftext|>", "<|endoftext|>", "!"]:
        vocab[token] = len(vocab)
    for ch in string.ascii_lowercase + string.digits:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)
    return tokenizer, len(vocab)


def _tiny_safety_checker(flags: bool) -> tuple[Any, Any]:
    """A StableDiffusionSafetyChecker on a tiny CLIP vision tower, and its image processor.

    The checker flags a picture when a cosine similarity (from -1 to 1) exceeds a concept's
    threshold: thresholds of -2 flag every picture, thresholds of 2 none.
    """
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessorPil

    config = CLIPConfig(
        text_config={"vocab_size": 64, "hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2,
                     "num_hidden_layers": 1, "max_position_embeddings": 16},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 8, "intermediate_size": 16,
                       "num_attention_heads": 2, "num_hidden_layers": 1},
        projection_dim=8,
    )
    checker = StableDiffusionSafetyChecker(config)
    threshold = -2.0 if flags else 2.0
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(threshold)
        checker.special_care_embeds_weights.fill_(threshold)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return checker, processor


def build_tiny_sd_pipeline(root: Path, *, width: int = 8, sample_size: int = 8, seed: int = 0,
                           checker_flags: bool | None = None) -> str:
    """Save a randomly initialised, very small SD pipeline under ``root``; return its folder."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer, vocab_size = _tiny_tokenizer(root / "tok-src")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(width, 2 * width),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=width,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(width, 2 * width),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=2 * sample_size,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=width,
            intermediate_size=2 * width,
            num_attention_heads=2,
            num_hidden_layers=1,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    safety_checker, feature_extractor = None, None
    if checker_flags is not None:
        safety_checker, feature_extractor = _tiny_safety_checker(checker_flags)
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, steps_offset=1),
        safety_checker=safety_checker,
        feature_extractor=feature_extractor,
        requires_safety_checker=checker_flags is not None,
    )
    folder = root / "pipeline"
    pipe.save_pretrained(folder)
    return str(folder)
