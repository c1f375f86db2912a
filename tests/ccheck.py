"""Compile a tiny C program against Xen's public headers and report layouts.

Used by the layout tests to compare cffi declarations with the structs gcc
sees in ``/usr/include/xen`` (Debian's ``libxen-dev``)::

    from tests.ccheck import c_layout
    got = c_layout(["xen/io/ring.h"], {"struct xencons_interface": ["in", "out_prod"]})
    got["sizeof(struct xencons_interface)"], got["offsetof(struct xencons_interface, out_prod)"]

Skips the calling test when gcc or the headers are missing.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

__all__ = ["c_layout"]

INCLUDE_ROOT = Path("/usr/include")


def c_layout(
    includes: list[str],
    structs: dict[str, list[str]],
    *,
    prelude: str = "",
) -> dict[str, int]:
    """``{"sizeof(T)": n, "offsetof(T, member)": n}`` for every type ``T``
    in ``structs`` and each of its listed members (``"u.connect.ref"`` works
    for nested members).  ``includes`` are header paths relative to
    /usr/include (``"xen/io/console.h"``); ``prelude`` is C placed before
    them (for example ``DEFINE_RING_TYPES`` instances)."""
    key = (tuple(includes), tuple((t, tuple(m)) for t, m in structs.items()), prelude)
    return dict(_compile(key))


@functools.cache
def _compile(
    key: tuple[tuple[str, ...], tuple[tuple[str, tuple[str, ...]], ...], str],
) -> tuple[tuple[str, int], ...]:
    includes, structs, prelude = key
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed")
    for header in includes:
        if not (INCLUDE_ROOT / header).exists():
            pytest.skip(f"{INCLUDE_ROOT / header} is missing (install libxen-dev)")
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <stdint.h>"]
    lines += [f"#include <{h}>" for h in includes]
    lines += [prelude, "int main(void) {"]
    for type_name, members in structs:
        label = f"sizeof({type_name})"
        lines.append(f'printf("%s=%zu\\n", "{label}", sizeof({type_name}));')
        for member in members:
            label = f"offsetof({type_name}, {member})"
            lines.append(f'printf("%s=%zu\\n", "{label}", offsetof({type_name}, {member}));')
    lines += ["return 0;", "}"]
    with tempfile.TemporaryDirectory(prefix="ccheck-") as tmp:
        src = Path(tmp) / "layout.c"
        exe = Path(tmp) / "layout"
        src.write_text("\n".join(lines) + "\n")
        build = subprocess.run(
            [gcc, "-std=gnu11", "-Wall", "-o", str(exe), str(src)],
            capture_output=True,
            text=True,
        )
        if build.returncode != 0:
            raise AssertionError(f"layout program did not compile:\n{build.stderr}")
        run = subprocess.run([str(exe)], capture_output=True, text=True, check=True)
    result = []
    for line in run.stdout.splitlines():
        label, _, value = line.rpartition("=")
        result.append((label, int(value)))
    return tuple(result)
