"""maml_ext: fused, task-batched MAML meta-gradients for PyTorch.

    opt = maml_ext.MetaOptimizer(model, torch.optim.Adam(model.parameters(), 1e-3), inner_lr=0.4)
    result = opt.step(support_x, support_y, query_x, query_y)

The paper's experiments and the loader of their checkpoints are in :mod:`maml_ext.experiments`
(``from maml_ext.experiments import load_checkpoint``).
"""

from ._extension import extension_info
from ._optional import MissingExtraError
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
]
__version__ = "0.1.0"
