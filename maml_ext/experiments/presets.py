"""The MAML paper's few-shot classification settings (Finn et al. 2017, appendix A.1) as presets.

Each preset is a frozen :class:`FewShotPreset`: the network, the task shape (N ways, K shots,
Q queries per class), the meta-batch, the inner loop (steps, α), the outer optimiser (Adam, lr)
and the paper's iteration count. ``notes`` records, per preset, where it follows the paper and
where the paper's reference code (github.com/cbfinn/maml) or this implementation differs.

Override a setting with :meth:`FewShotPreset.with_overrides`, e.g.
``PRESETS["omniglot-5w1s"].with_overrides(first_order=True, meta_batch=8)``.

This module only imports torch inside :meth:`FewShotPreset.build_model`, so the command line can
list presets cheaply.
"""

from __future__ import annotations

import dataclasses

__all__ = [
    "ALGORITHMS",
    "ConfigurationError",
    "FewShotPreset",
    "PRESETS",
    "FOLDER_PRESET",
    "get_preset",
]

# The meta-learning algorithms a preset can run (maml_ext/experiments/algorithms.py).
ALGORITHMS = ("maml", "fomaml", "anil", "mamlpp", "imaml", "reptile", "metasgd")

DATASETS = ("omniglot", "miniimagenet", "folder")
BACKBONES = ("conv4", "resnet12")
# The preset of your own image folders (python -m maml_ext train folder-5w1s --data-dir DIR).
FOLDER_PRESET = "folder-5w1s"


class ConfigurationError(ValueError):
    """A user-facing setup problem (unknown preset, missing data, a checkpoint that does not fit):
    the command line prints its message without a traceback."""


_COMMON_NOTES: tuple[str, ...] = (
    "Follows the paper: Adam with learning rate 1e-3 on the mean query loss of the meta-batch; "
    "60000 meta-iterations; second-order MAML unless --first-order "
    "(FOMAML, the paper's first-order "
    "approximation).",
    "Batch norm normalises each task with its own batch statistics (track_running_stats=False), in "
    "training and at test time, as the reference code does (TensorFlow batch_norm in training "
    "mode). Here batch norm's weight and bias are adapted in the inner loop like every other "
    "parameter; in the reference code they live outside its weights dict "
    "and are only meta-learned.",
    "Initialisation: PyTorch's defaults. The reference code uses Xavier for the convolutions and "
    "zero biases (and N(0, 1) for Omniglot's output layer, Xavier for miniImageNet's).",
    "Test protocol (python -m maml_ext eval): 600 tasks from the test classes with a fixed seed, "
    "accuracy after every inner step 0..--steps, mean and 1.96*std/sqrt(600) (std with ddof=1; the "
    "reference code uses numpy's ddof=0, a 0.08% difference at n=600).",
)

_OMNIGLOT_NOTES: tuple[str, ...] = (
    "Follows the paper: 4 x [conv3x3 64 (padding 1), batch norm, ReLU, 2x2 max-pool], flatten, "
    "linear; 28x28 images; the 90/180/270-degree rotations of each character are further classes; "
    "the full set's characters are split 1100 / 100 / 423 (train / validation / test), "
    "the reference "
    "code's split (1200 training characters of which 100 are held out for validation).",
    "Query set: 15 images per class, as the PyTorch community does (learn2learn, torchmeta "
    "examples). The paper does not state it; the reference code draws K query images per class "
    "(DataGenerator(update_batch_size*2)), in training and at test time.",
    "Architecture: the paper names 2x2 max-pooling, which this preset uses; the reference code's "
    "Omniglot runs use stride-2 convolutions instead (its --max_pool flag defaults to False) and "
    "average the last feature map over space before the linear layer.",
    "Iterations: the paper says 60000; the usage lines of the reference code's main.py say 40000 "
    "for Omniglot.",
)

