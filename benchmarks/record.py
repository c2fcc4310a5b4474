"""What every benchmark writes: ``results.json`` (the record: figures, command, versions, machine) and
``results.md`` (the same for reading), into ``--out``."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import List, Tuple


def command_line() -> str:
    """The command that ran this benchmark, as a shell would take it."""
    return " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])


def add_out_arguments(p: argparse.ArgumentParser) -> None:
    """``--out`` (where the results go) and ``--workdir`` (the data and models; default ``<out>/work``)."""
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--workdir", type=Path, default=None, help="default: <out>/work")


def out_and_workdir(args: argparse.Namespace) -> Tuple[Path, Path]:
    """The absolute ``--out`` (created) and ``--workdir``."""
    out = args.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    return out, (args.workdir or out / "work").absolute()


def write_results(out: Path, record: dict, lines: List[str]) -> None:
    """Write ``record`` (with its ``versions`` and ``machine``) as results.json and ``lines`` plus a versions line
    as results.md, each written whole or not at all."""
    from nnunetv2_fedkd.utils import atomic_write_json, atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", record)
    md = [f"Command: `{record['command']}`", "", *lines, "",
          f"Versions: {record['versions']}; machine: {record['machine']}"]
    atomic_write_text(out / "results.md", "\n".join(md) + "\n")
