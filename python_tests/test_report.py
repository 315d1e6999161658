"""``python -m maml_ext report``: its plumbing end to end on tiny budgets (``--quick``, real
Omniglot images), its cache, its errors, and the pieces its numbers rest on (the task-switching
protocol against a per-task autograd loop, the sinusoid's mean function)."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from maml_ext import MetaOptimizer
from maml_ext.cli import main
from maml_ext.experiments import task_switching as switching
from maml_ext.experiments.presets import ConfigurationError
from maml_ext.experiments.report import SWITCH_STEPS, run_report
from maml_ext.experiments.report_cache import RunCache
from maml_ext.experiments.report_fewshot import FewShotScale
from maml_ext.experiments.sinusoid import make_sinusoid_model
from maml_ext.tasks.sinusoid import Sinusoid

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _report(out, cache, omniglot_root):
    argv = ["report", "--quick", "--out", str(out), "--cache", str(cache)]
    assert main(argv + ["--data-dir", str(omniglot_root)]) == 0
    return (out / "RESULTS.md").read_text()


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory, omniglot_root):
    root = tmp_path_factory.mktemp("report")
    text = _report(root / "docs", root / "cache", omniglot_root)
    return root, text


def _tables(text: str) -> list[list[list[str]]]:
    """Every markdown table of ``text`` as rows of cells (header first, rule dropped)."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if not all(set(cell) <= {"-"} for cell in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


def _table_headed(text: str, *header_start: str) -> list[list[str]]:
    matches = [t for t in _tables(text) if tuple(t[0][: len(header_start)]) == header_start]
    assert len(matches) == 1, f"expected one table headed {header_start!r}"
    return matches[0]


CELL = re.compile(r"^-?\d+\.\d+ ± \d+\.\d+$")


def test_quick_report_has_every_section_and_figure(quick_report):
    root, text = quick_report
    for heading in (
        "## 1. Sinusoid regression",
        "## 2. First order against second order",
        "## 3. More steps at test time",
        "## 4. Omniglot 5-way 1-shot",
        "## 5. Is an adapted network",
        "### Sinusoid (MSE)",
        "### Omniglot 5-way 1-shot (accuracy (%))",
    ):
        assert heading in text
    figures = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert len(figures) == 4
    for figure in figures:
        assert (root / "docs" / figure).read_bytes()[:8] == PNG_MAGIC
    assert "torch " + torch.__version__ in text
    assert "python -m maml_ext report --quick" in text


def test_quick_report_tables_have_every_row_and_column(quick_report):
    _, text = quick_report
    sinusoid = _table_headed(text, "method", "0 steps")
    rows = {row[0]: row[1:] for row in sinusoid[1:]}
    tasks = 20  # SinusoidScale.quick().eval_tasks
    for method in ("MAML", "pretrained"):
        assert len(rows[f"**{method}**"]) == 4 and all(map(CELL.match, rows[f"**{method}**"]))
        assert all(float(cell) > 0 for cell in rows[f"{method}: median"])
        worse = [cell.split(" of ") for cell in rows[f"{method}: tasks made worse"]]
        assert worse[0] == ["0", str(tasks)] and all(0 <= int(n) <= tasks for n, _ in worse)
        # Before adaptation no task is left out: the mean over "the others" is the mean.
        assert rows[f"{method}: mean over the others"][0] == rows[f"**{method}**"][0]
    assert CELL.match(rows["best fixed network (the mean function)"][0])

    steps = _table_headed(text, "sinusoid", "0")
    assert len(steps[0]) == 12 and len(steps) == 5 and all(len(row) == 12 for row in steps)
    omniglot_steps = _table_headed(text, "Omniglot 5w1s")
    assert [row[0] for row in omniglot_steps[1:]] == ["MAML", "pretrained"]

    order = _table_headed(text, "sinusoid", "0 steps")
    assert [row[0] for row in order[1:]] == ["MAML, second order", "MAML, first order"]
    for row in order[1:]:
        assert all(CELL.match(cell) for cell in row[1:5]) and float(row[5]) > 0
    for preset in ("omniglot-5w1s", "omniglot-20w1s"):
        table = _table_headed(text, preset)
        assert [row[0] for row in table[1:]] == ["second order", "first order"]
        for row in table[1:]:
            assert CELL.match(row[1]) and CELL.match(row[2]) and row[5]
            timed = re.match(r"^(\d+\.\d+) \(load (\d+\.\d+)\)$", row[3])
            assert timed and float(timed.group(1)) > 0 and float(row[4]) > 0

    long = _table_headed(text, "inner steps")
    steps = FewShotScale.quick().eval_steps
    assert [row[0] for row in long[1:]] == [str(k) for k in range(steps + 1)]
    assert all(CELL.match(row[1]) and CELL.match(row[2]) for row in long[1:])

    switching_tables = [t for t in _tables(text) if t[0][:2] == ["method", "k"]]
    assert len(switching_tables) == 2
    for table in switching_tables:
        assert len(table[0]) == 2 + len(switching.CONDITIONS) + len(switching.DIFFERENCES)
        expected = [(m, str(k)) for m in ("MAML", "pretrained") for k in SWITCH_STEPS]
        assert [(row[0], row[1]) for row in table[1:]] == expected
        assert all(CELL.match(cell) for row in table[1:] for cell in row[2:])


