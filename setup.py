"""Builds the optional C kernels (SSIM, 3D SSIM, registration warps); the rest is in pyproject.toml."""

import platform

from setuptools import Extension, setup

flags = ["-O3", "-ffast-math", "-fopenmp-simd"]
if platform.machine() in ("x86_64", "AMD64"):
    flags.append("-mrecip")
# The warp kernel reproduces grid_sample's float32 rounding: no -ffast-math, no fused multiply-add.
warp_flags = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]

setup(
    ext_modules=[
        Extension(
            "deepssim.ssim._kernel",
            ["src/deepssim/ssim/_kernel.c"],
            extra_compile_args=flags,
            libraries=["m"],  # with glibc also its vectorised exp and log (libmvec)
            optional=True,  # without a C compiler the PyTorch backend is used instead
        ),
        Extension(
            "deepssim.ssim._volume_kernel",
            ["src/deepssim/ssim/_volume_kernel.c"],
            extra_compile_args=flags,
            optional=True,  # without a C compiler NumPy computes 3D SSIM instead
        ),
        Extension(
            "deepssim.ssim._warp_kernel",
            ["src/deepssim/ssim/_warp_kernel.c"],
            extra_compile_args=warp_flags,
            optional=True,  # without a C compiler registration warps with torch's grid_sample
        ),
    ]
)
