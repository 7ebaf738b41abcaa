"""Issue #21: safe model bundles (`fastai_regularize.safe`). Each round trip is compared with the learner it came from
and with fastai's own pickle route (`learn.export` + `load_learner`); each refusal names what it refuses; each
corrupt file is a `ModelFileError`; loading a bundle never unpickles."""
import copy, json, os, pickle, random, re, struct, warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
import torch, torch.nn as nn
from PIL import Image

from fastai.data.block import DataBlock, CategoryBlock, MultiCategoryBlock
from fastai.data.transforms import RandomSplitter, parent_label, get_image_files, Normalize
from fastai.learner import Learner, load_learner
from fastai.losses import BCEWithLogitsLossFlat, FocalLossFlat
from fastai.torch_core import set_seed
from fastai.vision.data import ImageBlock, ImageDataLoaders
from fastai.vision.core import PILImageBW
from fastai.vision.augment import Resize, aug_transforms
from fastai.vision.learner import vision_learner
from fastai.imports import Transform
from torchvision.models import resnet18

import fastai.callback.progress  # noqa: F401 (`Learner.no_bar`)
import fastai_regularize.calibration  # noqa: F401 (`Learner.calibrate`)
from fastai_regularize.activations import BaseSoftmax, no_activation
from fastai_regularize.calibration import VectorScaling, MatrixScaling, DirichletCalibration, SigmoidScaling
from fastai_regularize.losses import LabelSmoothingCrossEntropyFlat
from fastai_regularize.mixup import MixUp
from fastai_regularize import safe as frs
from fastai_regularize.safe import (export_safe, load_safe, check_safe, read_bundle, load_pickle, ModelFileError,
    PickleWarning, BUNDLE_EXTRAS, register_bundle_extra, register_safe_class, act_state, act_from_state, SAFE_CLASSES)

torch.set_flush_denormal(True)
torch.set_num_threads(1)  # tiny models on a shared 2-core machine


def _write_images(root:Path, n:int=12, size:int=16, seed:int=0, grey:bool=False):
    "n RGB (or grey) PNGs per class, class c brighter in channel c, in root/c<c>/"
    rng = np.random.default_rng(seed)
    for c in range(3):
        (root/f'c{c}').mkdir(parents=True, exist_ok=True)
        for i in range(n):
            a = rng.integers(0, 120, (size, size, 3)); a[..., c] += 120
            im = Image.fromarray(a.astype(np.uint8))
            (im.convert('L') if grey else im).save(root/f'c{c}'/f'{i}.png')
    return root

@pytest.fixture(scope='module')
def imgs(tmp_path_factory): return _write_images(tmp_path_factory.mktemp('imgs'))

@pytest.fixture(scope='module')
def trained(imgs):
    "resnet18 trained one epoch with label smoothing and MixUp on a fastai `ImageDataLoaders` with aug_transforms"
    set_seed(0)
    dls = ImageDataLoaders.from_folder(imgs, valid_pct=0.25, seed=0, bs=8, num_workers=0, item_tfms=Resize(16),
                                       batch_tfms=[*aug_transforms(size=16, min_scale=0.75), Normalize.from_stats([0.5]*3, [0.25]*3)])
    learn = vision_learner(dls, resnet18, pretrained=False, loss_func=LabelSmoothingCrossEntropyFlat(eps=0.1), cbs=MixUp(0.4))
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    return learn

def _preds(learn, files, seed=3):
    "(probabilities of get_preds, of TTA (seeded), predict's decoded class) on `files`"
    with learn.no_bar():
        p,_ = learn.get_preds(dl=learn.dls.test_dl(files))
        set_seed(seed); t,_ = learn.tta(dl=learn.dls.test_dl(files))
        dec = learn.predict(files[0])[0]
    return p,t,dec

def _assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=1e-6)
    assert a[2] == b[2]


