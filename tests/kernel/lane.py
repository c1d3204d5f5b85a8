"""The stock-kernel lane: tests/kernel/ run inside a QEMU guest booted from Debian's kernel.

This machine's kernel lacks gretap, ip6gretap, erspan, ip6erspan, 8021q, dummy and
the openvswitch datapath; Debian's linux-image-amd64 (installed by scripts/setup
for the kvm tests) has them all as modules. The guest:

  - boots /boot/vmlinuz-<release> with a tiny initramfs built here (static
    busybox, the 9p/virtio modules of that release, an /init);
  - mounts the host's root file system read-only over 9p and chroots into it,
    with tmpfs on /tmp, /run, /var/tmp, /dev/shm: the same Python, the same
    checkout, the same tshark, and the release's own modules for modprobe;
  - mounts a second, writable 9p share (the results directory) on /run/results
    and runs run.sh from it: pytest over tests/kernel with VTAP_KERNEL_LANE=1,
    its log, junit file and exit code written back there;
  - powers off.

One boot runs every lane test. Tests in the lane skip on the host (in_lane()).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from initramfs import cpio_newc, load_order  # tests/initramfs.py (tests/ is on the path: tests/conftest.py)

import pytest

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / "tests" / ".cache" / "lane"
LANE_ENV = "VTAP_KERNEL_LANE"
BOOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p")  # with their dependencies, from modules.dep
INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs dev /dev
while read -r m; do insmod "/lib/modules/$m" || echo "lane: insmod $m failed"; done < /lib/modules/order
mkdir -p /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /newroot || { echo "lane: no host root"; poweroff -f; }
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs dev /newroot/dev
mkdir -p /newroot/dev/shm
for d in tmp run var/tmp dev/shm; do mount -t tmpfs -o mode=1777 tmpfs /newroot/$d; done
mkdir -p /newroot/run/results /newroot/run/netns
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 results /newroot/run/results || { echo "lane: no results share"; poweroff -f; }
# The repository has a share of its own: a checkout under /tmp, /run or /var/tmp (a CI clone) is
# hidden by the tmpfs mounts above, and one on another file system is not in the root share.
repo=$(cat /newroot/run/results/repo)
mkdir -p "/newroot$repo"
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose repo "/newroot$repo" || { echo "lane: no repository share"; poweroff -f; }
# The kernel's module autoloader runs /sbin/modprobe in this (initramfs) root: hand it to the host's.
printf '#!/bin/sh\nexec chroot /newroot /sbin/modprobe "$@"\n' > /sbin/modprobe
chmod 755 /sbin/modprobe
echo /sbin/modprobe > /proc/sys/kernel/modprobe
chroot /newroot /bin/sh /run/results/run.sh
sync
poweroff -f
"""


def in_lane() -> bool:
    return os.environ.get(LANE_ENV) == "1"


# Every test module of the lane starts with: pytestmark = lane_only
lane_only = pytest.mark.skipif(not in_lane(), reason="stock-kernel lane test: runs inside the Debian-kernel guest that tests/kernel/test_lane.py boots")


def kernel_path() -> Path | None:
    kernels = sorted(Path("/boot").glob("vmlinuz-*"))
    return kernels[-1] if kernels else None


def initramfs(release: str) -> Path:
    """The lane's initramfs for a kernel release (built once, cached under tests/.cache/lane)."""
    path = CACHE / f"initrd-{release}-{hashlib.sha256((INIT + repr(BOOT_MODULES)).encode()).hexdigest()[:12]}.gz"
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    entries = [(d, 0o40755, b"") for d in ("bin", "sbin", "proc", "sys", "dev", "lib", "lib/modules")]
    entries.append(("init", 0o100755, INIT.encode()))
    entries.append(("bin/busybox", 0o100755, Path(shutil.which("busybox") or "/bin/busybox").read_bytes()))
    entries.append(("dev/console", 0o20600, b""))
    order = []
    for module in load_order(release, BOOT_MODULES):
        name = os.path.basename(module)
        entries.append((f"lib/modules/{name}", 0o100644, Path(f"/lib/modules/{release}/{module}").read_bytes()))
        order.append(name)
    entries.append(("lib/modules/order", 0o100644, ("\n".join(order) + "\n").encode()))
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(cpio_newc(entries), compresslevel=1))
    tmp.rename(path)
    return path


def run_script(pytest_args) -> str:
    """What the guest runs in the host's root: pytest over the lane, results to /run/results."""
    bindir = os.path.dirname(sys.executable)
    env = {
        "PATH": f"{bindir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/tmp",
        "PYTHONDONTWRITEBYTECODE": "1",
        "TMPDIR": "/tmp",
        LANE_ENV: "1",
    }
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "--junitxml=/run/results/junit.xml", *pytest_args]
    return "\n".join(
        [
            "#!/bin/sh",
            *(f"export {k}={shlex.quote(v)}" for k, v in env.items()),
            f"cd {shlex.quote(str(REPO))}",
            "ip link set lo up",
            f"{shlex.join(args)} > /run/results/pytest.log 2>&1",
            "echo $? > /run/results/rc",
        ]
    ) + "\n"


def boot(results: Path, pytest_args, timeout: float = 900) -> tuple[int | None, str, str]:
    """Boot the lane once; returns (pytest exit code or None, pytest log, console log)."""
    kernel = kernel_path()
    release = kernel.name[len("vmlinuz-"):]
    results.mkdir(parents=True, exist_ok=True)
    (results / "run.sh").write_text(run_script(pytest_args))
    (results / "repo").write_text(str(REPO))
    console = results / "console.log"
    # TCG by default: nested KVM on CI machines often hangs or fails on MSRs (seen here).
    accel = ["-accel", os.environ.get("VTAP_LANE_ACCEL", "tcg")]
    command = [
        "qemu-system-x86_64", *accel, "-m", "2048", "-smp", "2",
        "-kernel", str(kernel), "-initrd", str(initramfs(release)),
        "-append", "console=ttyS0 panic=-1 quiet",
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={results},mount_tag=results,security_model=none",
        "-virtfs", f"local,path={REPO},mount_tag=repo,security_model=none,readonly=on,multidevs=remap",
        "-nic", "none", "-display", "none", "-monitor", "none", "-no-reboot",
        "-serial", f"file:{console}",
    ]
    try:
        subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        pass  # subprocess.run killed it; the logs say how far it got
    rc_file = results / "rc"
    rc = int(rc_file.read_text()) if rc_file.exists() else None
    log = (results / "pytest.log").read_text(errors="replace") if (results / "pytest.log").exists() else ""
    return rc, log, console.read_text(errors="replace") if console.exists() else ""
