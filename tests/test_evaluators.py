"""Evaluators: short training learns, is reproducible, prunes and fails cleanly; zero-cost proxies score sensibly."""

import math

import optuna
import pytest
import torch
from torch.utils.data import TensorDataset

import searchspace
from searchspace import Arch, MixerNASError, Stage, UnknownNameError
from searchspace.data import DataBundle, load_data
from searchspace.evaluators import (
    PROXIES,
    EvalResult,
    TrainEvaluator,
    TrainingDiverged,
    TrialPruned,
    ZeroCostEvaluator,
    create_evaluator,
    grad_norm,
    naswot,
    param_count,
    synflow,
)


def small_arch(width: int = 32, mixers=("sepconv", "pooling", "attention", "pooling")) -> Arch:
    return Arch(stages=tuple(Stage(mixer=m, depth=1, width=width, mlp_ratio=2.0) for m in mixers))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # a second thread only waits on other work on a shared 2-core machine (see the evaluators docstring)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits16():
    return load_data(input_size=16)  # 16x16 keeps each epoch of a small arch well under a second


@pytest.fixture(scope="module")
def evaluator():
    return TrainEvaluator(epochs=2, threads=1)


# ------------------------------------------------------------------------------------------------ short training


def test_training_learns_the_digits(digits16, evaluator):
    result = evaluator.evaluate(small_arch(), digits16)
    assert result.accuracy > 0.5  # chance is 0.1
    assert result.score == result.accuracy == result.accuracies[-1]
    assert len(result.accuracies) == len(result.train_losses) == len(result.val_losses) == result.epochs == 2
    assert 0 < result.val_loss < math.log(10)  # better than guessing
    assert result.train_losses[1] < result.train_losses[0]
    assert result.params == sum(p.numel() for p in searchspace.build_model(small_arch(), 10, in_chans=1).parameters())
    assert result.seconds > 0 and not result.pruned and result.evaluator == "train"


def test_same_seed_same_result_and_global_rng_untouched(digits16):
    evaluator = TrainEvaluator(epochs=1, threads=1, seed=7)
    state = torch.random.get_rng_state()
    a = evaluator.evaluate(small_arch(), digits16)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = evaluator.evaluate(small_arch(), digits16)
    assert (a.accuracies, a.train_losses) == (b.accuracies, b.train_losses)
    c = TrainEvaluator(epochs=1, threads=1, seed=8).evaluate(small_arch(), digits16)
    assert c.train_losses != a.train_losses


def test_augmentation_is_seeded_too(digits16):
    evaluator = TrainEvaluator(epochs=1, threads=1, augment=True)
    a, b = evaluator.evaluate(small_arch(), digits16), evaluator.evaluate(small_arch(), digits16)
    plain = TrainEvaluator(epochs=1, threads=1).evaluate(small_arch(), digits16)
    assert a.train_losses == b.train_losses != plain.train_losses


def test_train_returns_the_trained_model(digits16):
    model, result = TrainEvaluator(epochs=1, threads=1).train(small_arch(), digits16)
    assert not model.training
    images, labels = digits16.val.tensors
    with torch.no_grad():
        acc = (model(images).argmax(1) == labels).float().mean().item()
    assert acc == pytest.approx(result.accuracy)


def test_report_is_called_every_epoch(digits16):
    calls = []
    TrainEvaluator(epochs=2, threads=1).evaluate(small_arch(), digits16, lambda e, a: calls.append((e, a)))
    assert [e for e, _ in calls] == [1, 2] and all(0 <= a <= 1 for _, a in calls)


def test_report_returning_true_prunes_early(digits16):
    calls = []

    def report(epoch, accuracy):
        calls.append(epoch)
        return True

    with pytest.raises(TrialPruned) as info:
        TrainEvaluator(epochs=5, threads=1).evaluate(small_arch(), digits16, report)
    assert calls == [1]
    result = info.value.result
    assert result.pruned and result.epochs == 1 and len(result.accuracies) == 1
    assert isinstance(info.value, optuna.TrialPruned)  # Optuna records the trial as pruned by itself


def test_a_finished_training_is_not_pruned(digits16):
    # a pruner that says "stop" after the last epoch saves nothing; the trial keeps its full result
    calls = []

    def report(epoch, accuracy):
        calls.append(epoch)
        return True

    result = TrainEvaluator(epochs=1, threads=1).evaluate(small_arch(), digits16, report)
    assert calls == [1] and not result.pruned and result.epochs == 1


def test_optuna_pruner_marks_poor_trials_pruned(digits16):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    evaluator = TrainEvaluator(epochs=2, threads=1)
    archs = [small_arch(), small_arch(mixers=("identity",) * 4)]

    def objective(trial):
        arch = archs[trial.number % 2]

        def report(epoch, accuracy):
            trial.report(accuracy, epoch)
            return trial.number >= 2 and epoch == 1  # force a pruning decision for the later trials

        return evaluator.evaluate(arch, digits16, report).accuracy

    study = optuna.create_study(direction="maximize")
    study.optimize(objective, n_trials=3)
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE] * 2 + [optuna.trial.TrialState.PRUNED]