# ---------------------------------------------------------------- round trips
@pytest.mark.parametrize('method', [None, 'temperature', 'vector', 'matrix', 'dirichlet'])
def test_roundtrip_matches_learner_and_pickle(trained, imgs, tmp_path, method):
    "load_safe predicts what the learner and fastai's own pickle route predict, with each calibration installed"
    learn = trained
    learn.reset_calibration()
    if method is not None:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # tiny held-out set: separability warnings
            learn.calibrate(method)
    files = sorted(get_image_files(imgs))[::5]
    export_safe(learn, tmp_path/'m.safetensors')
    learn.export(tmp_path/'m.pkl')
    new,ref = load_safe(tmp_path/'m.safetensors'),load_learner(tmp_path/'m.pkl')
    want = _preds(learn, files)
    _assert_same(_preds(new, files), want)
    _assert_same(_preds(ref, files), want)          # the reference: fastai's pickle round trip agrees too
    kind = {None: None, 'temperature': BaseSoftmax, 'vector': VectorScaling, 'matrix': MatrixScaling,
            'dirichlet': DirichletCalibration}[method]
    if kind is None: assert 'default_act' not in vars(new)
    else:
        assert type(new.default_act) is kind
        # the calibration changed the probabilities: the test would fail if the bundle dropped it
        assert not torch.allclose(want[0], torch.softmax(learn.get_preds(dl=learn.dls.test_dl(files), act=no_activation)[0], 1))
    assert new.dls.vocab == learn.dls.vocab and type(new.loss_func) is LabelSmoothingCrossEntropyFlat and new.loss_func.func.eps == 0.1
    learn.reset_calibration()


def test_multilabel_grey_timm(tmp_path):
    "A sigmoid learner on grey images (PILImageBW, n_in=1) with a timm body, Platt-calibrated, round-trips"
    root = _write_images(tmp_path/'grey', n=8, grey=True)
    set_seed(0)
    dblock = DataBlock(blocks=(ImageBlock(cls=PILImageBW), MultiCategoryBlock), get_items=get_image_files,
                       get_y=lambda f: [parent_label(f)] + (['odd'] if int(f.stem) % 2 else []),
                       splitter=RandomSplitter(0.25, seed=0), item_tfms=Resize(16), batch_tfms=aug_transforms(size=16))
    dls = dblock.dataloaders(root, bs=8, num_workers=0)
    learn = vision_learner(dls, 'resnet10t', pretrained=False, n_in=1, loss_func=BCEWithLogitsLossFlat(thresh=0.4))
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.calibrate('platt')
    export_safe(learn, tmp_path/'m.safetensors')
    h,_ = read_bundle(tmp_path/'m.safetensors')
    assert (h['data']['task'], h['data']['image_type'], h['model']['library'], h['model']['n_in']) == ('multi_label', 'PILImageBW', 'timm', 1)
    new = load_safe(tmp_path/'m.safetensors')
    files = sorted(get_image_files(root))[::4]
    a,b = _preds(learn, files),_preds(new, files)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-6); torch.testing.assert_close(a[1], b[1], rtol=0, atol=1e-6)
    assert list(a[2]) == list(b[2]) and type(new.default_act) is SigmoidScaling and new.loss_func.thresh == 0.4


def test_xresnet_and_focal_loss(imgs, tmp_path):
    "fastai's own architecture by name, and a fastai loss with arguments (focal, class weights)"
    from fastai.vision.models.xresnet import xresnet18
    dls = ImageDataLoaders.from_folder(imgs, valid_pct=0.25, seed=0, bs=8, num_workers=0, item_tfms=Resize(16))
    lf = FocalLossFlat(gamma=1.5, weight=torch.tensor([1., 2., 0.5]))
    learn = vision_learner(dls, xresnet18, pretrained=False, loss_func=lf)
    export_safe(learn, tmp_path/'m.safetensors')
    new = load_safe(tmp_path/'m.safetensors', n_out=3, arch='xresnet18')
    assert new.loss_func.func.gamma == 1.5 and torch.equal(new.loss_func.func.weight, lf.func.weight)
    files = sorted(get_image_files(imgs))[::7]
    _assert_same(_preds(new, files), _preds(learn, files))
    with pytest.raises(ModelFileError, match='is for 3 classes, not 4'): load_safe(tmp_path/'m.safetensors', n_out=4)
    with pytest.raises(ModelFileError, match='is a xresnet18, not a resnet18'): load_safe(tmp_path/'m.safetensors', arch='resnet18')


