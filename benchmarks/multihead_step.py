"""Multi-head training step against the stock one: the same nnU-Net U-Net (from a plans file), with nnU-Net's
1x1 segmentation layers (stock, softmax over organs + background) or with the plugin's organ heads
(:mod:`nnunetv2_fedkd.networks.organ_heads`), the heads run fused (one network, the default) and one by one.

    python benchmarks/multihead_step.py --out benchmarks/results/multihead_step
        (--plans PLANS.json | --ct-like-plans DIR)
        [--configuration 3d_fullres] [--patch-size 32 32 32] [--batch-size 2] [--organs 4] [--head-channels 8]
        [--steps 10] [--repeats 3]

A step is what nnU-Net's ``train_step`` does to the network: forward with deep supervision, a loss on every output,
backward and nnU-Net's SGD (Nesterov, momentum 0.99). The loss is the same cheap one for every variant (mean square
of each output: the losses' own cost is not what is compared). The variants run in turns, ``--steps`` timed steps each
per turn, ``--repeats`` turns, after one untimed warm-up turn; each variant's figure is the median step over all its
timed steps, and the ratios are to the stock step of the same run.

``--ct-like-plans DIR``: the plans stock nnU-Net makes for a real abdominal CT dataset, without the images: DIR gets
a dataset of 40 cases whose fingerprint has real CT shapes and spacings (512 x 512 in-plane at 0.66-0.9 mm, 90-220
slices of 2-5 mm; seeded) and ``nnUNetv2_plan_experiment`` plans it (3d_fullres: patch 64 x 192 x 160, batch 2,
6 stages up to 320 features with nnU-Net 2.8's default planner). CPU or CUDA (``--device``); on CUDA every step is
synchronised. Writes ``results.json`` and ``results.md``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from copy import deepcopy
from pathlib import Path

import torch


def build(plans: dict, configuration: str, organs: int, head_channels):
    """The stock network (head_channels None) or the multi-head one, as the trainers build them."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_fedkd.trainers.partial_label import MULTIHEAD_PLANS_KEY, nnUNetTrainerMultiHead

    plans = deepcopy(plans)
    if head_channels is None:
        pm = PlansManager(plans)
        return nnUNetTrainer.build_network_architecture(pm, pm.get_configuration(configuration), 1, organs + 1, True)
    plans["configurations"][configuration][MULTIHEAD_PLANS_KEY] = {"head_channels": head_channels}
    pm = PlansManager(plans)
    return nnUNetTrainerMultiHead.build_network_architecture(pm, pm.get_configuration(configuration), 1, organs, True)


def ct_like_plans(workdir: Path) -> Path:
    """Plans of stock ``nnUNetv2_plan_experiment`` for a fingerprint of real abdominal CT shapes and spacings (the
    planner reads only the fingerprint, dataset.json and one file name); returns the plans file."""
    import os
    import random
    import subprocess

    import numpy as np
    import SimpleITK as sitk

    name = "Dataset900_CTLikePlansOnly"
    raw, pre = workdir / "nnUNet_raw" / name, workdir / "nnUNet_preprocessed" / name
    plans = pre / "nnUNetPlans.json"
    if plans.is_file():
        return plans
    rng = random.Random(0)
    (raw / "imagesTr").mkdir(parents=True, exist_ok=True), pre.mkdir(parents=True, exist_ok=True)
    shapes, spacings = [], []
    for _ in range(40):
        inplane = rng.uniform(0.66, 0.9)
        shapes.append([rng.randint(90, 220), 512, 512])
        spacings.append([rng.choice([2.0, 2.5, 3.0, 5.0]), inplane, inplane])
    (pre / "dataset_fingerprint.json").write_text(json.dumps({
        "foreground_intensity_properties_per_channel": {"0": {
            "max": 1500.0, "mean": 100.0, "median": 105.0, "min": -1000.0, "percentile_00_5": -60.0,
            "percentile_99_5": 250.0, "std": 50.0}},
        "median_relative_size_after_cropping": 1.0, "shapes_after_crop": shapes, "spacings": spacings}))
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "spleen": 2, "kidney": 3, "pancreas": 4},
        "numTraining": 40, "file_ending": ".nii.gz"}))
    # the planner picks its image reader from one file name; the image itself is never read
    image = sitk.GetImageFromArray(np.zeros((4, 4, 4), np.int16))
    sitk.WriteImage(image, str(raw / "imagesTr" / "case_000_0000.nii.gz"))
    env = {**os.environ, "nnUNet_raw": str(workdir / "nnUNet_raw"), "nnUNet_preprocessed": str(pre.parent),
           "nnUNet_results": str(workdir / "nnUNet_results")}
    from nnunetv2_fedkd.workflows.pipeline import nnunet_script

    subprocess.run([nnunet_script("nnUNetv2_plan_experiment"), "-d", "900"], env=env, check=True,
                   capture_output=True, text=True)
    return plans


