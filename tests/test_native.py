"The fused CPU kernel: against PyTorch and gradcheck, its threads, its fallbacks, and how it is built and cached."
import os, subprocess, sys, textwrap
from pathlib import Path

import pytest, torch, torch.nn.functional as F

from fastai_regularize import native
from fastai_regularize.native import native_info, use_native, smooth_ce
from fastai_regularize.losses import LabelSmoothingCrossEntropy, label_smoothing_cross_entropy, mixed_loss

HAVE_CC = bool(native._compiler())
needs_kernel = pytest.mark.skipif(not native_info()['available'], reason=f"kernel unavailable: {native_info().get('error')}")

def test_builds_where_a_compiler_exists():
    "On Linux/macOS with a C compiler the kernel must build, load and pass its self-test (CI runs here)"
    if sys.platform == 'win32' or not HAVE_CC: pytest.skip('no C compiler')
    info = native_info()
    assert info['enabled'] and info['available'], info.get('error')
    assert Path(info['path']).is_file()

def ref_mixed(z, ys, coefs, eps, ignore, red, mean_over_valid, w=None):
    "sum_k coefs[k] * F.cross_entropy(z, ys[k], weight=w, label_smoothing=eps, reduction='none'), then reduced"
    per = sum((1. if coefs is None else coefs[k]) * F.cross_entropy(z, ys[k], weight=w, label_smoothing=eps,
                                                                      reduction='none', ignore_index=ignore) for k in range(len(ys)))
    if red == 'none': return per
    if red == 'sum': return per.sum()
    if not mean_over_valid: return per.sum() / len(per)
    valid = ys[0] != ignore
    return per.sum() / (valid.sum() if w is None else (w[torch.where(valid, ys[0], 0)] * valid).sum())

