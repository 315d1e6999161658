"""Checks the CMake-built library (`make cmake` runs it; CI too): it loads into torch, an op runs
and gives the known answer, and where CMake compiled the CUDA kernels (WITH_CUDA in the build's
CMakeCache.txt) they are registered, and run on a GPU where one is visible.

    python build_tools/check_cmake_library.py cmake-build/libmaml_ext.so
"""

import math
import os
import re
import sys

import torch


def built_with_cuda(library):
    cache = os.path.join(os.path.dirname(os.path.abspath(library)), "CMakeCache.txt")
    with open(cache) as f:
        match = re.search(r"^WITH_CUDA:BOOL=(\w+)$", f.read(), re.MULTILINE)
    return match is not None and match.group(1).upper() in ("ON", "1", "TRUE", "YES")


def check_cross_entropy(device):
    # Uniform logits over 4 classes: every row's loss is log 4.
    logits = torch.zeros(3, 4, device=device)
    labels = torch.tensor([0, 1, 2], device=device)
    loss = torch.ops.maml_ext.softmax_cross_entropy(logits, labels, None)[0]
    expected = torch.full((3,), math.log(4.0), device=device)
    assert torch.allclose(loss, expected), f"softmax_cross_entropy on {device}: {loss}"


def main(library):
    torch.ops.load_library(library)
    check_cross_entropy("cpu")
    checked = "CPU kernels run"
    if built_with_cuda(library):
        op = "maml_ext::softmax_cross_entropy"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), (
            f"built WITH_CUDA=ON but {op} has no CUDA kernel"
        )
        if torch.cuda.is_available():
            check_cross_entropy("cuda")
            checked += "; CUDA kernels registered and run"
        else:
            checked += "; CUDA kernels registered (no GPU here to run them)"
    print(f"{library} loads: {checked}")


if __name__ == "__main__":
    main(sys.argv[1])