_MINIIMAGENET_NOTES: tuple[str, ...] = (
    "Follows the paper: 4 x [conv3x3 32 (padding 1), batch norm, ReLU, 2x2 max-pool], flatten, "
    "linear(32*5*5, 5) on 84x84 RGB images; 5 inner steps of alpha = 0.01 in training; 15 query "
    "images per class in training (following Ravi & Larochelle, as the paper says); Ravi & "
    "Larochelle's 64 / 16 / 20 class split.",
    "Evaluation steps: the paper (and the reference code, test_num_updates = 10) evaluates with 10 "
    "inner steps; `eval --steps 10` (the default) gives that number in the row for step 10. The "
    "reference code's test tasks use K query images per class, not 15.",
    "The reference code clips the meta-gradient of miniImageNet to [-10, 10] element-wise; this "
    "preset does not clip.",
)


@dataclasses.dataclass(frozen=True)
class FewShotPreset:
    """One few-shot classification setting.

    ``queries`` is the number of query images per class, in training and at test time.
    ``paper_eval_steps`` is the number of inner steps the paper reports test accuracy after (the
    evaluation reports every step up to ``eval --steps``, so that row is in the table).
    """

    name: str
    dataset: str  # "omniglot", "miniimagenet" or "folder" (ImageFolderTasks, your own classes)
    ways: int  # N
    shots: int  # K support images per class
    queries: int  # query images per class
    meta_batch: int  # tasks per meta-update
    inner_steps: int  # inner SGD steps in meta-training
    inner_lr: float  # alpha
    outer_lr: float = 1e-3  # Adam's learning rate
    iterations: int = 60000
    paper_eval_steps: int = 10
    filters: int = 64  # channels of every conv layer
    first_order: bool = False
    description: str = ""
    notes: tuple[str, ...] = ()
    algorithm: str = "maml"  # one of ALGORITHMS
    # MAML++ only (None: the defaults of maml_ext/experiments/algorithms.py): the iterations over
    # which the multi-step loss anneals, and the first-order iterations before second order.
    msl_iterations: int | None = None
    first_order_until: int | None = None
    # Image folders only: the side images are resized to, and their channels (0: not yet known;
    # training sets it from the data, 1 grayscale or 3 colour).
    image_size: int = 0
    channels: int = 0
    backbone: str = "conv4"  # or "resnet12" (maml_ext.models.resnet12)

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ConfigurationError(
                f"dataset: expected one of {', '.join(DATASETS)}, got {self.dataset!r}"
            )
        if self.backbone not in BACKBONES:
            raise ConfigurationError(
                f"backbone: expected one of {', '.join(BACKBONES)}, got {self.backbone!r}"
            )
        if self.dataset == "folder":
            size = self.image_size
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ConfigurationError(f"image_size: expected a positive integer, got {size!r}")
            if self.backbone == "conv4" and size < 16:
                raise ConfigurationError(
                    f"image_size: the conv4 backbone's four 2x2 max-pools need images of at "
                    f"least 16 pixels, got {size}"
                )
            if self.channels not in (0, 1, 3):
                raise ConfigurationError(f"channels: expected 0, 1 or 3, got {self.channels!r}")
        elif self.image_size:
            raise ConfigurationError(
                f"image_size: only image-folder presets resize their images; {self.dataset} "
                f"images are {self.image_shape[-1]} pixels"
            )
        for field in (
            "ways",
            "shots",
            "meta_batch",
            "inner_steps",
            "iterations",
            "filters",
            "paper_eval_steps",
        ):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{field}: expected a positive integer, got {value!r}")
        if isinstance(self.queries, bool) or not isinstance(self.queries, int) or self.queries < 1:
            raise ConfigurationError(f"queries: expected a positive integer, got {self.queries!r}")
        for field in ("inner_lr", "outer_lr"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigurationError(f"{field}: expected a positive number, got {value!r}")
        if not isinstance(self.first_order, bool):
            raise ConfigurationError(f"first_order: expected a bool, got {self.first_order!r}")
        if self.algorithm not in ALGORITHMS:
            raise ConfigurationError(
                f"algorithm: expected one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}"
            )
        for field in ("msl_iterations", "first_order_until"):
            value = getattr(self, field)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0
            ):
                raise ConfigurationError(
                    f"{field}: expected a non-negative integer or None, got {value!r}"
                )
        # JSON and some pickles turn the tuple into a list; keep the dataclass hashable.
        object.__setattr__(self, "notes", tuple(self.notes))

    # ---- the network ------------------------------------------------------------------------

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one input image."""
        if self.dataset == "folder":
            return (self.channels or 3, self.image_size, self.image_size)
        return (1, 28, 28) if self.dataset == "omniglot" else (3, 84, 84)

    @property
    def feature_size(self) -> int:
        """Inputs of the linear layer: ``filters`` times the side left after four 2x2 pools."""
        side = self.image_shape[-1]
        for _ in range(4):
            side //= 2
        return self.filters * side * side

    def build_model(self):
        """A freshly initialised network (PyTorch default initialisation, the caller's RNG)."""
        from maml_ext.models import conv4, resnet12

        channels, side, _ = self.image_shape
        if self.backbone == "resnet12":
            return resnet12(self.ways, channels, image_size=side)
        return conv4(self.ways, channels, self.filters, side)

    # ---- variants and (de)serialisation ------------------------------------------------------

    def with_overrides(self, **changes) -> FewShotPreset:
        """A copy with some settings changed (None values are ignored); validated again."""
        changes = {key: value for key, value in changes.items() if value is not None}
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigurationError(f"unknown preset settings: {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain Python types only (safe for JSON and for ``torch.load(weights_only=True)``)."""
        data = dataclasses.asdict(self)
        data["notes"] = list(self.notes)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> FewShotPreset:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})


