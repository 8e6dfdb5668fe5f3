"""vlm: train vision-language models, from a CLIP-style aligned ViT to an image+text chat assistant."""

__version__ = "0.1.0"
