"""vrefer-jax: VideoRefer region-level video LLM in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="vrefer-jax",
    version="0.1.0",
    description="VideoRefer (spatial-temporal object understanding with a video LLM) in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.13",
    packages=find_packages(include=["vrefer_jax", "vrefer_jax.*", "data_pipeline", "data_pipeline.*", "launch"]),
    include_package_data=True,
    install_requires=[
        "jax>=0.10,<0.11",
        "flax>=0.12,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12,<0.13",
        "grain>=0.2.18,<0.3",
        "einops>=0.8,<0.9",
        "gin-config>=0.5,<0.6",
        "numpy>=2.0,<3",
        "safetensors>=0.6,<1",
        "tokenizers>=0.22,<1",
        "sentencepiece>=0.2,<0.3",
        "tqdm>=4.66,<5",
        "av>=14,<19",
        "pycocotools>=2.0.8,<3",
        "google-crc32c>=1.5,<2",
        "protobuf>=5.26,<8",
        "pillow>=10,<14",
        "tensorboardX>=2.6,<3",
        "pysubs2>=1.6,<2",  # VideoMME .srt subtitles, as the official script reads them
        # vrefer-serve: the HTTP API (FastAPI + uvicorn) and its web demo (Gradio, which caps pillow < 13)
        "fastapi>=0.115,<1",
        "uvicorn>=0.30,<1",
        "gradio>=5,<7",
        # TFDS datasets of the records (data_pipeline/tfds_data.py): written as ArrayRecord and read
        # through tfds.data_source without TensorFlow (tensorflow-datasets does not require it).
        "tensorflow-datasets>=4.9.8,<5",
        "array-record>=0.8,<0.9",
        # tensorflow-datasets 4.9.10 imports it when a builder is defined (DatasetBuilder.code_path)
        # but pip's resolver does not bring it in on Python 3.11 (checked with --dry-run --ignore-installed)
        "importlib-resources>=6",
    ],
    extras_require={
        # Region benchmark scorers (vrefer-eval region / score): pycocoevalcap's caption metrics
        # (its METEOR / SPICE / PTB tokenizer also need a Java runtime, which pip cannot install),
        # inflect for DLC-Bench's plural class names, torch + transformers for LVIS / PACO SSim.
        "eval": [
            "pycocoevalcap>=1.2,<2",
            "inflect>=7,<8",
            "torch==2.13.0",
            "transformers>=4.46,<6",
        ],
        # Test-only references. torch is the CPU build; timm is installed with --no-deps by
        # .ci/run (its torchvision dependency has no CPU build for torch 2.13), hence pillow/pyyaml.
        "dev": [
            "pytest>=8,<10",
            "torch==2.13.0",
            "transformers>=4.46,<6",
            "tfrecord>=1.14,<2",
            "pyyaml>=6",
            "huggingface_hub>=0.24",
            "pycocoevalcap>=1.2,<2",  # the region benchmark scorers' tests (= the eval extra)
            "inflect>=7,<8",
            "httpx>=0.27",  # the serving tests' client
            # the demo's browser test drives Debian's chromium (.ci/install_browser); playwright's
            # own browser downloads are never used
            "playwright>=1.45,<2",
            "peft>=0.17,<1",  # loads our LoRA adapter export onto transformers' Qwen2 (tests/test_lora_export.py)
        ],
    },
    entry_points={"console_scripts": [
        "vrefer-convert = vrefer_jax.checkpoints.cli:main",
        "vrefer-data = data_pipeline.cli:main",
        "vrefer-train = vrefer_jax.training.cli:main",
        "vrefer-demo = vrefer_jax.main_job:main",
        "vrefer-infer = vrefer_jax.inference.cli:main",
        "vrefer-eval = vrefer_jax.evaluation.cli:main",
        "vrefer-serve = vrefer_jax.serving.cli:main",
    ]},
)
