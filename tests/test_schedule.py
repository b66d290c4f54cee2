"""The learning-rate schedule follows the larger of the step and time fractions spent: a run bounded by
``trainer.max_time`` anneals by its end, a step-driven schedule is unchanged, and a resumed run continues the schedule
where it stopped (the elapsed training time travels in the checkpoint).  Time comes from a fake clock: one second per
training batch."""

from __future__ import annotations

import math
import types

import lightning as L
import pandas as pd
import pytest
import torch

from potentials.training.run import run
from potentials.training.schedule import WarmupCosine, cosine_factor
from tests.train_config import train_config

MIN = 0.01


def _old_step_schedule(step: int, warm: int, total: int) -> float:
    """The step-only schedule: linear warmup, then cosine over the remaining steps."""
    if step < warm:
        return (step + 1) / warm
    progress = min((step - warm) / max(total - warm, 1), 1.0)
    return MIN + (1 - MIN) * 0.5 * (1 + math.cos(math.pi * progress))


def test_step_driven_schedule_is_unchanged():
    for step in range(0, 130):
        expected = _old_step_schedule(step, 10, 120)
        assert cosine_factor(step, 0.0, warmup=10, total=120, budget=None, min_lr_ratio=MIN) == expected
        # a time budget that a run ending by its steps spends at a steady rate never takes over
        elapsed = 100.0 * step / 120
        assert cosine_factor(step, elapsed, warmup=10, total=120, budget=110.0, min_lr_ratio=MIN) == expected


def test_time_limited_schedule_anneals_by_the_end_of_its_budget():
    """``max_epochs=100000`` (a step budget never reached) and 100 s at one step per second."""
    factors = [cosine_factor(s, float(s + 1), warmup=50, total=10_000_000, budget=100.0, min_lr_ratio=MIN)
               for s in range(100)]
    # warmup by time: 10 s (10 % of the budget) is reached before 50 steps
    assert factors[0] == pytest.approx(1 / 10) and max(factors) == pytest.approx(1.0)
    peak = factors.index(max(factors))
    assert 9 <= peak <= 11  # warmup ends by 10 % of the time budget
    assert all(b <= a + 1e-15 for a, b in zip(factors[peak:], factors[peak + 1:], strict=False))
    assert factors[-1] == pytest.approx(MIN, abs=1e-12)  # at t = budget
    assert factors[-2] < 2 * MIN
    # continuous in (step, time): the ramp rises by a tenth a second, the cosine falls by at most π/2 / 90 a second
    assert max(abs(b - a) for a, b in zip(factors[:peak + 1], factors[1:peak + 1], strict=False)) < 0.1 + 1e-12
    assert max(abs(b - a) for a, b in zip(factors[peak:], factors[peak + 1:], strict=False)) < 0.018


