"""Runtimes: each adapter prepares a real model and runs it; measurements say what ran them; failures are one line."""

from __future__ import annotations

import concurrent.futures
import json
import sys
import time

import pytest
import torch

import search
import searchspace
import searchspace.latency.__main__ as latency_cli
from searchspace import Arch, Stage, build_model
from searchspace.errors import MixerNASError, UnknownNameError
from searchspace.latency import InputSpec, clock_for, cpu_timer, measure_latency, measure_many, thread_cpu_timer
from searchspace.latency.measure import RunOptions, default_dtype
from searchspace.latency.stats import MeasurementError
from searchspace.latency.storage import table_key
from searchspace.runtimes import (
    Eager,
    Prepared,
    Runtime,
    RuntimeInfo,
    RuntimeUnavailableError,
    get_runtime,
    register_runtime,
    runtime_names,
)

SPEC = InputSpec(channels=1, height=16, width=16)
QUICK = dict(warmup=1, rounds=3, max_extra_rounds=0, target_round_ms=1.0, reference=False)


def tiny(mixers=("pooling", "attention")):
    arch = Arch(stages=tuple(Stage(mixer=m, depth=1, width=w) for m, w in zip(mixers, (16, 32))))
    torch.manual_seed(0)
    return build_model(arch, num_classes=3, in_chans=1).eval()


def outputs_agree(runtime_name, model, atol=1e-4):
    rt = get_runtime(runtime_name)
    x = SPEC.example("cpu")
    prepared = rt.prepare(model, x, device=torch.device("cpu"), threads=1)
    got = prepared.run()
    got = got[0] if isinstance(got, (list, tuple)) else got
    if not isinstance(got, torch.Tensor):  # OpenVINO's result maps outputs to arrays
        got = next(iter(got.values())) if hasattr(got, "values") else got
    with torch.no_grad():
        torch.testing.assert_close(torch.as_tensor(got), model(x), rtol=1e-4, atol=atol)
    return prepared


def test_every_runtime_the_issue_names_is_registered_and_unknown_names_are_one_line():
    assert {"eager", "compile", "onnxruntime", "openvino", "tensorrt"} <= set(runtime_names())
    with pytest.raises(UnknownNameError, match="did you mean 'onnxruntime'"):
        get_runtime("onnxruntim")
    assert get_runtime(None).name == "eager" and isinstance(get_runtime(Eager()), Eager)


def test_a_measurement_records_the_runtime_that_ran_it():
    result = measure_latency(tiny(), SPEC, threads=1, **QUICK)
    assert result.context.runtime == f"eager {torch.__version__.split('+')[0]}"
    assert result.context.runtime in str(result)


def test_tensorrt_on_the_cpu_is_refused_with_the_fix():
    with pytest.raises(RuntimeUnavailableError, match="does not run on cpu; use --device cuda"):
        measure_latency(tiny(), SPEC, threads=1, runtime="tensorrt", **QUICK)


def test_a_missing_extra_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an environment without the extra has
    with pytest.raises(RuntimeUnavailableError, match=r"pip install -e '\.\[onnx\]'"):
        measure_latency(tiny(), SPEC, threads=1, runtime="onnxruntime", **QUICK)


def test_the_thread_clock_is_used_only_for_runtimes_that_compute_on_the_calling_thread():
    assert clock_for("cpu", 1, runtime="eager") is thread_cpu_timer
    assert clock_for("cpu", 1, runtime="onnxruntime") is thread_cpu_timer
    assert clock_for("cpu", 2, runtime="onnxruntime") is cpu_timer  # more threads: the wall clock

    class Elsewhere(Runtime):
        name, thread_clock = "elsewhere", False

        def version(self):
            return "1"

    assert clock_for("cpu", 1, runtime=Elsewhere()) is cpu_timer
    with pytest.raises(MeasurementError, match="thread clock"):
        clock_for("cpu", 1, "thread", runtime=Elsewhere())


def test_a_runtime_that_computes_on_another_thread_is_caught_by_the_thread_clock_check():
    class Offloaded(Runtime):  # claims the calling thread, but its work runs on a thread of its own
        name = "offloaded"

        def version(self):
            return "1"

        def prepare(self, model, example, *, device, threads):
            pool = concurrent.futures.ThreadPoolExecutor(1)
            return Prepared(lambda: pool.submit(compute, 0.002).result(), RuntimeInfo(self.name, "1"), pool)

    def compute(seconds):  # CPU work, on the pool's thread
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    with pytest.raises(MeasurementError, match="computes on threads of its own"):
        measure_latency(tiny(), SPEC, threads=1, runtime=Offloaded(), timer=thread_cpu_timer, **QUICK)