def test_nan_loss_raises_training_diverged(digits16):
    images, labels = digits16.train.tensors
    poisoned = images.clone()
    poisoned[:] = float("nan")
    data = DataBundle(train=TensorDataset(poisoned, labels), val=digits16.val, num_classes=10, in_chans=1,
                      input_size=16, class_names=digits16.class_names, source="poisoned", mean=(0.0,), std=(1.0,))
    with pytest.raises(TrainingDiverged, match="loss is nan at epoch 1, step 1"):
        TrainEvaluator(epochs=1, threads=1).evaluate(small_arch(), data)


def test_huge_learning_rate_diverges_as_a_mixernas_error(digits16):
    with pytest.raises(MixerNASError, match="training diverged.*lower the learning rate"):
        TrainEvaluator(epochs=1, threads=1, lr=1e6, grad_clip=None).evaluate(small_arch(), digits16)


@pytest.mark.parametrize("kwargs, message", [
    ({"epochs": 0}, "epochs must be an integer >= 1"),
    ({"lr": -1.0}, "lr must be a positive number"),
    ({"batch_size": 2.5}, "batch_size must be an integer"),
    ({"label_smoothing": 1.0}, "label_smoothing"),
    ({"device": "tpu"}, "device"),
])
def test_train_evaluator_rejects_bad_settings(kwargs, message):
    with pytest.raises(MixerNASError, match=message):
        TrainEvaluator(**kwargs)


def test_result_to_dict_is_json_ready():
    result = EvalResult(evaluator="train", score=0.5, accuracy=0.5, accuracies=(0.4, 0.5), train_losses=(2.0, 1.0))
    assert result.to_dict()["accuracies"] == [0.4, 0.5] and result.train_loss == 1.0


# ------------------------------------------------------------------------------------------------ zero-cost proxies


def _model(width: int, mixers=("sepconv", "pooling", "attention", "pooling")):
    torch.manual_seed(0)
    return searchspace.build_model(small_arch(width, mixers), num_classes=10, in_chans=1)


def _batch(data, n=16):
    images, labels = data.train.tensors
    return images[:n], labels[:n]


def test_proxies_are_finite_and_leave_the_model_untouched(digits16):
    model = _model(32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = _batch(digits16)
    scores = [synflow(model, (1, 16, 16)), naswot(model, images), grad_norm(model, images, labels), param_count(model)]
    assert all(math.isfinite(s) for s in scores)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_wider_model_ranks_above_much_narrower_one(digits16):
    narrow, wide = _model(32), _model(128)
    assert synflow(wide, (1, 16, 16)) > synflow(narrow, (1, 16, 16))
    assert param_count(wide) > param_count(narrow)


def test_naswot_separates_distinct_images_better_than_repeated_ones(digits16):
    model = _model(32)
    images, _ = _batch(digits16, 8)
    repeated = images[:1].repeat(8, 1, 1, 1) + 1e-3 * torch.randn(8, 1, 16, 16)
    assert naswot(model, images) > naswot(model, repeated)


@pytest.mark.parametrize("proxy", PROXIES)
def test_zero_cost_evaluator(proxy, digits16):
    evaluator = ZeroCostEvaluator(proxy, batch_size=16, threads=1)
    a = evaluator.evaluate(small_arch(), digits16)
    assert a.accuracy is None and math.isfinite(a.score) and a.evaluator == proxy and a.epochs == 0
    assert a.params > 0
    assert evaluator.evaluate(small_arch(), digits16).score == a.score  # seeded


def test_zero_cost_evaluator_rejects_an_unknown_proxy():
    with pytest.raises(UnknownNameError, match="did you mean 'synflow'"):
        ZeroCostEvaluator("synflo")


def test_proxies_run_on_every_mixer_of_the_tiny_space(digits16):
    space = searchspace.get_space("tiny")
    mixers = {m for sc in space.stages for m in sc.mixers}
    for mixer in sorted(mixers):
        arch = small_arch(mixers=(mixer,) * 4) if mixer != "modulation" else small_arch(mixers=("pooling", mixer) * 2)
        for proxy in ("synflow", "naswot", "grad_norm"):
            assert math.isfinite(ZeroCostEvaluator(proxy, batch_size=8).evaluate(arch, digits16).score), (mixer, proxy)


# -------------------------------------------------------------------------------------------------------- factory


def test_create_evaluator_drops_unset_options_and_names_unknown_ones():
    assert create_evaluator("train", epochs=5, lr=None) == TrainEvaluator(epochs=5)
    assert create_evaluator("naswot", batch_size=32).proxy == "naswot"
    assert isinstance(create_evaluator("zero-cost"), ZeroCostEvaluator)
    with pytest.raises(MixerNASError, match="does not take epoch; it takes: epochs"):
        create_evaluator("train", epoch=3)
    with pytest.raises(UnknownNameError):
        create_evaluator("trian")
