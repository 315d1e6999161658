"""``python -m maml_ext``: see :mod:`maml_ext.cli`."""

import sys

from maml_ext.cli import main

if __name__ == "__main__":
    sys.exit(main())
