"""fairseq_quant: low-bit quantization of fairseq speech transformers (a fairseq --user-dir plugin)."""
from setuptools import find_packages, setup

setup(
    name="fairseq_quant",
    version="0.1.0",
    description="Honest low-bit quantization (QAT, strategies, export) for fairseq's VGGTransformer ASR models",
    python_requires=">=3.11",
    packages=find_packages(include=["fairseq_quant", "fairseq_quant.*", "fairseq_quant_runtime", "recipes",
                                    "recipes.*"]),
    package_data={"recipes.librispeech": ["strategies/*.yaml", "reference/*", "lexicon.yaml"]},
    # the base install is what every part needs; `train` is the fairseq plugin (torch, 4 GB, package fairseq_quant:
    # training, calibration, evaluation, export, search), `runtime` the on-device decoder (package
    # fairseq_quant_runtime, no torch): a device installs `fairseq_quant[runtime]` only
    install_requires=["numpy>=1.26", "pyyaml>=6.0"],
    extras_require={
        "train": [
            "torch==2.11.0",
            "torchaudio==2.11.0",
            # fairseq's main branch as a wheel that imports on Python 3.11/3.12; never depend on the
            # distribution name `fairseq` (pip would install the broken 0.12.2 over it).
            "ve-fairseq==0.12.3",
            "sentencepiece>=0.2,<0.3",
            "jiwer>=4.0,<5",
            "editdistance>=0.8",  # fairseq-generate --scoring wer
            "soundfile>=0.13",
            "tqdm>=4.60",
            "matplotlib>=3.8",
            "onnx>=1.16",  # the exporter writes ONNX graphs
            "scipy>=1.11",  # the strategy search's integer program (HiGHS) and rank correlations
        ],
        # Ray runs the strategy search's measurements on a cluster (scripts/search_strategy.py --ray-address)
        "search": ["ray>=2.40"],
        # ray: the search's Ray path is tested against a local Ray instance (a 79 MB wheel, seconds to install)
        "test": ["pytest>=8", "hypothesis>=6.100", "ray>=2.40"],
        # the on-device runtime (package fairseq_quant_runtime): imports neither torch, fairseq nor onnx (its graph
        # edits use protobuf, which onnxruntime needs anyway)
        "runtime": [
            "onnxruntime>=1.20",
            "protobuf>=4.22",
            "numpy>=1.26",
            "soundfile>=0.13",
            "sentencepiece>=0.2,<0.3",
            "soxr>=0.5",  # resampling to 16 kHz
            "jiwer>=4.0,<5",  # --manifest mode reports the WER
        ],
    },
)