@needs_kernel
@pytest.mark.parametrize('K', [1, 2])
@pytest.mark.parametrize('red', ['mean', 'sum', 'none'])
@pytest.mark.parametrize('ignore', [False, True])
@pytest.mark.parametrize('weighted', [False, True])
def test_gradcheck_and_values_float64(K, red, ignore, weighted):
    g = torch.Generator().manual_seed(K * 10 + len(red) + ignore + 100 * weighted)
    z = (torch.randn(9, 7, generator=g, dtype=torch.float64) * 3).requires_grad_()
    ys = torch.randint(0, 7, (K, 9), generator=g)
    if ignore: ys[:, ::4] = -100
    coefs = None if K == 1 else torch.stack([l := torch.rand(9, generator=g, dtype=torch.float64), 1 - l])
    w = torch.rand(7, generator=g, dtype=torch.float64) + .3 if weighted else None
    f = lambda z: smooth_ce(z, ys, coefs, 0.3, -100, red, mean_over_valid=K == 1, weight=w)
    out = f(z)
    assert out.grad_fn.name() == '_SmoothCENativeBackward'          # the kernel ran, not the fallback
    ref = ref_mixed(z, ys, coefs, 0.3, -100, red, K == 1, w)
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)
    go = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    assert torch.allclose(torch.autograd.grad(out, z, go)[0], torch.autograd.grad(ref, z, go)[0], atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(f, (z,))

@needs_kernel
@pytest.mark.parametrize('N,C', [(1024, 1000), (64, 32000), (300, 3)])
@pytest.mark.parametrize('scale', [1., 30.])
def test_float32_close_to_float64(N, C, scale):
    "The float32 kernel (its vectorised exp included) is as close to exact as PyTorch's own float32 loss"
    g = torch.Generator().manual_seed(N + C)
    z64 = torch.randn(N, C, generator=g, dtype=torch.float64) * scale     # scale 30: logits spread over ~±150
    y = torch.randint(0, C, (N,), generator=g)
    z32 = z64.float().requires_grad_()
    zd = z32.detach().double().requires_grad_()
    exact = F.cross_entropy(zd, y, label_smoothing=0.1); ge, = torch.autograd.grad(exact, zd)
    theirs = F.cross_entropy(z32, y, label_smoothing=0.1); gt, = torch.autograd.grad(theirs, z32)
    ours = LabelSmoothingCrossEntropy(0.1)(z32, y); go, = torch.autograd.grad(ours, z32)
    assert ours.grad_fn.name() == '_SmoothCENativeBackward'
    err_ours, err_theirs = abs(ours.double() - exact).item(), abs(theirs.double() - exact).item()
    assert err_ours <= max(4 * err_theirs, 1e-6 * exact.item())
    gerr_ours, gerr_theirs = (go.double() - ge).abs().max().item(), (gt.double() - ge).abs().max().item()
    assert gerr_ours <= max(4 * gerr_theirs, 1e-9)

@needs_kernel
def test_exp_underflow_gives_zero_probability():
    "Logits 100 below the row's max have probability e^-100: 0 in float32, and the loss stays exact"
    z = torch.tensor([[0., -100., -200., 5.], [3., 3., -1e4, 3.]], requires_grad=True)
    y = torch.tensor([1, 2])
    ours = label_smoothing_cross_entropy(z, y, 0.0, reduction='none')
    zd = z.detach().double().requires_grad_()
    ref = F.cross_entropy(zd, y, reduction='none')
    assert torch.allclose(ours.double(), ref, rtol=1e-6)
    g, = torch.autograd.grad(ours.sum(), z); gr, = torch.autograd.grad(ref.sum(), zd)
    assert torch.allclose(g.double(), gr, atol=1e-7)

@needs_kernel
def test_threads_give_the_same_bits():
    "Rows are split into blocks, one per thread; every row and the total are computed identically"
    g = torch.Generator().manual_seed(0)
    z = torch.randn(777, 500, generator=g).requires_grad_()
    y = torch.randint(0, 500, (777,), generator=g)
    old = torch.get_num_threads()
    out = {}
    try:
        for n in (1, 2, 5):
            torch.set_num_threads(n)
            l = LabelSmoothingCrossEntropy(0.1)(z, y)
            out[n] = (l.detach(), torch.autograd.grad(l, z)[0])
    finally: torch.set_num_threads(old)
    for n in (2, 5):
        assert torch.equal(out[1][0], out[n][0]) and torch.equal(out[1][1], out[n][1])

@needs_kernel
@pytest.mark.parametrize('bad', [float('inf'), float('-inf'), float('nan')])
def test_non_finite_logits_fall_back_to_pytorch(bad):
    z = torch.randn(6, 5, dtype=torch.float64)
    z[2, 3] = bad
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    ours = LabelSmoothingCrossEntropy(0.1, reduction='none')(z1, y)
    assert ours.grad_fn.name() != '_SmoothCENativeBackward'
    ref = F.cross_entropy(z2, y, label_smoothing=0.1, reduction='none')
    assert torch.allclose(ours, ref, equal_nan=True)
    ours.sum().backward(); ref.sum().backward()
    assert torch.allclose(z1.grad, z2.grad, equal_nan=True)

@needs_kernel
def test_bad_index_still_named():
    with pytest.raises(ValueError, match='class index 7, outside'):
        LabelSmoothingCrossEntropy()(torch.randn(3, 7), torch.tensor([0, 7, 1]))
    with pytest.raises(ValueError, match='class index -1'):
        mixed_loss(LabelSmoothingCrossEntropy(), torch.randn(3, 7), (torch.tensor([0, 1, 2]),),
                   (torch.tensor([0, -1, 2]),), torch.rand(3))

@needs_kernel
def test_mixed_loss_takes_the_kernel_and_equals_the_torch_path():
    g = torch.Generator().manual_seed(5)
    pred = torch.randn(2, 6, 4, 3, dtype=torch.float64, generator=g)          # per-pixel logits, classes on dim 1
    m1, m2 = torch.randint(0, 6, (2, 4, 3), generator=g), torch.randint(0, 6, (2, 4, 3), generator=g)
    lam = torch.rand(2, dtype=torch.float64, generator=g)
    from fastai_regularize.losses import LabelSmoothingCrossEntropyFlat
    lf = LabelSmoothingCrossEntropyFlat(axis=1, eps=0.2)
    for red in ('mean', 'sum', 'none'):
        lf.reduction = lf.func.reduction = red
        p1, p2 = pred.clone().requires_grad_(), pred.clone().requires_grad_()
        ours = mixed_loss(lf, p1, (m1,), (m2,), lam)
        with use_native(False): theirs = mixed_loss(lf, p2, (m1,), (m2,), lam)
        assert ours.shape == theirs.shape and torch.allclose(ours, theirs, atol=1e-12)
        go = torch.rand(ours.shape, dtype=torch.float64, generator=g)
        ours.backward(go); theirs.backward(go)
        assert torch.allclose(p1.grad, p2.grad, atol=1e-12)

def test_use_native_rejects_non_bool():
    with pytest.raises(TypeError, match='`enabled` must be True or False'):
        with use_native('no'): pass

def test_switched_off_by_context_and_environment():
    z, y = torch.randn(4, 3, requires_grad=True), torch.tensor([0, 1, 2, 1])
    with use_native(False):
        assert not native_info()['enabled']
        assert LabelSmoothingCrossEntropy()(z, y).grad_fn.name() == '_SmoothCEReducedBackward'
    r = _run("from fastai_regularize.native import native_info; i = native_info(); print(i['enabled'], i['available'])",
             FASTAI_REGULARIZE_NATIVE='0')
    assert r.stdout.split() == ['False', 'False'], r.stderr

def _run(code, **env):
    e = {**os.environ, **env}
    return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], env=e, capture_output=True, text=True, timeout=300)

