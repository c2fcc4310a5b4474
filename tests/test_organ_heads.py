"""The organ heads run as one network (fused convolutions) and compute exactly what K separate heads compute,
with the same parameter names (organ-aware aggregation, FedBN and old checkpoints rely on them)."""
import pytest
import torch
from torch import nn

from nnunetv2_fedkd.networks.organ_heads import OrganHeads

INSTANCE_NORM = (nn.InstanceNorm3d, {"eps": 1e-5, "affine": True})  # nnU-Net's 3d_fullres norm


def _one_by_one(heads: OrganHeads, x):
    return torch.cat([h(x) for h in heads.heads], dim=1)


def _randomise(module):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize("conv_op,hidden,norm", [
    (nn.Conv3d, 3, INSTANCE_NORM), (nn.Conv3d, 3, (None, None)), (nn.Conv3d, 0, INSTANCE_NORM),
    (nn.Conv2d, 4, (nn.InstanceNorm2d, {"eps": 1e-5, "affine": True})), (nn.Conv3d, 2, (nn.InstanceNorm3d, {})),
])
def test_fused_heads_equal_separate_heads_outputs_and_gradients(conv_op, hidden, norm):
    heads = OrganHeads(conv_op, 5, 4, hidden, norm[0], norm[1])
    _randomise(heads)
    assert heads.fused
    spatial = (6, 5, 4)[: 3 if conv_op is nn.Conv3d else 2]
    x = torch.randn(2, 5, *spatial, generator=torch.Generator().manual_seed(1), requires_grad=True)
    fused = heads(x)
    assert fused.shape == (2, 4, *spatial)
    g_fused = torch.autograd.grad((fused * torch.arange(4.0).view(1, 4, *[1] * len(spatial))).sum(),
                                  [x, *heads.parameters()])
    ref = _one_by_one(heads, x)
    g_ref = torch.autograd.grad((ref * torch.arange(4.0).view(1, 4, *[1] * len(spatial))).sum(),
                                [x, *heads.parameters()])
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_fused, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_head_changes_only_its_own_output_channel():
    heads = OrganHeads(nn.Conv3d, 5, 3, 2, *INSTANCE_NORM)
    _randomise(heads)
    x = torch.randn(1, 5, 4, 4, 4)
    before = heads(x)
    with torch.no_grad():
        heads.heads[1][0].weight.add_(1.0)
    after = heads(x)
    torch.testing.assert_close(after[:, [0, 2]], before[:, [0, 2]])
    assert not torch.allclose(after[:, 1], before[:, 1])


def test_parameter_names_are_per_organ():
    names = set(OrganHeads(nn.Conv3d, 5, 2, 2, *INSTANCE_NORM).state_dict())
    assert {"heads.0.0.weight", "heads.0.1.weight", "heads.0.3.bias", "heads.1.0.weight"} <= names


def test_heads_with_running_statistics_run_one_by_one():
    heads = OrganHeads(nn.Conv3d, 5, 2, 2, nn.BatchNorm3d, {})
    assert not heads.fused
    x = torch.randn(2, 5, 3, 3, 3)
    heads.train()
    heads(x)
    assert int(heads.heads[0][1].num_batches_tracked) == 1  # each head's own running statistics are updated
