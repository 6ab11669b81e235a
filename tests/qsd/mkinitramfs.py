"""Build the tiny Linux test system's initramfs from the host's Debian packages.

Kernel: ``/boot/vmlinuz-*`` (linux-image-amd64). The initramfs holds busybox (busybox-static),
mke2fs with its shared libraries (e2fsprogs), the kernel modules the guest needs with their
dependencies (from the kernel's modules.dep) and ``init.sh`` as ``/init``. Nothing is
downloaded. ``cpio`` packs it. Run as a script to build one by hand::

    python tests/qsd/mkinitramfs.py OUT_DIR
"""
from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import sys
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
MODULES = ["virtio_pci", "virtio_blk", "ext4", "crc32c_generic", "loop"]
BINARIES = ["/sbin/mke2fs"]


def kernel() -> Optional[tuple[str, str]]:
    """(vmlinuz path, release) of the newest installed kernel whose modules are present."""
    for path in sorted(glob.glob("/boot/vmlinuz-*"), reverse=True):
        release = path.split("vmlinuz-", 1)[1]
        if os.path.exists(f"/lib/modules/{release}/modules.dep"):
            return path, release
    return None


def missing() -> list[str]:
    """What the host lacks to build and boot the test system (a package name each)."""
    need = []
    if kernel() is None or not os.access(kernel()[0], os.R_OK):  # type: ignore[index]
        need.append("linux-image-amd64 (a readable /boot/vmlinuz-*)")
    if not os.path.exists("/bin/busybox") or subprocess.run(["ldd", "/bin/busybox"], capture_output=True).returncode == 0:
        need.append("busybox-static")  # a dynamically linked busybox would need its libraries too
    if not shutil.which("cpio"):
        need.append("cpio")
    if not os.path.exists("/sbin/mke2fs"):
        need.append("e2fsprogs")
    return need


def _deps(release: str) -> list[str]:
    """Module files for MODULES, dependencies first (modules.dep order)."""
    base = f"/lib/modules/{release}"
    dep: dict[str, list[str]] = {}
    with open(f"{base}/modules.dep") as f:
        for line in f:
            mod, _, rest = line.partition(":")
            dep[os.path.basename(mod).split(".ko")[0].replace("-", "_")] = [mod] + rest.split()
    out: list[str] = []

    def add(path: str) -> None:
        name = os.path.basename(path).split(".ko")[0].replace("-", "_")
        for d in reversed(dep[name][1:]):
            add(d)
        if path not in out:
            out.append(path)

    for m in MODULES:
        if m in dep:
            add(dep[m][0])
    return [f"{base}/{p}" for p in out]


def _libs(binary: str) -> list[str]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    libs = []
    for line in out.splitlines():
        parts = line.split()
        for p in parts:
            if p.startswith("/"):
                libs.append(p)
    return libs


def vhost_user_disk(sock: str, queues: int = 1) -> list[str]:
    """QEMU options for a vhost-user-blk disk on ``sock`` (guest RAM must be a shared memfd)."""
    return ["-object", "memory-backend-memfd,id=mem,size=256M,share=on", "-numa", "node,memdev=mem",
            "-chardev", f"socket,id=vu,path={sock}",
            "-device", f"vhost-user-blk-pci,chardev=vu,num-queues={queues}"]


def qemu_argv(qemu: str, vmlinuz: str, initrd: str, disk: list[str], params: str, cpus: int = 1) -> list[str]:
    """Boot the test system with TCG (KVM is not used: it hangs on some of our machines)."""
    return [qemu, "-machine", "q35,accel=tcg", "-cpu", "max", "-m", "256M", "-smp", str(cpus), *disk,
            "-kernel", vmlinuz, "-initrd", initrd, "-append", f"console=ttyS0 quiet panic=-1 {params}",
            "-display", "none", "-nodefaults", "-serial", "stdio", "-no-reboot"]


def build(out_dir: str) -> tuple[str, str]:
    """(kernel path, initramfs path), building the initramfs once per input set."""
    k = kernel()
    if k is None:
        raise RuntimeError("no kernel under /boot")
    vmlinuz, release = k
    mods = _deps(release)
    with open(os.path.join(HERE, "init.sh"), "rb") as f:
        init = f.read()
    key = hashlib.sha256(repr((release, mods, BINARIES)).encode() + init).hexdigest()[:16]
    target = os.path.join(out_dir, f"initramfs-{key}.cpio")
    if os.path.exists(target):
        return vmlinuz, target
    root = os.path.join(out_dir, f"root-{key}")
    shutil.rmtree(root, ignore_errors=True)
    for d in ("bin", "sbin", "dev", "proc", "sys", "mnt", "tmp", "lib/modules", "lib64", "lib/x86_64-linux-gnu"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    shutil.copy2("/bin/busybox", os.path.join(root, "bin/busybox"))
    for applet in ("sh", "mount", "umount", "insmod", "sync", "md5sum", "dd", "mkdir", "cat", "echo",
                   "fstrim", "poweroff", "sleep", "ls", "rm", "head", "cut", "grep", "sed", "sha256sum",
                   "df", "du", "losetup", "stat", "seq", "find"):
        os.symlink("busybox", os.path.join(root, "bin", applet))
    for b in BINARIES:
        shutil.copy2(b, os.path.join(root, b.lstrip("/")))
        for lib in _libs(b):
            dest = os.path.join(root, lib.lstrip("/"))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copy2(os.path.realpath(lib), dest)
    os.symlink("mke2fs", os.path.join(root, "sbin/mkfs.ext4"))
    with open(os.path.join(root, "modules.order"), "w") as f:
        for m in mods:
            shutil.copy2(m, os.path.join(root, "lib/modules", os.path.basename(m)))
            f.write(os.path.basename(m) + "\n")
    shutil.copy2(os.path.join(HERE, "init.sh"), os.path.join(root, "init"))
    os.chmod(os.path.join(root, "init"), 0o755)
    files = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
    tmp = target + ".tmp"
    with open(tmp, "wb") as f:
        subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files, stdout=f, check=True)
    os.replace(tmp, target)
    shutil.rmtree(root, ignore_errors=True)
    return vmlinuz, target


if __name__ == "__main__":
    print(*build(sys.argv[1] if len(sys.argv) > 1 else "."))
