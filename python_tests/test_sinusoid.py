"""The sinusoid task distribution, the evaluation helpers, the CLI and a short end-to-end run."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from maml_ext.experiments import reporting, sinusoid as experiment
from maml_ext.tasks import Sinusoid, SinusoidBatch

# --- task distribution -----------------------------------------------------------------------


def test_sample_shapes_and_dtype():
    batch = Sinusoid(support=7, query=13, seed=0).sample(5, dtype=torch.float64)
    assert isinstance(batch, SinusoidBatch)
    assert batch.support_x.shape == batch.support_y.shape == (5, 7, 1)
    assert batch.query_x.shape == batch.query_y.shape == (5, 13, 1)
    assert batch.amplitude.shape == batch.phase.shape == (5,)
    assert all(tensor.dtype == torch.float64 for tensor in batch)


def test_defaults_are_the_papers():
    tasks = Sinusoid()
    assert (tasks.support, tasks.query) == (10, 10)
    assert tasks.amplitude_range == (0.1, 5.0)
    assert tasks.phase_range == (0.0, math.pi)
    assert tasks.x_range == (-5.0, 5.0)


def test_parameters_and_inputs_cover_their_ranges():
    batch = Sinusoid(seed=1).sample(4000, dtype=torch.float64)
    x = torch.cat([batch.support_x, batch.query_x], dim=1)
    for values, (low, high) in [
        (batch.amplitude, (0.1, 5.0)),
        (batch.phase, (0.0, math.pi)),
        (x, (-5.0, 5.0)),
    ]:
        assert values.min() >= low and values.max() <= high
        # Uniform over the whole range, not a corner of it.
        span = high - low
        assert values.min() < low + 0.01 * span and values.max() > high - 0.01 * span
        assert abs(values.mean().item() - (low + high) / 2) < 0.03 * span


def test_targets_follow_the_papers_phase_convention():
    # cbfinn/maml: outputs = amp * np.sin(inputs - phase)
    batch = Sinusoid(seed=2).sample(50, dtype=torch.float64)
    amplitude = batch.amplitude[:, None, None]
    phase = batch.phase[:, None, None]
    torch.testing.assert_close(batch.support_y, amplitude * torch.sin(batch.support_x - phase))
    torch.testing.assert_close(batch.query_y, amplitude * torch.sin(batch.query_x - phase))
    assert not torch.allclose(batch.support_y, amplitude * torch.sin(batch.support_x + phase))


def test_same_seed_same_tasks_other_seed_other_tasks():
    first = Sinusoid(seed=3).sample(8)
    again = Sinusoid(seed=3).sample(8)
    other = Sinusoid(seed=4).sample(8)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first.amplitude, other.amplitude)


def test_dtype_does_not_change_the_tasks():
    single = Sinusoid(seed=5).sample(6, dtype=torch.float32)
    double = Sinusoid(seed=5).sample(6, dtype=torch.float64)
    for a, b in zip(single, double):
        torch.testing.assert_close(a, b.float())


def test_state_dict_resumes_the_stream():
    uninterrupted = Sinusoid(seed=6)
    uninterrupted.sample(4)
    expected = uninterrupted.sample(4)

    interrupted = Sinusoid(seed=6)
    interrupted.sample(4)
    saved = interrupted.state_dict()
    resumed = Sinusoid(seed=999)
    resumed.load_state_dict(saved)
    for a, b in zip(resumed.sample(4), expected):
        assert torch.equal(a, b)


def test_accepts_a_generator():
    generator = torch.Generator().manual_seed(7)
    from_generator = Sinusoid(seed=generator).sample(3)
    from_int = Sinusoid(seed=7).sample(3)
    assert torch.equal(from_generator.support_x, from_int.support_x)


def test_grid_is_the_true_function_on_evenly_spaced_points():
    tasks = Sinusoid(seed=8)
    batch = tasks.sample(3)
    x, y = tasks.grid(batch.amplitude, batch.phase, points=21)
    assert x.shape == y.shape == (3, 21, 1)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x[1, :, 0], torch.linspace(-5, 5, 21))
    expected = batch.amplitude[:, None, None] * torch.sin(x - batch.phase[:, None, None])
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize(
    "kwargs", [dict(support=0), dict(query=-1), dict(amplitude=(5.0, 0.1)), dict(x_range=(1, -1))]
)
def test_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        Sinusoid(**kwargs)


# --- evaluation helpers ----------------------------------------------------------------------


def test_mean_ci95_on_a_known_sample():
    mean, half_width, std = reporting.mean_ci95([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == pytest.approx(3.0)
    # sample std = sqrt(2.5); 1.96 * sqrt(2.5) / sqrt(5) = 1.96 * sqrt(0.5)
    assert std == pytest.approx(math.sqrt(2.5))
    assert half_width == pytest.approx(1.96 * math.sqrt(0.5))
    assert reporting.mean_ci95(torch.tensor([2.5])) == (2.5, 0.0, 0.0)
    with pytest.raises(ValueError):
        reporting.mean_ci95([])


def test_sgd_adapt_takes_plain_per_task_sgd_steps():
    torch.manual_seed(0)
    model = experiment.make_sinusoid_model().double()
    batch = Sinusoid(seed=9).sample(3, dtype=torch.float64)
    adapted = experiment.sgd_adapt(model, batch.support_x, batch.support_y, steps=2, inner_lr=0.05)
    for task in range(3):
        weights = {
            name: p.detach().clone().requires_grad_() for name, p in model.named_parameters()
        }
        for _ in range(2):
            prediction = torch.func.functional_call(model, weights, (batch.support_x[task],))
            loss = F.mse_loss(prediction, batch.support_y[task])
            grads = torch.autograd.grad(loss, list(weights.values()))
            weights = {
                name: (w - 0.05 * g).detach().requires_grad_()
                for (name, w), g in zip(weights.items(), grads)
            }
        for name, w in weights.items():
            torch.testing.assert_close(adapted[name][task], w.detach())
    predictions = experiment.predict_per_task(model, adapted, batch.query_x)
    assert predictions.shape == batch.query_y.shape


def test_mse_table_has_a_row_per_method_and_a_column_per_step():
    results = {
        method: {str(s): {"mse": 1.0 + s, "ci95": 0.25} for s in experiment.EVAL_STEPS}
        for method in ("MAML", "pretrained")
    }
    lines = reporting.mse_table(results, experiment.EVAL_STEPS).splitlines()
    assert lines[0].split()[:3] == ["method", "0", "steps"]
    assert lines[2].startswith("MAML") and "11.000 ± 0.250" in lines[2]
    assert lines[3].startswith("pretrained")


# --- command line ----------------------------------------------------------------------------


def test_cli_rejects_an_unknown_experiment_listing_the_choices(capsys):
    from maml_ext.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "no-such-preset"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "invalid choice: 'no-such-preset'" in error and "'sinusoid'" in error


def test_cli_passes_only_the_options_given(monkeypatch):
    from maml_ext.cli import main

    calls = []
    monkeypatch.setattr(experiment, "train_sinusoid", lambda **options: calls.append(options) or {})
    assert (
        main(
            [
                "train",
                "sinusoid",
                "--iterations",
                "7",
                "--backend",
                "reference",
                "--meta-batch",
                "3",
            ]
        )
        == 0
    )
    assert calls == [dict(iterations=7, backend="reference", meta_batch=3, out_dir="runs/sinusoid")]


# --- end to end (needs maml_ext.MetaOptimizer) -----------------------------------------------


def test_sgd_adapt_matches_meta_optimizer_adapt():
    """Both methods are fine-tuned the same way: MetaOptimizer.adapt for MAML, sgd_adapt for the
    baseline."""
    from maml_ext import MetaOptimizer

    torch.manual_seed(1)
    model = experiment.make_sinusoid_model()
    meta_optimizer = MetaOptimizer(
        model,
        torch.optim.Adam(model.parameters(), lr=1e-3),
        inner_lr=0.01,
        loss="mse",
        backend="reference",
    )
    batch = Sinusoid(seed=10).sample(4)
    ours = experiment.sgd_adapt(model, batch.support_x, batch.support_y, steps=3, inner_lr=0.01)
    theirs = meta_optimizer.adapt(batch.support_x, batch.support_y, steps=3)
    assert set(ours) == set(theirs)
    for name in ours:
        torch.testing.assert_close(theirs[name], ours[name], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        meta_optimizer.predict(theirs, batch.query_x),
        experiment.predict_per_task(model, ours, batch.query_x),
        rtol=1e-4,
        atol=1e-5,
    )


def test_short_training_run_writes_its_results_and_adaptation_helps(tmp_path):
    report = experiment.train_sinusoid(
        iterations=30,
        out_dir=str(tmp_path),
        seed=0,
        backend="reference",
        eval_tasks=50,
        progress=False,
        verbose=False,
        log_every=10,
    )
    json_path = tmp_path / "sinusoid_eval.json"
    assert json_path.is_file() and (tmp_path / "sinusoid_adaptation.png").stat().st_size > 0
    assert (tmp_path / "sinusoid_models.pt").is_file()
    written = json.loads(json_path.read_text())
    assert written["seed"] == 0 and written["config"]["iterations"] == 30
    assert written["results"] == report["results"]
    assert [point[0] for point in written["train_curves"]["MAML"]] == [10, 20, 30]
    for method in ("MAML", "pretrained"):
        for steps in ("0", "1", "5", "10"):
            cell = written["results"][method][steps]
            assert math.isfinite(cell["mse"]) and cell["ci95"] > 0
    # One inner step on the support points must improve the fit of the whole function.
    maml = written["results"]["MAML"]
    assert maml["1"]["mse"] < maml["0"]["mse"]


def test_training_is_deterministic_given_the_seed():
    def run():
        return experiment.train_sinusoid(
            iterations=5,
            out_dir=None,
            seed=3,
            backend="reference",
            meta_batch=4,
            eval_tasks=10,
            plot_tasks=0,
            progress=False,
            verbose=False,
        )

    threads = torch.get_num_threads()
    first, second = run(), run()
    assert torch.get_num_threads() == threads  # the run's single-thread setting is undone
    assert first["results"] == second["results"]
    assert first["train_curves"] == second["train_curves"]
