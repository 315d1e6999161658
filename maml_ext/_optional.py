"""Optional dependencies: the ``experiments`` extra (progress bars, plots, image decoding).

The core (MetaOptimizer, its backends, the sinusoid tasks) needs only torch and numpy. What needs
more imports it through :func:`require`, which names the extra to install when it is missing.
"""

import importlib
from types import ModuleType

__all__ = ["EXTRA", "INSTALL_COMMAND", "MissingExtraError", "require"]

EXTRA = "experiments"
INSTALL_COMMAND = f'pip install "maml_ext[{EXTRA}]"'
# Module name -> the package that provides it (as pip spells it).
_PACKAGES = {"tqdm": "tqdm", "matplotlib": "matplotlib", "PIL": "pillow"}


class MissingExtraError(ImportError):
    """A feature needs a package of the ``experiments`` extra that is not installed."""


def require(module: str, purpose: str) -> ModuleType:
    """``importlib.import_module(module)``, or :class:`MissingExtraError` saying that ``purpose``
    needs it and how to install it. ``module`` is one of the extra's: tqdm, matplotlib, PIL."""
    top_level = module.split(".")[0]
    if top_level not in _PACKAGES:
        raise ValueError(f"module: {module!r} is not part of the {EXTRA!r} extra")
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingExtraError(
            f"{purpose} needs {_PACKAGES[top_level]}, part of maml_ext's optional {EXTRA!r} extra; "
            f'install it with: {INSTALL_COMMAND}  (from a checkout: pip install ".[{EXTRA}]")'
        ) from error
