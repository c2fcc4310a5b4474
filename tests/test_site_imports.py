"""Site code never imports server code (issue 16, item 3): what a hospital runs - the plugin trainers, the nnU-Net
site, the Flower ClientApp - loads none of the coordinator's modules (aggregation, round core, runner, planning,
the Flower ServerApp and its transport), checked in a fresh interpreter."""
from __future__ import annotations

import json
import subprocess
import sys

SITE_MODULES = ["nnunetv2_fedkd.trainers", "nnunetv2_fedkd.federated.nnunet_site", "nnunetv2_fedkd.federated.site_side",
                "nnunetv2_fedkd.flower.client_app", "nnunetv2_fedkd.flower.task",
                "nnunetv2_fedkd.nnunet_ext_trainers.nnunetv2_fedkd_trainers"]
SERVER_MODULES = ["nnunetv2_fedkd.federated.aggregation", "nnunetv2_fedkd.federated.update_checks",
                  "nnunetv2_fedkd.federated.strategies", "nnunetv2_fedkd.federated.round_core",
                  "nnunetv2_fedkd.federated.runner", "nnunetv2_fedkd.federated.planning",
                  "nnunetv2_fedkd.federated.results_folder", "nnunetv2_fedkd.flower.server_app",
                  "nnunetv2_fedkd.flower.strategy", "nnunetv2_fedkd.workflows.pipeline", "nnunetv2_fedkd.workflows.cli"]


def loaded_after_importing(module: str) -> list:
    code = (f"import sys, json, importlib\nimportlib.import_module({module!r})\n"
            f"print(json.dumps(sorted(m for m in sys.modules if m.startswith('nnunetv2_fedkd'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_site_modules_load_no_server_module():
    for module in SITE_MODULES:
        loaded = loaded_after_importing(module)
        server = [m for m in SERVER_MODULES if m in loaded]
        assert not server, f"importing {module} loads server code: {server}"


def test_the_package_still_re_exports_both_sides_lazily():
    from nnunetv2_fedkd import federated

    assert federated.FedAvg.name == "fedavg" and federated.SiteUpdate.__module__.endswith("site_side")
    assert "aggregate_round" in dir(federated)
