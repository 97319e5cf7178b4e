"""What a sweep prints: trials named by what varies, sorted by held-out loss, with their standard errors."""

import logging
import math
import time

from tune_lfm.console import LiveTable, results_table, show_first_slow_warning_only, trial_line, varied_settings
from tune_lfm.config import TrialConfig


def row(trial_id, dataset, eval_loss, status="completed", **extra):
    return {**TrialConfig(dataset=dataset, model="tiny-lfm2").to_dict(), "trial_id": trial_id, "status": status,
            "eval_loss": eval_loss, "eval_loss_se": 0.01, "improvement": 0.3, "improvement_se": 0.02, "kl": 0.2,
            "kl_se": 0.005, "trainable_params": 26624, "wall_s": 61.2, **extra}


def test_table_names_trials_by_what_varies_best_first_and_failures_last():
    rows = [row("b", "alpaca", 2.5, lora_rank=4), row("c", "alpaca", math.nan, status="failed", error="boom"),
            row("a", "alpaca", 2.1, lora_rank=16)]
    assert varied_settings(rows) == ["lora_rank"]
    lines = results_table(rows).splitlines()
    assert lines[0].split() == ["trial_id", "lora_rank", "status", "eval_loss", "improvement", "probe_loss", "kl",
                                "params", "wall_s"]
    assert [line.split()[0] for line in lines[2:]] == ["a", "b", "c"]  # one dataset: lowest held-out loss first
    assert "2.1000±0.0100" in lines[2] and "26,624" in lines[2] and lines[4].split()[3] == "-"


def test_trials_of_different_datasets_are_ordered_on_the_shared_probe_set():
    """Held-out losses of different datasets are on different rows: gsm8k's low one says gsm8k is easy, not that
    training helped most. The probe set is the same for every trial."""
    rows = [row("g", "gsm8k", 1.9, probe_loss=6.30, probe_loss_se=0.02),
            row("u", "ultrachat", 2.6, probe_loss=6.28, probe_loss_se=0.02)]
    lines = results_table(rows).splitlines()
    assert [line.split()[0] for line in lines[2:]] == ["u", "g"] and "6.2800±0.0200" in lines[2]


def test_a_finished_trial_is_one_line_and_a_failed_one_says_why():
    rows = [row("a", "alpaca", 2.1), row("c", "dolly", math.nan, status="failed", error="CUDA out of memory")]
    assert trial_line(rows[0], ["dataset"]) == ("a  dataset=alpaca  completed  eval 2.1000±0.0100  "
                                                "gain 0.3000±0.0200  kl 0.2000±0.0050  61 s")
    assert trial_line(rows[1], ["dataset"]).endswith("failed: CUDA out of memory")
    assert trial_line(rows[0], []).startswith("a  completed  eval")  # a sweep of one trial: nothing varies


class Terminal:
    """A stream that says it is a terminal and replays what was written to it as the screen would show it."""

    def __init__(self):
        self.text = ""

    def isatty(self):
        return True

    def write(self, text):
        self.text += text

    def flush(self):
        pass

    def screen(self) -> list[str]:
        lines: list[str] = []
        for chunk in self.text.split("\x1b[1A\x1b[2K"):
            if chunk is not self.text and lines:  # each erase removes the last completed line
                lines.pop()
            lines.extend(chunk.splitlines())
        return lines


def test_live_table_redraws_running_trials_in_place_and_keeps_log_lines_above(monkeypatch):
    from tune_lfm import console

    terminal = Terminal()
    monkeypatch.setattr(console.sys, "stderr", terminal)
    config = TrialConfig(dataset="gsm8k", max_steps=60).to_dict()
    with LiveTable(["dataset"], stream=terminal, min_interval_s=0) as table:
        table.start("a1", config)
        table.step("a1", config, {"step": 30, "loss": 1.23456, "tokens_per_s": 2345.6, "elapsed_s": 60.0})
        table.start("b2", {**config, "dataset": "dolly"})
        console.log("a1  dataset=gsm8k  completed")
        table.finish("a1")
        screen = terminal.screen()
        assert screen[0] == "[tune_lfm] a1  dataset=gsm8k  completed"
        assert screen[1].split() == ["trial_id", "dataset", "status", "step", "loss", "tok/s", "ETA"]
        assert screen[3].split() == ["b2", "dolly", "starting", "0/60", "-", "-", "?"] and len(screen) == 4
        table.finish("b2")
    assert terminal.screen() == ["[tune_lfm] a1  dataset=gsm8k  completed"] and LiveTable.active is None


def test_live_table_shows_step_loss_speed_and_time_left():
    terminal = Terminal()
    config = TrialConfig(dataset="gsm8k", max_steps=60).to_dict()
    table = LiveTable(["dataset"], stream=terminal, min_interval_s=0)
    table.step("a1", config, {"step": 30, "loss": 1.23456, "tokens_per_s": 2345.6, "elapsed_s": 60.0})
    assert terminal.screen()[2].split() == ["a1", "gsm8k", "running", "30/60", "1.2346", "2,346", "1m00s"]
    table.step("a1", config, {"step": 60, "loss": 1.1, "tokens_per_s": 2400.0, "elapsed_s": 120.0})
    assert terminal.screen()[2].split()[2:4] == ["measuring", "60/60"] and len(terminal.screen()) == 3


def test_live_table_draws_nothing_into_a_file_or_pipe(tmp_path):
    with open(tmp_path / "log", "w") as sink, LiveTable(["dataset"], stream=sink, min_interval_s=0) as table:
        table.start("a1", TrialConfig(dataset="gsm8k").to_dict())
        assert LiveTable.active is None
    assert (tmp_path / "log").read_text() == ""


def test_the_quiet_console_shows_tunes_first_slow_operation_warning_only(monkeypatch):
    """Tune's own `warn_if_slow`, as its controller uses it around callbacks: four lines per slow result on a busy
    machine; after the filter, the first slow warning and any other warning of that logger pass."""
    from ray.tune.utils import util as tune_util

    tune_logger = logging.getLogger("ray.tune.utils.util")
    monkeypatch.setattr(tune_util, "START_OF_TIME", time.time() - 120)  # Tune stays silent in its first minute
    monkeypatch.setattr(tune_logger, "filters", [])
    show_first_slow_warning_only()
    show_first_slow_warning_only()  # a second sweep in the same process adds no second filter
    shown = []
    handler = logging.Handler()
    handler.emit = lambda record: shown.append(record.getMessage())
    tune_logger.addHandler(handler)  # Ray's loggers do not propagate to the root logger
    try:
        for name in ("callbacks.on_trial_result", "process_trial_result", "callbacks.on_trial_result"):
            with tune_util.warn_if_slow(name, threshold=1e-9):
                time.sleep(0.001)
        tune_logger.warning("Install psutil to monitor system performance.")
    finally:
        tune_logger.removeHandler(handler)
    assert len(shown) == 2, shown
    assert "callbacks.on_trial_result" in shown[0] and "performance bottleneck" in shown[0]
    assert shown[1].startswith("Install psutil")
