"""``nnunetv2_fedkd``: the plugin's command line (subcommands like ``git``).

Training, prediction, ensembling and evaluation stay the stock ``nnUNetv2_*`` commands; this command does what nnU-Net
has no command for: converting the public layouts to one organ registry, synthesising a federation, deriving small
plans for CPUs, planning one set of plans for a federation without pooling images (``plan``), pseudo-labelling the
sites' images with single-organ teachers for one stock nnU-Net (``pseudo-label``), and printing the environment
that lets nnU-Net find the plugin's trainers.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional


def _cmd_env(args) -> int:
    from nnunetv2_fedkd.env import nnunet_env, shell_exports

    print(shell_exports(nnunet_env(args.workdir, cpu=args.cpu)))
    return 0


def _cmd_convert(args) -> int:
    from nnunetv2_fedkd.data.conversion import convert_dataset

    out = convert_dataset(args.format, args.input_dir, args.dataset_id, dataset_name=args.name,
                          keep_tumour=args.keep_tumour, organs=args.organs, overwrite=args.overwrite,
                          unlabelled_as_training=args.unlabelled_as_training)
    print(f"wrote {out}")
    return 0


def _cmd_convert_federation(args) -> int:
    from nnunetv2.paths import nnUNet_raw

    from nnunetv2_fedkd.workflows.pipeline import StepError, convert_federation
    from nnunetv2_fedkd.spec import load_spec

    if not nnUNet_raw:
        print("nnunetv2_fedkd convert-federation: error: nnUNet_raw is not set (nnunetv2_fedkd env WORKDIR prints "
              "the exports)", file=sys.stderr)
        return 2
    spec = load_spec(args.spec)
    try:
        written = convert_federation(spec, Path(nnUNet_raw), overwrite=args.overwrite, sites=args.sites,
                                     test_set=not args.no_test_set and not args.sites)
    except StepError as e:
        print(f"nnunetv2_fedkd convert-federation: error: {e}", file=sys.stderr)
        return 2
    for out in written:
        print(f"wrote {out}")
    return 0


def _cmd_synth(args) -> int:
    from nnunetv2_fedkd.data.synthetic import make_federation

    spec = make_federation(args.out_dir, seed=args.seed, size=tuple(args.size), cases_per_site=args.cases_per_site,
                           test_cases=args.test_cases, first_dataset_id=args.first_dataset_id,
                           overwrite=args.overwrite, fov_scale=args.fov_scale, num_sites=args.sites,
                           fully_labelled=args.fully_labelled)
    print(f"wrote the synthetic federation; spec: {spec}")
    return 0


def _cmd_small_plans(args) -> int:
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunetv2_fedkd.data.small_plans import write_small_plans

    for d in args.dataset:
        folder = Path(nnUNet_preprocessed) / maybe_convert_to_dataset_name(d)
        out = write_small_plans(folder, source=args.source, target=args.target, configuration=args.configuration,
                                patch_size=args.patch_size, base_features=args.features[0],
                                max_features=args.features[1], n_stages=args.stages, batch_size=args.batch_size)
        print(f"wrote {out}")
    return 0


def _cmd_check_spec(args) -> int:
    from nnunetv2.paths import nnUNet_raw

    from nnunetv2_fedkd.spec import check_datasets, load_spec

    spec = load_spec(args.spec)
    print(f"{spec.path}: federation {spec.name!r}, labels {spec.labels}, "
          f"{len(spec.sites)} sites: {', '.join(f'{s.name} ({s.dataset}: {s.organs})' for s in spec.sites)}")
    if args.datasets:
        check_datasets(spec, nnUNet_raw)
        print("every site's dataset.json agrees with the spec")
    return 0


def _cmd_merge(args) -> int:
    from nnunetv2_fedkd.data.pooled import merge_sites
    from nnunetv2_fedkd.spec import load_spec

    out = merge_sites(load_spec(args.spec), args.dataset_id, dataset_name=args.name, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def _cmd_pseudo_label(args) -> int:
    from nnunetv2_fedkd.workflows.pipeline import StepError
    from nnunetv2_fedkd.workflows.pseudo_labels import build_pseudo_label_dataset

    source = args.source
    if source.suffix == ".toml" or source.is_file():
        from nnunetv2_fedkd.spec import load_spec

        source = load_spec(source)
    elif not source.exists() and str(source).isdigit():
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

        source = Path(maybe_convert_to_dataset_name(int(str(source))))
    try:
        out = build_pseudo_label_dataset(source, args.teachers, args.dataset_id, high=args.high, low=args.low,
                                         dataset_name=args.name, predictions_dir=args.keep_predictions,
                                         overwrite=args.overwrite, cpu=args.device == "cpu", tta=args.tta)
    except StepError as e:
        print(f"nnunetv2_fedkd pseudo-label: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}\nnext: nnUNetv2_plan_and_preprocess -d {args.dataset_id} -c 3d_fullres "
          f"--verify_dataset_integrity && nnUNetv2_train {args.dataset_id} 3d_fullres all")
    return 0


def _cmd_plan(args) -> int:
    from nnunetv2_fedkd.federated.planning import (FederatedPlanningError, PayloadError, PlansMismatch,
                                                   plan_federation)
    from nnunetv2_fedkd.workflows.pipeline import StepError
    from nnunetv2_fedkd.spec import load_spec

    try:
        record = plan_federation(load_spec(args.spec), plans_name=args.plans_name, overwrite=args.overwrite,
                                 planner=args.planner, configurations=args.configurations,
                                 num_processes=args.num_processes)
    except (FederatedPlanningError, PayloadError, PlansMismatch, StepError) as e:
        print(f"nnunetv2_fedkd plan: error: {e}", file=sys.stderr)
        return 2
    print(f"plans {record['plans_name']} (digest {record['plans_digest'][:12]}...) at every site: "
          + ", ".join(f"{site} -> {e['dataset']}" for site, e in record["sites"].items()))
    return 0


def _cmd_federate(args) -> int:
    from nnunetv2_fedkd.federated.planning import PlansMismatch
    from nnunetv2_fedkd.federated.round_core import FederationStateError, FederationStopped
    from nnunetv2_fedkd.federated.runner import FederateError, federate
    from nnunetv2_fedkd.spec import load_spec

    options = {}
    for item in args.strategy_option or []:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"nnunetv2_fedkd federate: error: --strategy-option needs KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    try:
        federate(load_spec(args.spec), args.rounds, local_epochs=args.local_epochs,
                 local_iterations=args.local_iterations, strategy=args.strategy, strategy_options=options,
                 trainer=args.trainer, plans=args.plans, settings_file=args.config, device=args.device,
                 min_sites=args.min_sites, evaluate=not args.no_evaluate, evaluate_every=args.evaluate_every,
                 evaluate_patches=args.evaluate_patches, resume=not args.restart_refused,
                 seed=args.seed, sites=args.sites, large_updates=args.large_updates,
                 resume_with_new_settings=args.resume_with_new_settings, round_attempts=args.round_attempts,
                 transport_dtype=args.transport_dtype, sites_per_round=args.sites_per_round,
                 sampling=args.sampling, max_update_ratio=args.max_update_ratio or None, max_num_examples=args.max_num_examples or None,
                 **({} if args.keep_checkpoints is None else {"keep_checkpoints": args.keep_checkpoints}))
    except (FederateError, FederationStateError, FederationStopped, PlansMismatch, ValueError) as e:
        print(f"nnunetv2_fedkd federate: error: {e}", file=sys.stderr)
        return 2
    return 0


def _cmd_verify_checkpoint(args) -> int:
    from nnunetv2_fedkd.federated.results_folder import VerificationFailed, verify_results_folder

    try:
        info = verify_results_folder(args.model_folder, args.run_dir, args.fold, args.checkpoint)
    except FileNotFoundError as e:
        print(f"nnunetv2_fedkd verify-checkpoint: error: {e}", file=sys.stderr)
        return 2
    except VerificationFailed as e:
        print(f"nnunetv2_fedkd verify-checkpoint: NOT verified: {e}", file=sys.stderr)
        return 1
    print(f"verified: {info['checkpoint']} holds the federation's global model after round {info['round']}/"
          f"{info['total_rounds']} (weights digest {info['weights_digest'][:16]}..., plans digest "
          f"{info['plans_digest'][:16]}...; run folder {info['run_dir']})")
    return 0


def _cmd_upgrade_weights(args) -> int:
    from nnunetv2_fedkd.federated.weights_io import CorruptCheckpoint, upgrade_weights_file

    files = sorted(args.folder.rglob("*.fedkd")) if args.folder.is_dir() else [args.folder]
    if not files or not files[0].is_file():
        print(f"nnunetv2_fedkd upgrade-weights: error: no .fedkd file in {args.folder}", file=sys.stderr)
        return 2
    done = 0
    for f in files:
        try:
            done += upgrade_weights_file(f)
        except CorruptCheckpoint as e:
            print(f"nnunetv2_fedkd upgrade-weights: error: {e} ({done} file(s) converted before it; the others are "
                  f"unchanged)", file=sys.stderr)
            return 2
    print(f"{done} of {len(files)} weights file(s) in {args.folder} converted to safetensors "
          f"({len(files) - done} already were)")
    return 0


def _cmd_demo(args) -> int:
    from nnunetv2_fedkd.workflows.demo import run_demo

    return run_demo(args.workdir, quick=args.quick, seed=args.seed, with_teachers=args.teachers)


def build_parser() -> argparse.ArgumentParser:
    from nnunetv2_fedkd.federated.aggregation import DEFAULT_MAX_UPDATE_RATIO
    from nnunetv2_fedkd.federated.round_core import DEFAULT_ROUND_ATTEMPTS
    from nnunetv2_fedkd.spec import CONVERTER_FORMATS

    p = argparse.ArgumentParser(prog="nnunetv2_fedkd", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    e = sub.add_parser("env", help="print the environment exports stock nnU-Net needs for the plugin: "
                                   'eval "$(nnunetv2_fedkd env --workdir DIR)"')
    e.add_argument("--workdir", type=Path, default=None,
                   help="also export nnUNet_raw/preprocessed/results as sub-folders of this folder")
    e.add_argument("--cpu", action="store_true",
                   help="also export the settings that make nnU-Net workable on a small CPU machine")
    e.set_defaults(func=_cmd_env)

    c = sub.add_parser("convert", help="convert a public dataset layout into an nnU-Net raw dataset "
                                       "mapped to the organ registry")
    c.add_argument("format", choices=CONVERTER_FORMATS)
    c.add_argument("input_dir", type=Path)
    c.add_argument("-d", dest="dataset_id", type=int, required=True, help="nnU-Net dataset id to write")
    c.add_argument("--name", default=None, help="dataset name (default: from the source format)")
    c.add_argument("--keep-tumour", action="store_true",
                   help="keep tumours/cysts as their own labels (default: merged into their organ)")
    c.add_argument("--organs", nargs="+", default=None, metavar="ORGAN",
                   help="write exactly these registry entries (sub-structures merge into them, others become "
                        "background), e.g. --organs liver spleen kidney pancreas")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--unlabelled-as-training", action="store_true",
                   help="the source's unlabelled images (MSD imagesTs, ...) become training cases that annotate no "
                        "organ (dataset.json fedkd.case_annotated []), for nnUNetTrainerDualKD; default: imagesTs")
    c.set_defaults(func=_cmd_convert)

    cf = sub.add_parser("convert-federation",
                        help="convert every site of a federation.toml (its source_format / source_dir) and its test "
                             "set (restricted to the federation's labels) into nnUNet_raw, then check them against "
                             "the spec")
    cf.add_argument("spec", type=Path)
    cf.add_argument("--sites", nargs="+", default=None, metavar="SITE",
                    help="only these sites (a hospital converts its own); the test set is then left out")
    cf.add_argument("--no-test-set", action="store_true", help="do not convert the test set")
    cf.add_argument("--overwrite", action="store_true")
    cf.set_defaults(func=_cmd_convert_federation)

    s = sub.add_parser("synth", help="generate the synthetic partial-label federation (CT-like phantoms in "
                                     "LiTS/KiTS23/MSD/BTCV layouts) and its federation.toml")
    s.add_argument("out_dir", type=Path)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", type=int, nargs=3, default=[64, 64, 48], metavar=("X", "Y", "Z"))
    s.add_argument("--cases-per-site", type=int, default=8)
    s.add_argument("--test-cases", type=int, default=6)
    s.add_argument("--first-dataset-id", type=int, default=501)
    s.add_argument("--fov-scale", type=float, default=1.0,
                   help="scale every scanner's field of view and scan length (< 1: tighter abdominal crop, more "
                        "voxels per organ on small grids)")
    s.add_argument("--sites", type=int, default=4,
                   help="number of sites, 1-8: liver, kidney, spleen, pancreas, then a second site per organ in the "
                        "same order (default 4)")
    s.add_argument("--fully-labelled", action="store_true",
                   help="the federated oracle's data: the same sites and images, every organ labelled at every site "
                        "(BTCV layout)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=_cmd_synth)

    sp = sub.add_parser("small-plans", help="derive small (CPU-sized) plans from nnU-Net's plans; "
                                            "train with -p nnUNetPlansSmall")
    sp.add_argument("-d", dest="dataset", nargs="+", required=True, help="dataset ids or names")
    sp.add_argument("--source", default="nnUNetPlans")
    sp.add_argument("--target", default="nnUNetPlansSmall")
    sp.add_argument("-c", dest="configuration", default="3d_fullres")
    sp.add_argument("--patch-size", type=int, nargs="+", default=[32, 32, 32])
    sp.add_argument("--features", type=int, nargs=2, default=[8, 64], metavar=("FIRST", "MAX"))
    sp.add_argument("--stages", type=int, default=4)
    sp.add_argument("--batch-size", type=int, default=2)
    sp.set_defaults(func=_cmd_small_plans)

    m = sub.add_parser("merge", help="pool the sites' converted datasets into one partial-label dataset "
                                     "(central training); dataset.json records which organs each case annotates")
    m.add_argument("spec", type=Path)
    m.add_argument("-d", dest="dataset_id", type=int, required=True, help="nnU-Net dataset id to write")
    m.add_argument("--name", default=None, help="dataset name (default: <federation name>Pooled)")
    m.add_argument("--overwrite", action="store_true")
    m.set_defaults(func=_cmd_merge)

    ps = sub.add_parser("pseudo-label", help="the stock-nnU-Net baseline: single-organ teachers pseudo-label every "
                                             "site's training images; writes one ordinary nnU-Net dataset (with "
                                             "nnU-Net's ignore label) for stock nnUNetv2_train")
    ps.add_argument("source", type=Path, help="federation.toml, or a pooled dataset written by 'merge' (id, name "
                                              "under nnUNet_raw, or folder)")
    ps.add_argument("--teachers", nargs="+", required=True, metavar="[ORGAN=]FOLDER",
                    help="single-organ teachers: nnU-Net results folders (<nnUNet_results>/DatasetXXX_Name/"
                         "<trainer>__<plans>__<configuration>, or one of its fold_X folders); the organ comes from "
                         "the teacher's dataset.json unless given as ORGAN=FOLDER")
    ps.add_argument("-d", dest="dataset_id", type=int, required=True, help="nnU-Net dataset id to write")
    ps.add_argument("--name", default=None, help="dataset name (default: <federation name>PseudoLabels)")
    ps.add_argument("--high", type=float, default=0.7,
                    help="a teacher's probability >= HIGH makes a voxel its organ (default 0.7)")
    ps.add_argument("--low", type=float, default=0.3,
                    help="LOW <= p < HIGH is unsure: the voxel becomes nnU-Net's ignore label (default 0.3)")
    ps.add_argument("-device", dest="device", default="cuda", choices=["cuda", "cpu"],
                    help="device for the teachers' nnUNetv2_predict (default: cuda)")
    ps.add_argument("--tta", action="store_true", help="test-time mirroring in the teachers' predictions")
    ps.add_argument("--keep-predictions", type=Path, default=None, metavar="DIR",
                    help="keep the teachers' predicted probabilities in DIR (default: a temporary folder)")
    ps.add_argument("--overwrite", action="store_true")
    ps.set_defaults(func=_cmd_pseudo_label)

    pl = sub.add_parser("plan", help="federated planning: per-site view datasets in the global label set, local "
                                     "fingerprints merged at a coordinator, ONE plan for all sites, local "
                                     "preprocessing (see nnunetv2_fedkd/federated/planning/)")
    pl.add_argument("spec", type=Path)
    pl.add_argument("--plans-name", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    pl.add_argument("--planner", default="ExperimentPlanner",
                    help="stock nnU-Net experiment planner class (default: ExperimentPlanner)")
    pl.add_argument("-c", dest="configurations", nargs="+", default=["3d_fullres"],
                    help="configurations to preprocess at every site (default: 3d_fullres)")
    pl.add_argument("-np", dest="num_processes", type=int, default=2,
                    help="processes for fingerprint extraction and preprocessing (default: 2)")
    pl.add_argument("--overwrite", action="store_true",
                    help="rebuild existing view datasets, the plans dataset and the plans")
    pl.set_defaults(func=_cmd_plan)

    f = sub.add_parser("federate", help="federated training on this machine: every site in-process, one after the "
                                        "other, through the round core; resumes after the last completed round")
    f.add_argument("spec", type=Path)
    f.add_argument("--rounds", type=int, required=True)
    g = f.add_mutually_exclusive_group(required=True)
    g.add_argument("--local-epochs", type=int, help="local epochs per round (num_iterations_per_epoch from --config)")
    g.add_argument("--local-iterations", type=int, help="local iterations per round (one local epoch)")
    f.add_argument("--strategy", default="fedavg",
                   help="fedavg | fedprox | fedbn | fedopt | fedavgm | fedadam | median | trimmed_mean")
    f.add_argument("--strategy-option", action="append", metavar="KEY=VALUE",
                   help="strategy option, e.g. mu=0.01 (fedprox), weighting=equal; repeatable")
    f.add_argument("-tr", dest="trainer", default="nnUNetTrainerFedKD", help="site trainer (default: nnUNetTrainerFedKD)")
    f.add_argument("-p", dest="plans", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    f.add_argument("--config", type=Path, default=None, help="trainer settings (JSON) sent to every site")
    f.add_argument("-device", dest="device", default="cuda", choices=["cuda", "cpu", "mps"])
    f.add_argument("--min-sites", type=int, default=1,
                   help="least valid updates for a round to be aggregated and committed (default 1)")
    f.add_argument("--round-attempts", type=int, default=DEFAULT_ROUND_ATTEMPTS, metavar="N",
                   help="a round with fewer than --min-sites valid updates runs again, at most N times in a row, "
                        f"then the federation stops with nothing of that round committed (default "
                        f"{DEFAULT_ROUND_ATTEMPTS})")
    f.add_argument("--transport-dtype", default="float32", choices=["float32", "float16"],
                   help="what the global weights and the sites' updates travel in: float16 halves the bytes (updates "
                        "as changes from the global weights sent; aggregation and checkpoints stay float32)")
    f.add_argument("--sites-per-round", type=int, default=None, metavar="K",
                   help="K of the sites train each round, drawn afresh every round (seeded by --seed; recorded in "
                        "metrics.json); default: every site")
    f.add_argument("--sampling", default="uniform", choices=["uniform", "organs"],
                   help="how --sites-per-round draws: uniformly, or every organ's labelling sites first (organs)")
    f.add_argument("--no-evaluate", action="store_true", help="skip the sites' validation of each global model")
    f.add_argument("--evaluate-every", type=int, default=1, metavar="K",
                   help="the sites validate the global model every K rounds and after the last (default 1)")
    f.add_argument("--evaluate-patches", type=int, default=None, metavar="N",
                   help="each site's validation of a global model predicts at most N patches: whole validation "
                        "volumes when nnU-Net's sliding window over them needs no more, else N validation patches "
                        "(default 100; 0: always whole volumes)")
    f.add_argument("--seed", type=int, default=0, help="seed of the initial global weights")
    f.add_argument("--keep-checkpoints", type=int, default=None, metavar="N",
                   help="the newest N global checkpoints stay in the run folder; a resume whose newest one is "
                        "damaged goes back to the newest intact one (default: 2)")
    f.add_argument("--max-update-ratio", type=float, default=DEFAULT_MAX_UPDATE_RATIO, metavar="R",
                   help="an update whose change ||w_site - w_global|| exceeds R times ||w_global|| is rejected (or "
                        f"clipped, --large-updates clip); 0: unbounded (default {DEFAULT_MAX_UPDATE_RATIO:g})")
    f.add_argument("--large-updates", choices=["reject", "clip"], default="reject",
                   help="what to do with an update beyond --max-update-ratio (default: reject)")
    f.add_argument("--max-num-examples", type=int, default=None, metavar="N",
                   help="an update claiming more than N training cases is rejected (every site is also bounded by "
                        "the cases it had when the federation was planned)")
    f.add_argument("--sites", nargs="+", default=None, help="only these sites of the spec (default: all)")
    f.add_argument("--no-resume", dest="restart_refused", action="store_true",
                   help="refuse to continue an existing run folder instead of resuming it")
    f.add_argument("--resume-with-new-settings", action="store_true",
                   help="resume a run folder that was trained with other settings (rounds, local iterations, "
                        "trainer settings, strategy options, sites, min-sites, ...) instead of refusing it; the "
                        "changes are recorded in its state.json")
    f.set_defaults(func=_cmd_federate)

    v = sub.add_parser("verify-checkpoint",
                       help="check, without unpickling anything, that an nnU-Net results folder written by a "
                            "federation holds exactly its last global model (digests of weights and plans) before "
                            "nnUNetv2_predict, which unpickles the checkpoint, uses it")
    v.add_argument("model_folder", type=Path, help="$nnUNet_results/<plans dataset>/<trainer>__<plans>__3d_fullres")
    v.add_argument("--run-dir", type=Path, default=None,
                   help="the federation's run folder (default: MODEL_FOLDER/federation)")
    v.add_argument("-f", dest="fold", default="all", help="fold folder (default: all)")
    v.add_argument("-chk", dest="checkpoint", default="checkpoint_final.pth")
    v.set_defaults(func=_cmd_verify_checkpoint)

    u = sub.add_parser("upgrade-weights",
                       help="convert the weights files (*.fedkd) of a run folder written by an earlier version "
                            "(torch zip) to safetensors, in place; only for files you wrote yourself")
    u.add_argument("folder", type=Path, help="a federation run folder (every *.fedkd below it) or one file")
    u.set_defaults(func=_cmd_upgrade_weights)

    k = sub.add_parser("check-spec", help="validate a federation spec (and, with --datasets, the sites' datasets)")
    k.add_argument("spec", type=Path)
    k.add_argument("--datasets", action="store_true", help="also check the converted datasets in nnUNet_raw")
    k.set_defaults(func=_cmd_check_spec)

    d = sub.add_parser("demo", help="the main job: synthesise a federation and run the whole pipeline")
    d.add_argument("--workdir", type=Path, default=Path("fedkd_demo"))
    d.add_argument("--quick", action="store_true", help="smaller data and shorter training")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--teachers", action="store_true",
                   help="also train one single-organ teacher per site and compare FedKD with them merged (longer)")
    d.set_defaults(func=_cmd_demo)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    from nnunetv2_fedkd.errors import USER_ERRORS

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        print(f"nnunetv2_fedkd {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
