"""Build script for ckpt._native (cffi API mode, out-of-line).

Each kernel area lives in native/areas/<area>.py with four strings, as in
pyca/cryptography's _cffi_src: INCLUDES (C headers), TYPES and FUNCTIONS (what
Python may see: the cdef) and CUSTOMIZATIONS (C code compiled into the module).
This script only joins them, so adding an area never touches another one.
"""

from __future__ import annotations

import importlib.util
import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
AREAS = ["common", "ptrace", "memory", "spawn", "uffd", "msgscan", "procfiles"]


def _version() -> str:
    for line in (HERE.parent / "pyproject.toml").read_text().splitlines():
        if line.startswith("version"):
            return line.split("=", 1)[1].strip().strip('"')
    raise RuntimeError("no version in pyproject.toml")


def _load(area: str):
    spec = importlib.util.spec_from_file_location(
        f"_ckpt_area_{area}", HERE / "areas" / f"{area}.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build_ffi() -> FFI:
    ffi = FFI()
    mods = [_load(a) for a in AREAS]
    ffi.cdef("const char CKPT_NATIVE_VERSION[];")
    for m in mods:
        ffi.cdef(m.TYPES)
    for m in mods:
        ffi.cdef(m.FUNCTIONS)
    source = "\n".join(
        ["#define _GNU_SOURCE 1"]
        + [m.INCLUDES for m in mods]
        + [f'const char CKPT_NATIVE_VERSION[] = "{_version()}";']
        + [m.CUSTOMIZATIONS for m in mods]
    )
    ffi.set_source(
        "ckpt._native", source, extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"]
    )
    return ffi


ffibuilder = build_ffi()

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
