"""Latency you can trust: measurement on this machine's device, parameter/MAC counts, and budgets.

>>> from searchspace.latency import InputSpec, measure_latency, parse_budget
>>> budget_ms = parse_budget("5ms")
>>> result = measure_latency("PoolFormerV2-S12", InputSpec(height=64, width=64), threads=1)  # doctest: +SKIP
>>> result.value_ms <= budget_ms, str(result)  # doctest: +SKIP
(False, '13.8 ms +-0.9% (95% interval 13.7 ms to 13.9 ms; 12 rounds of 2 runs, reference-corrected ...')
>>> table = LatencyTable.open("cpu", InputSpec(height=64, width=64), threads=1)  # cached on disk  # doctest: +SKIP
>>> table.build_for_space("default")  # doctest: +SKIP
>>> table.predict(searchspace.preset("PoolFormerV2-S12")).total_ms  # no model built  # doctest: +SKIP
13.6

From the shell: ``python -m searchspace.latency PoolFormerV2-S12 --input-size 224 --threads 1``.
"""

from .budget import ACCEPTED_FORMS, BudgetError, format_ms, parse_budget
from .cache import default_cache_dir
from .counting import COUNTER_NAME, Counts, count_macs, count_params, count_params_macs
from .measure import (
    DEFAULT_INPUT,
    InputSpec,
    LatencyContext,
    LatencyResult,
    clock_for,
    cpu_timer,
    cuda_timer,
    device_name,
    measure_latency,
    measure_many,
    num_threads,
    reference_for,
    resolve_device,
    run_rounds,
    thread_cpu_timer,
    warm_until_steady,
)
from .parts import BlockPart, DownsamplePart, HeadPart, StemPart, arch_parts, stage_resolutions
from .predictor import Accuracy, Calibration, Features, fit_calibration
from .reference import Anchor, Reference
from .stats import (
    MeasurementError,
    Summary,
    calibrate_runs,
    median_interval,
    relative_spread,
    robust_latency,
    summarize,
)
from .storage import TableKey
from .table import LatencyTable, PartProtocol, Prediction

__all__ = [
    "ACCEPTED_FORMS",
    "Accuracy",
    "Anchor",
    "Features",
    "Reference",
    "clock_for",
    "fit_calibration",
    "median_interval",
    "reference_for",
    "warm_until_steady",
    "BlockPart",
    "Calibration",
    "DownsamplePart",
    "HeadPart",
    "LatencyTable",
    "PartProtocol",
    "Prediction",
    "StemPart",
    "TableKey",
    "arch_parts",
    "default_cache_dir",
    "stage_resolutions",
    "COUNTER_NAME",
    "DEFAULT_INPUT",
    "BudgetError",
    "Counts",
    "InputSpec",
    "LatencyContext",
    "LatencyResult",
    "MeasurementError",
    "Summary",
    "calibrate_runs",
    "count_macs",
    "count_params",
    "count_params_macs",
    "cpu_timer",
    "cuda_timer",
    "device_name",
    "format_ms",
    "measure_latency",
    "measure_many",
    "num_threads",
    "thread_cpu_timer",
    "parse_budget",
    "relative_spread",
    "resolve_device",
    "robust_latency",
    "run_rounds",
    "summarize",
]
