"""What every benchmark writes: ``results.json`` (the record: figures, command, versions, machine) and
``results.md`` (the same for reading), into ``--out``."""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import List


def command_line() -> str:
    """The command that ran this benchmark, as a shell would take it."""
    return " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])


def write_results(out: Path, record: dict, lines: List[str]) -> None:
    """Write ``record`` (with its ``versions`` and ``machine``) as results.json and ``lines`` plus a versions line
    as results.md."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(record, indent=1))
    md = [f"Command: `{record['command']}`", "", *lines, "",
          f"Versions: {record['versions']}; machine: {record['machine']}"]
    (out / "results.md").write_text("\n".join(md) + "\n")
