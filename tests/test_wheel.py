"The offline Kaggle route: build the wheel, install it with --no-index into a fresh venv that has fastai, use it."
import os, subprocess, sys, sysconfig, textwrap, venv, zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r

@pytest.mark.slow
def test_offline_wheel_install(tmp_path):
    dist = tmp_path/'dist'
    run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '--no-build-isolation', '-w', str(dist), str(ROOT)])
    wheel, = dist.glob('fastai_regularize-*.whl')
    names = zipfile.ZipFile(wheel).namelist()
    for mod in ('all', 'core', 'activations', 'losses', 'mixup'):
        assert f'fastai_regularize/{mod}.py' in names, names
    assert 'fastai_regularize/csrc/fr_native.c' in names and 'fastai_regularize/csrc/fr_rows.h' in names, names

    # A fresh venv standing for Kaggle's image: fastai and its dependencies are there (links to this venv's
    # packages, added as a plain path), our package is not (its editable install and metadata are left out).
    image = tmp_path/'image'
    image.mkdir()
    for p in Path(sysconfig.get_paths()['purelib']).iterdir():
        if 'fastai_regularize' not in p.name and not p.name.endswith('.pth'): (image/p.name).symlink_to(p)
    env_dir = tmp_path/'kaggle'
    venv.create(env_dir, with_pip=True)
    py = env_dir/'bin'/'python'
    # the venv sees only what it installs: not a checkout on $PYTHONPATH (how shared development environments point at theirs)
    clean = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    site = run([str(py), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'], env=clean).stdout.strip()
    Path(site, 'kaggle_image.pth').write_text(f'{image}\n')
    # venv's own old setuptools would shadow the image's (torch pins setuptools>=77): one set of packages, as on Kaggle
    run([str(py), '-m', 'pip', 'uninstall', '-q', '-y', 'setuptools'], env=clean)
    r = subprocess.run([str(py), '-c', 'import fastai_regularize'], capture_output=True, text=True, cwd=tmp_path, env=clean)
    assert r.returncode != 0, 'the fresh venv must not see the package before the install'
    run([str(py), '-m', 'pip', 'install', '-q', '--no-index', '--find-links', str(dist), 'fastai_regularize'], cwd=tmp_path, env=clean)

    script = textwrap.dedent("""
        import torch, torch.nn as nn, fastai_regularize
        from fastai.data.core import Datasets
        from fastai.learner import Learner
        from fastai_regularize.all import MixUp, LabelSmoothingCrossEntropyFlat
        assert 'site-packages' in fastai_regularize.__file__, fastai_regularize.__file__
        xs,ys = torch.randn(32, 4),torch.randint(0, 3, (32,))
        dls = Datasets(range(32), [[xs.__getitem__], [ys.__getitem__]], splits=[range(16), range(16, 32)]).dataloaders(bs=16)
        learn = Learner(dls, nn.Linear(4, 3), loss_func=LabelSmoothingCrossEntropyFlat(), cbs=MixUp())
        learn.fit(1)
        print('fitted', len(learn.recorder.losses), fastai_regularize.__version__)
        # the kernel builds from the C source installed with the package, where there is a compiler
        import shutil
        from fastai_regularize.native import native_info, _csrc
        i = native_info()
        assert i['available'] or not shutil.which('cc'), i
        assert 'site-packages' in str(_csrc()), _csrc()
        print('kernel', i['available'])
    """)
    out = run([str(py), '-c', script], cwd=tmp_path, env=clean).stdout
    assert 'fitted 1' in out, out
