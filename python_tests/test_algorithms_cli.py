"""The MAML family through the experiments and the command line: ``train PRESET --algorithm X``
with each algorithm's options, its checkpoint (evaluated and loaded), exact resume with the
outer schedule and Reptile's annealing, the MAML++ presets and the mapping of each name to
MetaOptimizer's options.

Runs use the real Omniglot images (the ``omniglot_root`` fixture) with a tiny network."""

import json

import pytest
import torch

import maml_ext
from maml_ext import ImplicitMetaOptimizer, MetaOptimizer, Reptile
from maml_ext.experiments import algorithms, fewshot, load_checkpoint
from maml_ext.experiments.fewshot import read_checkpoint, train as fewshot_train
from maml_ext.experiments.presets import PRESETS, ConfigurationError, get_preset

TINY = PRESETS["omniglot-5w1s"].with_overrides(filters=8, queries=2, meta_batch=2)

ALGORITHM_CASES = [
    ("maml", [], MetaOptimizer),
    ("fomaml", [], MetaOptimizer),
    ("metasgd", [], MetaOptimizer),
    ("anil", [], MetaOptimizer),
    (
        "mamlpp",
        ["--msl-iterations", "2", "--first-order-until", "1", "--inner-steps", "2"],
        MetaOptimizer,
    ),
    ("imaml", ["--lam", "1.5", "--cg-steps", "2", "--inner-steps", "2"], ImplicitMetaOptimizer),
    ("reptile", ["--inner-optimizer", "adam", "--inner-lr", "0.01", "--anneal"], Reptile),
]