def test_check_keeps_random_state_and_learner(trained):
    "Checking (rebuilding, seeding the probes) leaves Python's, NumPy's and PyTorch's random streams where they were"
    random.seed(5); np.random.seed(5); torch.manual_seed(5)
    before = random.random(),np.random.rand(),torch.rand(1)
    random.seed(5); np.random.seed(5); torch.manual_seed(5)
    training = trained.model.training
    check_safe(trained)
    assert (random.random(),np.random.rand(),torch.rand(1)) == before
    assert trained.model.training == training and 'MixUp' in [type(c).__name__ for c in trained.cbs]


def test_write_is_atomic(trained, tmp_path, monkeypatch):
    "An export that fails while writing leaves the previous file, and no temporary file"
    fn = tmp_path/'m.safetensors'
    fn.write_bytes(b'old')
    def fail(*a): raise OSError('disk full')
    monkeypatch.setattr(frs.os, 'replace', fail)
    with pytest.raises(OSError, match='disk full'): export_safe(trained, fn)
    assert fn.read_bytes() == b'old' and sorted(p.name for p in tmp_path.iterdir()) == ['m.safetensors']


# ---------------------------------------------------------------- what cannot be stored: refused by name, nothing written
class Posterize(Transform):
    "A transform of the user's own"
    order = 50
    def encodes(self, x): return x

def test_refusals_name_what_is_missing(imgs, tmp_path):
    from fastai.tabular.learner import tabular_learner
    from fastai_regularize.data import digits_tabular_dls, tensor_image_dls
    dls = ImageDataLoaders.from_folder(imgs, valid_pct=0.25, seed=0, bs=8, num_workers=0, item_tfms=Resize(16))
    cases = {
        'a model vision_learner did not build': (Learner(dls, nn.Sequential(nn.Flatten(), nn.Linear(768, 3))), 'has no `arch`'),
        'a tabular learner': (tabular_learner(digits_tabular_dls(bs=32)), 'has no `arch`'),
        'a custom head': (vision_learner(dls, resnet18, pretrained=False, concat_pool=False), 'not what vision_learner'),
        'a user loss': (vision_learner(dls, resnet18, pretrained=False, loss_func=lambda p, y: p.sum()), 'the loss function'),
    }
    x,y = torch.randint(0, 256, (8, 8, 8), dtype=torch.uint8),torch.arange(8) % 3
    cases['tensor datasets'] = (vision_learner(tensor_image_dls(x, y, x, y, ['a', 'b', 'c'], bs=4), resnet18, pretrained=False, n_in=1),
                                'not fastai `Datasets` of image files')
    odd = ImageDataLoaders.from_folder(imgs, valid_pct=0.25, seed=0, bs=8, num_workers=0, item_tfms=Resize(16), batch_tfms=Posterize())
    cases['an unknown transform'] = (vision_learner(odd, resnet18, pretrained=False), 'batch_tfms[1]: cannot store Posterize')
    for what,(learn,msg) in cases.items():
        with pytest.raises(ValueError, match=re.escape(msg)) as e: export_safe(learn, tmp_path/'m.safetensors')
        assert '\n' not in str(e.value), what
    assert not (tmp_path/'m.safetensors').exists()
    register_safe_class(Posterize)           # the allowlist is extensible: the user's own transform, registered on both sides
    try: check_safe(cases['an unknown transform'][0])
    finally: SAFE_CLASSES.pop(frs._qualname(Posterize))