CHECK = """
import torch, torch.nn.functional as F
from fastai_regularize.native import native_info
from fastai_regularize.losses import LabelSmoothingCrossEntropy
z, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 5, (8,))
l = LabelSmoothingCrossEntropy(0.1)(z, y)
assert torch.allclose(l, F.cross_entropy(z, y, label_smoothing=0.1)), 'wrong loss'
i = native_info()
print(i['available'], l.grad_fn is None or l.grad_fn.name(), repr(i.get('error', '')))
"""

def test_no_compiler_means_pytorch_path_and_a_reason(tmp_path):
    "A compiler that fails: the losses still give PyTorch's numbers, and native_info says why"
    r = _run(CHECK, CC='false', FASTAI_REGULARIZE_CACHE=str(tmp_path))
    assert r.returncode == 0, r.stderr
    avail, _, err = r.stdout.split(' ', 2)
    assert avail == 'False' and 'did not build' in err
    assert not list(tmp_path.glob('*.so')) and not list(tmp_path.glob('*.tmp')) and not list(tmp_path.glob('*.c'))

@pytest.mark.skipif(not HAVE_CC or sys.platform == 'win32', reason='no C compiler')
def test_cache_is_built_once_concurrently_and_a_broken_file_rebuilt(tmp_path):
    "Three processes building into one empty cache at once all load it; a corrupted cached file is rebuilt"
    env = {**os.environ, 'FASTAI_REGULARIZE_CACHE': str(tmp_path)}
    ps = [subprocess.Popen([sys.executable, '-c', CHECK], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in ps]
    for p, (o, e) in zip(ps, outs): assert p.returncode == 0 and o.startswith('True'), e
    sos = list(tmp_path.glob('*.so'))
    assert len(sos) == 1 and not list(tmp_path.glob('*.tmp'))
    sos[0].write_bytes(b'not a shared library')
    r = _run(CHECK, FASTAI_REGULARIZE_CACHE=str(tmp_path))
    assert r.returncode == 0 and r.stdout.startswith('True'), r.stdout + r.stderr
    assert sos[0].read_bytes()[:4] == b'\x7fELF' or sys.platform == 'darwin'

@needs_kernel
def test_smooth_ce_rejects_misshapen_targets():
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r'expected \(K, 4\)'): smooth_ce(z, torch.zeros(4, dtype=torch.long), None, 0.1, -100, 'mean')
    with pytest.raises(ValueError, match=r'expected \(K, 4\)'):
        smooth_ce(z, torch.zeros(2, 4, dtype=torch.long), torch.ones(1, 4), 0.1, -100, 'mean')

