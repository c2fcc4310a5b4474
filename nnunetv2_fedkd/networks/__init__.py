"""Network pieces the plugin adds to nnU-Net's architectures."""
from nnunetv2_fedkd.networks.organ_heads import OrganHeads, attach_organ_heads

__all__ = ["OrganHeads", "attach_organ_heads"]
