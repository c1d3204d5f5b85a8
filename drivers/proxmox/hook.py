"""The PVE hookscript side: `vtap hook VMID PHASE`, and installing it on VMs.

PVE runs a guest's hookscript as `<script> <vmid> <phase>` on the node where the phase happens
(qemu-server and pve-container call PVE::GuestHelpers::exec_hookscript): only `pre-start` can stop
the guest (a failure there aborts the start; PVE also refuses to start when the snippet is missing on
the node), the other phases' failures are only warnings. post-start is also what runs on the target
of a live migration, inside its `qm start`: the guest's taps are applied there from the published
desired state and the node's own devices, with no API request (hook_plan.py). pre-stop and
post-stop take them away.

A hookscript must never stop a guest from starting: the snippet exits 0 at once for phases vtap does
not use, and exits 0 when vtap is missing or fails. `hook install --strict` lets one thing fail: at
pre-start, a vtap that is missing or cannot read its configuration and desired state stops the start
(nothing at post-start can stop a guest any more).
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import sys

from vtap_core import reconcile
from vtap_core.errors import NotFound, OperationFailed, ValidationError, VtapError

log = logging.getLogger("vtap.proxmox.hook")

PHASES = ("pre-start", "post-start", "pre-stop", "post-stop")
SNIPPET = "vtap-hook.sh"
HOOK_USER = "root@pam"  # PVE lets only this login set a hookscript (not even root's API tokens)
HOOK_TIMEOUT = 20  # seconds the snippet lets vtap run before it gives up (and the guest goes on)


def check_vmid(text) -> int:
    if not str(text).isdigit() or not 100 <= int(text) <= 999999999:
        raise ValidationError("vmid", f"{text!r} is not a PVE vmid (a number from 100)")
    return int(text)


def run_hook(driver, desired_state, vmid: int, phase: str) -> str:
    """Apply (post-start) or remove (pre-stop, post-stop) this guest's taps on this node."""
    if phase not in PHASES:
        raise ValidationError("phase", f"{phase!r} is not one of {', '.join(PHASES)}")
    if phase == "pre-start":
        desired_state.load()  # strict mode's check: configuration and desired state are readable
        return f"VM {vmid} pre-start: ready (taps follow at post-start)"
    sessions, flows = desired_state.load()
    resolved = getattr(desired_state, "resolved", None)
    if resolved or (resolved is not None and not flows):  # the published document: no API request
        from vtap_drivers.proxmox.hook_plan import apply_guest, remove_guest

        plan = apply_guest(driver, resolved, sessions, flows, vmid) if phase == "post-start" else remove_guest(driver, resolved, vmid)
    else:  # a single node without a shared document (or one an older vtap wrote): ask the API
        # PVE calls us before /cluster/resources shows the change: trust the phase for this VM.
        driver.placement_override[vmid] = driver.node if phase == "post-start" else None
        driver.refresh(force={vmid})
        vm = driver.cluster.vm(vmid)
        if vm is None:
            raise NotFound(f"vmid: PVE lists no VM {vmid}")
        plan = reconcile.reconcile(driver, sessions, flows, scope=vm.identity)
    problems = "; ".join(f"{s}/{f or '-'}: {why}" for s, f, why in plan.problems)
    text = f"VM {vmid} {phase} on {driver.node}: {len(plan.add)} applied, {len(plan.remove)} removed"
    return text + (f" (not realizable: {problems})" if problems else "")


def hook_main(driver, desired_state, vmid_text, phase, strict: bool) -> int:
    """What `vtap hook VMID PHASE` runs: errors go to stderr (PVE's task log), not to the guest's start."""
    try:
        vmid = check_vmid(vmid_text)
        print(f"vtap: {run_hook(driver, desired_state, vmid, phase)}", file=sys.stderr)
        return 0
    except Exception as exc:  # noqa: BLE001 - a hookscript must not fail a VM start by surprise
        text = str(exc) if isinstance(exc, VtapError) else f"{type(exc).__name__}: {exc}"
        if strict and phase == "pre-start":
            print(f"vtap: hook {vmid_text} {phase} failed (strict mode): {text}", file=sys.stderr)
            return getattr(exc, "exit_code", 1)
        print(f"vtap: hook {vmid_text} {phase} failed, VM continues without its taps: {text}", file=sys.stderr)
        return 0


# ------------------------------------------------------------------ install