def test_unregistered_extra_refused_then_registered(trained, tmp_path, monkeypatch):
    "What `calibrate` installs is refused while its extra is unregistered (an object of ours, or a plain dict under our name)"
    learn = trained
    learn.tta_act,learn.tta_params = BaseSoftmax(3.),{'n': 4, 'beta': 0.25}
    try:
        with monkeypatch.context() as m:
            m.delitem(BUNDLE_EXTRAS, 'tta_act'); m.delitem(BUNDLE_EXTRAS, 'tta_params')
            with pytest.raises(ValueError, match=r'tta_act \(BaseSoftmax\), tta_params \(dict\)'): check_safe(learn)
            register_bundle_extra('tta_act', act_state, act_from_state)
            with pytest.raises(ValueError, match=r'holds tta_params \(dict\), which a bundle would leave out'): check_safe(learn)
        export_safe(learn, tmp_path/'m.safetensors')                      # both registered (as on import)
        new = load_safe(tmp_path/'m.safetensors')
        assert type(new.tta_act) is BaseSoftmax and new.tta_act.base == 3. and new.tta_params == {'n': 4, 'beta': 0.25}
        with monkeypatch.context() as m:
            m.delitem(BUNDLE_EXTRAS, 'tta_act')                              # a reader that does not know it: refused
            with pytest.raises(ModelFileError, match='holds learn.tta_act, which this version'): load_safe(tmp_path/'m.safetensors')
        learn.other_act = BaseSoftmax(2.)
        with pytest.raises(ValueError, match=r'other_act \(BaseSoftmax\)'): check_safe(learn)
    finally: learn.reset_calibration(); vars(learn).pop('other_act', None)


def _tta_calibrated(learn, method):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # tiny held-out set: separability warnings
        learn.calibrate('temperature'); learn.calibrate(method, tta=dict(n=2, beta=0.4), seed=1)

@pytest.mark.parametrize('method', ['temperature', 'vector'])
def test_tta_calibration_roundtrip(trained, imgs, tmp_path, method):
    "`tta_act` and `tta_params` survive: the reloaded learner's calibrated TTA probabilities are the learner's"
    from fastai_regularize.activations import tta_preds
    learn = trained
    try:
        _tta_calibrated(learn, method)
        files = sorted(get_image_files(imgs))[::5]
        export_safe(learn, tmp_path/'m.safetensors')
        new = load_safe(tmp_path/'m.safetensors')
        assert type(new.tta_act) is type(learn.tta_act) and new.tta_params == learn.tta_params == {'n': 2, 'beta': 0.4}
        want = tta_preds(learn, learn.dls.test_dl(files), n=2, beta=0.4, seed=3)[0]
        torch.testing.assert_close(tta_preds(new, new.dls.test_dl(files), n=2, beta=0.4, seed=3)[0], want, rtol=0, atol=1e-6)
        with warnings.catch_warnings():
            warnings.simplefilter('error')                                 # fitted for these settings: no warning after reload
            set_seed(3); got = new.tta(dl=new.dls.test_dl(files), n=2, beta=0.4)[0]
        set_seed(3); torch.testing.assert_close(got, learn.tta(dl=learn.dls.test_dl(files), n=2, beta=0.4)[0], rtol=0, atol=1e-6)
        # the TTA map changed the probabilities (so a bundle that dropped it would fail), and it is not the single-pass one
        for act in (None, learn.default_act):
            other = tta_preds(learn, learn.dls.test_dl(files), n=2, beta=0.4, seed=3, act=act or (lambda z: torch.softmax(z, -1)))[0]
            assert not torch.allclose(want, other, atol=1e-4)
    finally: learn.reset_calibration()


def test_conformal_roundtrip(trained, imgs, tmp_path):
    "`learn.conformal` survives: the same scores, settings, thresholds, prediction sets, and still valid for the calibration"
    import fastai_regularize.conformal  # noqa: F401 (`Learner.conformalize`)
    from fastai_regularize.conformal import ConformalPredictor
    learn = trained
    try:
        _tta_calibrated(learn, 'temperature')
        pred = learn.conformalize(alpha=0.3, score='aps', randomized=True, tta=dict(n=2, beta=0.4), seed=2)
        files = sorted(get_image_files(imgs))
        export_safe(learn, tmp_path/'m.safetensors')
        h,ts = read_bundle(tmp_path/'m.safetensors')
        assert h['extras']['conformal']['state']['score'] == 'aps' and ts['extra.conformal.scores'].dtype == torch.float64
        new = load_safe(tmp_path/'m.safetensors')
        c = new.conformal
        assert type(c) is ConformalPredictor and c.state()['settings'] == pred.state()['settings']
        assert torch.equal(c.scores, pred.scores) and torch.equal(c.targs, pred.targs)
        for a in (0.3, 0.5): assert c.threshold(a) == pred.threshold(a)
        want = learn.predict_sets(learn.dls.test_dl(files))
        got = new.predict_sets(new.dls.test_dl(files))                    # refused if the calibration digest did not survive
        assert torch.equal(got[0], want[0]) and 0 < want[0].sum(1).double().mean() < 3
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-6)
        assert torch.equal(c.sets(want[1], 0.5), pred.sets(want[1], 0.5))
    finally: learn.reset_calibration(); vars(learn).pop('conformal', None)


