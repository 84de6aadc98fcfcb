"""Installs the ``medvlsm`` package (code in Logic/, data in Resources/) and the ``medvlsm`` command.

torch is deliberately not pinned here: Slicer gets it from the PyTorch extension and a CPU
machine must not pull a CUDA build (see README, "Install"). ``Resources/requirements.txt``
holds the pinned versions the Slicer module installs.
"""

from setuptools import setup

setup(
    name="medvlsm",
    version="0.1.0",
    description="Text-prompted medical image segmentation with vision-language models (CLIPSeg, CRIS, BiomedCLIPSeg)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",  # the pinned numpy, scipy, matplotlib and transformers need 3.11
    package_dir={"medvlsm": "Logic/medvlsm", "medvlsm.resources": "Resources"},
    packages=["medvlsm", "medvlsm.models", "medvlsm.server", "medvlsm.resources"],
    package_data={"medvlsm.resources": ["*.json", "*.txt", "Tokenizers/*/*", "Demo/*", "UI/*.ui", "Icons/*.png"]},
    install_requires=[
        "torch>=2.1",
        "transformers>=5.18,<6",  # CI tests 5.18.0 (make test) and the pinned 5.23.0; models/base.py checks it
        "monai>=1.3",
        "SimpleITK>=2.2",
        "numpy>=1.23",
        "pynrrd>=1.0",
        "scipy>=1.10",
        "tqdm>=4.60",
        "matplotlib>=3.6",
        "safetensors>=0.4",
        "huggingface_hub>=1.31",
    ],
    extras_require={
        "slicer": ["Qt.py>=1.4"],
        "dicom": ["highdicom>=0.22", "pydicom>=2.4"],
        "server": ["fastapi>=0.110", "uvicorn>=0.29"],  # `medvlsm serve`; the client needs nothing more
        "ray": ["ray[serve]>=2.48", "fastapi>=0.110", "uvicorn>=0.29"],  # `medvlsm serve --replicas N`
    },
    entry_points={"console_scripts": ["medvlsm=medvlsm.cli:main"]},
)