@pytest.mark.skipif(not sys.platform.startswith('linux') or not HAVE_CC, reason='Linux with a C compiler')
def test_one_openmp_runtime_shared_with_pytorch():
    "Built with OpenMP, the kernel runs on the libgomp PyTorch already loaded: one copy is mapped, not two"
    r = _run("""
        import torch
        from fastai_regularize.native import native_info
        from fastai_regularize.losses import LabelSmoothingCrossEntropy
        torch.set_num_threads(2)
        z = torch.randn(512, 1000, requires_grad=True)
        LabelSmoothingCrossEntropy()(z, torch.randint(0, 1000, (512,))).backward()
        maps = {l.split()[-1] for l in open('/proc/self/maps') if 'libgomp' in l or 'libomp' in l or 'libiomp' in l}
        print(native_info()['openmp'], len(maps))
        """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ['True', '1'], r.stdout

@pytest.mark.skipif(not HAVE_CC or sys.platform == 'win32', reason='no C compiler')
def test_compiler_without_openmp_builds_the_serial_kernel(tmp_path):
    "A compiler that refuses -fopenmp gets the variant without threads, which gives the same numbers"
    cc = native._compiler()
    fake = tmp_path/'cc'
    fake.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec {cc} "$@"\n')
    fake.chmod(0o755)
    r = _run(CHECK + "print(i['openmp'])", CC=str(fake), FASTAI_REGULARIZE_CACHE=str(tmp_path/'cache'))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split('\n')
    assert lines[0].startswith('True ') and lines[1] == 'False', r.stdout     # available, without OpenMP

@pytest.mark.skipif(not HAVE_CC or sys.platform == 'win32', reason='no C compiler')
@pytest.mark.parametrize('ctx', ['torch.no_grad()', 'torch.inference_mode()'])
def test_first_use_under_no_grad(ctx):
    "The kernel's first use may be in get_preds/predict, under no_grad or inference_mode: its self-test still runs"
    r = _run(f"""
        import torch, torch.nn.functional as F
        from fastai_regularize.native import native_info
        from fastai_regularize.losses import LabelSmoothingCrossEntropy
        z, y = torch.randn(8, 5), torch.randint(0, 5, (8,))
        with {ctx}: l = LabelSmoothingCrossEntropy()(z, y)
        assert torch.allclose(l, F.cross_entropy(z, y, label_smoothing=0.1)), 'wrong loss'
        print(native_info()['available'], native_info().get('error'))
        """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ['True', 'None'], r.stdout

@needs_kernel
def test_class_weights_take_the_kernel_through_the_public_losses():
    g = torch.Generator().manual_seed(9)
    z = torch.randn(20, 6, dtype=torch.float64, generator=g, requires_grad=True)
    y, y2 = torch.randint(0, 6, (20,), generator=g), torch.randint(0, 6, (20,), generator=g)
    w = torch.rand(6, dtype=torch.float64, generator=g) + .2
    lf = LabelSmoothingCrossEntropy(0.2, weight=w)
    out = lf(z, y)
    assert out.grad_fn.name() == '_SmoothCENativeBackward'
    assert torch.allclose(out, F.cross_entropy(z, y, weight=w, label_smoothing=0.2), atol=1e-12)
    lam = torch.rand(20, dtype=torch.float64, generator=g)
    mixed = mixed_loss(lf, z, (y,), (y2,), lam)
    assert mixed.grad_fn.name() == '_SmoothCENativeBackward'
    with use_native(False): ref = mixed_loss(lf, z, (y,), (y2,), lam)
    assert torch.allclose(mixed, ref, atol=1e-12)

# --- where the compiled library is loaded from: never a file someone else could have written

PLANTED = r'''
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(MARKER, "w");
    if (f) { fputs("a planted library ran\n", f); fclose(f); }
}
int fr_version(void) { return VERSION; }
'''
needs_cc = pytest.mark.skipif(not HAVE_CC or not sys.platform.startswith('linux'), reason='Linux with a C compiler')
needs_root = pytest.mark.skipif(not hasattr(os, 'geteuid') or os.geteuid() != 0,
                                reason='making files owned by another user (chown to nobody) needs root')

@pytest.fixture(scope='module')
def kernel_name(tmp_path_factory):
    "The file name the loader builds this version's kernel under, learned from one build into a private cache"
    r = _run("from fastai_regularize.native import native_info; print(native_info()['path'])",
             FASTAI_REGULARIZE_CACHE=str(tmp_path_factory.mktemp('probe')/'cache'))
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    return Path(r.stdout.strip()).name

def _plant(path:Path, marker:Path):
    "A library at `path`, named as the kernel, whose constructor writes `marker` the moment it is loaded"
    src = marker.with_suffix('.c')
    src.write_text(PLANTED)
    r = subprocess.run([native._compiler(), '-shared', '-fPIC', f'-DMARKER="{marker}"', f'-DVERSION={native._VERSION}',
                        str(src), '-o', str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

def _nobody()->tuple:
    import pwd
    p = pwd.getpwnam('nobody')
    return p.pw_uid, p.pw_gid

def _check_not_loaded(tmp_path, cache:Path, planted:Path, marker:Path):
    "Loading with `cache` as the cache: the planted library never runs, and the kernel is still built and used"
    tmp = tmp_path/'tmpdir'
    tmp.mkdir(exist_ok=True)
    # no other cache to fall back to (HOME=/dev/null): a private temporary directory, or the cache itself rebuilt
    r = _run("from fastai_regularize.native import native_info; import json; print(json.dumps(native_info()))",
             FASTAI_REGULARIZE_CACHE=str(cache), HOME='/dev/null', XDG_CACHE_HOME='', TMPDIR=str(tmp))
    assert r.returncode == 0, r.stderr
    assert not marker.exists(), f'the planted library ran: {marker.read_text()!r}'
    import json
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info['available'], info
    st = os.lstat(info['path']) if os.path.lexists(info['path']) else None
    assert st is None or (st.st_uid == os.geteuid() and not st.st_mode & 0o022 and not os.path.islink(info['path'])), info
    assert not list(tmp.iterdir()), 'the private temporary directory was left behind'
    return info

@needs_cc
@pytest.mark.parametrize('mode', [0o777, 0o770, 0o1777])
def test_planted_library_in_a_shared_cache_dir_is_not_loaded(mode, kernel_name, tmp_path):
    "A cache directory others can write: a library planted there under the kernel's own name is never loaded"
    cache = tmp_path/'shared'
    cache.mkdir()
    os.chmod(cache, mode)
    marker = tmp_path/'planted-ran'
    _plant(cache/kernel_name, marker)
    info = _check_not_loaded(tmp_path, cache, cache/kernel_name, marker)
    assert 'writable by group or others' in info.get('cache', ''), info

@needs_cc
@needs_root
def test_planted_library_in_another_users_dir_is_not_loaded(kernel_name, tmp_path):
    cache = tmp_path/'theirs'
    cache.mkdir(mode=0o755)
    marker = tmp_path/'planted-ran'
    _plant(cache/kernel_name, marker)
    uid, gid = _nobody()
    os.chown(cache/kernel_name, uid, gid); os.chown(cache, uid, gid)
    info = _check_not_loaded(tmp_path, cache, cache/kernel_name, marker)
    assert 'owned by uid' in info.get('cache', ''), info

@needs_cc
@pytest.mark.parametrize('how', ['owned by another user', 'group-writable', 'symlink'])
def test_untrusted_file_in_our_cache_is_rebuilt(how, kernel_name, tmp_path):
    "Our own private cache directory, but a file in it someone else could have written: rebuilt, never loaded"
    if how == 'owned by another user' and os.geteuid() != 0: pytest.skip('chown to nobody needs root')
    cache = tmp_path/'ours'
    cache.mkdir(mode=0o700)
    marker = tmp_path/'planted-ran'
    if how == 'symlink':
        _plant(tmp_path/'elsewhere.so', marker)
        (cache/kernel_name).symlink_to(tmp_path/'elsewhere.so')
    else:
        _plant(cache/kernel_name, marker)
        if how == 'group-writable': os.chmod(cache/kernel_name, 0o775)
        else: os.chown(cache/kernel_name, *_nobody())
    info = _check_not_loaded(tmp_path, cache, cache/kernel_name, marker)
    assert info['path'] == str(cache/kernel_name)                 # rebuilt in place, by us
    st = os.lstat(cache/kernel_name)
    assert st.st_uid == os.geteuid() and not st.st_mode & 0o022

@needs_cc
def test_private_cache_created_0700_and_reused_across_processes(tmp_path):
    cache = tmp_path/'new'/'cache'
    code = "from fastai_regularize.native import native_info; print(native_info()['path'])"
    r1 = _run(code, FASTAI_REGULARIZE_CACHE=str(cache))
    assert r1.returncode == 0, r1.stderr
    assert os.stat(cache).st_mode & 0o777 == 0o700
    path = Path(r1.stdout.strip())
    assert path.parent == cache
    before = os.stat(path)
    r2 = _run(code, FASTAI_REGULARIZE_CACHE=str(cache))
    assert r2.returncode == 0 and Path(r2.stdout.strip()) == path, r2.stderr
    after = os.stat(path)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), 'rebuilt instead of reused'

@needs_cc
def test_no_usable_cache_builds_privately_and_leaves_nothing(tmp_path):
    "No cache directory at all: built in a fresh private temporary directory, used, removed; no fixed name in $TMPDIR"
    tmp = tmp_path/'tmpdir'
    tmp.mkdir()
    r = _run("from fastai_regularize.native import native_info; i = native_info(); print(i['available'], i.get('cache'))",
             HOME='/dev/null', XDG_CACHE_HOME='', FASTAI_REGULARIZE_CACHE='', TMPDIR=str(tmp))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith('True') and 'temporary' in r.stdout, r.stdout
    assert not list(tmp.iterdir())

# --- the kernel as C files in the package

def test_the_library_name_hashes_the_c_files(tmp_path, monkeypatch):
    "Compiled from fastai_regularize/csrc: a changed byte in any C file gives another library name, so an edited source is rebuilt"
    assert {'fr_native.c', 'fr_rows.h'} <= set(native._sources())
    flags = native._FLAGS + native._VARIANTS[0]
    name = native._lib_name('cc', flags)
    for changed in ('fr_native.c', 'fr_rows.h'):
        copy = tmp_path/changed/'csrc'
        copy.mkdir(parents=True)
        for f in native._csrc().iterdir(): (copy/f.name).write_bytes(f.read_bytes() + (b' ' if f.name == changed else b''))
        monkeypatch.setattr(native, '_csrc', lambda: copy)
        assert native._lib_name('cc', flags) != name
    monkeypatch.undo()
    assert native._lib_name('cc', flags) == name and native._lib_name('gcc', flags) != name
    assert f'return FR_VERSION;' in (native._csrc()/'fr_native.c').read_text()
    assert f'#define FR_VERSION {native._VERSION} ' in (native._csrc()/'fr_native.c').read_text()

@pytest.mark.skipif(not HAVE_CC or sys.platform == 'win32', reason='no C compiler')
def test_missing_c_source_is_named(tmp_path):
    "An install without its C files: the PyTorch path, and native_info says what is missing"
    r = _run("""
        from fastai_regularize import native
        from pathlib import Path
        native._csrc = lambda: Path('/nonexistent/csrc')
        i = native.native_info()
        print(i['available'], i.get('error'))
        """, FASTAI_REGULARIZE_CACHE=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith('False') and 'C source is missing' in r.stdout, r.stdout
