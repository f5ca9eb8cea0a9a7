"""What a search is asked to do: one validated, JSON-serialisable configuration."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MixerNASError
from ..latency.budget import format_ms
from ..latency.measure import DTYPES
from ..presets import preset_spec
from ..runtimes import get_runtime
from .storage import display_url

EVALUATORS = ("train", "zero-cost")
SAMPLERS = ("tpe", "nsga2", "random")
OBJECTIVES = ("accuracy", "pareto")
BACKENDS = ("optuna", "ray", "nni")

# Settings that define *what* is searched: a results folder holds one such search; the others (trials,
# timeout, workers, ...) may change between runs that resume it.
IDENTITY_FIELDS = ("budget_ms", "space", "data", "input_size", "batch_size", "evaluator", "epochs", "objective",
                   "sampler", "seed", "device", "runtime", "dtype", "channels_last", "cuda_graphs",
                   "cudnn_benchmark")


@dataclass(frozen=True)
class SearchConfig:
    """A search: find the most accurate architecture of ``space`` whose measured latency is at most ``budget_ms``."""

    budget_ms: float  # latency budget in milliseconds, judged on measured latency
    space: str = "default"  # registered space name or "package.module:function"
    data: str | None = None  # image folder (one sub-folder per class); None = scikit-learn's digits
    input_size: int | None = None  # square input side in pixels; None = the data's default (digits: 32)
    batch_size: int = 1  # batch size the latency is measured at
    device: str = "auto"  # "auto" (CUDA if present, else CPU), "cpu", "cuda", "cuda:N"
    threads: int | None = None  # threads latency is measured with; None = 1 on the CPU (training uses all cores)
    runtime: str = "eager"  # what runs the candidates when latency is measured (searchspace.runtimes)
    dtype: str | None = None  # precision latency is measured in; None = float16 on CUDA, float32 on the CPU
    channels_last: bool | None = None  # None = on for CUDA, off on the CPU
    cuda_graphs: bool = False  # CUDA: time the replay of a captured graph (batch-1 latency without launch cost)
    cudnn_benchmark: bool | None = None  # CUDA: cuDNN picks its fastest kernels; None = on for CUDA
    train_threads: int | None = None  # CPU threads for training; None = torch's default (every core)
    trials: int = 100  # trials to run in total (a resumed search runs only the missing ones); the timeout
    # usually ends the default search first: 40 trials took 156 s on an idle 2-core CPU, 12 took 447 s on a busy one
    timeout_s: float | None = 420.0  # seconds of trials in this run; None = no limit
    evaluator: str = "train"  # "train" (short training) or "zero-cost" (a proxy score, no training)
    epochs: int | None = None  # training epochs per trial; None = the evaluator's default
    final_epochs: int | None = None  # epochs to train the winner; None = 4x the trial epochs
    objective: str = "accuracy"  # "accuracy" (TPE under the latency constraint) or "pareto" (NSGA-II)
    sampler: str | None = None  # None = TPE for accuracy, NSGA-II for pareto; "random" is the baseline sampler
    backend: str = "optuna"  # "optuna", "ray" (Ray Tune) or "nni"
    storage: str | None = None  # Optuna storage URL; None = SQLite inside the output folder
    study_name: str | None = None  # None = derived from the output folder name
    out: str | None = None  # results folder; None = runs/<space>-<budget>
    seed: int = 0
    ray_address: str | None = None  # join this Ray cluster; None = start a local Ray
    workers: int = 1  # trials evaluated at once (Ray)
    # presets the search is compared with: those that are points of the space are its first trials, the others are
    # evaluated beside it the same way; None = all, () = none
    baselines: tuple[str, ...] | None = None
    compress: str | None = None  # recipe the CLI applies to the winner (searchspace never imports compress)

    def __post_init__(self) -> None:
        if not isinstance(self.budget_ms, (int, float)) or not self.budget_ms > 0:
            raise MixerNASError(f"the latency budget must be a positive number of milliseconds, got {self.budget_ms!r}")
        for name, choices in (("evaluator", EVALUATORS), ("objective", OBJECTIVES), ("backend", BACKENDS),
                              ("sampler", SAMPLERS + (None,))):
            if getattr(self, name) not in choices:
                raise MixerNASError(f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(choices)}")
        get_runtime(self.runtime)  # an unknown name is one line naming the close ones
        if self.dtype is not None and self.dtype not in DTYPES:
            raise MixerNASError(f"unknown --dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        for name in ("trials", "batch_size", "workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise MixerNASError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        for name in ("epochs", "final_epochs", "threads", "train_threads", "input_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise MixerNASError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.input_size is not None and self.input_size < 8:
            raise MixerNASError(f"--input-size must be at least 8 pixels, got {self.input_size}")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise MixerNASError(f"--timeout must be a positive number of seconds, got {self.timeout_s!r}")
        if self.backend == "nni" and self.objective == "pareto":
            raise MixerNASError("the NNI backend searches one objective; use --objective accuracy, or --backend "
                                "optuna/ray for the Pareto front")
        if self.baselines is not None:
            object.__setattr__(self, "baselines", tuple(self.baselines))
            for name in self.baselines:
                preset_spec(name)  # unknown names fail now, with the close matches

    @property
    def out_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        runtime = "" if self.runtime == "eager" else f"-{self.runtime}"  # a budget on another runtime is another search
        return Path("runs") / f"{_slug(self.space)}-{_slug(format_ms(self.budget_ms))}{runtime}"

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.out_dir / 'study.db').resolve()}"

    @property
    def name(self) -> str:
        return self.study_name or f"mixernas-{_slug(self.out_dir.name)}"

    def to_dict(self) -> dict[str, Any]:
        """The settings as written to ``config.json`` (a database password is not)."""
        data = dataclasses.asdict(self)
        if self.storage:
            data["storage"] = display_url(self.storage)
        return data

    def identity(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in IDENTITY_FIELDS}

    def check_resumable(self, saved: dict[str, Any]) -> None:
        """A folder holds one search: resuming with different defining settings is an error, not a mix."""
        mine = self.identity()
        diff = [k for k in IDENTITY_FIELDS if k in saved and saved[k] != mine[k]]
        if diff:
            changes = ", ".join(f"{k} {saved[k]!r} -> {mine[k]!r}" for k in diff)
            raise MixerNASError(f"{self.out_dir} holds a different search ({changes}); pass --out NEW_FOLDER for a "
                                f"new search, or the same settings to resume it")


def _slug(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z.]+", "", text.replace("µ", "u").replace(":", "-")) or "search"


def load_saved_config(out: Path) -> dict[str, Any] | None:
    path = out / "config.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MixerNASError(f"cannot read {path}: {exc}; remove the file or choose another --out") from None
