"""The offline routes of the README's install section: build the sdist and the wheel as `make dist` does, install each
with `--no-index` into a fresh venv that has fastai (Kaggle's image) but not this package, and use it."""
import os, re, subprocess, sys, sysconfig, tarfile, textwrap, venv, zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = ('all', 'core', 'activations', 'native', 'losses', 'mixup', 'manifold', 'calibration', 'conformal', 'distributed',
           'kaggle', 'safe')
CSRC = ('fastai_regularize/csrc/fr_native.c', 'fastai_regularize/csrc/fr_rows.h')  # the kernel is built from these

# without PYTHONPATH: a checkout on it would make the fresh venv see the package before it is installed
ENV = {k:v for k,v in os.environ.items() if k != 'PYTHONPATH'}

def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, **kw)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r

def version()->str: return re.search(r'__version__ = "(.+)"', (ROOT/'fastai_regularize'/'__init__.py').read_text())[1]

@pytest.fixture(scope='module')
def dist(tmp_path_factory)->Path:
    "dist/ as `make dist` builds it: the sdist, then the wheel built from the sdist (the code `kaggle-dataset` builds with)"
    from fastai_regularize.kaggle import build_dist
    out = tmp_path_factory.mktemp('dist')
    build_dist(ROOT, out)
    return out

def kaggle_venv(tmp_path:Path, leave_out:tuple=('fastai_regularize',))->Path:
    "A fresh venv standing for Kaggle's image: fastai and its dependencies are there, `leave_out` are not; its python"
    # links to this venv's packages, added as a plain path; the packages named in `leave_out` (our package's editable
    # install and metadata first) left out
    image = tmp_path/'image'
    image.mkdir()
    for p in Path(sysconfig.get_paths()['purelib']).iterdir():
        if not any(n in p.name for n in leave_out) and not p.name.endswith('.pth'): (image/p.name).symlink_to(p)
    env_dir = tmp_path/'kaggle'
    venv.create(env_dir, with_pip=True)
    py = env_dir/'bin'/'python'
    site = run([str(py), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])']).stdout.strip()
    Path(site, 'kaggle_image.pth').write_text(f'{image}\n')
    # venv's own old setuptools would shadow the image's (torch pins setuptools>=77): one set of packages, as on Kaggle
    run([str(py), '-m', 'pip', 'uninstall', '-q', '-y', 'setuptools'])
    for n in leave_out:
        r = subprocess.run([str(py), '-c', f'import {n}'], capture_output=True, text=True, cwd=tmp_path, env=ENV)
        assert r.returncode != 0, f'the fresh venv must not see {n} before the install'
    return py

def installed_version(py:Path, cwd:Path)->str:
    "Import the package in `py`'s venv, check it is the installed copy, return its version"
    script = "import fastai_regularize as f, fastai_regularize.all; assert 'site-packages' in f.__file__, f.__file__; print(f.__version__)"
    return run([str(py), '-c', script], cwd=cwd).stdout.strip()

@pytest.mark.slow
def test_dist_names_and_contents(dist):
    v = version()
    assert sorted(p.name for p in dist.iterdir()) == [f'fastai_regularize-{v}-py3-none-any.whl', f'fastai_regularize-{v}.tar.gz']
    names = zipfile.ZipFile(dist/f'fastai_regularize-{v}-py3-none-any.whl').namelist()
    sdist = tarfile.open(dist/f'fastai_regularize-{v}.tar.gz').getnames()
    for mod in MODULES:
        assert f'fastai_regularize/{mod}.py' in names, names
        assert f'fastai_regularize-{v}/fastai_regularize/{mod}.py' in sdist, sdist
    for c in CSRC: assert c in names and f'fastai_regularize-{v}/{c}' in sdist, (c, names, sdist)
    meta = zipfile.ZipFile(dist/f'fastai_regularize-{v}-py3-none-any.whl').read(f'fastai_regularize-{v}.dist-info/METADATA').decode()
    assert f'Version: {v}\n' in meta and 'Requires-Dist: fastai>=2.7.19' in meta

@pytest.mark.slow
def test_offline_wheel_install(dist, tmp_path):
    py = kaggle_venv(tmp_path)
    run([str(py), '-m', 'pip', 'install', '-q', '--no-index', '--find-links', str(dist), '--only-binary', ':all:',
         'fastai_regularize'], cwd=tmp_path)
    assert installed_version(py, tmp_path) == version()
    script = textwrap.dedent("""
        import torch, torch.nn as nn, fastai_regularize
        from fastai.data.core import Datasets
        from fastai.learner import Learner
        from fastai_regularize.all import MixUp, LabelSmoothingCrossEntropyFlat
        xs,ys = torch.randn(32, 4),torch.randint(0, 3, (32,))
        dls = Datasets(range(32), [[xs.__getitem__], [ys.__getitem__]], splits=[range(16), range(16, 32)]).dataloaders(bs=16)
        learn = Learner(dls, nn.Linear(4, 3), loss_func=LabelSmoothingCrossEntropyFlat(), cbs=MixUp())
        learn.fit(1)
        print('fitted', len(learn.recorder.losses))
        # the kernel builds from the C source installed with the package, where there is a compiler
        import shutil
        from fastai_regularize.native import native_info, _csrc
        i = native_info()
        assert i['available'] or not shutil.which('cc'), i
        assert 'site-packages' in str(_csrc()), _csrc()
        print('kernel', i['available'])
    """)
    out = run([str(py), '-c', script], cwd=tmp_path).stdout
    assert 'fitted 1' in out, out

@pytest.mark.slow
def test_offline_sdist_install(dist, tmp_path):
    "pip builds the sdist itself (no index: with the image's setuptools) and installs it; the console script runs"
    py = kaggle_venv(tmp_path)
    sdist, = dist.glob('*.tar.gz')
    run([str(py), '-m', 'pip', 'install', '-q', '--no-index', '--no-build-isolation', str(sdist)], cwd=tmp_path)
    assert installed_version(py, tmp_path) == version()
    out = run([str(py.parent/'fastai-regularize'), '--help'], cwd=tmp_path).stdout
    assert out.startswith('usage: fastai-regularize'), out
