"""Builds the optional fused SSIM kernel; everything else is configured in pyproject.toml."""

import platform

from setuptools import Extension, setup

flags = ["-O3", "-ffast-math"]
if platform.machine() in ("x86_64", "AMD64"):
    flags.append("-mrecip")

setup(
    ext_modules=[
        Extension(
            "deepssim.ssim._kernel",
            ["src/deepssim/ssim/_kernel.c"],
            extra_compile_args=flags,
            optional=True,  # without a C compiler the PyTorch backend is used instead
        ),
        Extension(
            "deepssim.ssim._volume_kernel",
            ["src/deepssim/ssim/_volume_kernel.c"],
            extra_compile_args=flags,
            optional=True,  # without a C compiler NumPy computes 3D SSIM instead
        ),
    ]
)
