"""Telemetry: the monitor logs throughput, transfer and host-time figures through Lightning's loggers."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger

from lightning_megatrain import MegaTrainMonitor
from models import BlockLM, data, trainer


def test_monitor_logs_through_the_logger(tmp_path: Path) -> None:
    L.seed_everything(0)
    monitor = MegaTrainMonitor(peak_tflops=1.0)
    t = trainer("megatrain", max_steps=4, logger=CSVLogger(tmp_path), log_every_n_steps=1, callbacks=[monitor])
    t.fit(BlockLM(), data())
    rows = list(csv.DictReader(open(Path(t.logger.log_dir) / "metrics.csv")))
    keys = set(rows[0])
    for key in ("perf/tokens_per_s", "perf/model_tflops", "perf/mfu", "perf/h2d_GBps", "perf/d2h_GBps",
                "perf/gpu_wait_transfer_s", "perf/host_optimizer_s", "perf/wait_host_optimizer_s", "mem/host_rss_GiB"):
        assert key in keys, key
    steps = [r for r in rows if r["perf/tokens_per_s"]]
    assert len(steps) == 4
    assert all(float(r["perf/tokens_per_s"]) > 0 and float(r["perf/h2d_GBps"]) > 0 and float(r["perf/d2h_GBps"]) > 0 for r in steps)
    # the host optimizer ran (steps 2..4 see the previous step's update time)
    assert sum(float(r["perf/host_optimizer_s"]) for r in steps) > 0
    # tokens per step: 4 sequences of 12
    m = monitor.last
    assert abs(m["perf/model_tflops"] - 6 * sum(p.numel() for p in t.lightning_module.parameters()) * 48 / m["perf/step_s"] / 1e12) < 1e-9


def test_monitor_with_plain_lightning_logs_throughput_only(tmp_path: Path) -> None:
    monitor = MegaTrainMonitor()
    trainer("auto", max_steps=2, callbacks=[monitor]).fit(BlockLM(), data())
    assert "perf/tokens_per_s" in monitor.last and "perf/h2d_GBps" not in monitor.last and "perf/mfu" not in monitor.last
