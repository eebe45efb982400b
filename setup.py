"""Builds the Cython core (src/hvcore). Compiler directives and warnings live here, in one place."""

import os
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

# Every .pyx under src/hvcore is one extension module, named by its path (net/tcp.pyx is
# hvcore.net.tcp).
HVCORE = Path(__file__).parent.joinpath("src", "hvcore")
MODULES = sorted(".".join(p.relative_to(HVCORE).with_suffix("").parts)
                 for p in HVCORE.rglob("*.pyx"))
# PYHV_MODULES=qcow2,net.packet builds only those (quick rebuilds while working on one part).
if os.environ.get("PYHV_MODULES"):
    MODULES = [m for m in MODULES if m in os.environ["PYHV_MODULES"].split(",")]

directives = {"language_level": 3, "embedsignature": True, "cdivision": True}
debug = os.environ.get("PYHV_DEBUG") == "1"
extensions = [
    Extension(
        f"hvcore.{name}",
        [f"src/hvcore/{name.replace('.', '/')}.pyx"],
        extra_compile_args=["-O2", "-Wall", "-Wno-unused-function", "-Wno-unreachable-code"]
        + (["-g", "-O0"] if debug else ["-g0"]),
        # without debug info: the modules are 5-10x smaller (PYHV_DEBUG=1 keeps it)
        extra_link_args=[] if debug else ["-Wl,--strip-debug"],
    )
    for name in MODULES
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives=directives,
        include_path=["src"],
        annotate=os.environ.get("PYHV_ANNOTATE") == "1",
    ),
)
