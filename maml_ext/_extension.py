"""Loads the compiled ops (maml_ext._C) and records whether they are there, and why not."""

from __future__ import annotations

import torch

_load_error: str | None = None
try:
    from . import _C  # noqa: F401  (importing registers the torch.ops.maml_ext ops)
except ImportError as error:  # a pure-Python checkout, or a build for another torch
    _load_error = f"{type(error).__name__}: {error}"


def compiled_ops_available() -> bool:
    """True when maml_ext._C loaded and its ops are registered."""
    return _load_error is None


def cuda_kernels_compiled() -> bool:
    return compiled_ops_available() and bool(torch.ops.maml_ext.compiled_with_cuda())


def extension_info() -> dict:
    """What was built and what runs here: whether ``_C`` loaded, whether its CUDA kernels were
    compiled in, the torch and CUDA versions, and the reason when something is missing."""
    loaded = compiled_ops_available()
    with_cuda = cuda_kernels_compiled()
    reasons = []
    if not loaded:
        reasons.append(f"maml_ext._C did not load ({_load_error}); only backend='reference' works")
    elif not with_cuda:
        reasons.append("maml_ext._C was built without CUDA kernels (CPU-only build)")
    if not torch.cuda.is_available():
        reasons.append("no CUDA device is visible")
    return {
        "compiled_ops_loaded": loaded,
        "cuda_kernels_compiled": with_cuda,
        "cuda_available": torch.cuda.is_available(),
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "reason": "; ".join(reasons) or None,
    }
