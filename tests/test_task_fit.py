"""`Task.fit`: the experiment runner trains with the task's own schedule (here fastai's `fine_tune`, the seed's regime)
and says so in runs.csv; without one it trains with `fit_one_cycle` exactly as before. The reference is fastai itself:
the same seeding, learner and `fine_tune` / `fit_one_cycle` called by hand, its predictions and its per-epoch log."""
import pickle
from functools import partial

import cloudpickle
import pandas as pd
import pytest
import torch
from torch import nn
from fastai.learner import Learner
from fastai.metrics import error_rate
from fastai.torch_core import params, set_seed
import fastai.callback.schedule  # noqa: F401 (patches `Learner.fit_one_cycle`, `Learner.fine_tune`)

from fastai_regularize.activations import no_activation
from fastai_regularize.data import tensor_image_dls
from fastai_regularize.experiment import CONFIGS, SettingsMismatch, Task, run_experiment, train_run

FINE_TUNE = partial(Learner.fine_tune, freeze_epochs=1)


def _images(n, g):
    y = torch.arange(n) % 3
    return (torch.rand(n, 8, 8, generator=g)*120 + y[:, None, None]*60).to(torch.uint8), y


def make_dls(seed):
    g = torch.Generator().manual_seed(0)
    (x, y), (xv, yv) = _images(64, g), _images(30, g)
    return tensor_image_dls(x, y, xv, yv, ['dark', 'mid', 'light'], bs=16)


def two_groups(m): return [params(m[0]), params(m[1])]


def make_learner(dls, loss_func, cbs):
    "A body and a head, split in two parameter groups, so `freeze` has something to freeze"
    model = nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU()), nn.Linear(16, 3))
    return Learner(dls, model, loss_func=loss_func, cbs=cbs, metrics=error_rate, splitter=two_groups)


def task(**kw): return Task(make_dls, make_learner, dict(data='tiny', model='mlp'), **kw)


def by_hand(fit, seed, epochs, lr):
    "What train_run promises to do, written out with fastai's calls: (logits, every epoch's logged values)"
    torch.set_flush_denormal(True)
    set_seed(seed, reproducible=True)
    dls = make_dls(seed)
    set_seed(seed, reproducible=True)
    loss_func, cbs = CONFIGS['baseline'].build()
    learn = make_learner(dls, loss_func, cbs)
    logged = []
    learn.logger = logged.append  # the Recorder calls it once per epoch of every fit
    with learn.no_bar(): fit(learn, epochs, lr)
    with learn.no_bar(): logits, _ = learn.get_preds(act=no_activation)
    return logits, [list(map(float, l[1:-1])) for l in logged]  # train_loss, valid_loss, error_rate (no epoch, time)


def test_custom_fit_is_used_and_recorded(tmp_path):
    out = tmp_path/'ft'
    run_experiment(task(fit=FINE_TUNE), 'baseline', seeds=[3], epochs=2, lr=0.05, out=out, tta=False, bars=False)
    runs = pd.read_csv(out/'runs.csv')
    assert runs.schedule.tolist() == ['fine_tune(freeze_epochs=1)']
    logits, logged = by_hand(lambda learn, e, lr: learn.fine_tune(e, lr, freeze_epochs=1), 3, 2, 0.05)
    assert torch.equal(torch.load(out/'preds'/'baseline__s3.pt')['logits'], logits)
    # the frozen epoch and the two unfrozen ones, in order (fastai's Recorder keeps only the last fit's two)
    assert len(logged) == 3
    assert [float(v) for v in runs.valid_error_by_epoch[0].split()] == [l[2] for l in logged]
    assert [float(v) for v in runs.train_loss_by_epoch[0].split()] == [l[0] for l in logged]
    assert 'of fine_tune(freeze_epochs=1) at lr 0.05' in (out/'summary.md').read_text()


def test_default_is_fit_one_cycle_as_before(tmp_path):
    out = tmp_path/'default'
    run_experiment(task(), 'baseline', seeds=[3], epochs=2, lr=0.05, out=out, tta=False, bars=False)
    runs = pd.read_csv(out/'runs.csv')
    assert runs.schedule.tolist() == ['fit_one_cycle']
    logits, logged = by_hand(lambda learn, e, lr: learn.fit_one_cycle(e, lr), 3, 2, 0.05)
    assert torch.equal(torch.load(out/'preds'/'baseline__s3.pt')['logits'], logits)
    assert [float(v) for v in runs.valid_error_by_epoch[0].split()] == [l[2] for l in logged]
    assert 'of fit_one_cycle at lr 0.05' in (out/'summary.md').read_text()
    # resuming in the same folder with another schedule is refused, in one line, naming it
    with pytest.raises(SettingsMismatch, match=r"schedule='fit_one_cycle', this run has schedule='fine_tune\(freeze_epochs=1\)'"):
        run_experiment(task(fit=FINE_TUNE), 'baseline', seeds=[3], epochs=2, lr=0.05, out=out, tta=False, bars=False)


def test_named_schedule_and_bad_fit(tmp_path):
    out = tmp_path/'named'
    run_experiment(task(fit=FINE_TUNE, schedule='fine_tune, 1 frozen epoch'), 'baseline', seeds=[0], epochs=1, lr=0.05,
                   out=out, tta=False, bars=False)
    assert pd.read_csv(out/'runs.csv').schedule.tolist() == ['fine_tune, 1 frozen epoch']
    with pytest.raises(TypeError, match=r"`fit` must be a function `fit\(learn, epochs, lr\)` or None"):
        train_run(task(fit='fine_tune'), CONFIGS['baseline'], 0, 1, 0.05, bars=False)


def test_a_task_with_fit_pickles():
    "Runs may be sent to other processes: a Task with a fit survives pickle and cloudpickle (a closure too)"
    t = pickle.loads(pickle.dumps(task(fit=FINE_TUNE)))
    assert t.fit.func is Learner.fine_tune and t.fit.keywords == {'freeze_epochs': 1}
    def closure(learn, epochs, lr, k=2): learn.fine_tune(epochs, lr, freeze_epochs=k)
    t = cloudpickle.loads(cloudpickle.dumps(task(fit=closure)))
    assert t.fit.__code__.co_code == closure.__code__.co_code