def _lrs(scheduler: WarmupCosine, optimizer: torch.optim.Optimizer, clock: list[float], steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        clock[0] += 1.0
        optimizer.step()
        scheduler.step()
        out.append(optimizer.param_groups[0]["lr"])
    return out


def _scheduler(clock: list[float]) -> tuple[WarmupCosine, torch.optim.Optimizer]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    return WarmupCosine(optimizer, warmup=5, total=1000, budget=60.0, min_lr_ratio=MIN,
                        clock=lambda: clock[0]), optimizer


def test_scheduler_records_the_time_and_a_resume_continues_from_it():
    clock = [0.0]
    scheduler, optimizer = _scheduler(clock)
    whole = _lrs(scheduler, optimizer, clock, 50)

    clock = [0.0]
    scheduler, optimizer = _scheduler(clock)
    first = _lrs(scheduler, optimizer, clock, 20)
    state = {"scheduler": scheduler.state_dict(), "optimizer": optimizer.state_dict()}
    assert state["scheduler"]["elapsed"] == 20.0 and "clock" not in state["scheduler"]
    torch.save(state, _buffer := __import__("io").BytesIO())  # the state is plain data
    # the resumed run's clock carries the earlier attempt's time (as Lightning's Timer does): the same schedule
    clock = [20.0]
    resumed, optimizer = _scheduler(clock)
    optimizer.load_state_dict(state["optimizer"])
    resumed.load_state_dict(state["scheduler"])
    assert first + _lrs(resumed, optimizer, clock, 30) == whole
    # a clock that restarts from zero cannot send the schedule back to its peak: the recorded time is a floor
    clock = [0.0]
    restarted, optimizer = _scheduler(clock)
    optimizer.load_state_dict(state["optimizer"])
    restarted.load_state_dict(state["scheduler"])
    later = _lrs(restarted, optimizer, clock, 5)
    assert max(later) <= first[-1]


# ---- end to end: train.py's pipeline with a fake clock (one second per training batch) ----

class Tick(L.Callback):
    """Advances the fake clock by one second as every training batch starts (and notes the step)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        _NOW[0] += 1.0
        _STEPS.append(trainer.global_step)


class Crash(L.Callback):
    """Raises as training batch ``step`` starts (after the checkpoint of the step before)."""

    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            raise _Crash(f"crash at step {self.step}")


class _Crash(RuntimeError):
    pass


_NOW = [0.0]
_STEPS: list[int] = []


@pytest.fixture
def fake_clock(monkeypatch):
    """Lightning's Timer (trainer.max_time) reads the fake clock."""
    import lightning.pytorch.callbacks.timer as timer

    monkeypatch.setattr(timer, "time", types.SimpleNamespace(monotonic=lambda: _NOW[0]))
    yield


def _config(run_dir, data_root, *extra):
    return train_config(run_dir, data_root, "logger=csv", "trainer.max_epochs=100000", "trainer.max_time=00:00:00:40",
                        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
                        "trainer.log_every_n_steps=1", "data.source.n_structures=22", "data.split.val=4",
                        "data.split.test=2", "data.batch_size=4", "model.channels=8", "model.num_layers=1",
                        "training.warmup_steps=3", "test=false", "demo_relax=false", "figures=false", "export=false",
                        "checkpoint.every_n_train_steps=1", "+callbacks.tick._target_=tests.test_schedule.Tick",
                        *extra)


def _lr_log(run_dir) -> pd.Series:
    rows = pd.read_csv(run_dir / "csv" / "metrics.csv")
    column = next(c for c in rows.columns if c.startswith("lr-"))
    return rows.dropna(subset=[column]).set_index("step")[column]


def test_a_run_bounded_by_max_time_anneals_and_resumes_on_schedule(tmp_path, data_root, fake_clock):
    peak = 5e-3
    whole = tmp_path / "whole"
    run(_config(whole, data_root))
    lrs = _lr_log(whole)
    assert 38 <= len(lrs) <= 41  # stopped by the 40 s budget, one batch a second
    assert lrs.max() == pytest.approx(peak) and lrs.iloc[-1] < 0.03 * peak  # annealed by the end
    ckpt = torch.load(whole / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["lr_schedulers"][0]["elapsed"] == pytest.approx(ckpt["global_step"], abs=1)

    # killed after step 17 and rerun: the same rates at every step (the time of both attempts counts)
    parts = tmp_path / "parts"
    with pytest.raises(_Crash):
        run(_config(parts, data_root, "+callbacks.crash._target_=tests.test_schedule.Crash",
                    "+callbacks.crash.step=17"))
    _NOW[0] += 1000.0  # time between the attempts is not training time
    _STEPS.clear()
    run(_config(parts, data_root))
    assert _STEPS[0] == 17  # resumed, not started afresh
    resumed = _lr_log(parts)
    pd.testing.assert_series_equal(resumed, lrs, check_exact=True)

    # training.schedule_by=steps: the steps alone drive the schedule, which 100000 epochs never anneal
    steps = tmp_path / "steps"
    run(_config(steps, data_root, "training.schedule_by=steps"))
    assert _lr_log(steps).iloc[-1] > 0.99 * peak
