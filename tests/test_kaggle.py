"""`fastai-regularize kaggle-dataset`: the folder and its metadata checked against Kaggle's documented rules, the offline
install from it into a fresh venv that has fastai (Kaggle's image, as in test_wheel.py) but neither this package nor
fastkaggle, the push through fastkaggle up to the network (fastkaggle's functions replaced by recorders), the clear
error without credentials, and a folder that a failed or interrupted run leaves as it was."""
import base64, csv, hashlib, io, json, os, re, subprocess, sys, textwrap, zipfile
from importlib import metadata
from pathlib import Path

import pytest

from fastai_regularize import kaggle as frk
from fastai_regularize.kaggle import KaggleError, write_kaggle_dataset, push_kaggle_dataset
from test_wheel import ROOT, ENV, dist, run, version, kaggle_venv, installed_version  # noqa: F401 (`dist` is a fixture)

# Kaggle's licence names and limits, from the Kaggle API's docs/datasets_metadata.md (not from our code)
KAGGLE_LICENSES = {'CC0-1.0', 'CC-BY-SA-3.0', 'CC-BY-SA-4.0', 'CC-BY-NC-SA-4.0', 'GPL-2.0', 'ODbL-1.0', 'DbCL-1.0',
                   'copyright-authors', 'other', 'unknown', 'CC-BY-4.0', 'CC-BY-NC-4.0', 'PDDL', 'CC-BY-3.0',
                   'CC-BY-3.0-IGO', 'US-Government-Works', 'CC-BY-NC-SA-3.0-IGO', 'CDLA-Permissive-1.0',
                   'CDLA-Sharing-1.0', 'CC-BY-ND-4.0', 'CC-BY-NC-ND-4.0', 'ODC-BY-1.0', 'LGPL-3.0', 'AGPL-3.0',
                   'FDL-1.3', 'EU-ODP-Legal-Notice', 'apache-2.0', 'GPL-3.0'}


def wheel_of_installed(name:str, dest:Path)->Path:
    "A wheel of the installed distribution `name`, zipped from the files its RECORD lists: a local stand-in for PyPI's"
    d = metadata.distribution(name)
    info = f"{d.metadata['Name']}-{d.version}.dist-info"
    whl,rows = dest/f"{d.metadata['Name']}-{d.version}-py3-none-any.whl",[]
    with zipfile.ZipFile(whl, 'w') as z:
        for f in d.files:
            s = str(f)
            if s.startswith('..') or '__pycache__' in s or s.split('/')[-1] in ('INSTALLER', 'REQUESTED', 'RECORD', 'direct_url.json'): continue
            data = f.locate().read_bytes()
            z.writestr(s, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()
            rows.append((s, f'sha256={digest}', str(len(data))))
        buf = io.StringIO()
        csv.writer(buf, lineterminator='\n').writerows(rows + [(f'{info}/RECORD', '', '')])
        z.writestr(f'{info}/RECORD', buf.getvalue())
    return whl


@pytest.fixture(scope='module')
def index(tmp_path_factory)->Path:
    "A folder of wheels pip reads instead of PyPI (`PIP_NO_INDEX`, `PIP_FIND_LINKS`): fastkaggle's"
    pytest.importorskip('fastkaggle')
    out = tmp_path_factory.mktemp('index')
    wheel_of_installed('fastkaggle', out)
    return out


def fake_wheel(path:Path, requires=())->Path:
    "A wheel with metadata only, standing for a built one in the tests that do not build"
    meta = f'Metadata-Version: 2.1\nName: fastai_regularize\nVersion: {version()}\nLicense-Expression: Apache-2.0\n'
    meta += ''.join(f'Requires-Dist: {r}\n' for r in requires)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, 'w') as z: z.writestr(f'fastai_regularize-{version()}.dist-info/METADATA', meta)
    return path


@pytest.fixture
def fake_build(monkeypatch):
    "`build_dist` replaced by one that writes a metadata-only wheel at once; records its calls"
    calls = []
    def build(src, out):
        calls.append(('build_dist', Path(src)))
        return None,fake_wheel(Path(out)/f'fastai_regularize-{version()}-py3-none-any.whl', ['fastai>=2.7.19', 'fastkaggle; extra == "kaggle"'])
    monkeypatch.setattr(frk, 'build_dist', build)
    return calls


def hidden(folder:Path)->list: return sorted(p.name for p in folder.iterdir() if p.name.startswith('.'))