def snippet_text(vtap_path: str, strict: bool) -> str:
    """The snippet PVE runs. It must not depend on the node that wrote it (a shared storage): vtap is
    looked up on the node running it, the writer's path only as a fallback."""
    return f"""#!/bin/sh
# vtap hookscript, written by `vtap hook install`: PVE runs it as <script> <vmid> <phase>.
# Only a failing pre-start stops a guest; this script fails nothing unless STRICT=1, and then only pre-start.
# Connection settings come from /etc/vtap/config.toml ([proxmox]), never from this file.
STRICT={1 if strict else 0}
case "$2" in
  post-start|pre-stop|post-stop) ;;
  pre-start) [ "$STRICT" = 1 ] || exit 0 ;;
  *) exit 0 ;;
esac
fail() {{
  echo "vtap: hook $1 $2: $3" >&2
  if [ "$STRICT" = 1 ] && [ "$2" = pre-start ]; then exit 1; fi
  exit 0
}}
VTAP=$(PATH="$PATH:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin" command -v vtap) || VTAP={shlex.quote(vtap_path)}
[ -x "$VTAP" ] || fail "$1" "$2" "vtap is not installed on this node, VM continues without its taps"
if command -v timeout >/dev/null; then LIMIT="timeout -k 2 {HOOK_TIMEOUT}"; else LIMIT=; fi
VTAP_HOOK_STRICT=$STRICT $LIMIT "$VTAP" hook "$1" "$2" || fail "$1" "$2" "vtap failed (exit $?), VM continues without its taps"
exit 0
"""


def vtap_executable() -> str:
    found = shutil.which("vtap")
    return os.path.abspath(found or sys.argv[0])


def install(driver, storage: str, vmids=None, all_vms: bool = False, strict: bool = False) -> str:
    """Write the snippet on this node and set `hookscript` on the VMs; all or nothing."""
    api = driver.api
    if api.login != HOOK_USER:
        raise ValidationError("user", f"only {HOOK_USER} may set a VM's hookscript (PVE's rule, API tokens included); "
                                      f"connected as {api.login}: use --user root@pam with VTAP_PROXMOX_PASSWORD")
    if bool(vmids) == bool(all_vms):
        raise ValidationError("vm", "give --vm VMID (repeatable) or --all")
    volume = f"{storage}:snippets/{SNIPPET}"
    folder = _snippet_folder(api, storage)
    if not os.access(_nearest_existing(folder), os.W_OK):
        raise ValidationError("storage", f"cannot write {folder} as this OS user: run hook install as root on the node")
    vms = driver.current_vms()
    if all_vms:
        chosen = [vm for vm in vms if not vm.template]
    else:
        known = {vm.vmid: vm for vm in vms}
        chosen = []
        for vmid in vmids:
            vmid = check_vmid(vmid)
            if vmid not in known:
                raise NotFound(f"vm: PVE lists no VM {vmid}")
            chosen.append(known[vmid])
    configs = {vm.vmid: api.get(f"nodes/{vm.node}/{vm.kind}/{vm.vmid}/config") for vm in chosen}
    for vm in chosen:
        current = configs[vm.vmid].get("hookscript")
        if current and current != volume:
            raise ValidationError("hookscript", f"VM {vm.vmid} already runs hookscript {current}: vtap does not replace it "
                                                f"(call `vtap hook \"$@\"` from it instead)")
    path = os.path.join(folder, SNIPPET)
    created = _write_snippet(path, snippet_text(vtap_executable(), strict))
    done = []
    try:
        for vm in chosen:
            if configs[vm.vmid].get("hookscript") != volume:
                api.put(f"nodes/{vm.node}/{vm.kind}/{vm.vmid}/config", hookscript=volume)
                done.append(vm)
    except VtapError as exc:
        for vm in done:
            try:
                api.put(f"nodes/{vm.node}/{vm.kind}/{vm.vmid}/config", delete="hookscript")
            except VtapError:
                pass
        if created:
            os.unlink(path)
        if isinstance(exc, OperationFailed) and "only root" in str(exc):
            raise ValidationError("user", f"PVE refused: only {HOOK_USER} may set a hookscript") from None
        raise OperationFailed(f"hook install failed and was rolled back: {exc}") from None
    ids = ", ".join(str(vm.vmid) for vm in chosen) or "none"
    return (f"hookscript {volume} set on VMs {ids} ({len(done)} changed); snippet {path} written on node {driver.node}"
            f" (a storage that is not shared needs `vtap hook install` on every node)")


def _snippet_folder(api, storage: str) -> str:
    try:
        config = api.get(f"storage/{storage}")
    except (NotFound, ValidationError, OperationFailed) as exc:
        raise ValidationError("storage", f"{storage!r}: {exc}") from None
    content = str(config.get("content", "")).split(",")
    if "snippets" not in content:
        raise ValidationError("storage", f"{storage!r} does not hold snippets (content: {config.get('content') or 'none'}); "
                                         f"add it: pvesm set {storage} --content {config.get('content')},snippets")
    if not config.get("path"):
        raise ValidationError("storage", f"{storage!r} is a {config.get('type')} storage without a file path: choose a directory storage")
    return os.path.join(config["path"], "snippets")


def _nearest_existing(path: str) -> str:
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def _write_snippet(path: str, text: str) -> bool:
    """Write it (mode 0755); True when the file did not exist before."""
    existed = os.path.exists(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o755), "w") as handle:
        handle.write(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    return not existed
