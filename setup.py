"""Build of the optional C hot path (shmfeed/_accel.c); everything else is in pyproject.toml.

``optional=True``: without a C compiler the install still succeeds and shmfeed runs its
pure-Python path (the same behaviour, slower).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "shmfeed._accel",
            ["shmfeed/_accel.c"],
            libraries=["pthread"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Wno-missing-field-initializers",
                                "-Wno-unused-parameter", "-Wno-cast-function-type"],
            optional=True,
        )
    ]
)
