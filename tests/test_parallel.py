"""Runs side by side (`compare --workers N`, `--scheduler`): the numbers of one run after another in this process, a
worker killed mid-run costs one retried run, a run that kills its worker twice is reported and left missing for the
next resume, Ctrl-C keeps the finished rows, and what cannot reach the workers is a one-line error."""
import io, os, shutil, signal, sys, threading
from contextlib import redirect_stderr, redirect_stdout
from functools import partial
from pathlib import Path

import pandas as pd
import pytest
from conftest import tiny_digits
import torch
from torch import nn
from fastai.callback.core import Callback
from fastai.learner import Learner
from fastai.metrics import error_rate

pytest.importorskip('distributed')
from distributed import LocalCluster

from fastai_regularize import experiment
from fastai_regularize.cli import main
from fastai_regularize.data import digits_folder, tensor_image_dls
from fastai_regularize.experiment import ClusterError, Task, read_runs, register_config, run_experiment

TINY = ['--epochs', '1', '--size', '16', '--bs', '16']
PAIR = ['--seeds', '2', '--configs', 'baseline,mixup']
NUMBERS = [m for m in experiment.METRICS if m != 'seconds_per_epoch'] + ['valid_error_by_epoch', 'train_loss_by_epoch', 'valid_targets_sha1']


@pytest.fixture(scope='module')
def data(tmp_path_factory): return tiny_digits(tmp_path_factory)


def run_main(*args):
    o,e = io.StringIO(),io.StringIO()
    argv = sys.argv[:]
    try:
        with redirect_stdout(o), redirect_stderr(e): rc = main(list(map(str, args)))
    finally: sys.argv = argv
    return rc,o.getvalue(),e.getvalue()


def assert_same_numbers(a:Path, b:Path):
    "Every (config, seed) of `a` has the same metrics, per-epoch curves and saved logits in `b`, to the last bit"
    ra,rb = (pd.read_csv(p/'runs.csv', dtype=str).set_index(['config', 'seed']).sort_index() for p in (a, b))
    assert list(ra.index) == list(rb.index) and len(ra) == 4
    pd.testing.assert_frame_equal(ra[NUMBERS], rb[NUMBERS])  # as written: every digit (`repr` of the float)
    for f in sorted((a/'preds').iterdir()):
        pa,pb = torch.load(f),torch.load(b/'preds'/f.name)
        assert pa.keys() == pb.keys() and {'logits', 'targs'} <= pa.keys(), f.name
        for k in pa: assert torch.equal(pa[k], pb[k]) if torch.is_tensor(pa[k]) else pa[k] == pb[k], (f.name, k)


def test_dask_draws_leave_the_global_random_alone():
    """A Dask worker's event loop samples `random` (sizeof of a result it sends) while the next run builds its data; first in
    this file, before any cluster's event loop runs in this process"""
    import random
    import dask.sizeof, distributed.comm.core
    state = random.getstate()
    dask.sizeof.sizeof(list(range(1000)))  # Dask samples 10 items of a long list
    assert random.getstate() != state      # the global generator, as it stands
    experiment._isolate_dask_random()
    assert dask.sizeof.random is not random and distributed.comm.core.random is dask.sizeof.random
    state = random.getstate()
    dask.sizeof.sizeof(list(range(1000))), dask.sizeof.sizeof({str(i): i for i in range(1000)})
    assert random.getstate() == state
    random.seed(0); a = random.random()
    random.seed(0); dask.sizeof.sizeof(list(range(1000))); assert random.random() == a


@pytest.fixture(scope='module')
def serial(data, tmp_path_factory):
    "The reference: the four runs one after another in this process, one torch thread each"
    out = tmp_path_factory.mktemp('serial')/'cmp'
    rc,o,e = run_main('compare', data, *TINY, *PAIR, '--out', out, '--threads-per-run', 1)
    assert rc == 0, e[-3000:]
    assert '== baseline s42 (1/4)' in o and 'Dask' not in o  # --workers 1: today's loop, no cluster
    return out


@pytest.mark.slow
def test_two_workers_give_the_numbers_of_one(data, serial, tmp_path):
    rc,o,e = run_main('compare', data, *TINY, *PAIR, '--out', tmp_path/'cmp', '--workers', 2, '--threads-per-run', 1)
    assert rc == 0, e[-3000:]
    assert '4 run(s) on 2 Dask worker(s) of a local cluster, 1 torch thread(s) per run' in o
    assert_same_numbers(serial, tmp_path/'cmp')
    rows = read_runs(tmp_path/'cmp'/'runs.csv')
    assert {r['threads'] for r in rows} == {'1'}  # each row records the threads its run had
    assert sorted(f.name for f in (tmp_path/'cmp'/'preds').iterdir()) == [f'{c}__s{s}.pt' for c in ('baseline', 'mixup') for s in (42, 43)]
    # the tables list the configurations in the order asked for, whatever order the runs finished in
    assert list(pd.read_csv(tmp_path/'cmp'/'summary.csv').drop_duplicates('config').config) == ['baseline', 'mixup']


