"""End-to-end tests of the `fastai-regularize` CLI (in subprocesses) and of the data readers it relies on."""
import contextlib, gzip, io, json, os, pickle, random, shutil, struct, subprocess, sys, warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fastai_regularize import data as frd
from fastai_regularize.data import DataError, digits_folder, read_idx, load_idx_pair

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='session')
def env(tmp_path_factory):
    "Environment of the CLI subprocesses: this checkout first on the path, the digits cache in a temp folder"
    home = tmp_path_factory.mktemp('home')
    pp = os.pathsep.join(p for p in (str(ROOT), os.environ.get('PYTHONPATH', '')) if p)
    return {**os.environ, 'PYTHONPATH': pp, 'MPLBACKEND': 'Agg', 'FASTAI_REGULARIZE_HOME': str(home)}


def cli(env, cwd, *args, timeout=600):
    return subprocess.run([sys.executable, '-m', 'fastai_regularize.cli', *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


@pytest.fixture(scope='session')
def digits(tmp_path_factory):
    return digits_folder(tmp_path_factory.mktemp('data')/'digits')


def test_digits_folder(digits):
    files = sorted(digits.glob('*/*/*.png'))
    assert len(files) == 1797
    assert sorted({f.parent.name for f in files}) == [str(i) for i in range(10)]
    assert len(list((digits/'valid').glob('*/*.png'))) == 359
    from sklearn.datasets import load_digits
    d = load_digits()
    f = files[100]
    i = int(f.stem)
    assert f.parent.name == str(d.target[i])
    np.testing.assert_array_equal(np.array(Image.open(f)), np.round(d.images[i]*255/16).astype(np.uint8))


# IDX reference writer, from the format description (http://yann.lecun.com/exdb/mnist/), not from our reader
def write_idx(path, a, code=0x08, gz=False):
    dt = {0x08: '>u1', 0x0C: '>i4', 0x0D: '>f4'}[code]
    data = bytes([0, 0, code, a.ndim]) + struct.pack('>' + 'I'*a.ndim, *a.shape) + np.asarray(a, dtype=dt).tobytes()
    with (gzip.open if gz else open)(path, 'wb') as f: f.write(data)


@pytest.mark.parametrize('gz', [False, True])
def test_read_idx_roundtrip(tmp_path, gz):
    rng = np.random.default_rng(1)
    x,y = rng.integers(0, 256, (11, 28, 28)).astype(np.uint8),rng.integers(0, 10, 11).astype(np.uint8)
    write_idx(tmp_path/'x', x, gz=gz); write_idx(tmp_path/'y', y, gz=gz)
    xt,yt = load_idx_pair(tmp_path/'x', tmp_path/'y')
    assert xt.dtype == torch.uint8 and yt.dtype == torch.uint8
    np.testing.assert_array_equal(xt.numpy(), x); np.testing.assert_array_equal(yt.numpy(), y)
    big = np.array([[70000, -3]], dtype=np.int64)  # needs 4 big-endian bytes: catches a byte-order slip
    write_idx(tmp_path/'i', big, code=0x0C, gz=gz)
    np.testing.assert_array_equal(read_idx(tmp_path/'i').numpy(), big)


def test_read_idx_rejects(tmp_path):
    write_idx(tmp_path/'x', np.zeros((2, 3, 3), np.uint8))
    (tmp_path/'cut').write_bytes((tmp_path/'x').read_bytes()[:-2])
    with pytest.raises(DataError, match=r'shape \(2, 3, 3\) \(18 bytes of data\) but it holds 16 bytes'): read_idx(tmp_path/'cut')
    (tmp_path/'png').write_bytes(b'\x89PNG\r\n\x1a\n')
    with pytest.raises(DataError, match='not an IDX file'): read_idx(tmp_path/'png')
    write_idx(tmp_path/'y', np.zeros(3, np.uint8))
    with pytest.raises(DataError, match='2 images but'): load_idx_pair(tmp_path/'x', tmp_path/'y')


@pytest.fixture(scope='session')
def paddy(tmp_path_factory, digits):
    "A Kaggle-paddy-shaped folder from the digits: train_images/<label>/, test_images/, sample_submission.csv, 2 corrupt files"
    root = tmp_path_factory.mktemp('paddy')
    for lbl in range(10):
        (root/'train_images'/str(lbl)).mkdir(parents=True)
        for f in sorted((digits/'train'/str(lbl)).glob('*.png'))[:30]: shutil.copy(f, root/'train_images'/str(lbl)/f.name)
    (root/'test_images').mkdir()
    for f in sorted((digits/'valid').glob('*/*.png'))[:40]: shutil.copy(f, root/'test_images'/f.name)
    (root/'train_images'/'3'/'notes.png').write_text('this is not an image')
    good = sorted((root/'test_images').glob('*.png'))[0].read_bytes()
    (root/'test_images'/'truncated.png').write_bytes(good[:len(good)//2])
    ids = sorted(f.name for f in (root/'test_images').glob('*.png'))
    random.Random(0).shuffle(ids)
    pd.DataFrame({'image_id': ids, 'label': 'x'}).to_csv(root/'sample_submission.csv', index=False)
    return root


@pytest.fixture(scope='session')
def fitted(paddy, env):
    r = cli(env, paddy, 'fit', 'train_images', '--epochs', 1, '--size', 16, '--bs', 32, '--test-dir', 'test_images',
            '--sample-submission', 'sample_submission.csv', '--submission', 'out/submission.csv', '--export', 'model.pkl', '--calibrate',
            '--reliability', 'out/reliability.png', '--conformalize')
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_fit_submission(paddy, fitted):
    out = fitted.stdout + fitted.stderr
    assert not any(c in fitted.stdout for c in ('\r', '█', '|----'))  # a pipe: one line per epoch, no progress bars
    assert 'epoch 1/1  train_loss' in fitted.stdout
    assert 'notes.png' in out and 'truncated.png' in out  # both corrupt files are reported
    for k in ('error_rate', 'tta_error_rate', 'valid_loss', 'nll', 'ece', 'nll_calibrated', 'ece_calibrated'):
        assert k in fitted.stdout
    sample = pd.read_csv(paddy/'sample_submission.csv', dtype=str)
    sub = pd.read_csv(paddy/'out'/'submission.csv', dtype=str)
    assert list(sub.columns) == list(sample.columns)
    assert list(sub.image_id) == list(sample.image_id)  # the sample's (shuffled) row order
    assert set(sub.label) <= {str(i) for i in range(10)}  # every row, the unreadable image's included, filled
    assert (paddy/'model.pkl').is_file()
    assert 'conformal: APS scores of' in fitted.stdout
    from PIL import Image
    assert Image.open(paddy/'out'/'reliability.png').size[0] > 500  # the before/after diagrams were drawn


def test_predict_matches_fit(paddy, env, fitted):
    r = cli(env, paddy, 'predict', 'model.pkl', 'test_images', '--out', 'preds.csv')
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'truncated.png' in r.stderr
    sub = pd.read_csv(paddy/'out'/'submission.csv', dtype=str).set_index('image_id').label
    preds = pd.read_csv(paddy/'preds.csv', dtype=str)
    assert list(preds.columns) == ['image_id', 'label']
    assert len(preds) == 40 and 'truncated.png' not in set(preds.image_id)
    # TTA's augmented passes are random; fit and predict seed them alike, so the labels are identical
    assert list(preds.label) == list(sub[preds.image_id])


def test_predict_sets_column(paddy, env, fitted):
    "`--sets 0.9`: the sets `learn.predict_sets` gives the same images, written as space-separated names, most probable first"
    r = cli(env, paddy, 'predict', 'model.pkl', 'test_images', '--out', 'sets.csv', '--sets', '0.9')
    assert r.returncode == 0, r.stderr[-3000:]
    got = pd.read_csv(paddy/'sets.csv', dtype=str, keep_default_na=False)
    assert list(got.columns) == ['image_id', 'label', 'set', 'set_size']
    plain = pd.read_csv(paddy/'preds.csv', dtype=str) if (paddy/'preds.csv').is_file() else None
    if plain is not None: assert list(got.label) == list(plain.label)          # the same TTA passes: the same labels
    import warnings
    from fastai.learner import load_learner
    import fastai_regularize.conformal  # noqa: F401
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn = load_learner(paddy/'model.pkl')
        files = frd.get_test_images(paddy/'test_images')
    assert [f.name for f in files] == list(got.image_id)
    sets,probs = learn.predict_sets(learn.dls.test_dl(files), alpha=0.1)   # seeded as fit seeded it: --seed 42
    vocab = [str(v) for v in learn.dls.vocab]
    want = [' '.join(vocab[c] for c in probs[i].argsort(descending=True).tolist() if sets[i, c]) for i in range(len(files))]
    assert list(got.set) == want and list(got.set_size) == [str(int(n)) for n in sets.sum(1)]
    from fastai_regularize.cli import predict_probs
    assert torch.equal(probs, predict_probs(learn, files, seed=42, tta=learn.conformal.tta))   # one path: `tta_preds`
    assert 0 < sets.sum(1).double().mean() < len(vocab)                      # neither all empty nor all full
    learn.conformal = None                                                   # a learner without scores: one line
    learn.export(paddy/'plain.pkl')
    r = cli(env, paddy, 'predict', 'plain.pkl', 'test_images', '--sets', '0.9')
    errors = [l for l in r.stderr.splitlines() if 'error' in l]               # (load_learner's pickle warning comes first)
    assert r.returncode == 2 and len(errors) == 1 and errors[0].startswith('fastai-regularize: error: predict: --sets: plain.pkl has no '
                                                                           'conformal scores; fit it with --conformalize'), r.stderr


@pytest.fixture(scope='session')
def fitted_probs(paddy, env):
    "`fit --probs` into a log-loss sample submission (an id column, then the classes in another order)"
    ids = pd.read_csv(paddy/'sample_submission.csv', dtype=str).image_id
    pd.DataFrame({'image_id': ids, **{str(c): 0.1 for c in (3, 1, 0, 2, 4, 5, 6, 7, 8, 9)}}).to_csv(paddy/'sample_probs.csv', index=False)
    r = cli(env, paddy, 'fit', 'train_images', '--epochs', 1, '--size', 16, '--bs', 32, '--test-dir', 'test_images', '--calibrate',
            '--sample-submission', 'sample_probs.csv', '--submission', 'out/probs.csv', '--probs', '--export', 'model_probs.pkl')
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_fit_probs_fill_the_sample_and_predict_reproduces_them(paddy, env, fitted_probs):
    assert 'tta_nll_calibrated' in fitted_probs.stdout and 'wrote 40 probabilities' in fitted_probs.stdout
    sample = pd.read_csv(paddy/'sample_probs.csv', dtype={'image_id': str})
    sub = pd.read_csv(paddy/'out'/'probs.csv', dtype={'image_id': str})
    assert list(sub.columns) == list(sample.columns) and list(sub.image_id) == list(sample.image_id)
    classes = list(sample.columns[1:])
    assert torch.allclose(torch.tensor(sub[classes].values).sum(1), torch.ones(len(sub), dtype=torch.float64), atol=1e-6)
    # the unreadable image got the training set's class frequencies (the training part of fit's seeded split)
    from collections import Counter
    from fastai.data.transforms import parent_label
    counts = Counter(parent_label(f) for f in frd.image_folder_dls(paddy/'train_images', bs=32, size=16, seed=42).train_ds.items)
    freq = [counts[c]/sum(counts.values()) for c in classes]
    assert sub.set_index('image_id').loc['truncated.png', classes].tolist() == pytest.approx(freq, abs=1e-8)
    r = cli(env, paddy, 'predict', 'model_probs.pkl', 'test_images', '--out', 'probs2.csv', '--probs')
    assert r.returncode == 0, r.stderr[-3000:]
    again = pd.read_csv(paddy/'probs2.csv', dtype={'image_id': str})
    # a fresh process after load_learner draws the same augmentations as fit did: the same probabilities, digit for digit
    assert (sub.set_index('image_id').loc[again.image_id, classes].values == again[classes].values).all()
    # `predict --probs`: the vocab as header, one row per readable image, exactly the installed TTA map's combination
    import warnings
    from fastai.learner import load_learner
    from fastai_regularize.activations import tta_logits, combine_tta
    from fastai_regularize.cli import predict_probs
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn = load_learner(paddy/'model_probs.pkl')
        files = frd.get_test_images(paddy/'test_images')
    vocab = [str(v) for v in learn.dls.vocab]
    assert list(again.columns) == ['image_id', *vocab] and list(again.image_id) == [f.name for f in files]
    assert learn.tta_params == {'n': 4, 'beta': 0.25}                        # `fit --calibrate` calibrated the TTA path
    probs = predict_probs(learn, files, seed=42)
    assert torch.equal(torch.tensor(again[vocab].values).float(), probs)     # the file holds them exactly (float32)
    P,_ = tta_logits(learn, dl=learn.dls.test_dl(files), seed=42)
    assert torch.equal(probs, combine_tta(torch.stack([learn.tta_act(z) for z in P])))


@pytest.mark.parametrize('case', ['missing', 'empty', 'one_class', 'bad_arch', 'bad_lr', 'reliability_alone', 'probs_alone'])
def test_bad_input_one_line(tmp_path, env, digits, case):
    path = tmp_path/'data'
    extra = []
    if case == 'empty': path.mkdir()
    if case == 'one_class': shutil.copytree(digits/'train'/'4', path/'4')
    if case in ('bad_arch', 'bad_lr', 'reliability_alone', 'probs_alone'):
        shutil.copytree(digits/'train', path)
        extra = {'bad_arch': ['--arch', 'resnet_nope'], 'bad_lr': ['--lr', '-0.1'], 'reliability_alone': ['--reliability', 'r.png'],
                 'probs_alone': ['--probs']}[case]
    r = cli(env, tmp_path, 'fit', path, *extra, timeout=120)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('fastai-regularize: error: fit: '), r.stderr
    assert {'missing': 'does not exist', 'empty': 'has no image files', 'one_class': "one class ('4')",
            'bad_arch': "unknown --arch 'resnet_nope'", 'bad_lr': '`lr` must be in',
            'reliability_alone': '--reliability needs --calibrate', 'probs_alone': '--probs needs --test-dir'}[case] in lines[0]


def test_usage(env, tmp_path):
    r = cli(env, tmp_path, 'frobnicate', timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and 'unknown command' in r.stderr


def test_get_test_images_skips_corrupt(paddy):
    with pytest.warns(frd.DataWarning, match='truncated.png'): files = frd.get_test_images(paddy/'test_images')
    assert len(files) == 40 and files == sorted(files)


def test_fit_timm_arch_on_digits(env, tmp_path):
    "The default data (digits) with a timm architecture given by name, one epoch"
    r = cli(env, tmp_path, 'fit', '--arch', 'resnet10t', '--epochs', 1, '--size', 16, '--no-mixup')
    assert r.returncode == 0, r.stderr[-3000:]
    err = float(next(l for l in r.stdout.splitlines() if l.startswith('error_rate')).split()[-1])
    assert err < 0.9  # better than chance (0.9): it trained


ARGVS = {'fit': [[], ['some/dir'], ['d', '--epochs', '2', '--no-mixup', '--lr', '0.01'], ['--test-dir', 't', '--cutmix', 'd'], ['--test-dir', 't', '--probs'],
                 ['--sample-submission', 's.csv', '--submission', 'o.csv', '--seed', '7']],
         'compare': [[], ['d', '--out', 'o', '--bs', '8'], ['--seeds', '2', '--configs', 'baseline,mixup', '--fresh'],
                     ['--workers', '2', '--threads-per-run', '1'], ['--scheduler', 'tcp://127.0.0.1:8786']],
         'predict': [['m.pkl', 'd'], ['m.pkl', 'd', '--out', 'p.csv', '--seed', '3'], ['m.pkl', 'd', '--sets', '0.9'],
                     ['m.safetensors', 'd', '--trust'],
                     ['m.pkl', 'd', '--probs']]}

@pytest.mark.parametrize('name', sorted(ARGVS))
def test_parser_without_fastcore_pos(name, monkeypatch):
    "fastai 2.7 pins fastcore < 1.8, whose `anno_parser` has no `pos`: `_parser`'s own parser reads the same arguments"
    from fastai_regularize import cli as frc
    func,pos = frc.COMMANDS[name]
    ref = frc._parser(func, 'prog', pos)
    old = lambda func, prog=None: pytest.fail('the fallback must not call anno_parser')  # fastcore 1.7's signature
    monkeypatch.setattr(frc, 'anno_parser', old)
    fallback = frc._parser(func, 'prog', pos)
    for argv in ARGVS[name]:
        want = {k:v for k,v in vars(ref.parse_args(argv)).items() if k not in ('pdb', 'xtra')}
        assert vars(fallback.parse_args(argv)) == want, argv


# ================================================================ issue #21: model files, checks before training
def run_main(*args):
    "`main` in this process: (exit status, stdout, stderr)"
    from fastai_regularize.cli import main
    o,e = io.StringIO(),io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e): rc = main([str(a) for a in args])
    return rc,o.getvalue(),e.getvalue()


@pytest.fixture(scope='session')
def fitted_safe(paddy, env, fitted):
    "The run of `fitted` again (same seed and flags, --conformalize too), exported as a safe bundle"
    r = cli(env, paddy, 'fit', 'train_images', '--epochs', 1, '--size', 16, '--bs', 32, '--test-dir', 'test_images',
            '--sample-submission', 'sample_submission.csv', '--submission', 'out/submission_safe.csv', '--export',
            'model.safetensors', '--calibrate', '--reliability', 'out/reliability_safe.png', '--conformalize')
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'exported the learner to model.safetensors (a safe bundle)' in r.stdout
    return paddy/'model.safetensors'


def _no_unpickling(monkeypatch):
    def refuse(*a, **k): raise AssertionError('unpickling while predicting from a safe bundle')
    for mod,name in ((pickle, 'load'), (pickle, 'loads'), (pickle, 'Unpickler'), (torch, 'load'), (torch.serialization, 'load')):
        monkeypatch.setattr(mod, name, refuse)


def test_safe_bundle_predicts_as_the_pickle(paddy, fitted, fitted_safe, tmp_path, monkeypatch):
    "`fit --export x.safetensors` and `--export x.pkl` of the same run: equal submissions, equal `predict` CSVs, equal calibrated TTA"
    assert (paddy/'out'/'submission_safe.csv').read_text() == (paddy/'out'/'submission.csv').read_text()
    rc,_,err = run_main('predict', paddy/'model.pkl', paddy/'test_images', '--out', tmp_path/'pkl.csv')
    assert rc == 0, err
    with monkeypatch.context() as m:
        _no_unpickling(m)
        rc,_,err = run_main('predict', fitted_safe, paddy/'test_images', '--out', tmp_path/'safe.csv')
    assert rc == 0, err
    assert 'pickle' not in err
    assert (tmp_path/'safe.csv').read_text() == (tmp_path/'pkl.csv').read_text()
    sub = pd.read_csv(paddy/'out'/'submission.csv', dtype=str).set_index('image_id').label
    preds = pd.read_csv(tmp_path/'safe.csv', dtype=str)
    assert list(preds.label) == list(sub[preds.image_id])
    # calibrated too: the installed temperature and the calibrated TTA probabilities, not only the argmax
    from fastai.torch_core import set_seed
    from fastai_regularize.activations import BaseSoftmax
    from fastai_regularize.cli import load_model
    a,b = load_model(paddy/'model.pkl'),load_model(fitted_safe)
    assert type(b.default_act) is BaseSoftmax and b.default_act.base == a.default_act.base != np.e
    files = frd.get_test_images(paddy/'test_images')
    probs = []
    for learn in (a, b):
        set_seed(42); probs.append(learn.tta(dl=learn.dls.test_dl(files))[0])
    torch.testing.assert_close(probs[0], probs[1], rtol=0, atol=1e-6)


@pytest.fixture(scope='session')
def test_imgs(paddy, tmp_path_factory):
    "Five readable test images (paddy's test folder also holds a truncated one, which `predict` warns about)"
    d = tmp_path_factory.mktemp('test_imgs')
    for f in sorted((paddy/'test_images').glob('*.png'))[1:6]: shutil.copy(f, d/f.name)
    return d


class Planted:
    "Unpickling it makes a folder: stands for any code the author of a pickle wants run"
    def __init__(self, where): self.where = where
    def __reduce__(self): return (os.mkdir, (self.where,))

@pytest.mark.parametrize('case', ['world_writable', 'group_writable', 'other_owner', 'private', 'trusted'])
def test_predict_crafted_pickle(test_imgs, tmp_path, case):
    fn,marker = tmp_path/'model.pkl',tmp_path/'ran'
    torch.save(Planted(str(marker)), fn)
    os.chmod(fn, {'world_writable': 0o666, 'group_writable': 0o660, 'trusted': 0o666}.get(case, 0o600))
    if case == 'other_owner':
        if os.geteuid() != 0: pytest.skip('changing a file owner needs root')
        os.chown(fn, 65534, -1)
    rc,_,err = run_main('predict', fn, test_imgs, '--out', tmp_path/'p.csv', *(['--trust'] if case == 'trusted' else []))
    lines = err.strip().splitlines()
    assert rc == 2 and 'Traceback' not in err
    if case in ('world_writable', 'group_writable', 'other_owner'):
        assert len(lines) == 1 and lines[0].startswith('fastai-regularize: error: predict: refusing to load the pickle'), err
        assert not marker.exists()
    else:
        assert lines[0] == f'fastai-regularize: warning: {fn} is a pickle: loading it runs any code its author put in it; load only ' \
                           'models you made or trust, and share models as .safetensors bundles (fit --export model.safetensors)'
        assert len(lines) == 2 and 'holds a NoneType, not a fastai Learner' in lines[1]
        assert marker.is_dir()   # the warning is about this: the file's code ran


def _raw(fn):
    "The safetensors layout read with struct and json, from the format's description: (table, data bytes)"
    raw = Path(fn).read_bytes()
    n = struct.unpack('<Q', raw[:8])[0]
    return json.loads(raw[8:8+n]),raw[8+n:]

def _write_raw(fn, table, data):
    hb = json.dumps(table).encode()
    hb += b' ' * (-len(hb) % 8)
    Path(fn).write_bytes(struct.pack('<Q', len(hb)) + hb + data)

def _edited(src, dst, edit):
    table,data = _raw(src)
    h = json.loads(table['__metadata__']['fastai_regularize'])
    edit(h)
    table['__metadata__']['fastai_regularize'] = json.dumps(h)
    _write_raw(dst, table, data)

@pytest.mark.parametrize('case,msg', [
    ('truncated.pkl', 'is not a readable learn.export file'), ('text.pkl', 'is not a readable learn.export file'),
    ('dict.pkl', 'holds a dict, not a fastai Learner'), ('header.safetensors', 'is not a valid safetensors file'),
    ('truncated.safetensors', 'is not a valid safetensors file'), ('classes.safetensors', 'its weights do not fit resnet18 with 4 outputs'),
    ('arch.safetensors', 'its weights do not fit resnet34 with 10 outputs'), ('newer.safetensors', 'bundle format 2, newer than this'),
    ('pickle.safetensors', 'is not a valid safetensors file'), ('model.pth', "must end in .safetensors")])
def test_predict_corrupt_or_wrong_model(paddy, fitted, fitted_safe, test_imgs, tmp_path, case, msg):
    fn = tmp_path/case
    if case == 'truncated.pkl': fn.write_bytes((paddy/'model.pkl').read_bytes()[:100_000])
    elif case == 'text.pkl': fn.write_text('hello, I am not a model\n')
    elif case == 'dict.pkl': torch.save({'state_dict': {}}, fn)
    elif case == 'truncated.safetensors': fn.write_bytes(fitted_safe.read_bytes()[:-1000])
    elif case == 'pickle.safetensors': torch.save(Planted(str(tmp_path/'ran')), fn)   # a pickle named .safetensors: never unpickled
    elif case == 'model.pth': shutil.copy(paddy/'model.pkl', fn)
    elif case == 'header.safetensors':
        table,data = _raw(fitted_safe)
        k = next(k for k in table if k != '__metadata__' and len(table[k]['shape']) == 2)
        table[k]['shape'][0] += 1
        _write_raw(fn, table, data)
    else:
        edit = {'classes.safetensors': lambda h: (h['model'].update(n_out=4), h['data'].update(vocab=['a', 'b', 'c', 'd'])),
                'arch.safetensors': lambda h: h['model'].update(arch='resnet34'),
                'newer.safetensors': lambda h: h.update(format_version=2)}[case]
        _edited(fitted_safe, fn, edit)
    os.chmod(fn, 0o600)
    rc,_,err = run_main('predict', fn, test_imgs, '--out', tmp_path/'p.csv')
    errors = [l for l in err.strip().splitlines() if not l.startswith(f'fastai-regularize: warning: {fn} is a pickle: ')]
    assert rc == 2 and 'Traceback' not in err and len(errors) == 1, err
    assert errors[0].startswith('fastai-regularize: error: predict: ') and msg in errors[0], err
    assert not (tmp_path/'ran').exists() and not (tmp_path/'p.csv').exists()


def _sample(tmp_path, paddy, case):
    ids = pd.read_csv(paddy/'sample_submission.csv', dtype=str).image_id
    fn = tmp_path/'sample.csv'
    if case == 'no_label': pd.DataFrame({'image_id': ids, 'a': 'x', 'b': 'y'}).to_csv(fn, index=False)
    elif case == 'unknown_ids': pd.DataFrame({'image_id': [*ids, 'nope.png'], 'label': 'x'}).to_csv(fn, index=False)
    elif case == 'id_only': pd.DataFrame({'image_id': ids}).to_csv(fn, index=False)
    elif case == 'empty': fn.write_bytes(b'')
    elif case == 'binary': fn.write_bytes(b'\xff\xfe\x00\x81garbage\x00' * 20)
    elif case == 'probs_columns': pd.DataFrame({'image_id': ids, **{str(c): 0.1 for c in range(9)}, 'ten': 0.1}).to_csv(fn, index=False)
    return fn

@pytest.mark.parametrize('case,msg', [
    ('no_label', "cannot tell the label column among ['a', 'b']"), ('unknown_ids', 'not in the test folder: nope.png'),
    ('id_only', 'cannot tell the label column among []'), ('empty', 'is not a readable CSV'), ('binary', 'is not a readable CSV'),
    ('export_suffix', "--export '"), ('export_parent', 'is a file, not a folder'), ('submission_folder', 'is a folder; give a file name'),
    ('missing_test_dir', 'test folder'), ('reliability_suffix', '--reliability'),
    ('probs_columns', "its columns ['0', '1', '2', '3', '4', '5', '6', '7', '8', 'ten'] are not the model's classes ['0', '1', '2', '3', '4', '5', '6', '7', '8', '9']")])
def test_fit_checks_inputs_before_training(paddy, tmp_path, monkeypatch, case, msg):
    "Every path and the sample submission are checked before anything trains (`train_run` would fail the test)"
    import fastai_regularize.experiment as fre
    def trained(*a, **k): raise AssertionError('training started despite bad input')
    monkeypatch.setattr(fre, 'train_run', trained)
    (tmp_path/'file').write_text('x')
    args = ['fit', paddy/'train_images', '--epochs', 1, '--test-dir', paddy/'test_images', '--submission', tmp_path/'sub.csv']
    if case in ('no_label', 'unknown_ids', 'id_only', 'empty', 'binary'): args += ['--sample-submission', _sample(tmp_path, paddy, case)]
    if case == 'probs_columns': args += ['--probs', '--sample-submission', _sample(tmp_path, paddy, case)]
    extra = {'export_suffix': ['--export', tmp_path/'m.onnx'], 'export_parent': ['--export', tmp_path/'file'/'m.safetensors'],
             'submission_folder': ['--submission', tmp_path], 'missing_test_dir': ['--test-dir', tmp_path/'nope'],
             'reliability_suffix': ['--calibrate', '--reliability', tmp_path/'r.nope']}
    rc,out,err = run_main(*args, *extra.get(case, []))
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith('fastai-regularize: error: fit: ') and msg in lines[0], err
    assert 'epoch' not in out


def test_fit_checks_the_safe_export_before_the_first_epoch(paddy, tmp_path, monkeypatch):
    "With --export x.safetensors the learner is checked as soon as it is built: a refusal comes before `fit` runs"
    import fastai_regularize.safe as frs
    from fastai.learner import Learner
    def refuse(learn, **k): raise ValueError('the loss Frobnicate is not one export_safe can rebuild')
    def fitting(*a, **k): raise AssertionError('an epoch started')
    monkeypatch.setattr(frs, 'check_safe', refuse)
    monkeypatch.setattr(Learner, 'fit', fitting)
    rc,_,err = run_main('fit', paddy/'train_images', '--epochs', 1, '--size', 8, '--export', tmp_path/'m.safetensors')
    assert rc == 2 and 'Traceback' not in err  # (the first line warns about paddy's unreadable notes.png)
    assert err.strip().splitlines()[-1] == f"fastai-regularize: error: fit: --export {tmp_path/'m.safetensors'}: the loss Frobnicate is not one export_safe can rebuild"


def test_compare_checks_out_before_training(paddy, tmp_path, monkeypatch):
    import fastai_regularize.experiment as fre
    def ran(*a, **k): raise AssertionError('compare started training despite bad input')
    monkeypatch.setattr(fre, 'run_experiment', ran)
    (tmp_path/'file').write_text('x')
    rc,_,err = run_main('compare', paddy/'train_images', '--out', tmp_path/'file')
    assert rc == 2 and err.strip() == f"fastai-regularize: error: compare: --out {tmp_path/'file'} is a file; give a folder"
    rc,_,err = run_main('compare', tmp_path/'nope', '--out', tmp_path/'o')
    assert rc == 2 and err.strip() == f"fastai-regularize: error: compare: path {tmp_path/'nope'} does not exist"


def test_probs_and_sets_equal_for_both_formats(paddy, fitted, fitted_safe, tmp_path, monkeypatch):
    "`predict --probs` and `predict --sets` from the safe bundle and from the pickle of the same run: the same files, digit for digit"
    from fastai_regularize.cli import load_model
    out = {}
    for kind,model in (('pkl', paddy/'model.pkl'), ('safe', fitted_safe)):
        with monkeypatch.context() as m:
            if kind == 'safe': _no_unpickling(m)
            for opt in (['--probs'], ['--sets', '0.9']):
                fn = tmp_path/f"{kind}{opt[0]}.csv"
                rc,_,err = run_main('predict', model, paddy/'test_images', '--out', fn, *opt)
                assert rc == 0, err
                out[kind, opt[0]] = fn.read_text()
    assert out['safe', '--probs'] == out['pkl', '--probs'] and out['safe', '--sets'] == out['pkl', '--sets']
    b = load_model(fitted_safe)
    probs = pd.read_csv(tmp_path/'safe--probs.csv', dtype={'image_id': str})
    assert list(probs.columns) == ['image_id', *[str(v) for v in b.dls.vocab]] and len(probs) == 40
    assert b.tta_params == {'n': 4, 'beta': 0.25} and type(b.tta_act).__name__ == 'BaseSoftmax'   # calibrated for TTA
    assert b.conformal.tta == {'n': 4, 'beta': 0.25, 'use_max': False} and b.conformal.score == 'aps'
    sets = pd.read_csv(tmp_path/'safe--sets.csv', dtype=str, keep_default_na=False)
    assert list(sets.columns) == ['image_id', 'label', 'set', 'set_size'] and 0 < sets.set_size.astype(int).mean() < 10


def test_predict_sets_refuses_scores_of_another_tta_calibration(paddy, fitted_safe, test_imgs, tmp_path):
    "A bundle whose TTA map is not the one its conformal scores were made under: `--sets` refuses in one line, `--probs` still works"
    fn = tmp_path/'other_tta.safetensors'
    _edited(fitted_safe, fn, lambda h: h['extras']['tta_act']['state'].update(base=h['extras']['tta_act']['state']['base']*1.5))
    rc,_,err = run_main('predict', fn, test_imgs, '--out', tmp_path/'s.csv', '--sets', '0.9')
    assert rc == 2 and err.strip() == ("fastai-regularize: error: predict: --sets: the learner's calibration of TTA (`tta_act` and "
        "`tta_params`, else `default_act`) changed since `conformalize()`, so the held-out scores came from other probabilities; "
        "call `learn.conformalize()` again"), err
    assert not (tmp_path/'s.csv').exists()
    rc,_,err = run_main('predict', fn, test_imgs, '--out', tmp_path/'p.csv', '--probs')
    assert rc == 0, err
