"""The experiment runner end to end through `fastai-regularize compare`: the same seed in fresh processes gives the
same numbers, an interrupted comparison resumes without recomputing what finished, the summary's paired intervals
match a hand computation, and output to a log file has no progress bars."""
import csv, io, math, os, shutil, signal, subprocess, sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pandas as pd
import pytest
from conftest import tiny_digits
import torch
from fastai.callback.core import Callback

from fastai_regularize import experiment
from fastai_regularize.cli import main
from fastai_regularize.data import digits_folder
from fastai_regularize.experiment import CONFIGS, Config, read_runs, _append_row, _sigint_held
from fastai_regularize.mixup import MixUp

ROOT = Path(__file__).resolve().parents[1]
TINY = ['--epochs', '1', '--size', '16', '--bs', '16']
METRICS = ['error_rate', 'tta_error_rate', 'nll', 'ece', 'temperature', 'nll_calibrated', 'ece_calibrated',
           'tta_nll', 'tta_ece', 'tta_temperature', 'tta_nll_calibrated', 'tta_ece_calibrated', 'tta_nll_single_t', 'tta_ece_single_t']


@pytest.fixture(scope='module')
def data(tmp_path_factory): return tiny_digits(tmp_path_factory)


def compare_in_fresh_process(data, out, *args):
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join(p for p in (str(ROOT), os.environ.get('PYTHONPATH', '')) if p),
           'MPLBACKEND': 'Agg'}
    env.pop('PYTHONHASHSEED', None)
    return subprocess.run([sys.executable, '-m', 'fastai_regularize.cli', 'compare', str(data), *TINY, '--out', str(out), *args],
                          capture_output=True, text=True, env=env, timeout=600)


def test_same_seed_in_fresh_processes_gives_identical_numbers(data, tmp_path):
    "The first run of a process used to depend on the state of Python's `random` when its DataLoaders were built"
    rs = [compare_in_fresh_process(data, tmp_path/f'out{i}', '--seeds', '1', '--configs', 'mixup') for i in range(2)]
    for r in rs: assert r.returncode == 0, r.stderr[-3000:]
    a,b = (pd.read_csv(tmp_path/f'out{i}'/'runs.csv') for i in range(2))
    assert a[METRICS + ['valid_error_by_epoch', 'train_loss_by_epoch']].equals(b[METRICS + ['valid_error_by_epoch', 'train_loss_by_epoch']])
    pa,pb = (torch.load(tmp_path/f'out{i}'/'preds'/'mixup__s42.pt') for i in range(2))
    assert torch.equal(pa['logits'], pb['logits']) and torch.equal(pa['targs'], pb['targs'])
    assert torch.equal(pa['tta_logits'], pb['tta_logits']) and pa['tta_logits'].shape == (5, 18, 3)
    # stdout is a pipe here, as in `make demo > log`: one line per epoch and per run, no redrawn bars
    out = rs[0].stdout
    assert not any(c in out for c in ('\r', '\x1b', '█', '|----'))  # fastprogress's bars, redrawn or appended
    assert [l for l in out.splitlines() if ' epoch ' in l][0].startswith('mixup s42  epoch 1/1  train_loss ')
    assert sum(l.startswith('mixup s42: error ') for l in out.splitlines()) == 1


class Interrupt(Callback):
    "Ctrl-C in the middle of a training batch"
    def after_batch(self): raise KeyboardInterrupt


def run_main(*args):
    o,e = io.StringIO(),io.StringIO()
    argv = sys.argv[:]
    try:
        with redirect_stdout(o), redirect_stderr(e): rc = main(list(map(str, args)))
    finally: sys.argv = argv
    return rc,o.getvalue(),e.getvalue()


