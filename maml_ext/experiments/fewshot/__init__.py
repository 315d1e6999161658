"""Few-shot image classification with MAML: training, the paper's test protocol, and a baseline.

Training (``python -m maml_ext train <preset> --data-dir DIR --out OUT``, :func:`train_fewshot`)
meta-trains a preset's network on the meta-training classes and writes, under ``OUT``:

- ``log.csv`` and ``log.jsonl``: one row per ``log_every`` iterations (phase ``train``: mean query
  loss and accuracy of the window) and per validation (phase ``val``: accuracy after the training
  number of inner steps on ``val_tasks`` fixed tasks from the held-out validation classes);
- ``learning_curve.png``: train and validation accuracy against iterations;
- ``checkpoint.pt``: everything needed to continue exactly (see :mod:`.checkpoint`), written
  atomically every ``checkpoint_every`` iterations and at the end; ``best.pt``: the checkpoint
  with the best validation accuracy so far.

``resume=True`` continues from ``OUT/checkpoint.pt``: the same parameters, optimiser state, task
stream and RNG states, so N iterations in one go and N/2 + resume + N/2 give bit-identical weights
on the CPU. Rows logged after that checkpoint (by a run that was killed) are dropped.

Data splits. Omniglot: characters (default) or whole alphabets (``split_by="alphabet"``: train on
some alphabets, test on others) are cut into train / val / test by :class:`Omniglot`'s default
fractions (1100 : 100 : 423, the MAML code's split of the full 1623 characters) with a fixed split
seed (0 by default). On the two minimal archives (8 alphabets, 242 characters) that gives
164 / 15 / 63 characters by character, or by alphabet 5 / 1 / 2 alphabets (152 / 26 / 64
characters: Balinese, Greek, Japanese_(katakana), Korean, Tagalog / Latin / Early_Aramaic,
Sanskrit); every character counts 4 times (its rotations). miniImageNet: Ravi & Larochelle's train
/ val / test files.
Your own image folders (preset ``folder-5w1s``, :class:`~maml_ext.tasks.ImageFolderTasks`): classes
(default) or top-level folders (``split_by="group"``) cut 64 : 16 : 20 with the split seed; every
class of a split must hold ``shots + queries`` images, checked (all short classes named) before
training.

Evaluation (``python -m maml_ext eval CHECKPOINT``, :func:`evaluate_checkpoint`): see
:mod:`.evaluate`; the baseline it compares with (``eval --baseline``): see :mod:`.baseline`.

Modules: :mod:`.data` (splits and task samplers), :mod:`.train`, :mod:`.evaluate`,
:mod:`.baseline`, :mod:`.checkpoint` (the checkpoint format, :func:`load_checkpoint`); what they
report (confidence intervals, tables, the run log, plots) is in
:mod:`maml_ext.experiments.reporting`. The command line's registry
(:data:`maml_ext.cli.EXPERIMENTS`)
runs :func:`train_fewshot` with the preset's name.
"""

from maml_ext.experiments.fewshot.baseline import baseline_meta_optimizer, pretrain_baseline
from maml_ext.experiments.fewshot.checkpoint import (
    CHECKPOINT_FORMAT,
    build_meta_optimizer,
    load_checkpoint,
    read_checkpoint,
)
from maml_ext.experiments.fewshot.data import load_split, make_sampler
from maml_ext.experiments.fewshot.evaluate import (
    EVAL_CHUNK,
    evaluate_checkpoint,
    evaluate_tasks,
    per_step_accuracy,
    summarise,
)
from maml_ext.experiments.fewshot.train import train_fewshot
from maml_ext.experiments.reporting import DEFAULT_EVAL_SEED, LOG_COLUMNS

__all__ = [
    "CHECKPOINT_FORMAT",
    "DEFAULT_EVAL_SEED",
    "EVAL_CHUNK",
    "LOG_COLUMNS",
    "baseline_meta_optimizer",
    "build_meta_optimizer",
    "evaluate_checkpoint",
    "evaluate_tasks",
    "load_checkpoint",
    "load_split",
    "make_sampler",
    "per_step_accuracy",
    "pretrain_baseline",
    "read_checkpoint",
    "summarise",
    "train_fewshot",
]
