import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def omniglot_root() -> Path:
    """The real Omniglot archives: ``../shared/data/omniglot`` or ``$MAML_EXT_OMNIGLOT_DIR``.

    Absent data skips the test, except under CI (``CI=true``), where it is a failure.
    """
    configured = os.environ.get("MAML_EXT_OMNIGLOT_DIR")
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
    root = Path(configured) if configured else default
    if not root.is_dir():
        reason = (f"Omniglot data not found at {root} "
                  f"(set MAML_EXT_OMNIGLOT_DIR to the folder holding the archives)")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return root