@pytest.fixture(scope='module')
def cluster():
    "A cluster started outside the runner, as `dask scheduler` and `dask worker --nworkers 2 --nthreads 1` would give"
    import dask
    with dask.config.set({'distributed.worker.multiprocessing-method': experiment._start_method([None])}):  # forked: no import each
        c = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                         scheduler_kwargs=dict(dashboard_address='127.0.0.1:0'))
        yield c
        c.close()


@pytest.mark.slow
def test_scheduler_gives_the_numbers_of_one(data, serial, cluster, tmp_path):
    rc,o,e = run_main('compare', data, *TINY, *PAIR, '--out', tmp_path/'cmp', '--scheduler', cluster.scheduler_address,
                      '--threads-per-run', 1)
    assert rc == 0, e[-3000:]
    assert f"4 run(s) on 2 Dask worker(s) of {cluster.scheduler_address}, 1 torch thread(s) per run" in o
    assert_same_numbers(serial, tmp_path/'cmp')


def tiny_task():
    "Built here, in a test function: its functions are closures over tensors, which cloudpickle sends by value"
    g = torch.Generator().manual_seed(0)
    def draw(n):
        y = torch.arange(n) % 3
        return (torch.rand(n, 8, 8, generator=g)*120 + y[:, None, None]*60).to(torch.uint8),y
    (x,y),(xv,yv) = draw(48),draw(24)
    def make_dls(seed): return tensor_image_dls(x, y, xv, yv, ['dark', 'mid', 'light'], bs=16)
    def make_learner(dls, loss_func, cbs):
        return Learner(dls, nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), loss_func=loss_func, cbs=cbs, metrics=error_rate)
    return Task(make_dls, make_learner, dict(data='tiny', model='linear'))


@pytest.mark.slow
def test_killed_worker_costs_one_retried_run(tmp_path, monkeypatch, capsys):
    "Configurations registered at run time with a callback class defined here: one kills its worker once, one every time"
    class KillWorker(Callback):
        "SIGKILL to this process in the first training batch: once per marker file, or every time without one"
        def __init__(self, marker=None): self.marker = marker
        def before_batch(self):
            if not self.training or (self.marker is not None and os.path.exists(self.marker)): return
            if self.marker is not None: open(self.marker, 'w').close()
            os.kill(os.getpid(), signal.SIGKILL)
    monkeypatch.setattr(experiment, 'CONFIGS', dict(experiment.CONFIGS))  # the registrations end with the test
    register_config('dies_once', cbs=partial(KillWorker, marker=str(tmp_path/'died')))
    register_config('dies_always', cbs=KillWorker)
    out = tmp_path/'cmp'
    run_experiment(tiny_task(), 'baseline,dies_once,dies_always', seeds=1, epochs=1, lr=0.05, out=out, bars=False, workers=2)
    o = capsys.readouterr().out
    assert (tmp_path/'died').exists()  # it did die once
    assert o.count('dies_once s0: its worker process died; running it again') == 1
    assert 'dies_once s0: error ' in o                                   # the retry finished
    assert o.count('dies_always s0: its worker process died; running it again') == 1
    lost = [l for l in o.splitlines() if l.startswith('dies_always s0: its worker process died 2 times')]
    assert len(lost) == 1 and 'left missing: run the same command again' in lost[0]
    assert 'left missing, their worker process died 2 times: dies_always s0; run the same command again to retry them' in o
    assert sorted((r['config'], r['seed']) for r in read_runs(out/'runs.csv')) == [('baseline', '0'), ('dies_once', '0')]
    assert sorted(f.name for f in (out/'preds').iterdir()) == ['baseline__s0.pt', 'dies_once__s0.pt']
    assert (out/'summary.md').stat().st_size > 0
    # a comparison whose every run is lost ends with one line, and nothing to summarize
    assert run_experiment(tiny_task(), 'dies_always', seeds=[3], epochs=1, out=tmp_path/'none', bars=False, workers=2) is None
    o = capsys.readouterr().out
    assert "1 run(s) on 1 Dask worker(s)" in o and o.rstrip().endswith(f"{tmp_path/'none'/'runs.csv'}: no finished run to summarize")
    # the next resume runs what is missing, and only that
    register_config('dies_always', replace=True)
    run_experiment(tiny_task(), 'baseline,dies_once,dies_always', seeds=1, epochs=1, lr=0.05, out=out, bars=False)
    assert '2 finished run(s) found; 1 to go' in capsys.readouterr().out
    assert [r['config'] for r in read_runs(out/'runs.csv')] == ['baseline', 'dies_once', 'dies_always']


