"""One light segmentation head per organ on nnU-Net's shared encoder-decoder (Kim et al. 2024 multi-head U-Net,
MultiTalent, DoDNet's task heads).

nnU-Net's U-Net decoder ends every (deep-supervision) stage in ``decoder.seg_layers[s]``, a 1x1 convolution to all
classes. :func:`attach_organ_heads` replaces each by :class:`OrganHeads`: per organ, ``conv(3) -> norm -> LeakyReLU ->
conv(1) -> 1 logit`` when ``hidden_channels > 0``, or a single 1x1 convolution per organ when 0. The outputs are
concatenated to ``[B, K, ...]``, so everything downstream (deep supervision, sigmoid inference through nnU-Net's
regions) is unchanged.
"""
from __future__ import annotations

import torch
from torch import nn


class OrganHeads(nn.Module):
    """K independent heads on a shared feature map. ``forward(x [B, C, *spatial]) -> [B, K, *spatial]``."""

    def __init__(self, conv_op, in_channels: int, num_organs: int, hidden_channels: int = 0, norm_op=None,
                 norm_op_kwargs=None):
        super().__init__()
        heads = []
        for _ in range(num_organs):
            if hidden_channels > 0:
                layers = [conv_op(in_channels, hidden_channels, 3, 1, 1, bias=norm_op is None)]
                if norm_op is not None:
                    layers.append(norm_op(hidden_channels, **(norm_op_kwargs or {})))
                layers += [nn.LeakyReLU(inplace=True), conv_op(hidden_channels, 1, 1, 1, 0, bias=True)]
                heads.append(nn.Sequential(*layers))
            else:
                heads.append(conv_op(in_channels, 1, 1, 1, 0, bias=True))
        self.heads = nn.ModuleList(heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([h(x) for h in self.heads], dim=1)


def attach_organ_heads(network: nn.Module, num_organs: int, hidden_channels: int) -> nn.Module:
    """Replace the ``decoder.seg_layers`` of an nnU-Net (dynamic_network_architectures) U-Net by organ heads."""
    decoder = getattr(network, "decoder", None)
    if decoder is None or not hasattr(decoder, "seg_layers"):
        raise TypeError(f"{type(network).__name__} has no decoder.seg_layers; organ heads need an nnU-Net U-Net "
                        f"(PlainConvUNet, ResidualEncoderUNet)")
    encoder = network.encoder
    decoder.seg_layers = nn.ModuleList(
        OrganHeads(encoder.conv_op, layer.in_channels, num_organs, hidden_channels, encoder.norm_op,
                   encoder.norm_op_kwargs)
        for layer in decoder.seg_layers
    )
    return network