def _omniglot(name, ways, shots, meta_batch, inner_steps, inner_lr, paper_eval_steps, extra=()):
    return FewShotPreset(
        name=name,
        dataset="omniglot",
        ways=ways,
        shots=shots,
        queries=15,
        meta_batch=meta_batch,
        inner_steps=inner_steps,
        inner_lr=inner_lr,
        paper_eval_steps=paper_eval_steps,
        filters=64,
        description=f"Omniglot {ways}-way {shots}-shot (paper sec. 5.2, table 1)",
        notes=_OMNIGLOT_NOTES + tuple(extra) + _COMMON_NOTES,
    )


def _miniimagenet(name, shots, meta_batch, extra=()):
    return FewShotPreset(
        name=name,
        dataset="miniimagenet",
        ways=5,
        shots=shots,
        queries=15,
        meta_batch=meta_batch,
        inner_steps=5,
        inner_lr=0.01,
        paper_eval_steps=10,
        filters=32,
        description=f"miniImageNet 5-way {shots}-shot (paper sec. 5.2, table 2)",
        notes=_MINIIMAGENET_NOTES + tuple(extra) + _COMMON_NOTES,
    )


_OMNIGLOT_5WAY = (
    "Paper: 5-way Omniglot trains with 1 inner step of alpha = 0.4, meta-batch 32, "
    "and is evaluated "
    "with 3 steps of alpha = 0.4 (the row for step 3 of `eval`); the reference code computes test "
    "accuracy after up to 10 steps (test_num_updates = 10).",
)
_OMNIGLOT_20WAY = (
    "Paper: 20-way Omniglot trains and is evaluated with 5 inner steps of alpha = 0.1, meta-batch "
    "16 (the row for step 5 of `eval`); the reference code computes test accuracy after up to 10 "
    "steps.",
)

PRESETS: dict[str, FewShotPreset] = {
    preset.name: preset
    for preset in (
        _omniglot("omniglot-5w1s", 5, 1, 32, 1, 0.4, 3, _OMNIGLOT_5WAY),
        _omniglot("omniglot-5w5s", 5, 5, 32, 1, 0.4, 3, _OMNIGLOT_5WAY),
        _omniglot("omniglot-20w1s", 20, 1, 16, 5, 0.1, 5, _OMNIGLOT_20WAY),
        _omniglot("omniglot-20w5s", 20, 5, 16, 5, 0.1, 5, _OMNIGLOT_20WAY),
        _miniimagenet("miniimagenet-5w1s", 1, 4, ("Paper: meta-batch 4 tasks for 1-shot.",)),
        _miniimagenet(
            "miniimagenet-5w5s",
            5,
            2,
            (
                "Paper: meta-batch 2 tasks for 5-shot; "
                "the usage line of the reference code's main.py "
                "for 5-shot says --meta_batch_size=4.",
            ),
        ),
    )
}


