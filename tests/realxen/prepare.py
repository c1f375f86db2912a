#!/usr/bin/env python3
"""Prepare everything the real-Xen test boots, from Debian packages.

Run as root on Debian 12 (the test runs it; running it by hand is fine)::

    python3 tests/realxen/prepare.py [--cache DIR]

It installs the few host tools it needs (``qemu-system-x86``,
``busybox-static``, ``make``, the kbuild libraries) with apt-get, downloads
the kernels, kernel headers, kernel source and Xen with ``apt-get download``
and unpacks them with ``dpkg-deb`` into the cache (nothing goes to /boot),
then builds:

* ``xen.elf``: the hypervisor, a multiboot ELF for QEMU's ``-kernel``;
* ``dom0-vmlinuz`` and ``dom0-initrd.img``: Debian's generic kernel, which
  has dom0 support, and a busybox initramfs that loads the Xen and 9p
  modules, mounts the host's root read-only over virtio-9p and runs the
  harness in ``dom0.py`` from there (so dom0 uses this machine's xenstored,
  xl, Python and the project as installed);
* ``domu-vmlinuz`` and ``domu-initrd.img``: Debian's cloud kernel and a
  busybox initramfs with ``pvshim.ko`` (Linux's pvcalls-front plus the
  scenario in ``guest/pvshim.c``);
* ``pvcalls-back.ko``: Linux's own pvcalls backend for the dom0 kernel
  (Debian does not build it either), the reference the harness can run
  instead of the project's backend (``harness.py --backend linux``).

Downloads and unpacked packages are cached under the kernel ABI name; the
module and the initramfs images are rebuilt on every run (a few seconds), so
they never lag behind their sources.  The result is described by
``<cache>/out/manifest.json``.

Exit status: 0 ready, 2 the packages or tools cannot be had on this machine
(the test skips, printing the reason), 1 anything else (the test fails).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = HERE / "cache"

#: Host tools, installed with apt-get when missing.  The kbuild binaries
#: come unpacked from linux-kbuild-6.1, so their libraries are named here.
HOST_PACKAGES = {
    "qemu-system-x86": "/usr/bin/qemu-system-x86_64",
    "busybox-static": "/bin/busybox",
    "make": "/usr/bin/make",
    "gcc": "/usr/bin/gcc",
    "libelf1": None,
    "libssl3": None,
    "xen-utils-4.17": "/usr/lib/xen-4.17/bin/xl",
}

#: Modules dom0's initramfs loads, in this order (dependencies first).
DOM0_MODULES = [
    "kernel/drivers/virtio/virtio_ring.ko",
    "kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
    "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
    "kernel/drivers/virtio/virtio_pci.ko",
    "kernel/net/9p/9pnet.ko",
    "kernel/net/9p/9pnet_virtio.ko",
    "kernel/fs/netfs/netfs.ko",
    "kernel/fs/fscache/fscache.ko",
    "kernel/fs/9p/9p.ko",
    "kernel/drivers/xen/xen-evtchn.ko",
    "kernel/drivers/xen/xen-gntdev.ko",
    "kernel/drivers/xen/xen-gntalloc.ko",
    "kernel/drivers/xen/xen-privcmd.ko",
    "kernel/drivers/xen/xenfs/xenfs.ko",
]


class Unavailable(Exception):
    """The machine cannot provide a package or tool: the test skips."""


def log(message: str) -> None:
    print(f"prepare: {message}", file=sys.stderr, flush=True)


def run(*argv: str | Path, cwd: Path | None = None, quiet: bool = False) -> str:
    """Run a command; its output is returned, and shown if it fails."""
    proc = subprocess.run(
        [str(a) for a in argv], cwd=cwd, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-30:])
        raise RuntimeError(f"{' '.join(map(str, argv))} exited {proc.returncode}:\n{tail}")
    if not quiet and proc.stdout.strip():
        log(proc.stdout.strip().splitlines()[-1])
    return proc.stdout


# -- Debian packages --------------------------------------------------------

_apt_updated = False


def apt_update() -> None:
    global _apt_updated
    if not _apt_updated:
        log("apt-get update")
        try:
            run("apt-get", "update", "-qq", quiet=True)
        except RuntimeError as exc:
            raise Unavailable(f"apt-get update failed: {exc}") from exc
        _apt_updated = True


def ensure_host_packages() -> None:
    if os.geteuid() != 0:
        raise Unavailable("needs root to install Debian packages and run QEMU")
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise Unavailable("not a Debian machine (no apt-get/dpkg-deb)")
    missing = []
    for package, path in HOST_PACKAGES.items():
        installed = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", package],
            capture_output=True, text=True,
        ).stdout
        if "ok installed" not in installed or (path and not Path(path).exists()):
            missing.append(package)
    if missing:
        apt_update()
        log(f"apt-get install {' '.join(missing)}")
        try:
            run("apt-get", "install", "-y", "-qq", *missing, quiet=True)
        except RuntimeError as exc:
            raise Unavailable(f"cannot install {' '.join(missing)}: {exc}") from exc


def candidate_dependency(metapackage: str) -> str:
    """The versioned package a Debian kernel metapackage points at."""
    for attempt in range(2):
        out = subprocess.run(
            ["apt-cache", "depends", metapackage], capture_output=True, text=True
        ).stdout
        for line in out.splitlines():
            line = line.strip()
            if line.startswith("Depends:") and "linux-" in line:
                return line.split()[1]
        if attempt == 0:
            apt_update()
    raise Unavailable(f"apt knows no {metapackage}")


def candidate_version(package: str) -> str:
    out = subprocess.run(
        ["apt-cache", "policy", package], capture_output=True, text=True
    ).stdout
    for line in out.splitlines():
        if line.strip().startswith("Candidate:"):
            version = line.split()[1]
            if version != "(none)":
                return version
    raise Unavailable(f"apt has no candidate for {package}")


def download(packages: list[str], debs: Path) -> dict[str, Path]:
    """``apt-get download`` what is not in ``debs`` yet; name -> .deb path."""
    debs.mkdir(parents=True, exist_ok=True)

    def present(name: str) -> Path | None:
        bare = name.split("=")[0]
        found = sorted(debs.glob(f"{bare}_*.deb"))
        return found[-1] if found else None

    wanted = [p for p in packages if present(p) is None]
    if wanted:
        log(f"apt-get download {' '.join(wanted)}")
        try:
            run("apt-get", "download", *wanted, cwd=debs, quiet=True)
        except RuntimeError as exc:
            raise Unavailable(f"cannot download {' '.join(wanted)}: {exc}") from exc
    result = {}
    for p in packages:
        path = present(p)
        if path is None:
            raise RuntimeError(f"apt-get download left no .deb for {p}")
        result[p.split("=")[0]] = path
    return result


def fetch_kernels(cache: Path) -> dict[str, Path | str]:
    """Download and unpack the Debian pieces; cached per kernel ABI."""
    image = candidate_dependency("linux-image-cloud-amd64")  # linux-image-<abi>-cloud-amd64
    abi = image.removeprefix("linux-image-").removesuffix("-cloud-amd64")
    version = candidate_version(image)
    series = ".".join(abi.split(".")[:2])  # "6.1"
    root = cache / f"debian-{abi}"
    done = root / ".unpacked-2"  # bump when the list of pieces changes
    if not done.exists():
        packages = [
            f"linux-image-{abi}-amd64",
            f"linux-image-{abi}-cloud-amd64",
            f"linux-headers-{abi}-amd64",
            f"linux-headers-{abi}-cloud-amd64",
            f"linux-headers-{abi}-common",
            f"linux-kbuild-{series}={version}",
            f"linux-source-{series}={version}",
            "xen-hypervisor-4.17-amd64",
        ]
        debs = download(packages, cache / "debs")
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        for name, deb in debs.items():
            if name.startswith("linux-source"):
                continue
            log(f"unpacking {deb.name}")
            run("dpkg-deb", "-x", deb, root)
        # Only pvcalls-front and -back are needed from the 140 MB tarball.
        log("extracting drivers/xen/pvcalls-* from linux-source")
        src = debs[f"linux-source-{series}"]
        tarball = f"./usr/src/linux-source-{series}.tar.xz"
        member = f"linux-source-{series}/drivers/xen/pvcalls-*"
        subprocess.run(
            f"dpkg-deb --fsys-tarfile '{src}' | tar -xO '{tarball}'"
            f" | tar -xJ -C '{root}' --wildcards '{member}'",
            shell=True, check=True,
        )
        # The headers' Makefiles include the common headers by absolute path.
        for flavour in ("amd64", "cloud-amd64"):
            makefile = root / f"usr/src/linux-headers-{abi}-{flavour}/Makefile"
            makefile.write_text(
                makefile.read_text().replace("include /usr/src/", f"include {root}/usr/src/")
            )
        done.write_text(version + "\n")
        # The .debs are not needed any more; the unpacked tree is the cache.
        shutil.rmtree(cache / "debs")
    return {
        "abi": abi,
        "root": root,
        "dom0_kernel": root / f"boot/vmlinuz-{abi}-amd64",
        "dom0_modules": root / f"lib/modules/{abi}-amd64",
        "domu_kernel": root / f"boot/vmlinuz-{abi}-cloud-amd64",
        "headers": root / f"usr/src/linux-headers-{abi}-cloud-amd64",
        "dom0_headers": root / f"usr/src/linux-headers-{abi}-amd64",
        "pvcalls_src": root / f"linux-source-{series}/drivers/xen",
        "xen_gz": root / "boot/xen-4.17-amd64.gz",
    }


# -- Building ---------------------------------------------------------------


def build_shim(pieces: dict[str, Path | str], build: Path) -> Path:
    """Compile pvcalls-front.c and pvshim.c into pvshim.ko for the domU kernel."""
    if build.exists():
        shutil.rmtree(build)
    build.mkdir(parents=True)
    for src in (HERE / "guest/pvshim.c", HERE / "guest/Kbuild"):
        shutil.copy(src, build)
    front = Path(pieces["pvcalls_src"])
    for name in ("pvcalls-front.c", "pvcalls-front.h"):
        shutil.copy(front / name, build)
    log("building pvshim.ko")
    run("make", "-s", "-C", pieces["headers"], f"M={build}", "modules", quiet=True)
    return build / "pvshim.ko"


def build_linux_backend(pieces: dict[str, Path | str], build: Path) -> Path:
    """Linux's pvcalls-back.c as a module for the dom0 kernel."""
    if build.exists():
        shutil.rmtree(build)
    build.mkdir(parents=True)
    shutil.copy(Path(pieces["pvcalls_src"]) / "pvcalls-back.c", build)
    (build / "Kbuild").write_text("obj-m := pvcalls-back.o\n")
    log("building pvcalls-back.ko")
    run("make", "-s", "-C", pieces["dom0_headers"], f"M={build}", "modules", quiet=True)
    return build / "pvcalls-back.ko"


