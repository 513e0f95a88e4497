"""fastmae: fast, provably-faithful Masked Autoencoder pretraining.

`kernels/` is installed as the subpackage ``fastmae.kernels`` (not a top-level ``kernels``:
that name belongs to Hugging Face's kernel hub on PyPI, which transformers probes for).
"""

from setuptools import setup

setup(
    name="fastmae",
    version="0.1.0",
    description="Fast Masked Autoencoder (MAE) pretraining: Triton kernels, DALI data, compiled bf16 loop",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fastmae", "fastmae.data", "fastmae.kernels"],
    package_dir={"fastmae": "fastmae", "fastmae.kernels": "kernels"},
    install_requires=[
        "torch>=2.11",
        "triton>=3.6",
        "numpy",
        "pillow",
        "tqdm",
        "safetensors",
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda130"],
        "xformers": ["xformers"],
        "test": [
            "pytest",
            "pytest-benchmark",
            "transformers>=4.40",
            "ruff",
        ],
    },
    entry_points={"console_scripts": ["fastmae-train=fastmae.train:main"]},
)
