"""End-to-end tests of the `fastai-regularize` CLI (in subprocesses) and of the data readers it relies on."""
import gzip, os, random, shutil, struct, subprocess, sys
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
            '--reliability', 'out/reliability.png')
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


@pytest.mark.parametrize('case', ['missing', 'empty', 'one_class', 'bad_arch', 'bad_lr', 'reliability_alone'])
def test_bad_input_one_line(tmp_path, env, digits, case):
    path = tmp_path/'data'
    extra = []
    if case == 'empty': path.mkdir()
    if case == 'one_class': shutil.copytree(digits/'train'/'4', path/'4')
    if case in ('bad_arch', 'bad_lr', 'reliability_alone'):
        shutil.copytree(digits/'train', path)
        extra = {'bad_arch': ['--arch', 'resnet_nope'], 'bad_lr': ['--lr', '-0.1'], 'reliability_alone': ['--reliability', 'r.png']}[case]
    r = cli(env, tmp_path, 'fit', path, *extra, timeout=120)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('fastai-regularize: error: fit: '), r.stderr
    assert {'missing': 'does not exist', 'empty': 'has no image files', 'one_class': "one class ('4')",
            'bad_arch': "unknown --arch 'resnet_nope'", 'bad_lr': '`lr` must be in',
            'reliability_alone': '--reliability needs --calibrate'}[case] in lines[0]


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


ARGVS = {'fit': [[], ['some/dir'], ['d', '--epochs', '2', '--no-mixup', '--lr', '0.01'], ['--test-dir', 't', '--cutmix', 'd'],
                 ['--sample-submission', 's.csv', '--submission', 'o.csv', '--seed', '7']],
         'compare': [[], ['d', '--out', 'o', '--bs', '8'], ['--seeds', '2', '--configs', 'baseline,mixup', '--fresh'],
                     ['--workers', '2', '--threads-per-run', '1'], ['--scheduler', 'tcp://127.0.0.1:8786']],
         'predict': [['m.pkl', 'd'], ['m.pkl', 'd', '--out', 'p.csv', '--seed', '3']]}

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