@pytest.fixture(autouse=True)
def one_cpu_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def fewshot_cache(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "omniglot-cache"


@pytest.fixture
def tiny_presets(monkeypatch, fewshot_cache):
    """The CLI's omniglot-5w1s is TINY here, validating on 4 tasks, decoding into the cache."""
    monkeypatch.setitem(PRESETS, "omniglot-5w1s", TINY)
    new_run_settings = fewshot_train._new_run_settings

    def tiny_settings(*args, **kwargs):
        kwargs["cache_dir"] = fewshot_cache
        return {**new_run_settings(*args, **kwargs), "val_tasks": 4}

    monkeypatch.setattr(fewshot_train, "_new_run_settings", tiny_settings)


def _train_cli(root, out, algorithm, extra):
    from maml_ext.cli import main

    argv = [
        "train",
        "omniglot-5w1s",
        "--data-dir",
        str(root),
        "--out",
        str(out),
        "--iterations",
        "2",
        "--validate-every",
        "0",
        "--device",
        "cpu",
        "--algorithm",
        algorithm,
        *extra,
    ]
    assert main(argv) == 0


@pytest.mark.parametrize(("algorithm", "extra", "kind"), ALGORITHM_CASES)
def test_each_algorithm_trains_evaluates_and_loads_through_the_cli(
    algorithm, extra, kind, omniglot_root, tiny_presets, tmp_path, capsys
):
    from maml_ext.cli import main

    out = tmp_path / algorithm
    _train_cli(omniglot_root, out, algorithm, extra)
    state = read_checkpoint(out / "checkpoint.pt")
    assert state["preset"]["algorithm"] == algorithm
    assert state["iteration"] == 2
    options = state["settings"]["algorithm_options"]
    if algorithm == "imaml":
        assert options == {"lam": 1.5, "cg_steps": 2, "cg_damping": 0.0}
        assert state["preset"]["inner_steps"] == 2
    if algorithm == "reptile":
        assert options["inner_optimizer"] == "adam" and options["anneal"] == 2
        assert state["meta_optimizer"]["reptile"]["meta_steps"] == 2
    expected_schedule = "cosine" if algorithm == "mamlpp" else "constant"
    assert state["settings"]["outer_schedule"] == expected_schedule
    assert (state["outer_scheduler"] is not None) == (algorithm == "mamlpp")

    meta = load_checkpoint(out / "checkpoint.pt")
    assert type(meta) is kind
    trained = {n: p for n, p in meta.model.named_parameters()}
    saved = state["meta_optimizer"]["model"]
    assert all(torch.equal(trained[n], saved[n]) for n in trained)
    if algorithm == "fomaml":
        assert meta.first_order
    if algorithm == "metasgd":
        assert meta.inner_lr.learn == "per_parameter"

    json_path = tmp_path / f"{algorithm}.json"
    assert (
        main(
            [
                "eval",
                str(out / "checkpoint.pt"),
                "--tasks",
                "3",
                "--steps",
                "2",
                "--out",
                str(json_path),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    report = json.loads(json_path.read_text())
    assert report["algorithm"] == algorithm
    assert set(report["results"]["maml"]) == {"0", "1", "2"}
    assert 0 <= report["results"]["maml"]["2"]["accuracy"] <= 1
    assert algorithm in capsys.readouterr().out


def _train(root, cache, out, **options):
    settings = dict(
        iterations=4,
        checkpoint_every=2,
        validate_every=0,
        val_tasks=3,
        log_every=1,
        cache_dir=cache,
        device="cpu",
        progress=False,
        verbose=False,
        cpu_threads=1,
    )
    settings.update(options)
    return fewshot.train_fewshot(TINY, root, out, **settings)


@pytest.mark.parametrize(
    "options",
    [
        dict(algorithm="imaml", outer_schedule="cosine", algorithm_options={"cg_steps": 2}),
        dict(algorithm="reptile", inner_steps=2, algorithm_options={"anneal": True}),
        dict(algorithm="metasgd", outer_schedule="cosine"),
    ],
    ids=["imaml-cosine", "reptile-anneal", "metasgd-cosine"],
)
def test_resume_is_exact_with_schedules(options, omniglot_root, fewshot_cache, tmp_path):
    _train(omniglot_root, fewshot_cache, tmp_path / "straight", **options)
    _train(omniglot_root, fewshot_cache, tmp_path / "split", stop_after=2, **options)
    _train(omniglot_root, fewshot_cache, tmp_path / "split", resume=True)
    straight = read_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    split = read_checkpoint(tmp_path / "split" / "checkpoint.pt")
    for name, value in straight["meta_optimizer"]["model"].items():
        assert torch.equal(value, split["meta_optimizer"]["model"][name]), name
    if options.get("outer_schedule") == "cosine":
        assert straight["outer_scheduler"]["last_epoch"] == 4
        lr = straight["meta_optimizer"]["outer_optimizer"]["param_groups"][0]["lr"]
        assert lr < TINY.outer_lr  # the cosine has moved it
        assert split["outer_scheduler"] == straight["outer_scheduler"]
    with pytest.raises(ConfigurationError, match="started with algorithm="):
        _train(omniglot_root, fewshot_cache, tmp_path / "split", resume=True, algorithm="maml")


def test_bad_algorithm_options_error_clearly(omniglot_root, tmp_path, capsys):
    from maml_ext.cli import main

    with pytest.raises(ConfigurationError, match="--algorithm maml does not take --lam"):
        algorithms.resolve_options("maml", {"lam": 1.0})
    with pytest.raises(ConfigurationError, match="lam: expected a positive number"):
        algorithms.resolve_options("imaml", {"lam": -1.0})
    with pytest.raises(ConfigurationError, match="inner_optimizer: expected sgd or adam"):
        algorithms.resolve_options("reptile", {"inner_optimizer": "lbfgs"})
    with pytest.raises(ConfigurationError, match="algorithm: expected one of"):
        algorithms.resolve_options("protonet", {})
    for argv, message in [
        (
            ["train", "omniglot-5w1s", "--algorithm", "maml", "--cg-steps", "3"],
            "--algorithm maml does not take --cg-steps",
        ),
        (
            ["train", "omniglot-5w1s", "--algorithm", "reptile", "--outer-schedule", "cosine"],
            "Reptile has none",
        ),
        (["train", "sinusoid", "--msl-iterations", "2"], "sinusoid does not take --msl-iterations"),
        (
            ["train", "sinusoid", "--algorithm", "mamlpp"],
            "sinusoid does not run --algorithm mamlpp",
        ),
        (
            ["train", "sinusoid", "--algorithm", "maml", "--lam", "2"],
            "--algorithm maml does not take --lam",
        ),
        (["train", "omniglot-5w1s", "--algorithm", "bayes"], "invalid choice: 'bayes'"),
    ]:
        argv += ["--out", str(tmp_path / "run")]
        if argv[1] != "sinusoid":
            argv += ["--data-dir", str(omniglot_root)]
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2, argv
        error = capsys.readouterr().err
        assert message in error and "Traceback" not in error, (argv, error)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_cli_passes_the_algorithm_options(monkeypatch):
    from maml_ext.cli import main

    calls = []
    monkeypatch.setattr(
        fewshot, "train_fewshot", lambda name, **options: calls.append((name, options)) or {}
    )
    argv = [
        "train",
        "omniglot-20w1s",
        "--data-dir",
        "d",
        "--out",
        "o",
        "--algorithm",
        "imaml",
        "--lam",
        "0.5",
        "--cg-steps",
        "7",
        "--cg-damping",
        "0.1",
        "--inner-lr",
        "0.2",
        "--inner-steps",
        "3",
        "--outer-schedule",
        "cosine",
    ]
    assert main(argv) == 0
    assert calls.pop() == (
        "omniglot-20w1s",
        dict(
            data_dir="d",
            out_dir="o",
            algorithm="imaml",
            inner_lr=0.2,
            inner_steps=3,
            outer_schedule="cosine",
            algorithm_options=dict(lam=0.5, cg_steps=7, cg_damping=0.1),
        ),
    )
    argv = [
        "train",
        "omniglot-5w1s",
        "--data-dir",
        "d",
        "--out",
        "o",
        "--algorithm",
        "reptile",
        "--epsilon",
        "0.5",
        "--final-epsilon",
        "0.1",
        "--inner-optimizer",
        "adam",
        "--anneal",
    ]
    assert main(argv) == 0
    assert calls.pop()[1]["algorithm_options"] == dict(
        epsilon=0.5, final_epsilon=0.1, inner_optimizer="adam", anneal=True
    )
    argv = [
        "train",
        "omniglot-20w1s-mamlpp",
        "--data-dir",
        "d",
        "--out",
        "o",
        "--msl-iterations",
        "100",
        "--first-order-until",
        "50",
    ]
    assert main(argv) == 0
    assert calls.pop()[1] == dict(
        data_dir="d", out_dir="o", msl_iterations=100, first_order_until=50
    )


def test_names_map_to_meta_optimizer_options():
    preset = get_preset("omniglot-20w1s-mamlpp")
    common = dict(inner_lr=0.1, inner_steps=5, first_order=False)
    assert algorithms.meta_optimizer_kwargs(preset, "maml") == common
    assert algorithms.meta_optimizer_kwargs(preset, "fomaml") == common | dict(first_order=True)
    assert algorithms.meta_optimizer_kwargs(preset, "metasgd") == common | dict(
        learn_inner_lr="per_parameter"
    )
    assert algorithms.meta_optimizer_kwargs(preset, "anil") == common | dict(adapt="head")
    assert algorithms.meta_optimizer_kwargs(preset, "mamlpp") == common | dict(
        multi_step_loss=True,
        msl_iterations=5000,
        per_step_batch_norm=True,
        learn_inner_lr="per_step",
        first_order_until=25000,
    )
    plain = get_preset("omniglot-5w1s")
    assert algorithms.meta_optimizer_kwargs(plain, "mamlpp")["msl_iterations"] == (
        algorithms.DEFAULT_MSL_ITERATIONS
    )
    assert algorithms.default_outer_schedule("mamlpp") == "cosine"
    assert {algorithms.default_outer_schedule(a) for a in ("maml", "imaml", "anil")} == {"constant"}
    with pytest.raises(ValueError, match="imaml is not built on MetaOptimizer"):
        algorithms.meta_optimizer_kwargs(plain, "imaml")


@pytest.mark.parametrize(
    ("name", "base", "inner_lr", "msl_epochs"),
    [
        ("omniglot-20w1s-mamlpp", "omniglot-20w1s", 0.1, 10),
        ("miniimagenet-5w1s-mamlpp", "miniimagenet-5w1s", 0.01, 15),
    ],
)
def test_mamlpp_presets_hold_the_authors_settings(name, base, inner_lr, msl_epochs):
    preset, plain = get_preset(name), get_preset(base)
    assert preset.algorithm == "mamlpp" and plain.algorithm == "maml"
    assert (preset.inner_steps, preset.inner_lr) == (5, inner_lr)
    assert preset.msl_iterations == msl_epochs * 500
    assert preset.first_order_until == 50 * 500 and preset.iterations == 150 * 500
    assert (preset.ways, preset.shots, preset.dataset) == (plain.ways, plain.shots, plain.dataset)
    assert "MAML++" in preset.description and "MAML++" in " ".join(preset.notes)
    from maml_ext.cli import EXPERIMENTS

    assert name in EXPERIMENTS


def test_presets_reject_unknown_algorithms():
    with pytest.raises(ConfigurationError, match="algorithm: expected one of"):
        TINY.with_overrides(algorithm="protonet")
    with pytest.raises(ConfigurationError, match="msl_iterations: expected a non-negative"):
        TINY.with_overrides(msl_iterations=-1)


def test_top_level_exports():
    assert maml_ext.ImplicitMetaOptimizer is ImplicitMetaOptimizer
    assert maml_ext.Reptile is Reptile
    assert {"ImplicitMetaOptimizer", "Reptile"} <= set(maml_ext.__all__)


@pytest.mark.parametrize(
    ("algorithm", "options", "kind"),
    [
        ("imaml", {"lam": 1.0, "cg_steps": 3}, ImplicitMetaOptimizer),
        ("reptile", {"anneal": True, "inner_optimizer": "adam"}, Reptile),
        ("metasgd", {}, MetaOptimizer),
    ],
)
def test_sinusoid_runs_each_algorithm(algorithm, options, kind, monkeypatch):
    from maml_ext.experiments import sinusoid

    built = []
    original = sinusoid._train_maml

    def recording(optimizer, *args, **kwargs):
        built.append(optimizer)
        return original(optimizer, *args, **kwargs)

    monkeypatch.setattr(sinusoid, "_train_maml", recording)
    report = sinusoid.train_sinusoid(
        iterations=3,
        out_dir=None,
        meta_batch=4,
        eval_tasks=4,
        eval_steps=(1,),
        plot_tasks=0,
        progress=False,
        verbose=False,
        algorithm=algorithm,
        algorithm_options=options,
        inner_steps=2,
    )
    assert type(built[0]) is kind
    assert report["config"]["algorithm"] == algorithm
    if algorithm == "reptile":
        assert report["config"]["algorithm_options"]["anneal"] == 3
        assert built[0].meta_steps == 3
    assert report["results"]["MAML"]["1"]["mse"] > 0
