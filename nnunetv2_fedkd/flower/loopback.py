"""Local loopback deployments of the Flower app, for tests and benchmarks; not for production.

Starts ``flower-superlink`` and one ``flower-supernode`` per site as subprocesses on 127.0.0.1 (insecure, or TLS with
a throw-away CA and SuperNode authentication; free ports, one OMP thread each), runs the package's app with the
``flwr`` CLI of this interpreter's environment, polls the run's status, can kill and restart single processes (fault
tests) and stops every process it started (with the SuperExec and app processes below them). Used by
``tests/test_flower_deployment.py`` and ``benchmarks/federation_performance.py``. A real deployment (the hospital's
certificates, one machine per site) is set up as the README describes, not with this module.

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
from typing import Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple

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


class Loopback:
    """A running loopback deployment (what :func:`deployment` yields): the environment for :func:`flwr` /
    :func:`submit_app`, the log files by process name, and the processes, which a fault test may kill and restart."""

    def __init__(self, root: Path, env: Dict[str, str], tls: Optional["LoopbackTLS"] = None,
                 supernode_auth: bool = False):
        self.root, self.env, self.tls, self.supernode_auth = root, env, tls, supernode_auth
        self.logs: Dict[str, Path] = {}
        self.procs: Dict[str, subprocess.Popen] = {}
        self.node_configs: Dict[str, str] = {}
        self.node_keys: Dict[str, Optional[Path]] = {}
        self.port = 0

    def _start(self, name: str, cmd: List[str]) -> subprocess.Popen:
        log = self.root / f"{name}.log"
        # a restarted process appends to its log, so what it printed before it was killed is kept
        mode = "a" if name in self.logs else "w"
        self.logs[name] = log
        with open(log, mode) as f:
            p = subprocess.Popen(cmd, env=self.env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = p
        return p

    def start_superlink(self) -> None:
        security = ["--insecure"] if self.tls is None else [
            "--ssl-ca-certfile", str(self.tls.ca), "--ssl-certfile", str(self.tls.cert), "--ssl-keyfile",
            str(self.tls.key)]
        if self.supernode_auth:
            security.append("--enable-supernode-auth")
        link = self._start("superlink", [str(BIN / "flower-superlink"), *security, "--host", "127.0.0.1",
                                         "--port", str(self.port), "--disable-runtime-dependency-installation"])
        wait_for_port(self.port, link, self.logs["superlink"])

    def start_node(self, name: str, config: Optional[str] = None, private_key: Optional[Path] = None,
                   wait: bool = True) -> subprocess.Popen:
        """Start (or restart, with its earlier node config and key) the SuperNode ``name``; with ``wait``, wait until
        it listens. ``private_key``: its SuperNode authentication key (OpenSSH format, see :func:`node_key_pair`)."""
        if config is not None:
            self.node_configs[name] = config
            self.node_keys[name] = private_key
        node_port = free_port()
        security = ["--insecure"] if self.tls is None else ["--root-certificates", str(self.tls.ca)]
        if self.node_keys.get(name) is not None:
            security += ["--auth-supernode-private-key", str(self.node_keys[name])]
        node = self._start(name, [str(BIN / "flower-supernode"), *security, "--superlink", f"127.0.0.1:{self.port}",
                                  "--port", str(node_port), "--node-config", self.node_configs[name]])
        if wait:
            wait_for_port(node_port, node, self.logs[name])
        return node

    def kill(self, name: str) -> None:
        """SIGKILL the process ``name`` (``superlink`` or a site) and everything below it (the SuperExec and the
        ServerApp/ClientApp processes it started), as a crash would: nothing gets to clean up."""
        proc = self.procs[name]
        for pid in _descendants(proc.pid) if proc.poll() is None else []:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)

    def stop(self) -> None:
        stop(list(self.procs.values()))


@contextmanager
def deployment(root: Path, env: Mapping[str, str], nodes: Mapping[str, str], tls: Optional["LoopbackTLS"] = None,
               supernode_auth: bool = False, node_keys: Optional[Mapping[str, Path]] = None) -> Iterator[Loopback]:
    """Start a SuperLink and one SuperNode per entry of ``nodes`` (name -> node config) on 127.0.0.1 and wait until
    they listen; stop them all on the way out. With ``tls`` (:func:`tls_files`) every connection is TLS; with
    ``supernode_auth`` the SuperLink admits only SuperNodes whose public key was registered (``flwr supernode
    register``), and each node of ``nodes`` is started with its private key from ``node_keys`` (start the nodes
    after registering them: pass ``nodes={}`` and call :meth:`Loopback.start_node`).

    ``root/flwr_home`` becomes ``FLWR_HOME`` (its ``config.toml`` names the SuperLink as :data:`CONNECTION`); each
    process logs to ``root/<name>.log`` (the SuperLink's name: ``superlink``). Every process gets ``env`` plus
    ``FLWR_HOME``, :data:`BIN` first on ``PATH``, no telemetry or update check, unbuffered output and
    ``OMP_NUM_THREADS=1`` (the sites train at the same time: one core each). Yields the :class:`Loopback`."""
    home = root / "flwr_home"
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    security = "insecure = true" if tls is None else f'root-certificates = "{tls.ca}"'
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\n'
        f'{security}\n')
    env = {**env, "FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1"}
    lb = Loopback(root, env, tls, supernode_auth)
    lb.port = port
    try:
        lb.start_superlink()
        for name, config in nodes.items():
            lb.start_node(name, config, (node_keys or {}).get(name))
        yield lb
    finally:
        lb.stop()


class LoopbackTLS(NamedTuple):
    """The TLS files of a loopback SuperLink: the CA certificate (what SuperNodes and ``flwr`` trust), the SuperLink's
    certificate (signed by the CA, valid for ``localhost`` and ``127.0.0.1``) and its private key."""
    ca: Path
    cert: Path
    key: Path


def tls_files(folder: Path) -> LoopbackTLS:
    """Make a throw-away CA and a SuperLink certificate for 127.0.0.1 in ``folder`` (``cryptography``, installed with
    Flower). Tests only: a real deployment's certificates come from the hospital's PKI (README)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))

    def cert(subject: str, key, issuer: str, signing_key, ca: bool):
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(valid[0]).not_valid_after(valid[1])
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                             x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                critical=False)
        return b.sign(signing_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca_cert = cert("nnunetv2_fedkd loopback CA", ca_key, "nnunetv2_fedkd loopback CA", ca_key, ca=True)
    server_cert = cert("localhost", server_key, "nnunetv2_fedkd loopback CA", ca_key, ca=False)
    out = LoopbackTLS(folder / "ca.crt", folder / "server.pem", folder / "server.key")
    out.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    out.cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    out.key.write_bytes(server_key.private_bytes(serialization.Encoding.PEM,
                                                 serialization.PrivateFormat.TraditionalOpenSSL,
                                                 serialization.NoEncryption()))
    return out


def node_key_pair(folder: Path, name: str) -> Tuple[Path, Path]:
    """A SuperNode authentication key pair (ECDSA P-384, OpenSSH format, as ``ssh-keygen -t ecdsa -b 384`` makes):
    returns (private key, public key ``.pub``)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH))
    return private, public


def submit_app(run_config: str, env: Dict[str, str]) -> str:
    """``flwr run`` the package's Flower app (:data:`~nnunetv2_fedkd.flower.task.APP_DIR`) with ``run_config`` on the
    loopback SuperLink; returns the run id at once (raises RuntimeError if ``flwr run`` fails). ``flwr run`` exits 0
    even when the ServerApp fails: check the status."""
    from nnunetv2_fedkd.flower.task import APP_DIR  # imports Flower

    out = flwr(["run", str(APP_DIR), CONNECTION, "--run-config", run_config, "--format", "json"], env)
    if out.returncode != 0:
        raise RuntimeError(f"flwr run failed: {out.stdout[-3000:]} {out.stderr[-3000:]}")
    return json.loads(out.stdout)["run-id"]


def wait_for_run(run_id: str, env: Dict[str, str], timeout: float, poll: float) -> str:
    """Poll run ``run_id``'s status every ``poll`` s until it has finished or ``timeout`` s have passed; returns the
    last status."""
    t0 = time.monotonic()
    status = run_status(run_id, env)
    while not status.startswith("finished") and time.monotonic() - t0 < timeout:
        time.sleep(poll)
        status = run_status(run_id, env)
    return status


def run_app(run_config: str, env: Dict[str, str], timeout: float, poll: float) -> Tuple[str, str]:
    """:func:`submit_app` then :func:`wait_for_run`: returns (run id, last status)."""
    run_id = submit_app(run_config, env)
    return run_id, wait_for_run(run_id, env, timeout, poll)
