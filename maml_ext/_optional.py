"""Optional dependencies, grouped in the extras of pyproject.toml.

- ``experiments``: progress bars, plots, image decoding (tqdm, matplotlib, pillow);
- ``rl``: the MuJoCo locomotion environments of :mod:`maml_ext.rl` (gymnasium, mujoco).

The core (MetaOptimizer, its backends, the sinusoid tasks, 2D navigation) needs only torch and
numpy. What needs more imports it through :func:`require`, which names the extra to install when
it is missing.
"""

import importlib
from types import ModuleType

__all__ = ["EXTRA", "EXTRAS", "INSTALL_COMMAND", "MissingExtraError", "install_command", "require"]

# Top-level module -> (the extra that provides it, the package as pip spells it).
EXTRAS = {
    "tqdm": ("experiments", "tqdm"),
    "matplotlib": ("experiments", "matplotlib"),
    "PIL": ("experiments", "pillow"),
    "gymnasium": ("rl", "gymnasium"),
    "mujoco": ("rl", "mujoco"),
}
# The extra most features ask for (kept for callers that name it directly).
EXTRA = "experiments"


def install_command(extra: str) -> str:
    """The pip command that installs ``extra``: ``pip install "maml_ext[rl]"``."""
    return f'pip install "maml_ext[{extra}]"'


INSTALL_COMMAND = install_command(EXTRA)


class MissingExtraError(ImportError):
    """A feature needs a package of an optional extra (``experiments``, ``rl``) that is not
    installed."""


def require(module: str, purpose: str) -> ModuleType:
    """``importlib.import_module(module)``, or :class:`MissingExtraError` saying that ``purpose``
    needs it, which extra provides it and how to install it. ``module`` (or its top-level package)
    is one of :data:`EXTRAS`: tqdm, matplotlib, PIL (``experiments``); gymnasium, mujoco
    (``rl``)."""
    top_level = module.split(".")[0]
    if top_level not in EXTRAS:
        known = ", ".join(f"{name} ({extra})" for name, (extra, _) in EXTRAS.items())
        raise ValueError(f"module: {module!r} is not part of an optional extra; known: {known}")
    extra, package = EXTRAS[top_level]
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingExtraError(
            f"{purpose} needs {package}, part of maml_ext's optional {extra!r} extra; "
            f"install it with: {install_command(extra)}  "
            f'(from a checkout: pip install ".[{extra}]")'
        ) from error
