"""The foundation model: CineMA's ConvViT, its checkpoints and MAE pretraining.

Chapter: notebooks/00_foundation_model_and_lora.
"""

from medlora_lib.models.convvit import SIZES, ConvViT, ConvViTConfig, build_convvit

__all__ = ["SIZES", "ConvViT", "ConvViTConfig", "build_convvit"]