def test_class_axis_map_roundtrips_and_odd_ones_are_refused(trained, imgs, tmp_path):
    "`ClassAxis` (a per-pixel map's wrapper) has a stored form: its inner map and axis; one `calibrate` never makes is refused by name"
    from fastai_regularize.calibration import ClassAxis
    learn = trained
    g = torch.Generator().manual_seed(0)
    try:
        learn.default_act = ClassAxis(VectorScaling(1 + torch.rand(3, generator=g), torch.randn(3, generator=g)), 1)
        export_safe(learn, tmp_path/'m.safetensors')
        new = load_safe(tmp_path/'m.safetensors')
        assert type(new.default_act) is ClassAxis and new.default_act.axis == 1 and type(new.default_act.scaler) is VectorScaling
        assert torch.equal(new.default_act.scaler.weight, learn.default_act.scaler.weight)
        files = sorted(get_image_files(imgs))[::5]
        _assert_same(_preds(new, files), _preds(learn, files))
        learn.default_act = ClassAxis(BaseSoftmax(2.), 1)
        with pytest.raises(ValueError, match='a ClassAxis around BaseSoftmax is not one `calibrate` makes'): check_safe(learn)
    finally: learn.reset_calibration()


# ---------------------------------------------------------------- corrupt and wrong bundles
def _raw(fn:Path)->tuple:
    "The safetensors layout, read with struct and json (the format's spec), not with safetensors: (table, data bytes)"
    raw = fn.read_bytes()
    n = struct.unpack('<Q', raw[:8])[0]
    return json.loads(raw[8:8+n]),raw[8+n:]

def _write_raw(fn:Path, table:dict, data:bytes):
    hb = json.dumps(table).encode()
    hb += b' ' * (-len(hb) % 8)
    fn.write_bytes(struct.pack('<Q', len(hb)) + hb + data)

def _edit_header(src:Path, dst:Path, edit):
    table,data = _raw(src)
    h = json.loads(table['__metadata__']['fastai_regularize'])
    edit(h)
    table['__metadata__']['fastai_regularize'] = json.dumps(h)
    _write_raw(dst, table, data)

@pytest.fixture(scope='module')
def bundle(trained, tmp_path_factory):
    fn = tmp_path_factory.mktemp('bundle')/'m.safetensors'
    trained.calibrate('temperature')
    export_safe(trained, fn)
    trained.reset_calibration()
    return fn

def test_bundle_is_json_and_tensors_only(bundle):
    "Every byte of the file is the JSON table or a tensor it lists: no room for a pickle; the header is plain JSON"
    table,data = _raw(bundle)
    spans = sorted(tuple(v['data_offsets']) for k,v in table.items() if k != '__metadata__')
    assert spans[0][0] == 0 and spans[-1][1] == len(data) and all(a[1] == b[0] for a,b in zip(spans, spans[1:]))
    assert set(table['__metadata__']) == {'fastai_regularize'}
    h = json.loads(table['__metadata__']['fastai_regularize'])
    assert h['format'] == 'fastai_regularize.safe' and h['format_version'] == 1
    assert h['extras']['default_act']['state']['kind'] == 'BaseSoftmax'
    assert all(k.startswith('model.') for k in table if k != '__metadata__')
    from safetensors import safe_open
    with safe_open(str(bundle), framework='pt') as f: assert json.loads(f.metadata()['fastai_regularize']) == h

def test_loading_never_unpickles(bundle, monkeypatch):
    def refuse(*a, **k): raise AssertionError('unpickling while loading a bundle')
    for mod,name in ((pickle, 'load'), (pickle, 'loads'), (pickle, 'Unpickler'), (torch, 'load'), (torch.serialization, 'load')):
        monkeypatch.setattr(mod, name, refuse)
    learn = load_safe(bundle)
    assert type(learn.default_act) is BaseSoftmax

