"""A configurable 2D U-Net, the building block of both stages of SigmaMUNet / DoubleMUNet.

Layout (DECODE's mu-net style): each level is ``conv3x3 -> [norm] -> act -> conv3x3 -> [norm] -> act``;
the encoder halves the size with a strided 2x2 convolution (learned, unlike max-pooling) and doubles the
width; the decoder upsamples by nearest-neighbour x2 followed by a 1x1 convolution that halves the width,
concatenates the skip connection and runs a block. A final 1x1 convolution maps to ``out_channels``
without activation. All 3x3 convolutions are zero-padded, so the output has the input's height and
width, which must be multiples of ``2**depth``.
"""

from __future__ import annotations

import torch
from torch import nn

from decode_accel.errors import DecodeAccelError

ACTIVATIONS = {"elu": nn.ELU, "relu": nn.ReLU, "gelu": nn.GELU}
NORMS = ("none", "group", "batch")


def make_activation(name: str) -> nn.Module:
    """The activation module called ``name`` (elu, relu or gelu)."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise DecodeAccelError(f"unknown activation {name!r}", field="activation",
                               fix=f"use one of {sorted(ACTIVATIONS)}") from None


def check_norm(norm: str | None) -> str:
    """Normalise the ``norm`` argument (None means 'none') and reject unknown names."""
    norm = "none" if norm is None else norm
    if norm not in NORMS:
        raise DecodeAccelError(f"unknown normalization {norm!r}", field="norm", fix=f"use one of {list(NORMS)}")
    return norm


def group_count(channels: int) -> int:
    """Number of GroupNorm groups: at most 8, at least 4 channels per group (or one group)."""
    for groups in range(min(8, channels), 0, -1):
        if channels % groups == 0 and channels // groups >= 4:
            return groups
    return 1


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "group":
        return nn.GroupNorm(group_count(channels), channels)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


def elu_inference_(x: torch.Tensor) -> torch.Tensor:
    """ELU (alpha 1) of ``x`` IN PLACE, for inference on the CPU: ``max(x, exp(min(x, 0)) - 1)``.

    The same function as ``F.elu`` (for x > 0: max(x, 0) = x; for x <= 0: exp(x) - 1 >= x), within one
    float rounding of ``expm1`` (6e-8 absolute), but built from vectorised passes: PyTorch's CPU ELU
    evaluates ``expm1`` element by element, and was 26 % of the network's CPU time at inference
    (2.1 M elements: 11.7 ms against 8.3 ms, one thread, issue 15.1). No autograd: inference only.
    """
    e = torch.clamp(x, max=0.0).exp_().sub_(1.0)
    return torch.maximum(x, e, out=x)


def run_layers(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``layers(x)``; at inference on the CPU each ELU (alpha 1) after another layer runs as
    :func:`elu_inference_` on that layer's fresh output (training and other devices: the modules as they are)."""
    fast = not torch.is_grad_enabled() and x.device.type == "cpu"
    for index, layer in enumerate(layers):
        if (fast and type(layer) is nn.ELU and layer.alpha == 1.0 and index > 0
                and isinstance(layers[index - 1], (nn.Conv2d, nn.GroupNorm, nn.BatchNorm2d))):
            x = elu_inference_(x)
        else:
            x = layer(x)
    return x


class ConvBlock(nn.Sequential):
    """Two padded 3x3 convolutions, each followed by optional normalisation and the activation.

    With ``dropout > 0`` a channel-wise (spatial) dropout follows the block: neighbouring pixels of a
    feature map are strongly correlated, so dropping single pixels regularises little.
    """

    def __init__(self, in_channels: int, out_channels: int, activation: str = "elu", norm: str | None = None,
                 dropout: float = 0.0):
        norm = check_norm(norm)
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, 3, padding=1), _norm_layer(norm, out_channels),
            make_activation(activation),
            nn.Conv2d(out_channels, out_channels, 3, padding=1), _norm_layer(norm, out_channels),
            make_activation(activation),
        ]
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        super().__init__(*[layer for layer in layers if not isinstance(layer, nn.Identity)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_layers(self, x)


class UNet2d(nn.Module):
    """2D U-Net with strided-conv downsampling and nearest-neighbour + 1x1 conv upsampling.

    Args:
        in_channels: input channels.
        out_channels: output channels (1x1 output convolution, no activation).
        features: width of the first level; level i has ``features * 2**i`` channels.
        depth: number of down-sampling steps; input height and width must be multiples of ``2**depth``.
        activation: 'elu' (DECODE), 'relu' or 'gelu'.
        norm: None / 'none', 'group' (GroupNorm, see :func:`group_count`) or 'batch'.
        dropout: spatial dropout probability after every block, in [0, 1).
    """

    def __init__(self, in_channels: int, out_channels: int, features: int = 48, depth: int = 2,
                 activation: str = "elu", norm: str | None = None, dropout: float = 0.0):
        super().__init__()
        if features < 1 or depth < 0 or in_channels < 1 or out_channels < 1:
            raise DecodeAccelError(f"need features >= 1, depth >= 0 and channels >= 1, got features={features}, "
                                   f"depth={depth}, in={in_channels}, out={out_channels}", field="features")
        if not 0.0 <= dropout < 1.0:
            raise DecodeAccelError(f"must be in [0, 1), got {dropout}", field="dropout")
        self.depth = depth
        widths = [features * 2 ** level for level in range(depth + 1)]
        block = dict(activation=activation, norm=norm, dropout=dropout)
        self.encoders = nn.ModuleList()
        self.downs = nn.ModuleList()
        channels = in_channels
        for level in range(depth):
            self.encoders.append(ConvBlock(channels, widths[level], **block))
            self.downs.append(nn.Conv2d(widths[level], widths[level], kernel_size=2, stride=2))
            channels = widths[level]
        self.base = ConvBlock(channels, widths[depth], **block)
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in reversed(range(depth)):
            self.ups.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                          nn.Conv2d(widths[level + 1], widths[level], kernel_size=1)))
            self.decoders.append(ConvBlock(2 * widths[level], widths[level], **block))
        self.output = nn.Conv2d(widths[0], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_channels, H, W) -> (N, out_channels, H, W); H and W multiples of ``2**depth``."""
        skips = []
        for encoder, down in zip(self.encoders, self.downs):
            x = encoder(x)
            skips.append(x)
            x = down(x)
        x = self.base(x)
        for up, decoder, skip in zip(self.ups, self.decoders, reversed(skips)):
            x = decoder(torch.cat([skip, up(x)], dim=1))
        return self.output(x)