def test_report_reads_unchanged_runs_back_from_its_cache(quick_report, omniglot_root):
    root, first = quick_report
    again = _report(root / "again", root / "cache", omniglot_root)
    reused = re.search(r"runs read from the cache: (.*)", again).group(1).split(", ")
    assert sorted(reused) == sorted(
        [
            *(f"sinusoid-{order}-order" for order in ("first", "second")),
            *(
                f"omniglot-{p}-{order}-order{timing}"
                for p in ("5w1s", "20w1s")
                for order in ("first", "second")
                for timing in ("", "-timing")
            ),
            "omniglot-5w1s-long",
            "sinusoid-test-steps",
            "sinusoid-switching",
            "omniglot-switching",
        ]
    )
    # Every result table is the same; the last one lists the runs, now all reused.
    assert _tables(again)[:-1] == _tables(first)[:-1]
    runs_first, runs_again = _tables(first)[-1], _tables(again)[-1]
    assert runs_first[0][:2] == ["run", "this time"] and len(runs_first) == len(reused) + 1
    assert {row[1] for row in runs_first[1:]} == {"run now"}
    assert {row[1] for row in runs_again[1:]} == {"reused"}


def test_report_errors_name_the_argument_and_write_nothing(tmp_path):
    with pytest.raises(ConfigurationError, match="data_dir \\(--data-dir\\)"):
        run_report(tmp_path / "docs", cache_dir=tmp_path / "cache", quick=True)
    with pytest.raises(ConfigurationError, match="sections: expected some of"):
        run_report(tmp_path / "docs", quick=True, sections=["sinusoid", "plots"])
    assert not (tmp_path / "docs").exists() and not (tmp_path / "cache").exists()


def test_run_cache_keys_by_settings_and_recomputes_interrupted_runs(tmp_path):
    cache = RunCache(tmp_path)
    calls = []

    def compute(folder):
        calls.append(folder)
        return {"value": len(calls)}

    assert cache.run("run", {"a": 1}, compute) == {"value": 1}
    assert cache.run("run", {"a": 1}, compute) == {"value": 1} and cache.hits == ["run"]
    assert cache.run("run", {"a": 2}, compute) == {"value": 2}
    assert calls[0] != calls[1]

    def interrupted(folder):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.run("other", {"a": 1}, interrupted)
    assert not (cache.folder("other", {"a": 1}) / "result.json").exists()
    assert cache.run("other", {"a": 1}, compute) == {"value": 3}


# --------------------------------------------------------------------------------------------
# The task-switching protocol against a per-task autograd loop, in float64


def _loop_sgd(model, start, x, y, steps, lr):
    """One task at a time, torch.autograd.grad on a copy of the model."""
    adapted = []
    for t in range(x.shape[0]):
        weights = {name: w[t].clone().requires_grad_() for name, w in start.items()}
        for _ in range(steps):
            out = torch.func.functional_call(model, weights, (x[t],))
            loss = F.mse_loss(out, y[t])
            grads = torch.autograd.grad(loss, list(weights.values()))
            weights = {
                name: (w - lr * g).detach().requires_grad_()
                for (name, w), g in zip(weights.items(), grads)
            }
        adapted.append({name: w.detach() for name, w in weights.items()})
    return {name: torch.stack([a[name] for a in adapted]) for name in start}


def _loop_mse(model, weights, x, y):
    return torch.stack(
        [
            F.mse_loss(
                torch.func.functional_call(model, {n: w[t] for n, w in weights.items()}, (x[t],)),
                y[t],
            )
            for t in range(x.shape[0])
        ]
    )


@pytest.fixture
def sinusoid_pairs(seed):
    torch.manual_seed(seed)
    model = make_sinusoid_model().double()
    source = Sinusoid(support=10, query=20, seed=seed)
    a, b = source.sample(4, dtype=torch.float64), source.sample(4, dtype=torch.float64)
    return model, a, b


