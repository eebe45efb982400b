"""Builds the Cython core (src/hvcore). Compiler directives and warnings live here, in one place."""

import os
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

# Every src/hvcore/*.pyx is one extension module.
MODULES = sorted(p.stem for p in Path(__file__).parent.joinpath("src", "hvcore").glob("*.pyx"))
# PYHV_MODULES=qcow2,netpkt builds only those (quick rebuilds while working on one part).
if os.environ.get("PYHV_MODULES"):
    MODULES = [m for m in MODULES if m in os.environ["PYHV_MODULES"].split(",")]

directives = {"language_level": 3, "embedsignature": True, "cdivision": True}
debug = os.environ.get("PYHV_DEBUG") == "1"
extensions = [
    Extension(
        f"hvcore.{name}",
        [f"src/hvcore/{name}.pyx"],
        extra_compile_args=["-O2", "-Wall", "-Wno-unused-function", "-Wno-unreachable-code"]
        + (["-g", "-O0"] if debug else []),
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
