"""Build the compiled part of vireid_fast: one extension ``vireid_fast._C`` holding the op schemas and CPU kernels.

Environment:
    VIREID_BUILD_CUDA=auto|0|1  CUDA C++ sources (csrc/cuda/*.cu) build only with a CUDA torch and nvcc
                                (auto: prints why it skipped them).
    MAX_JOBS                    parallel compile jobs (honoured by torch's BuildExtension with ninja).
"""

import glob
import os
import shutil
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - build-time guidance
    sys.exit("vireid_fast needs torch installed before building: pip install torch, then "
             "pip install -e . --no-build-isolation")

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    mode = os.environ.get("VIREID_BUILD_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"VIREID_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is a CPU build")
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        reasons.append("nvcc was not found (set CUDA_HOME)")
    if not glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")):
        reasons.append("there are no CUDA C++ sources (CUDA tensors run the Triton kernels)")
    if reasons:
        if mode == "1":
            sys.exit("VIREID_BUILD_CUDA=1 but CUDA sources cannot be built: " + "; ".join(reasons))
        print("vireid_fast: skipping CUDA C++ sources: " + "; ".join(reasons))
        return False
    return True


def _extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    # The torch version is baked into the binary so that loading can refuse a build made for another torch.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-g0", f'-DVIREID_TORCH_VERSION="{torch.__version__}"']
    if _want_cuda():
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        return CUDAExtension("vireid_fast._C", sources, extra_compile_args={"cxx": cxx + ["-DVIREID_WITH_CUDA"],
                                                                           "nvcc": ["-O3", "-std=c++20"]},
                             extra_link_args=["-fopenmp"])
    return CppExtension("vireid_fast._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])


class _Build(BuildExtension):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("use_ninja", shutil.which("ninja") is not None)
        super().__init__(*args, **kwargs)


setup(ext_modules=[_extension()], cmdclass={"build_ext": _Build})
