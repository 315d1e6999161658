"""maml_ext: fused, task-batched MAML meta-gradients for PyTorch.

    opt = maml_ext.MetaOptimizer(model, torch.optim.Adam(model.parameters(), 1e-3), inner_lr=0.4)
    result = opt.step(support_x, support_y, query_x, query_y)

The paper's experiments are in :mod:`maml_ext.experiments` and :mod:`maml_ext.rl`;
``maml_ext.load_checkpoint(path)`` loads any checkpoint that ``python -m maml_ext train`` wrote (a
few-shot run's MetaOptimizer, or a meta-RL run whose ``.policy`` is the learned policy).
"""

from ._extension import extension_info
from ._optional import MissingExtraError
from .checkpoint import load_checkpoint
from .functional import hvp
from .implicit import ImplicitMetaOptimizer
from .optimizer import MetaOptimizer, MetaStepResult
from .program import UnsupportedModelError
from .reptile import Reptile

__all__ = [
    "ImplicitMetaOptimizer",
    "MetaOptimizer",
    "MetaStepResult",
    "MissingExtraError",
    "Reptile",
    "UnsupportedModelError",
    "extension_info",
    "hvp",
    "load_checkpoint",
]
__version__ = "0.1.0"