# MAML++ (Antoniou et al. 2018): 5 inner steps, per-layer per-step rates (LSLR) initialised at
# the MAML rate, multi-step loss over the first 10 (Omniglot) / 15 (miniImageNet) epochs and
# first-order gradients over the first 50 epochs, 150 epochs, an epoch being 500 iterations.
_MAMLPP_NOTES = (
    "MAML++ (Antoniou et al. 2018, 'How to train your MAML'): 5 inner steps; learned per-layer "
    "per-step inner rates (LSLR) initialised at the rate of this preset; per-step batch-norm "
    "weights and biases; multi-step loss annealed over the first msl_iterations (10 epochs of "
    "500 iterations for Omniglot, 15 for miniImageNet); first-order gradients for the first 50 "
    "epochs (first_order_until), second order after; 150 epochs; the outer Adam's rate annealed "
    "by a cosine to 1e-5 (--outer-schedule cosine, the default of --algorithm mamlpp).",
    "Network, query count and meta-batch follow the MAML preset of the same task (MAML++'s code "
    "uses other meta-batches and 48 filters for miniImageNet); batch norm uses per-task batch "
    "statistics, as in every preset here.",
    "The authors' released configs (AntreasAntoniou/HowToTrainYourMAMLPytorch, "
    "experiment_config/) differ from the paper's text and between commits: Omniglot 20-way "
    "1-shot (omniglot_maml++_20_way_1_shot_5_..._seed_0.json) runs 250 epochs, the multi-step "
    "loss over 20, second order from the start (first_order_to_second_order_epoch -1), one query "
    "per class, meta-batch 16; a miniImageNet 5-way 1-shot config runs 150 epochs, first order "
    "until epoch 80, 32 filters, 15 queries, meta-batch 4. These presets follow the paper.",
)


def _mamlpp(base: FewShotPreset, name: str, inner_lr: float, msl_epochs: int) -> FewShotPreset:
    return dataclasses.replace(
        base,
        name=name,
        inner_steps=5,
        inner_lr=inner_lr,
        iterations=150 * 500,
        paper_eval_steps=5,
        algorithm="mamlpp",
        msl_iterations=msl_epochs * 500,
        first_order_until=50 * 500,
        description=base.description.split(" (")[0] + " with MAML++ (Antoniou et al. 2018)",
        notes=_MAMLPP_NOTES + tuple(base.notes),
    )


PRESETS["omniglot-20w1s-mamlpp"] = _mamlpp(
    PRESETS["omniglot-20w1s"], "omniglot-20w1s-mamlpp", 0.1, 10
)
PRESETS["miniimagenet-5w1s-mamlpp"] = _mamlpp(
    PRESETS["miniimagenet-5w1s"], "miniimagenet-5w1s-mamlpp", 0.01, 15
)
_FOLDER_NOTES: tuple[str, ...] = (
    "Your own data: --data-dir is a folder of class folders (any depth of grouping, e.g. "
    "alphabet/character), read by maml_ext.tasks.ImageFolderTasks: any image format Pillow reads, "
    "resized to --image-size (84 by default) square, grayscale when every image is, else RGB, "
    "scaled to [0, 1]; decoded once and cached. The classes are cut 64 : 16 : 20 into train / "
    "validation / test with split seed 0, by class or (--split-by group) by top-level folder.",
    "Settings: miniImageNet's (5 inner steps of alpha = 0.01, meta-batch 4, 15 queries per class, "
    "4 x [conv3x3 32, batch norm, ReLU, 2x2 max-pool] + linear); --ways, --shots, --queries, "
    "--image-size and --backbone resnet12 change them. Every class of every split needs shots + "
    "queries images; classes with fewer are listed by name before training starts.",
)


def _folder(name, ways, shots):
    return FewShotPreset(
        name=name,
        dataset="folder",
        ways=ways,
        shots=shots,
        queries=15,
        meta_batch=4,
        inner_steps=5,
        inner_lr=0.01,
        paper_eval_steps=10,
        filters=32,
        image_size=84,
        description=f"your own class folders (--data-dir), {ways}-way {shots}-shot, "
        f"miniImageNet's settings",
        notes=_FOLDER_NOTES + _COMMON_NOTES,
    )


PRESETS[FOLDER_PRESET] = _folder(FOLDER_PRESET, 5, 1)


def get_preset(name: str) -> FewShotPreset:
    """The preset called ``name``; :class:`ConfigurationError` listing the choices otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigurationError(
            f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}"
        ) from None
