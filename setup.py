"""kimi_jax: a JAX/Flax reproduction of the Kimi k1.5 RL recipe for LLM reasoning."""
import setuptools

INSTALL_REQUIRES = [
    "jax>=0.6",
    "flax>=0.10",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "seqio>=0.0.19",
    "tensorflow-datasets>=4.9",
    # TFDS needs it to build datasets defined outside tfds (data/prompt_pipelines.py)
    # but does not declare it.
    "importlib_resources>=6",
    "ml-collections>=1.0",
    "absl-py>=2.0",
    # Its pure-Python record writer and protos: TensorBoard events without
    # importing TensorFlow (kimi_jax/metrics.py).
    "tensorboard>=2.16",
    "numpy>=1.26",
    "safetensors>=0.4",
    "tokenizers>=0.19",
    "sentencepiece>=0.2",
    "math-verify>=0.7",
    "matplotlib>=3.8",
    "pillow>=10",  # prompt images: decoding and HF-equal resizing (data/images.py)
    "tqdm>=4.66",
]

EXTRAS = {
    # Everything the test suite needs; deliberately no torch/transformers:
    # HF parity runs against checked-in reference files, live only when
    # transformers happens to be installed.
    "test": ["pytest>=8", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6"],
    "tpu": ["jax[tpu]"],
}

setuptools.setup(
    name="kimi_jax",
    version="0.1.0",
    description=__doc__,
    packages=setuptools.find_packages(include=["kimi_jax", "kimi_jax.*", "launch", "bench", "configs", "configs.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