@pytest.mark.slow
def test_ctrl_c_keeps_finished_rows_and_resumes(data, serial, cluster, tmp_path, request):
    "SIGINT to this process once the first row is on disk, the other runs running on two local workers"
    out = tmp_path/'cmp'
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's, whatever this test process inherited
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, before))
    done = threading.Event()
    def ctrl_c():
        while not read_runs(out/'runs.csv') and not done.wait(0.05): pass
        if not done.is_set(): os.kill(os.getpid(), signal.SIGINT)
    t = threading.Thread(target=ctrl_c, daemon=True)
    t.start()
    rc,o,e = run_main('compare', data, *TINY, *PAIR, '--out', out, '--workers', 2, '--threads-per-run', 1)
    done.set(); t.join()
    assert rc == 130, 'the comparison ended before it could be interrupted' if rc == 0 else e[-3000:]
    n = len(read_runs(out/'runs.csv'))
    assert 1 <= n < 4
    assert e.count('\n') == 1 and e.startswith('fastai-regularize: compare: interrupted in run '), e
    running = e.split('interrupted in run ')[1].split(';')[0].split(', ')
    assert 1 <= len(running) <= 2 and all(r.split()[0] in ('baseline', 'mixup') for r in running)  # what the two workers ran
    assert f"holds the {n} finished run(s): run the same command again to resume (--fresh starts over)" in e
    assert len(list((out/'preds').iterdir())) == n  # no file of a cancelled run
    after_interrupt = (out/'runs.csv').read_text()
    assert after_interrupt.count('\n') == n + 1  # the header and whole rows
    rc,o,e = run_main('compare', data, *TINY, *PAIR, '--out', out, '--scheduler', cluster.scheduler_address, '--threads-per-run', 1)
    assert rc == 0, e[-3000:]
    assert f"{n} finished run(s) found; {4 - n} to go" in o
    assert (out/'runs.csv').read_text().startswith(after_interrupt)
    assert_same_numbers(serial, out)


def test_what_cannot_reach_the_workers_is_one_line(tmp_path, cluster, monkeypatch):
    "Caught here before anything starts, or by the worker that cannot load it; a worker with two threads is refused"
    lock = threading.Lock()
    task = tiny_task()
    def make_dls(seed):
        with lock: return task.make_dls(seed)
    with pytest.raises(TypeError) as e:
        run_experiment(Task(make_dls, task.make_learner, task.settings), 'baseline', seeds=1, epochs=1, out=tmp_path/'a', workers=2)
    assert str(e.value).startswith('`task` cannot be sent to the workers (TypeError: ') and '\n' not in str(e.value)
    assert not (tmp_path/'a'/'runs.csv').exists()
    # a module this process imports and the workers cannot: they started before it was on the path
    (tmp_path/'mod').mkdir()
    (tmp_path/'mod'/'only_here.py').write_text("from fastai.callback.core import Callback\nclass Nothing(Callback): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path/'mod'))
    from only_here import Nothing
    monkeypatch.setattr(experiment, 'CONFIGS', dict(experiment.CONFIGS))
    register_config('only_here', cbs=Nothing)
    with pytest.raises(ClusterError) as e:
        run_experiment(tiny_task(), 'only_here', seeds=1, epochs=1, out=tmp_path/'b', scheduler=cluster.scheduler_address)
    assert "cannot load the task or configuration (ModuleNotFoundError: No module named 'only_here')" in str(e.value)
    assert '\n' not in str(e.value) and read_runs(tmp_path/'b'/'runs.csv') == []
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None,
                      scheduler_kwargs=dict(dashboard_address='127.0.0.1:0')) as two:
        with pytest.raises(ClusterError, match=r'has 2 threads: each run needs a worker process of its own'):
            run_experiment(tiny_task(), 'baseline', seeds=1, epochs=1, out=tmp_path/'c', scheduler=two.scheduler_address)


def test_local_workers_one_gpu_each_and_deaf_to_ctrl_c():
    """Without GPUs: the assignment a GPU machine would get reaches the worker processes (spawned: a fresh CUDA each); the
    workers ignore SIGINT, so the Ctrl-C a terminal sends to the whole process group is the caller's alone"""
    devices = experiment._devices(4, '7,9', 2)
    assert devices == ['7', '9']  # at most one worker per GPU: two runs at a time, the others queue
    with experiment._dask_client(2, devices, None) as c:
        seen = c.run(lambda: (os.environ.get('CUDA_VISIBLE_DEVICES'), signal.getsignal(signal.SIGINT) == signal.SIG_IGN))
        assert sorted(seen.values()) == [('7', True), ('9', True)]
        assert set(c.nthreads().values()) == {1}
        assert c.cluster.scheduler.allowed_failures == 0  # a dead worker fails its run at once: the runner retries it
