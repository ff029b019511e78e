"""`bdguard bench`: the attack x defense x seed grid of a suite in one resumable command, and its results table."""

from bdguard.bench.config import BenchConfig, load_suite, suite_names
from bdguard.bench.executors import ExecutorConfig
from bdguard.bench.runner import run_bench

__all__ = ["BenchConfig", "ExecutorConfig", "load_suite", "run_bench", "suite_names"]