class Cpio:
    """A ``newc`` cpio archive, the format the kernel unpacks as initramfs."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._ino = 1

    def _entry(self, name: str, mode: int, body: bytes = b"") -> None:
        fields = [self._ino, mode, 0, 0, 1, 0, len(body), 0, 0, 0, 0, len(name) + 1, 0]
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._data += header + name.encode() + b"\0"
        self._data += b"\0" * (-len(self._data) % 4)
        self._data += body
        self._data += b"\0" * (-len(self._data) % 4)

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, body: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, body)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def write(self, path: Path) -> None:
        self._entry("TRAILER!!!", 0)
        path.write_bytes(bytes(self._data))


def base_initramfs(init: Path) -> Cpio:
    archive = Cpio()
    for d in ("bin", "dev", "proc", "sys", "run", "tmp", "mnt", "lib", "lib/modules"):
        archive.dir(d)
    archive.file("bin/busybox", Path("/bin/busybox").read_bytes(), 0o755)
    archive.symlink("bin/sh", "busybox")
    archive.file("init", init.read_bytes(), 0o755)
    return archive


def build_dom0_initramfs(pieces: dict[str, Path | str], out: Path) -> None:
    archive = base_initramfs(HERE / "dom0-init.sh")
    modules = Path(pieces["dom0_modules"])
    order = []
    for rel in DOM0_MODULES:
        name = Path(rel).name
        archive.file(f"lib/modules/{name}", (modules / rel).read_bytes())
        order.append(name)
    archive.file("lib/modules/order", ("\n".join(order) + "\n").encode())
    archive.write(out)


def build_domu_initramfs(shim: Path, out: Path) -> None:
    archive = base_initramfs(HERE / "domu-init.sh")
    archive.file("lib/modules/pvshim.ko", shim.read_bytes())
    archive.write(out)


def prepare(cache: Path) -> Path:
    ensure_host_packages()
    pieces = fetch_kernels(cache)
    out = cache / "out"
    out.mkdir(parents=True, exist_ok=True)
    xen = out / "xen.elf"
    if not xen.exists():
        # Renamed into place: a run killed mid-write (the test's time
        # limit) must not leave a truncated xen.elf that later runs keep.
        partial = xen.with_suffix(".elf.partial")
        with gzip.open(pieces["xen_gz"]) as f:
            partial.write_bytes(f.read())
        partial.replace(xen)
    shim = build_shim(pieces, cache / "build/pvshim")
    linux_backend = build_linux_backend(pieces, cache / "build/pvcalls-back")
    build_dom0_initramfs(pieces, out / "dom0-initrd.img")
    build_domu_initramfs(shim, out / "domu-initrd.img")
    manifest = {
        "abi": pieces["abi"],
        "xen": str(xen),
        "dom0_kernel": str(pieces["dom0_kernel"]),
        "dom0_initrd": str(out / "dom0-initrd.img"),
        "domu_kernel": str(pieces["domu_kernel"]),
        "domu_initrd": str(out / "domu-initrd.img"),
        "linux_backend": str(linux_backend),
        "shim_sha256": hashlib.sha256(shim.read_bytes()).hexdigest(),
    }
    path = out / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args(argv)
    try:
        manifest = prepare(args.cache.resolve())
    except Unavailable as exc:
        print(f"prepare: unavailable: {exc}", file=sys.stderr)
        return 2
    print(manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