def _newer_extra(h): h['extras']['default_act']['version'] = 2
def _unknown_extra(h): h['extras']['frobnicate'] = {'version': 1, 'state': {}}
def _bad_conformal(h): h['extras']['conformal'] = {'version': 1, 'state': {}}
def _bad_tta_params(h): h['extras']['tta_params'] = {'version': 1, 'state': {'n': 0, 'beta': 0.25}}
def _planted(h): h['data']['batch_tfms'][0] = {'object': {'type': 'os.system', 'state': {}}}

@pytest.mark.parametrize('case,msg', [
    ('truncated', 'not a valid safetensors file'),
    ('text', 'not a valid safetensors file'),
    ('pickle', 'not a valid safetensors file'),
    ('tensor_shape', 'not a valid safetensors file'),
    ('plain_weights', 'not a fastai_regularize bundle'),
    ('newer_format', 'bundle format 2, newer than this'),
    ('n_out', 'its weights do not fit resnet18 with 5 outputs'),
    ('arch', 'its weights do not fit resnet34 with 3 outputs'),
    ('unknown_arch', "unknown architecture 'os.system'"),
    ('newer_extra', 'learn.default_act is in layout 2, newer'),
    ('unknown_extra', 'holds learn.frobnicate, which this version'),
    ('bad_conformal', "learn.conformal: conformal: tensor(s) ['scores', 'targs'] missing"),
    ('bad_tta_params', "learn.tta_params: tta_params: 'n' must be an int >= 1, got 0"),
    ('planted_class', "'os.system' is not a class this process can rebuild"),
    ('stray_tensor', 'tensor(s) no section claims'),
])
def test_corrupt_or_wrong_bundle(bundle, tmp_path, case, msg):
    fn = tmp_path/'bad.safetensors'
    raw = bundle.read_bytes()
    edits = {'newer_format': lambda h: h.update(format_version=2),
             'n_out': lambda h: (h['model'].update(n_out=5), h['data'].update(vocab=['a', 'b', 'c', 'd', 'e'])),
             'arch': lambda h: h['model'].update(arch='resnet34'), 'unknown_arch': lambda h: h['model'].update(arch='os.system'),
             'newer_extra': _newer_extra, 'unknown_extra': _unknown_extra, 'planted_class': _planted,
             'bad_conformal': _bad_conformal, 'bad_tta_params': _bad_tta_params}
    if case == 'truncated': fn.write_bytes(raw[:len(raw)//2])
    elif case == 'text': fn.write_text('this is not a model\n')
    elif case == 'pickle': fn.write_bytes(pickle.dumps({'weights': [1, 2]}))
    elif case == 'tensor_shape':
        table,data = _raw(bundle)
        k = next(k for k in table if k.endswith('.weight'))
        table[k]['shape'] = [table[k]['shape'][0] + 1, *table[k]['shape'][1:]]   # the header no longer matches its tensors
        _write_raw(fn, table, data)
    elif case == 'plain_weights':
        from safetensors.torch import save_file
        save_file({'w': torch.zeros(3)}, str(fn))
    elif case == 'stray_tensor':
        from safetensors.torch import save_file
        h,ts = read_bundle(bundle)
        save_file({**ts, 'hidden.payload': torch.zeros(4, dtype=torch.uint8)}, str(fn), metadata={'fastai_regularize': json.dumps(h)})
    else: _edit_header(bundle, fn, edits[case])
    with pytest.raises(ModelFileError) as e: load_safe(fn)
    assert msg in str(e.value) and '\n' not in str(e.value)


def _places(node, path=()):
    "Every place in a JSON tree, as a path of keys and indices"
    yield path
    if isinstance(node, dict):
        for k,v in node.items(): yield from _places(v, (*path, k))
    elif isinstance(node, list):
        for i,v in enumerate(node): yield from _places(v, (*path, i))

def _put(node, path, value):
    for k in path[:-1]: node = node[k]
    node[path[-1]] = value

@pytest.fixture(scope='module')
def small_bundle(imgs):
    "(header, tensors) of a small timm learner with aug_transforms, both calibrations, a conformal predictor and a weighted loss: much for a fuzzer to break"
    dls = ImageDataLoaders.from_folder(imgs, valid_pct=0.25, seed=0, bs=4, num_workers=0, item_tfms=Resize(16),
                                       batch_tfms=aug_transforms(size=16, min_scale=0.75))
    learn = vision_learner(dls, 'resnet10t', pretrained=False, loss_func=LabelSmoothingCrossEntropyFlat(weight=torch.ones(3)))
    learn.default_act = VectorScaling(torch.ones(3), torch.zeros(3))
    learn.tta_act,learn.tta_params = BaseSoftmax(2.),{'n': 2, 'beta': 0.25}
    from fastai_regularize.conformal import ConformalPredictor
    p = torch.softmax(torch.randn(30, 3, generator=torch.Generator().manual_seed(0)), 1)
    learn.conformal = ConformalPredictor.fit(p, torch.arange(30) % 3, score='raps', tta={'n': 2}, class_conditional=True, alpha=0.3)
    return frs._checked_state(learn)

_junk = st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.floats(-5, 5, allow_subnormal=False), st.text(max_size=4),
                  st.lists(st.integers(0, 4), max_size=3),
                  st.dictionaries(st.sampled_from(['object', 'type', 'state', 'tuple', 'tensor', 'name', 'func']),
                                  st.one_of(st.integers(0, 3), st.text(max_size=3)), max_size=2))

@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_damaged_header_is_a_model_file_error(small_bundle, data):
    "Whatever one place of the header is replaced with, rebuilding succeeds or raises `ModelFileError`, nothing else"
    h0,ts = small_bundle
    h = copy.deepcopy(h0)
    path = data.draw(st.sampled_from([p for p in _places(h0) if p]))
    _put(h, path, data.draw(_junk))
    try: frs._fill(frs._build(h, 'cpu', 'bundle'), h, ts, 'cpu', 'bundle')
    except ModelFileError as e: assert '\n' not in str(e)


# ---------------------------------------------------------------- pickles, fenced
class Planted:
    "Unpickling it makes a folder: stands for any code a pickle's author wants run"
    def __init__(self, where): self.where = where
    def __reduce__(self): return (os.mkdir, (self.where,))

@pytest.mark.parametrize('mode,owner,refused', [(0o666, None, True), (0o620, None, True), (0o600, 65534, True),
                                                (0o600, None, False), (0o644, None, False)])
def test_load_pickle_refuses_what_others_could_write(tmp_path, mode, owner, refused):
    fn,marker = tmp_path/'m.pkl',tmp_path/'ran'
    torch.save(Planted(str(marker)), fn)
    os.chmod(fn, mode)
    if owner is not None:
        if os.geteuid() != 0: pytest.skip('changing a file owner needs root')
        os.chown(fn, owner, -1)
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        with pytest.raises(ModelFileError) as e: load_pickle(fn)
    if refused:
        assert 'refusing to load the pickle' in str(e.value) and '\n' not in str(e.value) and not marker.exists() and not ws
        with warnings.catch_warnings(record=True) as ws:
            warnings.simplefilter('always')
            with pytest.raises(ModelFileError, match='holds a NoneType'): load_pickle(fn, trust=True)
    else: assert 'holds a NoneType, not a fastai Learner' in str(e.value)
    assert [w.category for w in ws] == [PickleWarning] and marker.is_dir()  # loaded: its code ran, which is why it warns


@pytest.mark.parametrize('case', ['truncated', 'text', 'empty', 'dict'])
def test_load_pickle_corrupt_one_line(trained, tmp_path, case):
    fn = tmp_path/'m.pkl'
    if case in ('truncated',):
        trained.export(fn); fn.write_bytes(fn.read_bytes()[:5000])
    elif case == 'text': fn.write_text('not a pickle at all\n')
    elif case == 'empty': fn.write_bytes(b'')
    else: torch.save({'a': 1}, fn)
    os.chmod(fn, 0o600)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with pytest.raises(ModelFileError) as e: load_pickle(fn)
    assert '\n' not in str(e.value) and ('holds a dict' in str(e.value) if case == 'dict' else 'not a readable learn.export file' in str(e.value))
