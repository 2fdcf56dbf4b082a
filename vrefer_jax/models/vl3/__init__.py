"""VideoRefer-VideoLLaMA3 (VRVL3) model parts: the SigLIP-NaViT encoder, token merge, projector."""
