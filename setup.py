"""Build of the optional C hot path (shmfeed/_accel.c, which includes its parts, the
shmfeed/_accel_*.h files); everything else is in pyproject.toml.

``optional=True``: without a C compiler the install still succeeds and shmfeed runs its
pure-Python path (the same behaviour, slower).
"""

import glob

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "shmfeed._accel",
            ["shmfeed/_accel.c"],
            depends=sorted(glob.glob("shmfeed/_accel_*.h")),  # its parts: a change rebuilds it
            libraries=["pthread"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Wno-missing-field-initializers",
                                "-Wno-unused-parameter", "-Wno-cast-function-type"],
            optional=True,
        )
    ]
)
