"""One light segmentation head per organ on nnU-Net's shared encoder-decoder (Kim et al. 2024 multi-head U-Net,
MultiTalent, DoDNet's task heads).

nnU-Net's U-Net decoder ends every (deep-supervision) stage in ``decoder.seg_layers[s]``, a 1x1 convolution to all
classes. :func:`attach_organ_heads` replaces each by :class:`OrganHeads`: per organ, ``conv(3) -> norm -> LeakyReLU ->
conv(1) -> 1 logit`` when ``hidden_channels > 0``, or a single 1x1 convolution per organ when 0. The outputs are
concatenated to ``[B, K, ...]``, so everything downstream (deep supervision, sigmoid inference through nnU-Net's
regions) is unchanged.

The heads keep one module per organ (``heads.<k>.*``: organ-aware aggregation and FedBN find an organ's parameters by
that name, and checkpoints keep their keys), but run as ONE network: their weights are concatenated on every forward
into one ``conv(3)`` with ``K x hidden`` output channels, one instance norm over those channels (per channel, so the
same as K separate norms), one LeakyReLU and one grouped ``conv(1)`` (``groups=K``) - the same function, computed
with 3 convolutions per deep-supervision stage instead of ``2 K`` (issue 17, item 6). Heads with a norm that keeps
running statistics (batch norm) run one by one, as before.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}  # by weight.dim()


class OrganHeads(nn.Module):
    """K independent heads on a shared feature map. ``forward(x [B, C, *spatial]) -> [B, K, *spatial]``.
    ``fuse = False`` (on an instance) runs the heads one by one, for comparison."""

    fuse = True

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
        norm = heads[0][1] if hidden_channels > 0 and norm_op is not None else None
        # fixed by the construction: only a norm that keeps running statistics (batch norm) cannot be fused
        self._fusable = norm is None or (isinstance(norm, nn.modules.instancenorm._InstanceNorm)
                                         and not norm.track_running_stats)

    @property
    def fused(self) -> bool:
        """Whether :meth:`forward` runs the heads as one network (see the module's docstring)."""
        return self.fuse and self._fusable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return torch.cat([h(x) for h in self.heads], dim=1)
        first = self.heads[0]
        if isinstance(first, nn.modules.conv._ConvNd):  # K 1x1 convolutions: one with K output channels
            return self._conv([h for h in self.heads], x)
        k = len(self.heads)
        y = self._conv([h[0] for h in self.heads], x)
        if len(first) == 4:
            norm = first[1]
            weight = torch.cat([h[1].weight for h in self.heads]) if norm.affine else None
            bias = torch.cat([h[1].bias for h in self.heads]) if norm.affine else None
            y = F.instance_norm(y, weight=weight, bias=bias, eps=norm.eps)
        act = first[-2]
        y = F.leaky_relu(y, act.negative_slope)
        return self._conv([h[-1] for h in self.heads], y, groups=k)

    @staticmethod
    def _conv(convs, x: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """The convolutions ``convs`` (same shape and settings) as one, their outputs concatenated on channels."""
        c = convs[0]
        weight = torch.cat([m.weight for m in convs])
        bias = torch.cat([m.bias for m in convs]) if c.bias is not None else None
        return _CONV[weight.dim()](x, weight, bias, c.stride, c.padding, c.dilation, groups)


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
