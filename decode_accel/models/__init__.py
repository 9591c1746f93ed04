"""Networks: SigmaMUNet (single channel), DoubleMUNet (two-channel ratiometric), their Scaling,
presets, feature caching for movies and the ``model`` config section.

All networks take frames (B, C, 3, H, W) in photons and return maps in physical units
(docs/architecture.md). Height and width must be multiples of ``2**depth`` (4 for the presets).
"""

from decode_accel.models.config import ModelConfig, build_model, load_pretrained
from decode_accel.models.double_munet import DoubleMUNet
from decode_accel.models.scaling import Scaling
from decode_accel.models.sigma_munet import SigmaMUNet
from decode_accel.models.two_stage import PRESETS, TwoStageNet
from decode_accel.models.unet import UNet2d

__all__ = ["DoubleMUNet", "ModelConfig", "PRESETS", "Scaling", "SigmaMUNet", "TwoStageNet", "UNet2d", "build_model", "load_pretrained"]
