"""The foundation model: CineMA's ConvViT, its checkpoints and MAE pretraining.

Chapter: notebooks/00_foundation_model_and_lora.
"""

from medlora_lib.models.checkpoint import (
    SMALL_FM_PATH,
    LoadReport,
    load_convvit,
    load_pretrained,
    save_convvit,
)
from medlora_lib.models.convvit import SIZES, ConvViT, ConvViTConfig, build_convvit
from medlora_lib.models.mae import (
    MAEConfig,
    MaskedAutoencoder,
    build_mae,
    load_mae,
    save_mae,
)

__all__ = [
    "SIZES",
    "SMALL_FM_PATH",
    "ConvViT",
    "ConvViTConfig",
    "LoadReport",
    "MAEConfig",
    "MaskedAutoencoder",
    "build_convvit",
    "build_mae",
    "load_convvit",
    "load_mae",
    "load_pretrained",
    "save_convvit",
    "save_mae",
]
