"""Few-shot task distributions: the paper's sinusoid regression and image classification data.

Names are imported lazily so that ``import maml_ext.tasks`` stays cheap. Decoding images needs PIL
(the optional ``experiments`` extra), imported only when an image is decoded.
"""

import importlib

_EXPORTS = {
    "Sinusoid": "sinusoid",
    "SinusoidBatch": "sinusoid",
    "Omniglot": "omniglot",
    "omniglot_image": "omniglot_archive",
    "MiniImageNet": "miniimagenet",
    "ImageFolderTasks": "folder",
    "TensorTasks": "tensor",
    "TaskSampler": "sampler",
    "TaskBatch": "sampler",
    "DatasetError": "_data_errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'maml_ext.tasks' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
