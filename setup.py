from setuptools import find_packages, setup

setup(
    name="nnunetv2_fedkd",
    version="0.1.0",
    description=(
        "nnU-Net v2 plugin: one multi-organ CT segmentation model from many partially labelled datasets "
        "(partial-label losses, knowledge distillation, federated training)"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["nnunetv2_fedkd", "nnunetv2_fedkd.*"]),
    # the shim folder that nnU-Net's nnUNet_extTrainer points at is plain .py files, not a package
    package_data={"nnunetv2_fedkd": ["nnunet_ext_trainers/*.py", "flower/app/pyproject.toml"]},
    include_package_data=True,
    install_requires=[
        "nnunetv2>=2.6,<2.9",
        "torch>=2.6",  # torch.load(weights_only=True) is a safe loader from 2.6 on (CVE-2025-32434)
        "numpy",
        "SimpleITK>=2.2",
        "nibabel>=5",
        "batchgenerators>=0.25",
        "tomli-w>=1.0",
        "matplotlib",
        "safetensors>=0.4",  # the federation's weights files (no pickle)
    ],
    extras_require={
        "test": ["pytest>=7", "flwr==1.41.0"],  # the Flower deployment test runs in CI
        "flower": ["flwr==1.41.0"],
    },
    entry_points={"console_scripts": ["nnunetv2_fedkd = nnunetv2_fedkd.workflows.cli:main"]},
)
