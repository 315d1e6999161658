"""maml_ext: fused, task-batched MAML meta-gradients for PyTorch.

    opt = maml_ext.MetaOptimizer(model, torch.optim.Adam(model.parameters(), 1e-3), inner_lr=0.4)
    result = opt.step(support_x, support_y, query_x, query_y)
"""
from ._extension import extension_info
from .checkpoint import load_checkpoint
from .functional import hvp
from .optimizer import MetaOptimizer, MetaStepResult
from .program import UnsupportedModelError

__all__ = ["MetaOptimizer", "MetaStepResult", "UnsupportedModelError", "extension_info", "hvp",
           "load_checkpoint"]
__version__ = "0.1.0"
