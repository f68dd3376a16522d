"""DP-LDM trainer: differentially private fine-tuning of latent diffusion models."""
from setuptools import find_packages, setup

# Pinned to versions seen working together (CPU build of torch 2.13.0; see README).
CORE = [
    "torch==2.13.0",
    "numpy>=1.26,<3",
    "pillow>=10",
    "pyyaml>=6",
    "tqdm>=4.66",
    "safetensors>=0.4",
    "prv-accountant==0.2.0",
    "opacus==1.6.0",
    "webdataset==1.0.2",
    "mlflow==3.17.2",
    "pandas>=2",  # MLflow's table type, named by the logged model's predict
    "deepspeed==0.19.8",
    "triton==3.9.0",
    "scipy>=1.11",
]

EXTRAS = {
    # the text conditioner's backbone (MiniLM) is loaded by local path through transformers
    "text": ["transformers>=4.40"],
    "test": ["pytest>=8", "einops>=0.7"],
    "eval": ["scipy>=1.11", "matplotlib>=3.8"],
    "gpu": ["xformers"],
}

setup(
    name="dpldm",
    version="0.1.0",
    description="Differentially private latent diffusion models: pretraining, DP-SGD fine-tuning, sampling",
    packages=find_packages(include=["trainer", "trainer.*"]),
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["dpldm=trainer.cli:main"]},
)
