"""Ready-made experiments (the paper's presets), each a function that trains, evaluates and writes
its results; they need the optional ``experiments`` extra (``pip install "maml_ext[experiments]"``:
progress bars, plots, image decoding) when they show progress, plot or decode images.

- :mod:`.presets`: the paper's few-shot classification settings;
- :mod:`.algorithms`: the MAML family by name (``--algorithm``: maml, fomaml, metasgd, anil,
  mamlpp, imaml, reptile) and each one's options;
- :mod:`.sinusoid`: sinusoid regression, MAML against a pretrained baseline;
- :mod:`.fewshot`: few-shot classification (training, the test protocol, the baseline,
  checkpoints: :func:`load_checkpoint` gives a ready MetaOptimizer from a training run);
- :mod:`.reporting`: confidence intervals, tables, progress bars, plots and the run log;
- :mod:`.runtime`: threads, devices and RNG states, set up alike by every experiment.

The core library (:mod:`maml_ext`) never imports this package.
"""

from maml_ext.experiments.fewshot.checkpoint import load_checkpoint, read_checkpoint

__all__ = ["load_checkpoint", "read_checkpoint"]