def time_steps(net, x, steps: int, device) -> list:
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    seconds = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        outputs = net(x)
        loss = sum(o.float().pow(2).mean() for o in (outputs if isinstance(outputs, (list, tuple)) else [outputs]))
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    return seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--plans", type=Path, help="an nnU-Net plans file (nnUNetPlans.json or derived)")
    source.add_argument("--ct-like-plans", type=Path, metavar="DIR",
                        help="plan a fingerprint of real abdominal CT with stock nnU-Net in DIR and use those plans")
    p.add_argument("--configuration", default="3d_fullres")
    p.add_argument("--patch-size", type=int, nargs="+", default=None, help="default: the plans' patch size")
    p.add_argument("--batch-size", type=int, default=None, help="default: the plans' batch size")
    p.add_argument("--organs", type=int, default=4)
    p.add_argument("--head-channels", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from accuracy import machine, versions
    from record import command_line, write_results

    from nnunetv2_fedkd.networks.organ_heads import OrganHeads

    if args.ct_like_plans is not None:
        args.plans = ct_like_plans(args.ct_like_plans)
    plans = json.loads(args.plans.read_text())
    cfg = plans["configurations"][args.configuration]
    patch = list(args.patch_size or cfg["patch_size"])
    batch = int(args.batch_size or cfg["batch_size"])
    device = torch.device(args.device)
    torch.manual_seed(0)
    nets = {"stock": build(plans, args.configuration, args.organs, None),
            "multi-head, fused heads": build(plans, args.configuration, args.organs, args.head_channels)}
    nets["multi-head, heads one by one"] = deepcopy(nets["multi-head, fused heads"])
    for m in nets["multi-head, heads one by one"].modules():
        if isinstance(m, OrganHeads):
            m.fuse = False
    assert all(m.fused for m in nets["multi-head, fused heads"].modules() if isinstance(m, OrganHeads))
    x = torch.randn(batch, 1, *patch, device=device)
    for net in nets.values():
        net.to(device).train()
        time_steps(net, x, 1, device)  # warm-up
    seconds = {name: [] for name in nets}
    for _ in range(args.repeats):
        for name, net in nets.items():
            seconds[name] += time_steps(net, x, args.steps, device)
    median = {name: statistics.median(s) for name, s in seconds.items()}
    params = {name: sum(p.numel() for p in net.parameters()) for name, net in nets.items()}
    record = {"command": command_line(), "plans": str(args.plans),
              "configuration": args.configuration, "patch_size": patch, "batch_size": batch, "organs": args.organs,
              "head_channels": args.head_channels, "device": str(device), "threads": torch.get_num_threads(),
              "step_seconds": seconds, "median_step_seconds": median, "parameters": params,
              "ratio_to_stock": {name: median[name] / median["stock"] for name in nets},
              "versions": versions(), "machine": machine()}
    lines = [f"{args.configuration} of {args.plans.name}, patch {patch}, batch {batch}, {args.organs} organs, head "
             f"channels {args.head_channels}, {device} ({record['threads']} threads); median of "
             f"{args.repeats} x {args.steps} steps per variant, in turns.", "",
             "| network | parameters | median step s | x stock |", "|---|---|---|---|"]
    lines += [f"| {name} | {params[name]:,} | {median[name]:.4f} | {record['ratio_to_stock'][name]:.2f} |"
              for name in nets]
    write_results(args.out, record, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