def test_a_runtime_of_your_own_is_measured_and_recorded(monkeypatch):
    class Doubled(Runtime):
        name = "doubled"

        def version(self):
            return "0.1"

        def prepare(self, model, example, *, device, threads):
            calls.append(example.shape)
            return Prepared(lambda: (model(example), model(example)), RuntimeInfo(self.name, "0.1", "twice"))

    calls = []
    monkeypatch.setattr(searchspace.runtimes, "RUNTIMES", type(searchspace.runtimes.RUNTIMES)("runtime"))
    register_runtime(Doubled())
    result = measure_latency(tiny(), SPEC, threads=1, runtime="doubled", **QUICK)
    assert calls == [torch.Size(SPEC.shape)] and result.context.runtime == "doubled 0.1 (twice)"
    with pytest.raises(MixerNASError, match="already registered"):
        register_runtime(Doubled())


def test_onnxruntime_runs_the_exported_model_with_the_same_outputs():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    prepared = outputs_agree("onnxruntime", tiny())
    assert prepared.info.name == "onnxruntime" and prepared.info.provider == "CPUExecutionProvider"
    [a, b] = measure_many([tiny(("pooling", "sepconv")), tiny()], SPEC, threads=1, runtime="onnxruntime",
                          timer=thread_cpu_timer, **QUICK)
    assert a.context.runtime.startswith("onnxruntime ") and a.value_ms > 0 and b.value_ms > 0


def test_openvino_runs_the_converted_model_with_the_same_outputs():
    pytest.importorskip("openvino")
    prepared = outputs_agree("openvino", tiny())
    assert prepared.info.name == "openvino" and prepared.info.provider == "CPU"
    # with one thread it computes on the calling thread: the search's thread clock is valid (checked inside)
    result = measure_latency(tiny(), SPEC, threads=1, runtime="openvino", timer=thread_cpu_timer, **QUICK)
    assert result.context.runtime.startswith("openvino ") and result.value_ms > 0


@pytest.mark.slow
def test_torch_compile_compiles_before_timing_and_keeps_the_outputs():
    prepared = outputs_agree("compile", tiny(("pooling", "sepconv")))
    assert prepared.info.provider == "inductor"
    # several models are measured one after another, each with a fresh compiler cache
    results = measure_many([tiny(("pooling", "sepconv")), tiny(("sepconv", "pooling"))], SPEC, threads=1,
                           runtime="compile", **QUICK)
    assert [r.context.runtime.split()[0] for r in results] == ["compile", "compile"]


def test_autocast_belongs_to_pytorchs_own_runtimes():
    with pytest.raises(MeasurementError):
        measure_latency(tiny(), SPEC, threads=1, runtime="onnxruntime", autocast=True, **QUICK)


# ------------------------------------------------------------------------------ run options (precision, GPU)


def test_run_options_follow_the_device_and_refuse_gpu_settings_on_the_cpu():
    assert RunOptions.for_device("cpu") == RunOptions() and default_dtype("cpu") == "float32"
    assert RunOptions.for_device("cpu", channels_last=True).tags() == ("channels_last",)
    with pytest.raises(MeasurementError, match="--cuda-graphs need a CUDA device; pass --device cuda"):
        RunOptions.for_device("cpu", cuda_graphs=True)


def test_run_options_and_the_runtime_are_part_of_the_table_key():
    plain = table_key("cpu", SPEC, 1)
    nhwc = table_key("cpu", SPEC, 1, options=RunOptions(channels_last=True))
    assert nhwc.options == "channels_last" and plain.options == "" and nhwc.filename() != plain.filename()
    assert plain.runtime == "eager" and plain.runtime_version == torch.__version__.split("+")[0]
    with pytest.raises(RuntimeUnavailableError, match="does not run on cpu"):
        table_key("cpu", SPEC, 1, "tensorrt")


def test_the_latency_command_measures_in_the_precision_and_layout_asked_for(capsys):
    argv = ["IdentityFormer-S12", "--input-size", "32", "--channels", "1", "--threads", "1", "--no-table",
            "--dtype", "bfloat16", "--channels-last", "--rounds", "3", "--max-extra-rounds", "0", "--json"]
    assert latency_cli.main(argv) == 0
    context = json.loads(capsys.readouterr().out)["measured"]["context"]
    assert context["dtype"] == "bfloat16" and "channels_last" in context["options"]
    assert context["runtime"].startswith("eager ")


def test_gpu_settings_on_the_cpu_are_one_line_in_every_command(tmp_path, capsys):
    assert latency_cli.main(["IdentityFormer-S12", "--cuda-graphs", "--device", "cpu", "--no-table"]) == 2
    assert search.main(["--latency-budget", "5ms", "--cuda-graphs", "--device", "cpu", "--out",
                        str(tmp_path / "run"), "--quiet"]) == 2
    assert search.main(["--latency-budget", "5ms", "--cudnn-benchmark", "--device", "cpu", "--out",
                        str(tmp_path / "run"), "--quiet"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all("need a CUDA device" in e for e in errors)
    assert not (tmp_path / "run").exists()
