"""Builds maml_ext._C: the C++ sources always, the CUDA sources when they can be compiled.

Environment:
  MAML_EXT_CPU_ONLY=1     never compile CUDA sources
  FORCE_CUDA=1            fail unless the CUDA sources can be compiled (CI sets it; no GPU needed)
  CUDA_HOME               the CUDA toolkit; found automatically when unset (build_tools/cuda_home.py)
  TORCH_CUDA_ARCH_LIST    architectures to compile for; default "9.0" where no GPU is visible
  MAX_JOBS                parallel compile jobs (ninja)
"""
import glob
import os
import sys

from setuptools import find_packages, setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from build_tools.cuda_home import find_cuda_home  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_decision(torch):
    """(compile CUDA?, reason). CUDA sources are compiled whenever a toolkit and a CUDA build of
    torch are both here, GPU or not; FORCE_CUDA=1 turns a missing one into an error."""
    forced = os.environ.get("FORCE_CUDA", "0") == "1"
    if os.environ.get("MAML_EXT_CPU_ONLY", "0") == "1":
        return False, "MAML_EXT_CPU_ONLY=1"
    missing = None
    if torch.version.cuda is None:
        missing = f"torch {torch.__version__} is a CPU-only build"
    elif os.environ.get("CUDA_HOME") is None:
        missing = "no CUDA toolkit found (set CUDA_HOME to the folder holding bin/nvcc)"
    if missing and forced:
        raise RuntimeError(f"maml_ext: FORCE_CUDA=1 but {missing}")
    if missing:
        return False, missing
    return True, "FORCE_CUDA=1" if forced else f"CUDA {torch.version.cuda} toolkit found"


def _extensions():
    cuda_home = find_cuda_home()
    if cuda_home is not None:
        # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME at import.
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda, reason = _cuda_decision(torch)
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "layers", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    sources.append(os.path.join("csrc", "python", "module.cpp"))
    cxx_flags = ["-O3", "-fopenmp"]
    define_macros = []
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        define_macros.append(("MAML_EXT_WITH_CUDA", "1"))
        arches = os.environ.get("TORCH_CUDA_ARCH_LIST") or "the visible GPU's"
        print(f"maml_ext: compiling CUDA kernels ({reason}) with {cuda_home}, "
              f"architectures {arches}", file=sys.stderr)
        extension = CUDAExtension(
            "maml_ext._C",
            sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        print(f"maml_ext: CPU-only build ({reason})", file=sys.stderr)
        extension = CppExtension(
            "maml_ext._C",
            sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    class BuildExtensionInTree(BuildExtension):
        """Keeps objects under build/temp (pip's editable builds would use a fresh temporary
        folder each time), so ninja recompiles only the sources that changed."""

        def finalize_options(self):
            super().finalize_options()
            self.build_temp = os.environ.get("MAML_EXT_BUILD_TEMP", os.path.join(ROOT, "build", "temp"))

    return [extension], {"build_ext": BuildExtensionInTree}


ext_modules, cmdclass = _extensions()

setup(
    name="maml_ext",
    version="0.1.0",
    description="Fused, task-batched MAML meta-gradients for PyTorch (C++/CUDA extension)",
    packages=find_packages(include=["maml_ext", "maml_ext.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.9",
    install_requires=["torch>=2.6", "numpy", "tqdm", "matplotlib", "pillow"],
)