@pytest.fixture(scope='module')
def resumed(data, tmp_path_factory):
    "`compare --seeds 2 --configs baseline,mixup` interrupted in its second run, then run again"
    out = tmp_path_factory.mktemp('resume')/'cmp'
    args = ('compare', data, *TINY, '--seeds', 2, '--configs', 'baseline,mixup', '--out', out)
    mp = pytest.MonkeyPatch()
    mp.setitem(CONFIGS, 'mixup', Config('mixup', cbs=(MixUp, Interrupt)))
    try: first = run_main(*args)
    finally: mp.undo()
    after_interrupt = (out/'runs.csv').read_text()
    preds_after_interrupt = sorted(f.name for f in (out/'preds').iterdir())
    second = run_main(*args)
    return dict(out=out, args=args, first=first, second=second, after_interrupt=after_interrupt,
                preds_after_interrupt=preds_after_interrupt)


def test_interrupted_compare_resumes_without_recomputing(resumed):
    rc,o,e = resumed['first']
    assert rc == 130
    assert e.count('\n') == 1 and e.startswith('fastai-regularize: compare: interrupted in run mixup s42; ')
    assert 'holds the 1 finished run(s): run the same command again to resume' in e
    first_rows = resumed['after_interrupt'].splitlines()
    assert len(first_rows) == 2 and first_rows[1].startswith('baseline,42,')  # the header and one whole row
    assert resumed['preds_after_interrupt'] == ['baseline__s42.pt']       # no file of the interrupted run
    rc,o,e = resumed['second']
    assert rc == 0, e[-3000:]
    assert '1 finished run(s) found; 3 to go' in o
    text = (resumed['out']/'runs.csv').read_text()
    assert text.startswith(resumed['after_interrupt'])  # byte for byte: finish time, wall time, metrics
    rows = read_runs(resumed['out']/'runs.csv')
    assert [(r['config'], r['seed']) for r in rows] == [('baseline', '42'), ('mixup', '42'), ('baseline', '43'), ('mixup', '43')]
    assert sorted(f.name for f in (resumed['out']/'preds').iterdir()) == [f'{c}__s{s}.pt' for c in ('baseline', 'mixup') for s in (42, 43)]
    for f in ('summary.csv', 'summary.json', 'summary.md', 'compare.png'): assert (resumed['out']/f).stat().st_size > 0


T_975_DF1 = 12.706204736174698  # Student's t, 0.975 quantile, 1 degree of freedom (t tables; scipy.stats.t.ppf)


def test_summary_paired_ci_matches_hand_computation(resumed):
    runs = pd.read_csv(resumed['out']/'runs.csv').set_index(['config', 'seed'])
    s = pd.read_csv(resumed['out']/'summary.csv').set_index(['config', 'metric'])
    for m in METRICS:
        d = [runs.loc[('mixup', k), m] - runs.loc[('baseline', k), m] for k in (42, 43)]
        mean = (d[0] + d[1])/2
        half = T_975_DF1*abs(d[0] - d[1])/math.sqrt(2)/math.sqrt(2)  # sd of two values is |a - b|/sqrt(2)
        r = s.loc[('mixup', m)]
        assert r['n_pairs'] == 2 and r['reference'] == 'baseline'
        assert r['diff'] == pytest.approx(mean, rel=1e-9, abs=1e-12)
        assert r['diff_low'] == pytest.approx(mean - half, rel=1e-9, abs=1e-12)
        assert r['diff_high'] == pytest.approx(mean + half, rel=1e-9, abs=1e-12)
        if m not in ('temperature', 'tta_temperature'): assert r['better'] == sum(v < 0 for v in d)
        base = [runs.loc[('baseline', k), m] for k in (42, 43)]
        assert s.loc[('baseline', m)]['mean'] == pytest.approx(sum(base)/2, rel=1e-12)
        assert s.loc[('baseline', m)]['std'] == pytest.approx(abs(base[0] - base[1])/math.sqrt(2), rel=1e-9, abs=1e-15)


@pytest.mark.parametrize('change,name', [(('--lr', '0.01'), 'lr'), (('--size', '20'), 'size')])
def test_other_settings_are_a_one_line_error(resumed, change, name):
    rc,o,e = run_main(*resumed['args'], *change)
    assert rc == 2 and e.count('\n') == 1, e
    assert f"holds runs made with {name}=" in e and '--fresh' in e
    assert len(read_runs(resumed['out']/'runs.csv')) == 4  # untouched


