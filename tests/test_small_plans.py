"""Small plans derived from nnU-Net's plans: consistent architecture, divisible patch, data reused."""
import json

import pytest

from nnunetv2_fedkd.data.small_plans import PlansError, shrink_plans, write_small_plans


def stock_like_plans():
    return {
        "dataset_name": "Dataset501_X", "plans_name": "nnUNetPlans",
        "configurations": {
            "2d": {"data_identifier": "nnUNetPlans_2d", "patch_size": [64, 64], "batch_size": 12,
                   "architecture": {"arch_kwargs": {}}},
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres", "patch_size": [40, 96, 96], "batch_size": 2,
                "architecture": {"network_class_name": "x.PlainConvUNet", "arch_kwargs": {
                    "n_stages": 5, "features_per_stage": [32, 64, 128, 256, 320],
                    "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
                    "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
                    "n_conv_per_stage": [2, 2, 2, 2, 2], "n_conv_per_stage_decoder": [2, 2, 2, 2]}}},
        },
    }


def test_shrink_keeps_data_identifier_and_makes_consistent_architecture():
    out = shrink_plans(stock_like_plans(), "Small", patch_size=(30, 33, 48), base_features=8, max_features=32,
                       n_stages=4)
    assert out["plans_name"] == "Small" and list(out["configurations"]) == ["3d_fullres"]
    c = out["configurations"]["3d_fullres"]
    a = c["architecture"]["arch_kwargs"]
    assert c["data_identifier"] == "nnUNetPlans_3d_fullres"
    assert a["n_stages"] == 4 and a["features_per_stage"] == [8, 16, 32, 32]
    assert len(a["kernel_sizes"]) == len(a["strides"]) == len(a["n_conv_per_stage"]) == 4
    assert len(a["n_conv_per_stage_decoder"]) == 3
    # total strides of the kept stages: (4, 8, 8): the patch is rounded down to multiples, capped by the planned one
    assert c["patch_size"] == [28, 32, 48]


def test_missing_configuration_or_plans(tmp_path):
    with pytest.raises(PlansError, match="no configuration '3d_lowres'"):
        shrink_plans(stock_like_plans(), configuration="3d_lowres")
    with pytest.raises(PlansError, match="nnUNetPlans.json does not exist"):
        write_small_plans(tmp_path)
    (tmp_path / "nnUNetPlans.json").write_text(json.dumps(stock_like_plans()))
    p = write_small_plans(tmp_path)
    assert json.loads(p.read_text())["plans_name"] == "nnUNetPlansSmall"