def test_functional_sgd_matches_metaoptimizer_adapt(sinusoid_pairs):
    model, a, _ = sinusoid_pairs
    meta = MetaOptimizer(model, None, inner_lr=0.05, loss="mse", backend="reference")
    expected = meta.adapt(a.support_x, a.support_y, steps=3)
    got = switching.functional_sgd(
        model, switching.repeat_weights(model, 4), a.support_x, a.support_y, 3, 0.05, "mse"
    )
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-12)


def test_switching_scores_match_a_per_task_loop(sinusoid_pairs):
    model, a, b = sinusoid_pairs
    steps, lr = 2, 0.05
    start = switching.repeat_weights(model, 4)
    scores = switching.switching_scores(
        model,
        start,
        (a.support_x, a.support_y, a.query_x, a.query_y),
        (b.support_x, b.support_y, b.query_x, b.query_y),
        steps,
        lr,
        "mse",
        switching.per_task_mse(model),
    )
    phi_a = _loop_sgd(model, start, a.support_x, a.support_y, steps, lr)
    phi_b = _loop_sgd(model, start, b.support_x, b.support_y, steps, lr)
    phi_ab = _loop_sgd(model, phi_a, b.support_x, b.support_y, steps, lr)
    phi_aba = _loop_sgd(model, phi_ab, a.support_x, a.support_y, steps, lr)
    expected = {
        "A from θ": _loop_mse(model, phi_a, a.query_x, a.query_y),
        "B from θ": _loop_mse(model, phi_b, b.query_x, b.query_y),
        "B from φ_A": _loop_mse(model, phi_ab, b.query_x, b.query_y),
        "A after B": _loop_mse(model, phi_ab, a.query_x, a.query_y),
        "A from φ_AB": _loop_mse(model, phi_aba, a.query_x, a.query_y),
    }
    assert set(scores) == set(switching.CONDITIONS)
    for condition, values in expected.items():
        torch.testing.assert_close(scores[condition], values, rtol=0, atol=1e-12)
    summary = switching.summarise_switching(scores)
    difference = (expected["B from φ_A"] - expected["B from θ"]).mean().item()
    assert summary["B: from φ_A − from θ"]["mean"] == pytest.approx(difference, abs=1e-12)


def test_per_task_accuracy_counts_argmax_hits():
    model = nn.Linear(2, 3, bias=False).double()
    weights = {"weight": torch.eye(3, 2, dtype=torch.float64).expand(2, 3, 2).clone()}
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 2.0]]], dtype=torch.float64)
    y = torch.tensor([[0, 0], [0, 1]])
    assert switching.per_task_accuracy(model)(weights, x, y).tolist() == [0.5, 1.0]


def test_sinusoid_floor_is_the_phase_average_of_the_task_functions():
    """The report's best fixed network, E[A] (cos(x − b) − cos(x − a)) / (b − a), against a
    numerical average of A sin(x − φ) over a fine grid of phases in [a, b] = [0, π]."""
    from maml_ext.experiments.report import _sinusoid_floor, sinusoid_mean_function

    x = torch.linspace(-5, 5, 101, dtype=torch.float64)
    phases = torch.linspace(0, math.pi, 20001, dtype=torch.float64)
    numeric = torch.sin(x[:, None] - phases[None, :])
    numeric = 2.55 * torch.trapezoid(numeric, phases, dim=1) / math.pi
    closed = sinusoid_mean_function(x, (0.1, 5.0), (0.0, math.pi))
    torch.testing.assert_close(closed, numeric, rtol=0, atol=1e-8)
    # On many tasks the floor approaches its expectation over the distribution:
    # E[A²]/2 − E[A]² (4/π²) mean_x cos² x, with mean_x over the 100-point grid.
    grid = torch.linspace(-5, 5, 100, dtype=torch.float64)
    expected = (5.0**3 - 0.1**3) / (3 * 4.9) / 2 - 2.55**2 * 4 / math.pi**2 * (
        torch.cos(grid) ** 2
    ).mean().item()
    floor = _sinusoid_floor(20000)
    assert abs(floor["mse"] - expected) < 2 * floor["ci95"]


def test_report_of_the_sinusoid_sections_alone_needs_no_omniglot(tmp_path):
    path = run_report(
        tmp_path / "docs", cache_dir=None, quick=True, sections=["sinusoid"], verbose=False
    )
    text = path.read_text()
    assert "## 1. Sinusoid regression" in text and "## 3. More steps at test time" in text
    assert "Omniglot 5-way 1-shot at about an hour" not in text and "omniglot-5w1s" not in text
    assert (tmp_path / "docs" / "results" / "test_steps.png").read_bytes()[:8] == PNG_MAGIC
    # cache_dir=None keeps nothing: no cache folder appears under the output.
    assert sorted(p.name for p in (tmp_path / "docs").iterdir()) == ["RESULTS.md", "results"]
