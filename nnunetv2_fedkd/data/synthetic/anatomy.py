"""What the phantoms are made of: the labelled structures (phantom ids -> organ registry keys), the lesions' host
organs, the tissues (structure, texture amplitude) and their HU values, fixed and per contrast phase.
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

from nnunetv2_fedkd.organs import ORGANS


STRUCTURES: Dict[int, str] = {
    1: "liver",
    2: "spleen",
    3: "kidney_right",
    4: "kidney_left",
    5: "pancreas",
    6: "gallbladder",
    7: "stomach",
    8: "aorta",
    9: "inferior_vena_cava",
    10: "liver_tumour",
    11: "kidney_tumour",  # in the right kidney
    12: "kidney_tumour",  # in the left kidney
    13: "kidney_cyst",  # in the right kidney
    14: "kidney_cyst",  # in the left kidney
    15: "pancreas_tumour",
}
LESION_HOSTS: Dict[int, str] = {10: "liver", 11: "kidney_right", 12: "kidney_left", 13: "kidney_right",
                                14: "kidney_left", 15: "pancreas"}
# ties in the block mode go to the later entry (background loses every tie)
_LABEL_PRIORITY: Tuple[int, ...] = (1, 10, 7, 2, 5, 15, 6, 3, 4, 11, 12, 13, 14, 9, 8)

# --------------------------------------------------------------------------------------------------------------------
# tissues: (name, structure id or 0, texture amplitude in HU)
# --------------------------------------------------------------------------------------------------------------------
_TISSUES: Tuple[Tuple[str, int, float], ...] = (
    ("air", 0, 0.0),
    ("table", 0, 5.0),
    ("skin", 0, 5.0),
    ("subcutaneous_fat", 0, 10.0),
    ("muscle", 0, 8.0),
    ("visceral_fat", 0, 14.0),
    ("bowel", 0, 22.0),
    ("bowel_gas", 0, 40.0),
    ("lung", 0, 30.0),
    ("heart", 0, 10.0),
    ("cortical_bone", 0, 60.0),
    ("cancellous_bone", 0, 60.0),
    ("csf", 0, 5.0),
    ("disc", 0, 10.0),
    ("rib", 0, 60.0),
    ("renal_sinus", 0, 25.0),
    ("liver", 1, 7.0),
    ("spleen", 2, 7.0),
    ("kidney_right_cortex", 3, 10.0),
    ("kidney_right_medulla", 3, 12.0),
    ("kidney_left_cortex", 4, 10.0),
    ("kidney_left_medulla", 4, 12.0),
    ("pancreas", 5, 18.0),
    ("gallbladder", 6, 3.0),
    ("stomach_wall", 7, 8.0),
    ("stomach_content", 7, 8.0),
    ("stomach_gas", 7, 25.0),
    ("aorta", 8, 6.0),
    ("inferior_vena_cava", 9, 8.0),
    ("liver_tumour", 10, 14.0),
    ("kidney_right_tumour", 11, 22.0),
    ("kidney_left_tumour", 12, 22.0),
    ("kidney_right_cyst", 13, 3.0),
    ("kidney_left_cyst", 14, 3.0),
    ("pancreas_tumour", 15, 12.0),
    ("kidney_right_tumour_necrosis", 11, 10.0),
    ("kidney_left_tumour_necrosis", 12, 10.0),
)
T: Dict[str, int] = {name: i for i, (name, _, _) in enumerate(_TISSUES)}
_STRUCT_OF_TISSUE = np.array([s for _, s, _ in _TISSUES], dtype=np.uint8)
_TEXTURE_OF_TISSUE = np.array([a for _, _, a in _TISSUES], dtype=np.float32)

# Unenhanced / fixed HU values
_FIXED_HU: Dict[str, float] = {
    "air": -1000.0, "skin": 30.0, "subcutaneous_fat": -105.0, "muscle": 50.0, "visceral_fat": -95.0,
    "bowel": 30.0, "bowel_gas": -950.0, "lung": -850.0, "cortical_bone": 700.0, "cancellous_bone": 250.0,
    "csf": 15.0, "disc": 80.0, "rib": 450.0, "renal_sinus": -40.0, "gallbladder": 10.0, "stomach_wall": 45.0,
    "stomach_gas": -950.0, "kidney_right_cyst": 8.0, "kidney_left_cyst": 8.0,
    "kidney_right_tumour_necrosis": 20.0, "kidney_left_tumour_necrosis": 20.0,
}
# Contrast phases: HU of enhancing structures, from typical attenuation values of contrast-enhanced abdominal CT
# (portal-venous phase ~70 s after injection: liver 100-110, spleen 110-120, pancreas 100-120, renal cortex and
# medulla 150-180; late arterial / pancreatic phase ~40 s: the pancreas peaks at 110-140, the renal cortex brighter
# than the medulla, the spleen heterogeneous and bright, the liver still little enhanced). Against visceral and
# peripancreatic fat near -100 HU the pancreas then stands out by 200 HU, as in real scans.
PHASES: Dict[str, Dict[str, float]] = {
    "portal_venous": {"liver": 105.0, "spleen": 115.0, "kidney_cortex": 170.0, "kidney_medulla": 150.0,
                      "pancreas": 105.0, "aorta": 175.0, "inferior_vena_cava": 145.0, "heart": 150.0,
                      "kidney_tumour": 95.0},
    "arterial": {"liver": 70.0, "spleen": 125.0, "kidney_cortex": 220.0, "kidney_medulla": 95.0,
                 "pancreas": 115.0, "aorta": 320.0, "inferior_vena_cava": 80.0, "heart": 240.0,
                 "kidney_tumour": 130.0},
    "pancreatic": {"liver": 85.0, "spleen": 120.0, "kidney_cortex": 195.0, "kidney_medulla": 125.0,
                   "pancreas": 130.0, "aorta": 260.0, "inferior_vena_cava": 115.0, "heart": 210.0,
                   "kidney_tumour": 110.0},
}


# registry sanity: every structure is a registry entry
assert all(k in ORGANS for k in STRUCTURES.values())
