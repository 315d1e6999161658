"""Finds the CUDA toolkit folder. Run as a script it prints it (empty where there is none)."""

import glob
import os
import shutil


def _is_toolkit(path):
    return (
        bool(path)
        and os.path.isfile(os.path.join(path, "bin", "nvcc"))
        and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h"))
    )


def find_cuda_home():
    """The CUDA toolkit folder, or None.

    torch guesses CUDA_HOME from the folder above the `nvcc` on PATH; where that `nvcc` is a wrapper
    script outside the toolkit (as on our development machines) the guess is wrong, so look for a
    folder that really holds nvcc and the runtime headers.
    """
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if _is_toolkit(os.environ.get(variable)):
            return os.environ[variable]
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    candidates.extend(sorted(glob.glob("/usr/local/cuda-*"), reverse=True))
    for candidate in candidates:
        if _is_toolkit(candidate):
            return candidate
    return None


if __name__ == "__main__":
    print(find_cuda_home() or "")
