"""Type aliases shared across the package."""

import os
from typing import TypeAlias

# A file-system path as the public functions accept it.
PathLike: TypeAlias = str | os.PathLike
