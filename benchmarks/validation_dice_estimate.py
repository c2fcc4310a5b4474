"""How well a site's patch-budgeted validation Dice estimates its whole-volume Dice, on ONE global model.

    python benchmarks/validation_dice_estimate.py --workdir DIR --run RUN_DIR --out OUT.json \\
        [--budgets 100 400 0] [--oversample-foreground 0.0] [--sites liver_site kidney_site]

``--workdir``: a planned federation (e.g. ``benchmarks/validation_cost.py``'s); ``--run``: a ``federation`` folder
of a ``federate`` run in it (its last ``global_round_NNNN.fedkd`` is scored). Each site scores that model with
:meth:`NnUNetSite.evaluate` once per budget (0: whole volumes with nnU-Net's sliding window). ``--oversample-
foreground``: nnU-Net's share of patches forced to hold foreground (0: uniform positions, the default of the site's
evaluation; 0.33: nnU-Net's training value, as in its per-epoch pseudo Dice). Run it with the nnU-Net variables of
that workdir (``eval "$(nnunetv2_fedkd env --workdir DIR --cpu)"``) and ``nnUNet_results`` of the run. The sites
score with ``nnUNetTrainerFedKD`` / ``nnUNetPlansSmall`` and without any FedBN local layers (a fresh site folder).
"""
from __future__ import annotations

import argparse
import functools
import json
import shlex
import sys
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budgets", type=int, nargs="+", default=[100, 400, 0])
    ap.add_argument("--oversample-foreground", type=float, default=0.0)
    ap.add_argument("--sites", nargs="+", default=None)
    args = ap.parse_args(argv)
    from nnunetv2_fedkd.federated import nnunet_site
    from nnunetv2_fedkd.federated.planning import resolve_layout
    from nnunetv2_fedkd.federated.weights_io import load_weights
    from nnunetv2_fedkd.spec import load_spec

    nnunet_site.validation_patches = functools.partial(nnunet_site.validation_patches,
                                                       oversample_foreground=args.oversample_foreground)
    spec = load_spec(args.workdir / "federation.toml")
    layout = resolve_layout(spec, args.workdir)
    model = sorted(args.run.glob("global_round_*.fedkd"))[-1]
    weights, meta = load_weights(model)
    done = int(meta["completed_rounds"])
    out = {"command": shlex.join([sys.executable, *sys.argv]), "model": str(model),
           "oversample_foreground": args.oversample_foreground, "sites": {}}
    for s in spec.sites:
        if args.sites and s.name not in args.sites:
            continue
        site = nnunet_site.NnUNetSite(s.name, layout.views[s.name], s.organs, args.out.parent / "sites" / s.name,
                                      "nnUNetTrainerFedKD", "nnUNetPlansSmall", device="cpu")
        out["sites"][s.name] = {str(b): site.evaluate(weights, {"round": done - 1, "evaluate_patches": b})
                                for b in args.budgets}
        print(s.name, json.dumps(out["sites"][s.name]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
