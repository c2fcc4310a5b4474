"""Teacher cache size: the same teachers' outputs stored as format 1 (float16 ``.npy``) and as today's format
(uint8 logit codes in blosc2, :mod:`nnunetv2_fedkd.distillation.teacher_cache`), side by side.

    python benchmarks/teacher_cache_size.py --out benchmarks/results/teacher_cache_size CACHE_FOLDER [CACHE_FOLDER ...]

Each ``CACHE_FOLDER`` holds a cache's case files: format-1 ``<case>.npy`` files (what a training before this format
wrote; e.g. ``$nnUNet_preprocessed/<dataset>/<data_identifier>_fedkd_teachers/<key>/``), whose probabilities are
re-stored here with :func:`nnunetv2_fedkd.distillation.teacher_cache.save_cached` (the student's patch size from
``--patch-size``), or today's ``<case>.b2nd`` files, whose format-1 size is computed (2 bytes a voxel plus the
``.npy`` header). For every case it records voxels, both sizes and, for re-stored cases, the largest logit error of
the stored codes. The real-size estimate scales the measured bytes per voxel to ``--cases`` cases of
``--case-voxels`` voxels and ``--teachers`` teachers (default: 500 KiTS-size cases of 32 M voxels, i.e. the
issue's 64 MB float16 per teacher and case, 4 teachers). Writes ``results.json`` and ``results.md``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def measure(folder: Path, patch_size, scratch: Path) -> list:
    from nnunetv2_fedkd.distillation.teacher_cache import (
        CASE_SUFFIX, LOGIT_RANGE, decode_probabilities, encode_probabilities,
                                              load_cached, save_cached)

    rows = []
    for f in sorted(folder.glob("*.npy")):
        probs = np.load(f, allow_pickle=False).astype(np.float32)
        t0 = time.perf_counter()
        new = save_cached(scratch, f.stem, probs, patch_size)
        seconds = time.perf_counter() - t0
        p = np.clip(probs.astype(np.float64), 1e-6, 1 - 1e-6)
        q = np.clip(decode_probabilities(encode_probabilities(probs)).astype(np.float64), 1e-6, 1 - 1e-6)
        err = float(np.max(np.abs((np.log(q) - np.log1p(-q)) - (np.log(p) - np.log1p(-p)))))
        assert np.array_equal(load_cached(scratch, f.stem, probs.shape[0], probs.shape[1:])[...],
                              decode_probabilities(encode_probabilities(probs)))
        rows.append({"folder": str(folder), "case": f.stem, "teachers": int(probs.shape[0]),
                     "voxels": int(np.prod(probs.shape)), "format1_bytes": f.stat().st_size,
                     "bytes": new.stat().st_size, "write_seconds": round(seconds, 3),
                     "max_logit_error": round(err, 4), "logit_range": LOGIT_RANGE})
    for f in sorted(folder.glob(f"*{CASE_SUFFIX}")):
        import blosc2

        shape = tuple(blosc2.open(str(f), mode="r").shape)
        rows.append({"folder": str(folder), "case": f.name[:-len(CASE_SUFFIX)], "teachers": int(shape[0]),
                     "voxels": int(np.prod(shape)), "format1_bytes": int(np.prod(shape)) * 2 + 128,
                     "bytes": f.stat().st_size})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", type=Path, nargs="+")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--patch-size", type=int, nargs=3, default=[32, 32, 32])
    p.add_argument("--cases", type=int, default=500)
    p.add_argument("--case-voxels", type=float, default=32e6)
    p.add_argument("--teachers", type=int, default=4)
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from accuracy import machine, versions
    from record import command_line, write_results

    with tempfile.TemporaryDirectory() as tmp:
        rows = [r for f in args.folders for r in measure(f, args.patch_size, Path(tmp))]
    if not rows:
        raise SystemExit(f"no .npy or .b2nd case files in {', '.join(map(str, args.folders))}")
    voxels = sum(r["voxels"] for r in rows)
    old, new = sum(r["format1_bytes"] for r in rows), sum(r["bytes"] for r in rows)
    per_voxel_old, per_voxel_new = old / voxels, new / voxels
    scale = args.cases * args.case_voxels * args.teachers
    record = {"command": command_line(), "rows": rows,
              "cases": len(rows), "voxels": voxels, "format1_bytes": old, "bytes": new,
              "bytes_per_voxel": {"format1": per_voxel_old, "now": per_voxel_new}, "ratio": old / new,
              "max_logit_error": max((r.get("max_logit_error", 0.0) for r in rows), default=None),
              "estimate": {"cases": args.cases, "case_voxels": args.case_voxels, "teachers": args.teachers,
                           "format1_gb": per_voxel_old * scale / 1e9, "now_gb": per_voxel_new * scale / 1e9},
              "versions": versions(), "machine": machine()}
    lines = [f"{len(rows)} cached cases ({voxels:,} teacher-voxels): format 1 (float16 .npy) {old:,} bytes, now "
             f"(uint8 logit codes, blosc2) {new:,} bytes: {old / new:.1f}x smaller, "
             f"{per_voxel_new:.4f} bytes per teacher-voxel (format 1: {per_voxel_old:.3f}); largest logit error of the "
             f"re-stored codes {record['max_logit_error']}.", "",
             f"Estimate for {args.cases} cases of {args.case_voxels / 1e6:.0f} M voxels and {args.teachers} teachers, "
             f"at these bytes per voxel: format 1 {record['estimate']['format1_gb']:.0f} GB, now "
             f"{record['estimate']['now_gb']:.1f} GB.", "",
             "| case | teachers | voxels | format 1 bytes | bytes now | ratio |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['teachers']} | {r['voxels']:,} | {r['format1_bytes']:,} | {r['bytes']:,} | "
              f"{r['format1_bytes'] / r['bytes']:.1f} |" for r in rows]
    write_results(args.out, record, lines)
    print("\n".join(lines[:3]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
