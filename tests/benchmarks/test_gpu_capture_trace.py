"""benchmarks/gpu_capture.py --trace: the trace it exports is read back and summarised.

On 2026-12-04 the H200 run of gpu_check.sh lost its capture-trace step to a JSONDecodeError: the
summary read the exported trace through a handle opened before the export, which the exporter had
replaced. The profiler runs on the CPU too, so the read-back is checked here (no device copies
in a CPU trace: the summary must say so, having parsed the file)."""
from __future__ import annotations

import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import gpu_capture  # noqa: E402


def test_the_trace_summary_parses_the_exported_trace() -> None:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.ones(1000).clone()
    assert gpu_capture.copy_trace_summary(prof) == "no device-to-host copies traced"
