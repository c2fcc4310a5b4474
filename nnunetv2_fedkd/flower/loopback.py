"""Local loopback deployments of the Flower app, for tests and benchmarks; not for production.

Starts ``flower-superlink`` and one ``flower-supernode`` per site as subprocesses on 127.0.0.1 (insecure, free ports,
one OMP thread each), runs the package's app with the ``flwr`` CLI of this interpreter's environment, polls the run's
status and stops every process it started (with the SuperExec and app processes below them). Used by
``tests/test_flower_deployment.py`` and ``benchmarks/federation_performance.py``. A real deployment (TLS, node
authentication, one machine per site) is set up as the README describes, not with this module.

Nothing here imports Flower's Python package at import time (only :func:`run_app` needs it, for the app folder); the
``flower-superlink``, ``flower-supernode`` and ``flwr`` executables must be next to ``sys.executable``. Linux only
(the process tree is read from ``/proc``).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Sequence, Tuple

#: the folder of this interpreter's executables (``flwr``, ``flower-superlink``, ``flower-supernode``)
BIN = Path(sys.executable).parent
#: the name of the SuperLink connection written to ``FLWR_HOME/config.toml`` and passed to ``flwr``
CONNECTION = "loopback"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    """Wait until something listens on 127.0.0.1:``port``; raise (with the tail of ``log``) if ``proc`` exits first or
    ``timeout`` seconds pass."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(1)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"{proc.args[0]} does not listen on 127.0.0.1:{port} after {timeout} s:\n"
                       f"{log.read_text()[-3000:]}")


def _descendants(pid: int) -> List[int]:
    """pid and every process below it (the SuperExec that SuperLink/SuperNode start runs in a session of its own,
    and it starts the ServerApp/ClientApp processes)."""
    children: Dict[int, List[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop(procs: Sequence[subprocess.Popen]) -> None:
    """SIGTERM the given processes and everything below them, then SIGKILL what is left."""
    tree = [p for proc in procs if proc.poll() is None for p in _descendants(proc.pid)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in tree:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 15
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        tree = [pid for pid in tree if _alive(pid)]
        if not tree:
            return


def flwr(args: Sequence[str], env: Dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Run this environment's ``flwr`` CLI with ``args``; output captured as text."""
    return subprocess.run([str(BIN / "flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout)


def run_status(run_id: str, env: Dict[str, str]) -> str:
    """The status of run ``run_id`` (``flwr ls``), e.g. ``finished:completed``; ``unknown (...)`` if it cannot be
    read."""
    out = flwr(["ls", CONNECTION, "--run-id", run_id, "--format", "json"], env)
    if out.returncode != 0:
        return f"unknown ({out.stdout[-500:]} {out.stderr[-500:]})"
    runs = json.loads(out.stdout)["runs"]
    return runs[0]["status"] if runs else "unknown (no such run)"


def node_config(site: str, dataset: str, organs: Sequence[str], site_dir: Path, device: str = "cpu") -> str:
    """The ``--node-config`` of a SuperNode that serves one site (read by the ClientApp)."""
    return (f'site="{site}" dataset="{dataset}" organs="{",".join(organs)}" site-dir="{site_dir}" '
            f'device="{device}"')


@contextmanager
def deployment(root: Path, env: Mapping[str, str],
               nodes: Mapping[str, str]) -> Iterator[Tuple[Dict[str, str], Dict[str, Path]]]:
    """Start a SuperLink and one SuperNode per entry of ``nodes`` (name -> node config) on 127.0.0.1 and wait until
    they listen; stop them all on the way out.

    ``root/flwr_home`` becomes ``FLWR_HOME`` (its ``config.toml`` names the SuperLink as :data:`CONNECTION`); each
    process logs to ``root/<name>.log`` (the SuperLink's name: ``superlink``). Every process gets ``env`` plus
    ``FLWR_HOME``, :data:`BIN` first on ``PATH``, no telemetry or update check, unbuffered output and
    ``OMP_NUM_THREADS=1`` (the sites train at the same time: one core each). Yields that environment (for
    :func:`flwr`, :func:`run_app`) and the log files by name."""
    home = root / "flwr_home"
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\n'
        f'insecure = true\n')
    env = {**env, "FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1"}
    logs: Dict[str, Path] = {}
    procs: List[subprocess.Popen] = []

    def start(name: str, cmd: List[str]) -> subprocess.Popen:
        logs[name] = root / f"{name}.log"
        with open(logs[name], "w") as f:
            p = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(p)
        return p

    try:
        link = start("superlink", [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port",
                                   str(port), "--disable-runtime-dependency-installation"])
        wait_for_port(port, link, logs["superlink"])
        for name, config in nodes.items():
            node_port = free_port()
            node = start(name, [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                                "--port", str(node_port), "--node-config", config])
            wait_for_port(node_port, node, logs[name])
        yield env, logs
    finally:
        stop(procs)


def run_app(run_config: str, env: Dict[str, str], timeout: float, poll: float) -> Tuple[str, str]:
    """``flwr run`` the package's Flower app (:data:`~nnunetv2_fedkd.flower.task.APP_DIR`) with ``run_config`` on the
    loopback SuperLink, then poll its status every ``poll`` s until it has finished or ``timeout`` s have passed since
    it was submitted. Returns (run id, last status); raises RuntimeError if ``flwr run`` fails. ``flwr run`` exits 0
    even when the ServerApp fails: check the status."""
    from nnunetv2_fedkd.flower.task import APP_DIR  # imports Flower

    t0 = time.monotonic()
    out = flwr(["run", str(APP_DIR), CONNECTION, "--run-config", run_config, "--format", "json"], env)
    if out.returncode != 0:
        raise RuntimeError(f"flwr run failed: {out.stdout[-3000:]} {out.stderr[-3000:]}")
    run_id = json.loads(out.stdout)["run-id"]
    status = run_status(run_id, env)
    while not status.startswith("finished") and time.monotonic() - t0 < timeout:
        time.sleep(poll)
        status = run_status(run_id, env)
    return run_id, status
