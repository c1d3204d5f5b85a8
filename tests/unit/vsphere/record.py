#!/usr/bin/env python3
"""Re-record the vsphere driver's SOAP cassettes from the live simulator.

    python3 tests/unit/vsphere/record.py [SCENARIO...]     (default: all of them)

Each scenario of scenarios.py runs against a fresh simulator; the cassette keeps the
conversation (password and session cookies scrubbed), meta.json the URL and what the
scenario returned, which the unit tests expect again on replay.
"""

import json
import sys
from pathlib import Path

from pyVmomi import vim

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "vsphere"))
from vsphere_cassette import CASSETTES, META, make_vcr  # noqa: E402
from vsphere_scenarios import SCENARIOS  # noqa: E402
from vcsim_simulator import Simulator  # noqa: E402


def main():
    from vtap_drivers.vsphere.driver import VsphereDriver

    wanted = sys.argv[1:] or list(SCENARIOS)
    meta = json.loads(META.read_text()) if META.exists() else {}
    CASSETTES.mkdir(exist_ok=True)
    for name in wanted:
        scenario = SCENARIOS[name]
        with Simulator(hosts=2, vms=3) as sim:
            si = sim.connect()
            view = si.content.viewManager.CreateContainerView(si.content.rootFolder, [vim.VirtualMachine], True)
            uuids = [vm.config.instanceUuid for vm in sorted(view.view, key=lambda vm: vm.name)]
            info = {"url": sim.url, "user": sim.user, "vms": uuids}
            path = CASSETTES / f"{name}.yaml"
            path.unlink(missing_ok=True)
            with make_vcr().use_cassette(str(path), record_mode="all"):
                driver = VsphereDriver(url=sim.url, user=sim.user, password=sim.password, state_dir="/nonexistent")
                info["result"] = scenario(driver, info)
                driver.close()
            meta[name] = info
            print(f"recorded {name}")
    META.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
