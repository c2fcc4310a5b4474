"""Partial-label trainers: one multi-organ nnU-Net from datasets that each annotate only some organs.

Each trainer is nnU-Net's trainer with a different loss; the per-sample label availability comes from dataset.json
(:mod:`nnunetv2_fedkd.data.label_availability`) through ``batch['keys']``. nnU-Net calls ``self.loss(output, target)``;
:class:`_PerBatchMask` passes the current batch's mask to the partial-label loss, and nnU-Net's own deep-supervision
wrapper (built by the stock ``_build_loss``) is kept with its weights.
"""
from __future__ import annotations

import copy
from typing import Any, Dict

import torch
from torch import nn
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_fedkd.data.label_availability import LabelAvailability
from nnunetv2_fedkd.losses import MarginalExclusionLoss, MaskedSigmoidLoss
from nnunetv2_fedkd.networks import attach_organ_heads
from nnunetv2_fedkd.trainers.base import nnUNetTrainerFedKDBase


class _PerBatchMask(nn.Module):
    """Adapts ``loss(output, target, annotated)`` to nnU-Net's ``loss(output, target)``: the trainer sets
    ``annotated`` (bool ``[B, C]``) before every train/validation step."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss
        self.annotated = None

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.annotated is None:
            raise RuntimeError("partial-label loss called without the batch's label availability")
        return self.loss(output, target, self.annotated.to(output.device))


class nnUNetTrainerPartialLabelBase(nnUNetTrainerFedKDBase):
    """Shared wiring; subclasses give ``_partial_label_loss()`` and ``_annotated_mask(keys)``."""

    accepts_cases_without_labels = True  # a case annotating no organ adds no label loss

    def initialize(self):
        self.label_availability = LabelAvailability(self.dataset_json)
        super().initialize()

    def _partial_label_loss(self) -> nn.Module:
        raise NotImplementedError

    def _annotated_mask(self, keys) -> torch.Tensor:
        raise NotImplementedError

    def _build_loss(self):
        self._masked_loss = _PerBatchMask(self._partial_label_loss())
        stock = super()._build_loss()  # nnU-Net's loss, wrapped for deep supervision with nnU-Net's weights
        if isinstance(stock, DeepSupervisionWrapper):
            stock.loss = self._masked_loss
            return stock
        return self._masked_loss

    def train_step(self, batch: dict) -> dict:
        self._masked_loss.annotated = self._annotated_mask(batch["keys"])
        return super().train_step(batch)

    def validation_step(self, batch: dict) -> dict:
        self._masked_loss.annotated = self._annotated_mask(batch["keys"])
        return super().validation_step(batch)


class nnUNetTrainerMarginal(nnUNetTrainerPartialLabelBase):
    """Softmax over background + all organs with the marginal loss (+ exclusion loss), after Shi et al. 2021.

    Classes a case does not annotate are merged into its background before DC+CE; voxels of its annotated organs are
    known not to be any other organ (exclusion). With every class annotated this is nnU-Net's own DC+CE.
    Settings: ``exclusion`` (bool), ``exclusion_weight``, ``exclusion_log_weight``, ``weight_ce``, ``weight_dice``.
    """

    config_defaults: Dict[str, Any] = {
        **nnUNetTrainerFedKDBase.config_defaults,
        "exclusion": True, "exclusion_weight": 1.0, "exclusion_log_weight": 1.0, "weight_ce": 1.0, "weight_dice": 1.0,
    }

    def _partial_label_loss(self) -> nn.Module:
        c = self.fedkd_config
        return MarginalExclusionLoss(batch_dice=self.configuration_manager.batch_dice, smooth=1e-5,
                                     weight_ce=c["weight_ce"], weight_dice=c["weight_dice"],
                                     exclusion_weight=c["exclusion_weight"], exclusion=c["exclusion"],
                                     log_weight=c["exclusion_log_weight"])

    def _annotated_mask(self, keys) -> torch.Tensor:
        return self.label_availability.softmax_mask(keys)


MULTIHEAD_PLANS_KEY = "fedkd_multihead"


def as_regions(dataset_json: dict) -> dict:
    """dataset.json with every organ as its own sigmoid region and ``regions_class_order``, so nnU-Net trains sigmoid
    outputs (region one-hot targets) and turns them into a label map at inference (stock predictor, ensembling,
    evaluation).

    nnU-Net switches to regions only when some region lists more than one label value (``LabelManager.has_regions``
    tests ``len(region) > 1``), so organ ``v`` is written as ``[v, v]``: the same set {v}, in a form nnU-Net accepts."""
    dj = copy.deepcopy(dataset_json)
    labels, order = {}, []
    for name, value in sorted(dj["labels"].items(), key=lambda kv: _first(kv[1])):
        v = _first(value)
        labels[name] = v if v == 0 else [v, v]
        if v != 0:
            order.append(v)
    dj["labels"] = labels
    dj["regions_class_order"] = order
    return dj


def _first(value) -> int:
    return int(value[0]) if isinstance(value, (list, tuple)) else int(value)


class nnUNetTrainerMultiHead(nnUNetTrainerPartialLabelBase):
    """Shared nnU-Net encoder-decoder with one light head per organ and sigmoid outputs (Kim et al. 2024,
    MultiTalent, DoDNet). BCE + soft Dice only on the organs each case annotates; unannotated heads get no gradient
    from labels. Inference goes through nnU-Net's regions (``regions_class_order``), so stock prediction,
    ensembling and evaluation work. Settings: ``head_channels`` (0 = a 1x1 convolution per organ), ``weight_bce``,
    ``weight_dice``. The head settings are stored in the plans the results folder keeps, so
    ``build_network_architecture`` rebuilds the network at inference from the results folder alone.
    """

    config_defaults: Dict[str, Any] = {
        **nnUNetTrainerFedKDBase.config_defaults, "head_channels": 8, "weight_bce": 1.0, "weight_dice": 1.0,
    }

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        cfg, _ = self.read_config(plans)
        plans["configurations"][configuration][MULTIHEAD_PLANS_KEY] = {"head_channels": int(cfg["head_channels"])}
        if not any(isinstance(v, (list, tuple)) for v in dataset_json["labels"].values()):
            dataset_json = as_regions(dataset_json)
        super().__init__(plans, configuration, fold, dataset_json, device)

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        heads = configuration_manager.configuration.get(MULTIHEAD_PLANS_KEY)
        if heads is None:
            raise RuntimeError(f"plans {plans_manager.plans_name} have no {MULTIHEAD_PLANS_KEY!r} entry; this model "
                               f"was not trained by nnUNetTrainerMultiHead")
        net = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                       num_output_channels, enable_deep_supervision)
        return attach_organ_heads(net, num_output_channels, heads["head_channels"])

    def _partial_label_loss(self) -> nn.Module:
        c = self.fedkd_config
        return MaskedSigmoidLoss(batch_dice=self.configuration_manager.batch_dice, smooth=1e-5,
                                 weight_bce=c["weight_bce"], weight_dice=c["weight_dice"])

    def _annotated_mask(self, keys) -> torch.Tensor:
        return self.label_availability.foreground_mask(keys)