@pytest.mark.slow
def test_folder_metadata_and_offline_install(dist, index, tmp_path, monkeypatch):
    "The folder as `kaggle datasets create -p` takes it; `pip install --no-index --find-links OUT` in a fresh venv"
    monkeypatch.setenv('PIP_NO_INDEX', '1'); monkeypatch.setenv('PIP_FIND_LINKS', str(index))
    out = tmp_path/'ds'
    files = write_kaggle_dataset(out, 'someone', title='fastai_regularize wheels', with_deps=True)
    v,fk = version(),metadata.version('fastkaggle')
    assert [f.name for f in files] == ['dataset-metadata.json', f'fastai_regularize-{v}-py3-none-any.whl', f'fastkaggle-{fk}-py3-none-any.whl']
    # the wheel is the one `make dist` builds: the same files
    ours = zipfile.ZipFile(out/f'fastai_regularize-{v}-py3-none-any.whl').namelist()
    assert ours == zipfile.ZipFile(dist/f'fastai_regularize-{v}-py3-none-any.whl').namelist()
    meta = json.loads((out/'dataset-metadata.json').read_text())
    assert meta['id'] == 'someone/fastai-regularize-wheels' and meta['title'] == 'fastai_regularize wheels'
    owner,slug = meta['id'].split('/')
    assert 6 <= len(meta['title']) <= 50 and 3 <= len(slug) <= 50 and re.fullmatch(r'[a-z0-9-]+', slug)
    assert len(meta['licenses']) == 1 and meta['licenses'][0]['name'] in KAGGLE_LICENSES
    assert meta['licenses'] == [{'name': 'apache-2.0'}]   # both wheels are Apache 2.0
    assert '!pip install -q --no-index --find-links /kaggle/input/fastai-regularize-wheels fastai_regularize' in meta['description']
    assert hidden(tmp_path) == []

    (tmp_path/'venv').mkdir()
    py = kaggle_venv(tmp_path/'venv', leave_out=('fastai_regularize', 'fastkaggle'))
    run([str(py), '-m', 'pip', 'install', '-q', '--no-index', '--find-links', str(out), 'fastai_regularize[kaggle]'], cwd=tmp_path)
    assert installed_version(py, tmp_path) == v
    # what the tutorial does first on a PC: fastkaggle from the folder, `setup_comp` of a competition folder that exists
    (tmp_path/'paddy-disease-classification').mkdir()
    script = textwrap.dedent("""
        import fastkaggle
        assert 'site-packages' in fastkaggle.__file__, fastkaggle.__file__
        print(fastkaggle.setup_comp('paddy-disease-classification'))
    """)
    env = {**ENV, 'KAGGLE_USERNAME': 'someone', 'KAGGLE_KEY': 'not-a-key', 'HOME': str(tmp_path)}
    r = subprocess.run([str(py), '-c', script], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0 and r.stdout.strip().endswith('paddy-disease-classification'), r.stdout + r.stderr


@pytest.mark.slow
def test_without_checkout_the_index_wheel(dist, tmp_path, monkeypatch):
    "An installed package without its source takes the same version's wheel from the index (here: `dist/`)"
    monkeypatch.setattr(frk, 'source_checkout', lambda: None)
    monkeypatch.setenv('PIP_NO_INDEX', '1'); monkeypatch.setenv('PIP_FIND_LINKS', str(dist))
    files = write_kaggle_dataset(tmp_path/'ds', 'someone')
    name = f'fastai_regularize-{version()}-py3-none-any.whl'
    assert [f.name for f in files] == ['dataset-metadata.json', name]
    assert (tmp_path/'ds'/name).read_bytes() == (dist/name).read_bytes()
    monkeypatch.setenv('PIP_FIND_LINKS', str(tmp_path/'empty'))
    (tmp_path/'empty').mkdir()
    with pytest.raises(KaggleError, match=r'pip download fastai_regularize==.* failed'): write_kaggle_dataset(tmp_path/'ds2', 'someone')
    assert not (tmp_path/'ds2').exists() and hidden(tmp_path) == []


def test_refuses_and_replaces(fake_build, tmp_path):
    out = tmp_path/'ds'
    out.mkdir()
    (out/'keep.txt').write_text('mine')
    with pytest.raises(KaggleError, match='exists and is not empty; pass force=True'): write_kaggle_dataset(out, 'someone')
    assert fake_build == [] and [p.name for p in out.iterdir()] == ['keep.txt']
    with pytest.raises(KaggleError, match="`user` must be a Kaggle user name"): write_kaggle_dataset(tmp_path/'x', 'no one')
    files = write_kaggle_dataset(out, 'someone', force=True)
    assert [f.name for f in files] == ['dataset-metadata.json', f'fastai_regularize-{version()}-py3-none-any.whl']
    assert hidden(tmp_path) == [] and fake_build == [('build_dist', ROOT)]
    (tmp_path/'empty').mkdir()
    assert len(write_kaggle_dataset(tmp_path/'empty', 'someone')) == 2   # an empty folder is filled without --force


@pytest.mark.parametrize('where', ['build', 'download', 'metadata'])
@pytest.mark.parametrize('existing', [False, True])
def test_interrupt_leaves_out_as_it_was(fake_build, tmp_path, monkeypatch, where, existing):
    out = tmp_path/'ds'
    if existing:
        out.mkdir()
        (out/'keep.txt').write_text('mine')
    def stop(*a, **k): raise KeyboardInterrupt
    monkeypatch.setattr(frk, {'build': 'build_dist', 'download': 'pip_download', 'metadata': 'dataset_metadata'}[where], stop)
    with pytest.raises(KeyboardInterrupt): write_kaggle_dataset(out, 'someone', with_deps=where == 'download', force=True)
    if existing: assert [p.name for p in out.iterdir()] == ['keep.txt'] and (out/'keep.txt').read_text() == 'mine'
    else: assert not out.exists()
    assert hidden(tmp_path) == []


@pytest.fixture
def recorded(monkeypatch):
    "fastkaggle's functions that reach Kaggle, replaced by recorders; what the folder held when `push_dataset` ran"
    fastkaggle = pytest.importorskip('fastkaggle')
    calls,state = [],{'exists': False, 'user': 'someone'}
    class Api:
        @property
        def config_values(self): return {'username': state['user'], 'key': 'not-a-key'}
    def import_kaggle():
        calls.append(('import_kaggle',))
        return Api()
    def check_ds_exists(ref):
        calls.append(('check_ds_exists', ref))
        return state['exists']
    def mk_dataset(path, title, force=False, upload=True): calls.append(('mk_dataset', Path(path).name, title, force, upload))
    def push_dataset(path, notes):
        calls.append(('push_dataset', Path(path), notes, sorted(p.name for p in Path(path).iterdir()),
                      json.loads((Path(path)/'dataset-metadata.json').read_text())['id']))
    for f in (import_kaggle, check_ds_exists, mk_dataset, push_dataset): monkeypatch.setattr(fastkaggle, f.__name__, f)
    return calls,state


def test_cli_push_creates_then_versions(fake_build, recorded, tmp_path, capsys):
    from fastai_regularize.cli import main
    calls,state = recorded
    out = tmp_path/'ds'
    assert main(['kaggle-dataset', str(out), '--user', 'someone', '--push', '--message', 'v1']) == 0
    wheel = f'fastai_regularize-{version()}-py3-none-any.whl'
    # credentials before the build; created by mk_dataset from a scratch folder, then the folder pushed as its version
    assert calls == [('import_kaggle',), ('import_kaggle',), ('check_ds_exists', 'someone/fastai-regularize'),
                     ('mk_dataset', 'fastai-regularize', 'fastai-regularize', True, True),
                     ('push_dataset', out, 'v1', ['dataset-metadata.json', wheel], 'someone/fastai-regularize')]
    assert fake_build == [('build_dist', ROOT)]
    assert 'created https://www.kaggle.com/datasets/someone/fastai-regularize' in capsys.readouterr().out
    calls.clear(); state['exists'] = True
    assert main(['kaggle-dataset', str(out), '--user', 'someone', '--push', '--force']) == 0
    assert [c[0] for c in calls] == ['import_kaggle', 'import_kaggle', 'check_ds_exists', 'push_dataset']
    assert calls[-1][2] == wheel   # default notes: the wheels' names
    assert 'versioned https://www.kaggle.com/datasets/someone/fastai-regularize' in capsys.readouterr().out


def test_cli_push_refusals(fake_build, recorded, tmp_path, capsys, monkeypatch):
    import fastkaggle, requests
    from fastai_regularize.cli import main
    calls,state = recorded
    out = tmp_path/'ds'
    state['user'] = 'other'
    assert main(['kaggle-dataset', str(out), '--user', 'someone', '--push']) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and "the dataset belongs to 'someone' but the Kaggle credentials are 'other''s" in err
    assert not out.exists() and fake_build == []
    state['user'] = 'someone'
    def offline(ref): raise requests.ConnectionError("HTTPSConnectionPool(host='api.kaggle.com'): Failed to resolve")
    monkeypatch.setattr(fastkaggle, 'check_ds_exists', offline)
    assert main(['kaggle-dataset', str(out), '--user', 'someone', '--push']) == 2
    err = capsys.readouterr().err
    assert err == (f"fastai-regularize: error: kaggle-dataset: could not reach Kaggle (ConnectionError); {out} is complete: "
                   f"push it again later, or upload it with `kaggle datasets create -p {out}`\n")
    assert sorted(p.name for p in out.iterdir()) == ['dataset-metadata.json', f'fastai_regularize-{version()}-py3-none-any.whl']


def test_cli_without_credentials(tmp_path):
    "The real Kaggle API without credentials: one line, exit status 2, nothing written (checked before the build)"
    pytest.importorskip('fastkaggle')
    env = {k:v for k,v in os.environ.items() if not k.startswith('KAGGLE_')}
    env.update(HOME=str(tmp_path/'home'), XDG_CONFIG_HOME=str(tmp_path/'home'/'.config'), KAGGLE_CONFIG_DIR=str(tmp_path/'cfg'),
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get('PYTHONPATH', '')) if p))
    (tmp_path/'home').mkdir(); (tmp_path/'cfg').mkdir()
    r = subprocess.run([sys.executable, '-m', 'fastai_regularize.cli', 'kaggle-dataset', str(tmp_path/'ds'), '--user', 'someone',
                        '--push'], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith('fastai-regularize: error: kaggle-dataset: no usable Kaggle credentials: set KAGGLE_USERNAME')
    assert r.stderr.count('\n') == 1 and r.stdout == '', (r.stdout, r.stderr)
    assert not (tmp_path/'ds').exists() and hidden(tmp_path) == []
