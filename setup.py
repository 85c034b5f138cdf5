"""Packaging for sdae_fast.

The top-level ``kernels/`` folder (Triton kernels) installs as ``sdae_fast.kernels``: a top-level
``kernels`` package would clash with another PyPI project. ``csrc/`` ships as package data so that
just-in-time builds work from an installed copy; ``SDAE_FAST_BUILD_CUDA=1`` builds it ahead of time.
That needs torch at build time, which pip's isolated build environment lacks (pyproject.toml asks
for setuptools and wheel only): ``SDAE_FAST_BUILD_CUDA=1 pip install --no-build-isolation .``
"""
import importlib.util
import os

from setuptools import setup

PACKAGES = [
    "sdae_fast",
    "sdae_fast.reference",
    "sdae_fast.ops",
    "sdae_fast.bench",
    "sdae_fast.models",
    "sdae_fast.train",
    "sdae_fast.data",
    "sdae_fast.eval",
    "sdae_fast.kernels",
    "sdae_fast.csrc",
]


def cuda_extensions():
    """The CUDA extension, only when asked for: building it needs torch with CUDA at build time."""
    if os.environ.get("SDAE_FAST_BUILD_CUDA") != "1":
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as exc:
        raise RuntimeError("SDAE_FAST_BUILD_CUDA=1 needs torch installed at build time: install torch first, then "
                           "SDAE_FAST_BUILD_CUDA=1 pip install --no-build-isolation .") from exc
    root = os.path.dirname(os.path.abspath(__file__))
    # cuda_build.py by its path: importing the sdae_fast package would import all of it (and triton).
    spec = importlib.util.spec_from_file_location("_sdae_fast_cuda_build",
                                                  os.path.join(root, "sdae_fast", "cuda_build.py"))
    cuda_build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cuda_build)
    return {
        "ext_modules": [CUDAExtension(**cuda_build.extension_kwargs(root))],
        "cmdclass": {"build_ext": BuildExtension},
    }


setup(
    name="sdae_fast",
    version="0.1.0",
    description="Triton and CUDA kernels for fast self-supervised ViT pretraining (SdAE, MAE, MixedAE, DINO)",
    long_description=open(os.path.join(os.path.dirname(__file__), "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={"sdae_fast.kernels": "kernels", "sdae_fast.csrc": "csrc"},
    package_data={"sdae_fast.csrc": ["*.cu", "*.cuh", "*.cpp", "*.h"]},
    install_requires=["torch>=2.4", "torchvision>=0.19", "numpy", "pillow", "tqdm"],
    extras_require={
        "triton": ["triton>=3.0"],
        "cuda": ["ninja"],
        "data": ["scikit-learn", "matplotlib"],
        "timm": ["timm>=0.9"],
        # reading shards needs only braceexpand (patterns); webdataset writes them (README) and the tests
        "webdataset": ["webdataset>=0.2", "braceexpand"],
        "test": ["triton>=3.0", "pytest", "pytest-benchmark", "scikit-learn", "matplotlib", "ninja", "timm>=0.9",
                 "webdataset>=0.2", "braceexpand"],
        "bench": ["triton>=3.0", "pytest-benchmark"],
        "xformers": ["xformers"],
        "flash-attn": ["flash-attn"],
    },
    entry_points={"console_scripts": ["sdae-fast=sdae_fast.cli:main"]},
    **cuda_extensions(),
)
