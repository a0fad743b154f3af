"""flame: efficient post-training of LLMs in JAX (FLAMe autoraters, model merging)."""
import setuptools

setuptools.setup(
    name="flame",
    version="0.1.0",
    description="T5X-style JAX/Flax codebase for autorater training (FLAMe) and model merging at scale",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["flame", "flame.*", "merging", "merging.*"]),
    install_requires=[
        "jax>=0.10,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "seqio>=0.0.20,<0.1",
        "tensorflow>=2.21,<2.22",
        "tensorflow-text>=2.20",
        "tensorflow-datasets>=4.9",
        "gin-config>=0.5",
        "numpy>=1.26",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        "absl-py>=2.1",
        "gguf>=0.10",
        "tokenizers>=0.20",
        "jinja2>=3.1",
        "pyyaml>=6",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-xdist>=3.5", "pytest-timeout>=2.3"],
        "tpu": ["libtpu"],
        "hf": ["torch==2.13.0", "transformers>=4.50", "safetensors>=0.4", "accelerate>=1.0",
               "mergekit==0.1.5"],
    },
    entry_points={
        "console_scripts": [
            "flame-train=flame.train:console_main",
            "flame-aot=flame.aot:console_main",
            "flame-plot=flame.plot:console_main",
            "flame-convert=flame.checkpoints.convert:console_main",
            "flame-merge=merging.merge:console_main",
            "flame-rate=flame.autorater.rate:console_main",
            "flame-evaluate=flame.autorater.evaluate:console_main",
            "flame-tailpatch=flame.tailpatch.run:console_main",
            "flame-tailpatch-analyze=flame.tailpatch.analyze:console_main",
            "flame-tailpatch-optimize=flame.tailpatch.optimize:console_main",
            "flame-pipeline=flame.pipeline.pipeline:console_main",
            "flame-judge=flame.pipeline.judge:console_main",
        ]
    },
)
