"""Running stock console scripts (``nnUNetv2_*``, ``nnunetv2_fedkd``) as subprocesses: the one place that starts
them, for the user workflows (:mod:`nnunetv2_fedkd.workflows.pipeline`) and the library code that needs a stock step
(the federation's planning runs nnU-Net's fingerprint extraction and preprocessing at each site)."""
from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence


class StepError(RuntimeError):
    pass


def nnunet_script(name: str) -> str:
    """Path of a console script installed next to this Python (works without an activated venv)."""
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


def run_command(cmd: Sequence[str], env: Dict[str, str], log_file: Optional[Path] = None,
                quiet: bool = False) -> float:
    """Run ``cmd``; stream or log its output; raise StepError with the log's tail on failure. Returns seconds."""
    shown = " ".join(shlex.quote(str(c)) for c in cmd)
    if not quiet:
        print(f"$ {shown}", flush=True)
    t0 = time.perf_counter()
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "w") as f:
            proc = subprocess.run([str(c) for c in cmd], env=env, stdout=f, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            tail = "".join(Path(log_file).read_text(errors="replace").splitlines(True)[-40:])
            raise StepError(f"command failed with exit code {proc.returncode}: {shown}\nlog: {log_file}\n{tail}")
    else:
        proc = subprocess.run([str(c) for c in cmd], env=env)
        if proc.returncode != 0:
            raise StepError(f"command failed with exit code {proc.returncode}: {shown}")
    return time.perf_counter() - t0