def test_sigint_while_a_row_is_written_waits_for_the_whole_row(tmp_path, monkeypatch, request):
    "A real SIGINT, delivered right after runs.csv is opened: the row is still written whole, then Ctrl-C is raised"
    real_open = open
    def open_then_sigint(*a, **k):
        f = real_open(*a, **k)
        os.kill(os.getpid(), signal.SIGINT)
        return f
    monkeypatch.setattr(experiment, 'open', open_then_sigint, raising=False)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's, whatever this test process inherited
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, before))
    fn = tmp_path/'runs.csv'
    with pytest.raises(KeyboardInterrupt): _append_row(fn, ['config', 'seed', 'error_rate'], dict(config='mixup', seed=1, error_rate=0.25))
    assert fn.read_text() == 'config,seed,error_rate\nmixup,1,0.25\n'
    ran = []
    with pytest.raises(KeyboardInterrupt):
        with _sigint_held():
            os.kill(os.getpid(), signal.SIGINT)
            ran.append('after the signal')
    assert ran == ['after the signal']
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # a process that ignores SIGINT (started in the background with `&`) writes its row and goes on
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _append_row(fn, ['config', 'seed', 'error_rate'], dict(config='mixup', seed=2, error_rate=0.5))
    assert fn.read_text().endswith('mixup,1,0.25\nmixup,2,0.5\n') and signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_tta_columns_match_the_saved_passes(resumed):
    "tta_error_rate and tta_nll/ece of runs.csv are `tta()`'s probabilities rebuilt from the saved passes (`combine_tta`)"
    import torch.nn.functional as F
    from fastai_regularize.activations import combine_tta
    from fastai_regularize.calibration_metrics import calibration_error
    runs = pd.read_csv(resumed['out']/'runs.csv').set_index(['config', 'seed'])
    for (c, s),r in runs.iterrows():
        p = torch.load(resumed['out']/'preds'/f'{c}__s{s}.pt')
        assert p['tta_logits'].dtype == torch.float32 and p['tta_beta'] == 0.25
        assert torch.equal(p['tta_logits'][-1], p['logits'])            # the plain pass is the saved logits
        q = combine_tta(torch.stack([F.softmax(z, -1) for z in p['tta_logits']]), p['tta_beta'])
        assert r['tta_error_rate'] == (q.argmax(1) != p['targs']).float().mean().item()   # exactly: same floats
        q = q.double()
        assert r['tta_nll'] == pytest.approx(F.nll_loss(q.log(), p['targs']).item(), rel=1e-6)
        assert r['tta_ece'] == pytest.approx(calibration_error(q, p['targs']), abs=1e-6)


def test_an_older_runs_csv_is_upgraded_not_refused(tmp_path):
    "A runs.csv without this version's columns: rewritten with the new header, every old cell kept, the new ones blank"
    fn = tmp_path/'runs.csv'
    fn.write_text('config,seed,error_rate,epochs\nbaseline,0,0.25,2\n"mixup,x",1,0.5,2\n')
    cols = ['config', 'seed', 'error_rate', 'tta_nll', 'epochs', 'tta_ece']
    experiment._upgrade_runs(fn, cols)
    assert fn.read_text() == 'config,seed,error_rate,tta_nll,epochs,tta_ece\nbaseline,0,0.25,,2,\n"mixup,x",1,0.5,,2,\n'
    experiment._upgrade_runs(fn, cols)                                    # nothing to do the second time
    assert fn.read_text().startswith('config,seed,error_rate,tta_nll,epochs,tta_ece\n')
    assert not list(tmp_path.glob('.*tmp'))
    with pytest.raises(experiment.SettingsMismatch, match="has column\\(s\\) 'tta_nll', 'tta_ece' that this version does not write"):
        experiment._upgrade_runs(fn, ['config', 'seed', 'error_rate', 'epochs'])
