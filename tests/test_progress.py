"""Readable logs: with stdout going to a file, training progress is a log line per epoch (and every N batches in
long epochs) instead of Lightning's carriage-return bar redraws; on a terminal the bar stays."""

from __future__ import annotations

import io
import logging
import math
import re
import subprocess
import sys
from pathlib import Path

from lightning.pytorch.callbacks import TQDMProgressBar

from potentials.training.progress import MIN_EVERY_N_STEPS, TextProgress, plain_progress
from potentials.training.run import run
from tests.train_config import train_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ["logger=csv", "trainer.max_time=null", "model.channels=8", "model.num_layers=1", "data.source.n_structures=24",
        "data.batch_size=4", "data.split.val=4", "data.split.test=4", "test=false", "export=false", "figures=false",
        "demo_relax=false", "checkpoint.every_n_minutes=null"]  # 16 training structures: 4 batches per epoch
LINE = re.compile(r"epoch (\d+)/(\d+) \| (?:batch (\d+)/4 \| )?step (\d+) \| loss ([-+.\deE]+)(.*)$")


def _progress(text: str) -> list[tuple[int, int | None, int, float, str]]:
    """(epoch, batch or None, step, loss, rest) of every progress line."""
    found = [LINE.search(line) for line in text.splitlines()]
    return [(int(m[1]), int(m[3]) if m[3] else None, int(m[4]), float(m[5]), m[6]) for m in found if m]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_run_written_to_a_file_has_one_progress_line_per_epoch(tmp_path):
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={tmp_path / 'run'}",
           f"data_root={tmp_path / 'data'}", "trainer.max_epochs=3", *TINY]
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.run(cmd, stdout=stdout, stderr=stderr, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, err.read_text()[-3000:]
    text = out.read_text()
    assert "\r" not in text and "\r" not in err.read_text()
    lines = _progress(text)
    assert [(epoch, batch, step) for epoch, batch, step, _, _ in lines] == [(1, None, 4), (2, None, 8), (3, None, 12)]
    assert all(math.isfinite(loss) and loss > 0 and re.match(r" \| val/force_mae [\d.]+ \| \d+ s$", rest)
               for _, _, _, loss, rest in lines), lines
    assert [line[:3] for line in _progress((tmp_path / "run" / "train.log").read_text())] == [
        line[:3] for line in lines]  # the run's own log holds the same lines


def test_lines_every_n_batches_within_an_epoch(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="potentials")
    run(train_config(tmp_path / "run", tmp_path / "data", *TINY, "trainer.max_epochs=2",
                     "+callbacks.progress._target_=potentials.training.progress.TextProgress",
                     "+callbacks.progress.every_n_steps=3"))
    lines = _progress(caplog.text)
    assert [(epoch, batch, step) for epoch, batch, step, _, _ in lines] == [(1, 3, 3), (1, None, 4), (2, 3, 7),
                                                                            (2, None, 8)]
    assert "val/" not in lines[0][4] and "val/force_mae" in lines[1][4]  # validation runs at the end of the epoch


def test_text_progress_only_off_a_terminal():
    (text,) = plain_progress([], enabled=True, stream=io.StringIO())
    assert isinstance(text, TextProgress)
    assert plain_progress([], enabled=True, stream=_Terminal()) == []  # Lightning's bar
    assert plain_progress([], enabled=False, stream=io.StringIO()) == []  # trainer.enable_progress_bar=false
    assert plain_progress([TQDMProgressBar()], enabled=True, stream=io.StringIO()) == []  # configured by the user


def test_mid_epoch_interval():
    auto = TextProgress()
    assert auto.interval(4) == auto.interval(40) == MIN_EVERY_N_STEPS  # short epochs: the epoch line only
    assert auto.interval(4600) == 460 and auto.interval(float("inf")) == 1000
    assert TextProgress(every_n_steps=7).interval(4600) == 7
