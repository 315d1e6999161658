"""The core needs only torch and numpy: tqdm, matplotlib and PIL (the ``experiments`` extra) are
made unimportable in a fresh interpreter, which must still import maml_ext and meta-train;
what needs the
extra must say so, naming it and the pip command."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Runs in the child. A None entry in sys.modules makes every import of the blocked packages (and
# of their submodules) raise ModuleNotFoundError, and importlib.util.find_spec report them absent,
# exactly as if they were not installed.
_CHILD = textwrap.dedent("""
    import json, sys

    BLOCKED = ("tqdm", "matplotlib", "PIL")
    for name in BLOCKED:
        sys.modules[name] = None

    out_dir, drawings_root = sys.argv[1], sys.argv[2]
    report = {}

    import torch
    import maml_ext
    from maml_ext.tasks import Sinusoid
    from maml_ext import MissingExtraError

    torch.manual_seed(0)
    backends = ["reference"]
    if maml_ext.extension_info()["compiled_ops_loaded"]:
        backends.append("fused")
    batch = Sinusoid(seed=3).sample(4, dtype=torch.float64)
    report["losses"] = {}
    for backend in backends:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.ReLU(),
                                    torch.nn.Linear(8, 1)).double()
        before = [p.detach().clone() for p in model.parameters()]
        meta = maml_ext.MetaOptimizer(model, torch.optim.Adam(model.parameters(), 1e-2),
                                      inner_lr=0.01, loss="mse", backend=backend)
        result = meta.step(batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        moved = any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
        report["losses"][backend] = [result.query_loss.item(), moved]

    # A library run without progress bars or plots needs no extra.
    from maml_ext.experiments.sinusoid import train_sinusoid
    summary = train_sinusoid(iterations=2, out_dir=None, backend="reference", meta_batch=2,
                             eval_tasks=3, eval_steps=(0, 1), progress=False, verbose=False)
    report["library_run"] = sorted(summary["results"])

    # The command plots and shows progress: it must stop before training, naming the extra.
    from maml_ext.cli import main
    try:
        main(["train", "sinusoid", "--iterations", "2", "--backend", "reference",
              "--out", out_dir])
        report["cli_exit"] = 0
    except SystemExit as exit_info:
        report["cli_exit"] = exit_info.code

    # Decoding images needs pillow; a missing one is not reported as a damaged file.
    from maml_ext.tasks import Omniglot
    try:
        Omniglot(drawings_root, "all", cache=False)
        report["omniglot_error"] = None
    except MissingExtraError as error:
        report["omniglot_error"] = str(error)

    report["blocked_imported"] = sorted(name for name, module in sys.modules.items()
                                        if module is not None and name.split(".")[0] in BLOCKED)
    print("REPORT " + json.dumps(report))
""")


def _one_drawing_archive(root: Path) -> Path:
    from PIL import Image

    folder = root / "images_background" / "Alphabet" / "character01"
    folder.mkdir(parents=True)
    Image.new("1", (105, 105), 1).save(folder / "0101_01.png")
    return root


def test_the_core_runs_without_the_experiments_extra(tmp_path):
    pytest.importorskip("PIL")  # only to write the test drawing in this process
    drawings = _one_drawing_archive(tmp_path / "omniglot")
    out_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(out_dir), str(drawings)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert child.returncode == 0, child.stderr
    [line] = [line for line in child.stdout.splitlines() if line.startswith("REPORT ")]
    report = json.loads(line[len("REPORT ") :])

    for backend, (loss, moved) in report["losses"].items():
        assert loss == loss and loss > 0 and moved, backend  # finite, and Adam moved the weights
    assert report["library_run"] == ["MAML", "pretrained"]

    assert report["cli_exit"] == 1
    assert "experiments" in child.stderr and 'pip install "maml_ext[experiments]"' in child.stderr
    assert "matplotlib" in child.stderr and "Traceback" not in child.stderr
    assert not out_dir.exists()  # it stopped before training, not after

    message = report["omniglot_error"]
    assert message is not None and "pillow" in message and "experiments" in message

    assert report["blocked_imported"] == []
