"""Speed and memory of fastai_regularize's label-smoothing loss and MixUp against the usual alternatives.

Not a test: it prints ratios (ours / theirs) measured side by side in one run, never asserts a time.
Every timed section interleaves its contenders round-robin (the starting contender rotates each repetition),
gives each repetition fresh inputs, and reports medians; ratios are median(ours) / median(theirs).

    python benchmarks/speed.py                  # full run, writes benchmarks/results/speed-cpu.{md,json}
    python benchmarks/speed.py --quick          # a few repetitions, nothing written unless --write
    python benchmarks/speed.py --device cuda    # same on a GPU, plus torch.cuda.max_memory_allocated peaks
    python benchmarks/speed.py --json out.json  # also the results as JSON at out.json (`make gpu-check` reads it)

See benchmarks/README.md for what each row means and how memory is measured.
"""
from __future__ import annotations
import argparse, datetime, json, os, platform, statistics, sys, time, warnings
from pathlib import Path
from types import SimpleNamespace

warnings.filterwarnings('ignore', category=FutureWarning)        # timm imports torch.jit.script
import torch, torch.nn as nn, torch.nn.functional as F
from torch import Tensor

ROOT = Path(__file__).resolve().parent
SIZES = [(256, 10), (1024, 1000), (512, 32000)]
GOAL_SIZES = [(1024, 1000), (512, 32000)]
EPS = 0.1

# ---------------------------------------------------------------------------------------------------- timing
class Timer:
    "Wall clock (synchronised on CUDA) or this process's CPU time (immune to time slices given to other processes)"
    def __init__(self, kind:str, device:torch.device):
        self.kind,self.cuda = kind,device.type == 'cuda'
    def now(self)->float:
        if self.cuda: torch.cuda.synchronize()
        return time.process_time() if self.kind == 'cpu' else time.perf_counter()

def interleaved(contenders:dict, setup, run, reps:int, warmup:int, timer:Timer, prewarm:bool=True)->dict:
    "Per contender, `reps` times of `run(fn, setup())`, round-robin across contenders, starting point rotating"
    names = list(contenders)
    times = {k: [] for k in names}
    for r in range(warmup + reps):
        for i in range(len(names)):
            k = names[(r + i) % len(names)]
            # an untimed call first: the allocator then serves the timed call as it would in a loop calling this
            # contender every step, rather than in whatever state the previous contender's sizes left it
            if prewarm: run(contenders[k], *setup())
            args = setup()                                   # fresh inputs, outside the timed region
            t0 = timer.now(); run(contenders[k], *args); t1 = timer.now()
            if r >= warmup: times[k].append(t1 - t0)
            del args
    return times

def med(v): return statistics.median(v)

MALLOC = {'steady': 32 << 20, 'fresh': 128 << 10}

def pin_malloc(mode:str)->bool:
    "Fix glibc's mmap threshold (M_MMAP_THRESHOLD=-3) and trim threshold (M_TRIM_THRESHOLD=-1) to `MALLOC[mode]`"
    # Left adaptive, glibc raises the mmap threshold whenever a large block is freed, so whether a 4 MB buffer
    # costs fresh pages (page faults: user+system time) depends on which contender ran just before. 'steady' pins
    # the values glibc's own adaptation converges to in a training loop (32 MiB, trim at twice that): smaller
    # buffers are reused, larger ones (512x32000 float32 = 62.5 MiB) are always fresh. 'fresh' pins the 128 KiB
    # start value: every large buffer is fresh memory.
    try:
        import ctypes
        libc = ctypes.CDLL('libc.so.6')
        return bool(libc.mallopt(-3, MALLOC[mode])) and bool(libc.mallopt(-1, 2 * MALLOC[mode]))
    except (OSError, AttributeError): return False

# ---------------------------------------------------------------------------------------------------- contenders
TORCH_OPS = 'ours, PyTorch ops'            # our loss with the native kernel switched off: its GPU / fallback path

def _torch_ops(f):
    from fastai_regularize.native import use_native
    def g(*a):
        with use_native(False): return f(*a)
    return g

def loss_contenders()->dict:
    from fastai_regularize.losses import LabelSmoothingCrossEntropy
    import fastai.losses as fl, timm.loss as tl
    return {
        'ours': LabelSmoothingCrossEntropy(EPS),
        TORCH_OPS: _torch_ops(LabelSmoothingCrossEntropy(EPS)),
        'plain CE': F.cross_entropy,
        'torch LS': lambda z, y: F.cross_entropy(z, y, label_smoothing=EPS),
        'fastai LS': fl.LabelSmoothingCrossEntropy(EPS),
        'timm LS': tl.LabelSmoothingCrossEntropy(EPS),
    }

def time_losses(fns:dict, z0:Tensor, y:Tensor, args, timer, label:str)->dict:
    "fwd+bwd of every loss in `fns` on fresh clones of `z0`, interleaved: ms and ours / each, printed as `label`"
    def run(f, z): f(z, y).backward()
    t = interleaved(fns, lambda: (z0.clone().requires_grad_(),), run, args.reps, args.warmup, timer, args.prewarm)
    m = {k: med(v) for k, v in t.items()}
    print(f"  {label}: " + ", ".join(f"{k} {v*1e3:.2f} ms" for k, v in m.items()), flush=True)
    return dict(N=z0.shape[0], C=z0.shape[1], ms={k: v * 1e3 for k, v in m.items()},
                ratio={k: m['ours'] / m[k] for k in m if k != 'ours'}, reps=args.reps)

def bench_losses(args, timer, dev)->list:
    rows = []
    fns = loss_contenders()
    for N, C in args.sizes:
        g = torch.Generator(device='cpu').manual_seed(N * C)
        z0 = torch.randn(N, C, generator=g).to(dev)
        y = torch.randint(0, C, (N,), generator=g).to(dev)
        rows.append(time_losses(fns, z0, y, args, timer, f"loss ({N}, {C})"))
    return rows

TARGET, TARGET_OPS = "ours, 'target'", "ours, 'target', PyTorch ops"

def bench_weighted(args, timer, dev)->list:
    "Class-weighted label smoothing at the goal sizes: ours (kernel and PyTorch ops; PyTorch's and the target class weighting) vs torch's weighted CE and LS"
    from fastai_regularize.losses import LabelSmoothingCrossEntropy
    rows = []
    for N, C in GOAL_SIZES:
        g = torch.Generator(device='cpu').manual_seed(7)
        z0 = torch.randn(N, C, generator=g).to(dev)
        y = torch.randint(0, C, (N,), generator=g).to(dev)
        w = (torch.rand(C, generator=g) + .5).to(dev)
        ours, target = LabelSmoothingCrossEntropy(EPS, weight=w), LabelSmoothingCrossEntropy(EPS, weight=w, class_weighting='target')
        fns = {'ours': ours, TORCH_OPS: _torch_ops(ours), TARGET: target, TARGET_OPS: _torch_ops(target),
               'weighted CE': lambda z, y: F.cross_entropy(z, y, weight=w),
               'torch weighted LS': lambda z, y: F.cross_entropy(z, y, weight=w, label_smoothing=EPS)}
        rows.append(time_losses(fns, z0, y, args, timer, f"weighted ({N}, {C})"))
    return rows

# ---------------------------------------------------------------------------------------------------- MixUp step
def bench_mixup_step(args, timer, dev)->dict:
    from fastai.learner import Learner
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.optimizer import SGD
    from fastai.callback.core import Callback, CancelValidException
    import fastai.callback.mixup as fm, fastai.losses as fl
    from fastai_regularize.mixup import MixUp
    from fastai_regularize.losses import LabelSmoothingCrossEntropyFlat

    N, C, D, nb = args.step_bs, args.step_classes, args.step_features, args.step_batches
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N * nb, D, generator=g)
    y = torch.randint(0, C, (N * nb,), generator=g)
    ds = list(zip(x, y))

    class StepTimer(Callback):
        "Time from the first `before_batch` to `after_step`: mixing, forward, loss, backward, optimiser step"
        order = -100
        def __init__(self): self.times = []
        def before_batch(self): self.t0 = timer.now()
        def after_step(self): self.times.append(timer.now() - self.t0)
        def before_validate(self): raise CancelValidException()

    model0 = nn.Linear(D, C)
    def make(mix, loss):
        dls = DataLoaders(DataLoader(ds, bs=N, shuffle=False, drop_last=True), DataLoader(ds[:N], bs=N), device=dev)
        m = nn.Linear(D, C); m.load_state_dict(model0.state_dict())
        learn = Learner(dls, m.to(dev), loss_func=loss, opt_func=SGD, lr=1e-3, cbs=[mix, StepTimer()])
        return learn
    from fastai_regularize.native import use_native
    learners = {'ours': make(MixUp(0.4), LabelSmoothingCrossEntropyFlat()),
                TORCH_OPS: make(MixUp(0.4), LabelSmoothingCrossEntropyFlat()),
                'fastai': make(fm.MixUp(0.4), fl.LabelSmoothingCrossEntropyFlat())}
    for l in learners.values():                                      # no progress bar, no printed metrics
        l.remove_cbs(l.cbs.filter(lambda c: type(c).__name__ == 'ProgressCallback')); l.logger = lambda *a, **k: None
    def run(k):
        l = learners[k]
        st = l.cbs.filter(lambda c: type(c).__name__ == 'StepTimer')[0]
        st.times = []
        with use_native(k != TORCH_OPS): l.fit(1)
        return st.times[1:]                                          # the first batch of each fit warms up
    times = {k: [] for k in learners}
    names = list(learners)
    for r in range(args.step_reps + 1):
        for i in range(len(names)):
            k = names[(r + i) % len(names)]
            t = run(k)
            if r: times[k] += t
    m = {k: med(v) for k, v in times.items()}
    loss_ok = all(l.loss_func.__class__.__module__.startswith(p) for l, p in
                  zip(learners.values(), ('fastai_regularize', 'fastai_regularize', 'fastai.losses')))
    print(f"  MixUp step: " + ", ".join(f"{k} {v*1e3:.2f} ms" for k, v in m.items()), flush=True)
    return dict(N=N, C=C, D=D, ms={k: v * 1e3 for k, v in m.items()}, ratio=m['ours'] / m['fastai'],
                ratio_torch_ops=m[TORCH_OPS] / m['fastai'],
                batches=len(times['ours']), loss_func_restored=loss_ok)

# ---------------------------------------------------------------------------------------------------- before_batch
def bench_before_batch(args, timer, dev)->dict:
    from fastai_regularize.mixup import MixUp
    import fastai.callback.mixup as fm
    n, shape = args.img_bs, (3, args.img_size, args.img_size)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, *shape, generator=g).to(dev)
    y = torch.randint(0, 10, (n,), generator=g).to(dev)
    partner = x.roll(-7, 0).contiguous()
    w = torch.rand(n, generator=g).to(dev).view(n, 1, 1, 1)
    ours = MixUp(0.4)
    theirs = fm.MixUp(0.4)
    ns = SimpleNamespace(xb=(x,), yb=(y,), x=x, y=y)
    theirs.learn, theirs.stack_y = ns, True                         # as after fastai's before_train with an int-target loss
    fns = {
        'ours': lambda: ours.mix((x,), (y,)),
        'bare lerp': lambda: torch.lerp(partner, x, w),
        'fastai MixUp': theirs.before_batch,
    }
    t = interleaved(fns, lambda: (), lambda f: f(), args.reps, args.warmup, timer, args.prewarm)
    m = {k: med(v) for k, v in t.items()}
    print(f"  before_batch: " + ", ".join(f"{k} {v*1e3:.2f} ms" for k, v in m.items()), flush=True)
    return dict(shape=[n, *shape], ms={k: v * 1e3 for k, v in m.items()},
                ratio={k: m['ours'] / m[k] for k in m if k != 'ours'})

# ---------------------------------------------------------------------------------------------------- memory
def _profiled_peak(fn, dev)->int:
    "Peak bytes above the level at entry while `fn` runs: the profiler's allocation events, summed in time order"
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev.type == 'cuda' else [])
    err = os.dup(2); os.dup2(os.open(os.devnull, os.O_WRONLY), 2)    # kineto prints start/stop lines on fd 2
    try:
        with torch.profiler.profile(activities=acts, profile_memory=True) as p: fn()
    finally: os.dup2(err, 2); os.close(err)
    allocs = []
    def walk(es):
        for e in es:
            if e.typed[0].name == 'Allocation' and e.typed[1].device.type == dev.type:
                allocs.append((e.start_time_ns, e.typed[1].alloc_size))
            walk(e.children)
    walk(p.profiler.kineto_results.experimental_event_tree())
    cur = peak = 0
    for _, size in sorted(allocs, key=lambda a: a[0]):
        cur += size; peak = max(peak, cur)
    return peak

def _saved_bytes(fn, z)->tuple:
    "Bytes of the tensors autograd saves for backward, and how many of them are the logits themselves"
    saved = []
    def pack(t): saved.append(t); return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t): fn()
    ptrs, total, logits = set(), 0, 0
    for t in saved:
        key = (t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))
        if key in ptrs: continue
        ptrs.add(key)
        if t.untyped_storage().data_ptr() == z.untyped_storage().data_ptr(): logits += t.numel() * t.element_size()
        else: total += t.numel() * t.element_size()
    return total, logits

def bench_memory(args, dev)->dict:
    N, C = args.mem_size
    unit = N * C * 4
    g = torch.Generator().manual_seed(2)
    z0 = torch.randn(N, C, generator=g).to(dev)
    y = torch.randint(0, C, (N,), generator=g).to(dev)
    # the method checked on known cases: one NxC buffer is 1.0, two alive at once 2.0, one freed before the next 1.0
    def one(): a = torch.empty(N, C, device=dev); a.fill_(0)
    def two(): a = torch.empty(N, C, device=dev); b = torch.empty(N, C, device=dev); del a, b
    def seq(): a = torch.empty(N, C, device=dev); del a; b = torch.empty(N, C, device=dev); del b
    calib = {k: _profiled_peak(f, dev) / unit for k, f in (('one', one), ('two', two), ('one then one', seq))}
    rows = {}
    for k, f in loss_contenders().items():
        z = z0.clone().requires_grad_()
        def step(): f(z, y).backward()
        peak = _profiled_peak(step, dev)
        z = z0.clone().requires_grad_()
        sv, sl = _saved_bytes(lambda: f(z, y), z)
        row = dict(peak=peak / unit, saved=sv / unit, saved_logits=sl / unit)
        if dev.type == 'cuda':
            z = z0.clone().requires_grad_(); torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
            step(); torch.cuda.synchronize()
            row['cuda_peak'] = (torch.cuda.max_memory_allocated() - base) / unit
        rows[k] = row
        del z
    print("  memory: " + ", ".join(f"{k} {r['peak']:.2f}" for k, r in rows.items()), flush=True)
    return dict(N=N, C=C, unit_bytes=unit, calibration=calib, rows=rows)

# ---------------------------------------------------------------------------------------------------- report
def machine(dev, args)->dict:
    cpu = 'unknown'
    try:
        for line in open('/proc/cpuinfo'):
            if line.startswith('model name'): cpu = line.split(':', 1)[1].strip(); break
    except OSError: pass
    import fastai, timm
    info = dict(date=datetime.datetime.now().astimezone().isoformat(timespec='seconds'), cpu=cpu,
                cores=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                fastai=fastai.__version__, timm=timm.__version__, python=platform.python_version(),
                device=str(dev), timer=args.timer, malloc_mmap_threshold_pinned=args.malloc_pinned, load_avg=os.getloadavg() if hasattr(os, 'getloadavg') else None)
    if dev.type == 'cuda': info['gpu'] = torch.cuda.get_device_name(dev)
    from fastai_regularize.native import native_info
    n = native_info()
    info['native'] = ('fused CPU kernel' if dev.type == 'cpu' else 'PyTorch ops (the CPU kernel does not run on GPUs)') \
        if n['available'] else f"PyTorch ops: CPU kernel unavailable ({n.get('error') or 'switched off'})"
    return info

def goal(ok:bool)->str: return 'met' if ok else '**not met**'

def report(res:dict, args)->str:
    m = res['machine']
    L = [f"# fastai_regularize speed ({m['device']})", '',
         f"{m['date']} · {m['cpu']} · {m['cores']} cores, torch threads {m['torch_threads']} · torch {m['torch']}, "
         f"fastai {m['fastai']}, timm {m['timm']} · timer: {m['timer']} · glibc malloc pinned: "
         f"{m['malloc_mmap_threshold_pinned']} · load average at the end {m['load_avg']}"
         + (f" · {m['gpu']}" if 'gpu' in m else ''), '',
         f"Ratios are median(ours) / median(theirs); below 1 means ours is faster. {args.reps} interleaved repetitions "
         f"per contender after {args.warmup} warm-up.", '',
         ]
    if 'losses' in res: L += ['## 1. Label-smoothing cross-entropy, forward + backward, float32, eps=0.1', '',
         f"*ours* is what `LabelSmoothingCrossEntropy` runs here ({m['native']}); *{TORCH_OPS}* is the same loss "
         "with the kernel switched off (`use_native(False)`): its path on GPUs or without a compiler.", '',
         f'| N × C | ours ms | / plain CE | / torch LS | / fastai LS | / timm LS | {TORCH_OPS}: / plain CE | / torch LS |',
         '|---|---|---|---|---|---|---|---|']
    for r in res.get('losses', []):
        q, ms = r['ratio'], r['ms']
        L.append(f"| {r['N']} × {r['C']} | {ms['ours']:.3f} | {q['plain CE']:.2f}x | {q['torch LS']:.2f}x | "
                 f"{q['fastai LS']:.2f}x | {q['timm LS']:.2f}x | {ms[TORCH_OPS] / ms['plain CE']:.2f}x | "
                 f"{ms[TORCH_OPS] / ms['torch LS']:.2f}x |")
    if 'losses' in res: L += ['', 'Milliseconds of every contender: ' + '; '.join(
        f"{r['N']}×{r['C']}: " + ', '.join(f"{k} {v:.3f}" for k, v in r['ms'].items()) for r in res['losses']), '']
    if 'weighted' in res:
        L += ["With class weights (uniform in [0.5, 1.5]); *'target'* is `class_weighting='target'` (each item's smoothed "
              "loss times its target's weight), against the default (PyTorch's weighting) on the same path:", '',
              f"| N × C | ours ms | / weighted CE | / torch weighted LS | {TORCH_OPS} ms | / torch weighted LS | "
              "'target' / default, kernel | 'target' / default, PyTorch ops |", '|---|---|---|---|---|---|---|---|']
        for r in res['weighted']:
            ms = r['ms']
            L.append(f"| {r['N']} × {r['C']} | {ms['ours']:.3f} | {r['ratio']['weighted CE']:.2f}x | "
                     f"{r['ratio']['torch weighted LS']:.2f}x | {ms[TORCH_OPS]:.3f} | {ms[TORCH_OPS] / ms['torch weighted LS']:.2f}x | "
                     f"{ms[TARGET] / ms['ours']:.2f}x | {ms[TARGET_OPS] / ms[TORCH_OPS]:.2f}x |")
        L.append('')
    if 'mixup_step' in res:
        s = res['mixup_step']
        L += ['## 2. MixUp + label smoothing training step', '',
              f"Learner on `nn.Linear({s['D']}, {s['C']})`, batch {s['N']}, SGD; time from `before_batch` to `after_step`, "
              f"{s['batches']} batches per learner, the learners' fits interleaved.", '',
              f'| ours ms | {TORCH_OPS} ms | fastai ms | ours / fastai | {TORCH_OPS} / fastai |', '|---|---|---|---|---|',
              f"| {s['ms']['ours']:.2f} | {s['ms'][TORCH_OPS]:.2f} | {s['ms']['fastai']:.2f} | {s['ratio']:.2f}x | "
              f"{s['ratio_torch_ops']:.2f}x |", '']
    if 'before_batch' in res:
        b = res['before_batch']
        L += ['## 3. MixUp `before_batch`', '',
              f"`MixUp.mix` on a {'×'.join(map(str, b['shape']))} float32 batch vs the floor (one `torch.lerp` with the "
              "partner batch and weights precomputed) and fastai's `MixUp.before_batch`.", '',
              '| ours ms | bare lerp ms | fastai ms | ours / bare lerp | ours / fastai |', '|---|---|---|---|---|',
              f"| {b['ms']['ours']:.2f} | {b['ms']['bare lerp']:.2f} | {b['ms']['fastai MixUp']:.2f} | "
              f"{b['ratio']['bare lerp']:.2f}x | {b['ratio']['fastai MixUp']:.2f}x |", '']
    if 'memory' in res:
        mm = res['memory']
        cuda = any('cuda_peak' in r for r in mm['rows'].values())
        L += [f"## 4. Memory of one loss step (fwd + bwd) at {mm['N']} × {mm['C']}", '',
              f"In units of one {mm['N']}×{mm['C']} float32 tensor ({mm['unit_bytes']/2**20:.1f} MiB). *Peak*: the profiler's "
              "allocation events during fwd+bwd summed in time order, highest point above the level at entry (the logits "
              "already exist; their gradient, which stays, counts 1.0). *Saved*: tensors autograd keeps for backward "
              "other than the logits (`saved_tensors_hooks`). Method check: one buffer = "
              f"{mm['calibration']['one']:.2f}, two alive at once = {mm['calibration']['two']:.2f}, one freed before the "
              f"next = {mm['calibration']['one then one']:.2f}.", '',
              '| loss | peak | saved (besides logits) | logits saved |' + (' CUDA max_memory_allocated peak |' if cuda else ''),
              '|---|---|---|---|' + ('---|' if cuda else '')]
        for k, r in mm['rows'].items():
            L.append(f"| {k} | {r['peak']:.2f} | {r['saved']:.2f} | {'yes' if r['saved_logits'] else 'no'} |"
                     + (f" {r['cuda_peak']:.2f} |" if cuda else ''))
        L.append('')
    L += ['## Goals', '', '| goal | measured | |', '|---|---|---|']
    for g in res['goals']: L.append(f"| {g['goal']} | {g['value']} | {goal(g['met'])} |")
    return '\n'.join(L) + '\n'

def goals(res:dict)->list:
    G = []
    for r in res.get('losses', []):
        if (r['N'], r['C']) in GOAL_SIZES:
            G.append(dict(goal=f"LS-CE fwd+bwd ≤ 1.15x plain CE at {r['N']}×{r['C']}", value=f"{r['ratio']['plain CE']:.2f}x",
                          met=r['ratio']['plain CE'] <= 1.15))
            G.append(dict(goal=f"LS-CE fwd+bwd ≤ 0.8x torch label_smoothing at {r['N']}×{r['C']}",
                          value=f"{r['ratio']['torch LS']:.2f}x", met=r['ratio']['torch LS'] <= 0.8))
    for r in res.get('weighted', []):
        for k, ref, path in ((TARGET, 'ours', 'kernel'), (TARGET_OPS, TORCH_OPS, 'PyTorch ops')):
            q = r['ms'][k] / r['ms'][ref]
            G.append(dict(goal=f"class_weighting='target' ≤ 1.1x the default at {r['N']}×{r['C']} ({path})",
                          value=f"{q:.2f}x", met=q <= 1.1))
    if 'mixup_step' in res:
        s = res['mixup_step']
        G.append(dict(goal=f"MixUp+LS step at C={s['C']} ≤ 0.65x fastai's", value=f"{s['ratio']:.2f}x", met=s['ratio'] <= 0.65))
    if 'before_batch' in res:
        b = res['before_batch']['ratio']['bare lerp']
        G.append(dict(goal="MixUp before_batch ≤ 1.3x bare lerp", value=f"{b:.2f}x", met=b <= 1.3))
    if 'memory' in res:
        p = res['memory']['rows']['ours']
        G.append(dict(goal="loss step allocates no N×C beyond the logits' gradient",
                      value=f"peak {p['peak']:.2f}, saved {p['saved']:.2f}", met=p['peak'] < 1.5 and p['saved'] < 0.5))
    return G

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--device', default='cpu', help="'cpu' or 'cuda'")
    ap.add_argument('--reps', type=int, default=None, help='timed repetitions per contender (default 25, --quick 5)')
    ap.add_argument('--warmup', type=int, default=3)
    ap.add_argument('--quick', action='store_true', help='few repetitions, fewer MixUp batches; writes nothing unless --write')
    ap.add_argument('--threads', type=int, default=None,
                    help='torch intra-op threads on CPU (default 1: steadier ratios on a shared machine)')
    ap.add_argument('--timer', choices=['cpu', 'wall'], default=None,
                    help="'cpu' = process CPU time (default on CPU with 1 thread), 'wall' = perf_counter (default otherwise)")
    ap.add_argument('--no-prewarm', dest='prewarm', action='store_false',
                    help='skip the untimed call of the same contender before each timed one')
    ap.add_argument('--malloc', choices=['steady', 'fresh', 'default'], default='steady',
                    help="glibc on CPU: 'steady' pins the thresholds its adaptation reaches in a loop (buffers < 32 MiB "
                         "reused), 'fresh' makes every buffer >= 128 KiB fresh pages, 'default' leaves glibc adaptive")
    ap.add_argument('--only', default='losses,weighted,step,before_batch,memory', help='comma-separated sections to run')
    ap.add_argument('--write', action='store_true', help='write the results files even with --quick')
    ap.add_argument('--no-write', action='store_true', help='print only')
    ap.add_argument('--json', default=None, help='also write the results (what the .json file holds) to this path')
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == 'cuda' and not torch.cuda.is_available(): sys.exit('--device cuda: no CUDA device here')
    torch.set_flush_denormal(True)
    args.malloc_pinned = args.malloc if dev.type == 'cpu' and args.malloc != 'default' and pin_malloc(args.malloc) else False
    if dev.type == 'cpu': torch.set_num_threads(args.threads or 1)
    if args.timer is None: args.timer = 'cpu' if dev.type == 'cpu' and torch.get_num_threads() == 1 else 'wall'
    if args.timer == 'cpu' and dev.type == 'cuda': sys.exit('--timer cpu measures nothing of a GPU; use wall')
    if args.reps is None: args.reps = 5 if args.quick else 25
    args.sizes = SIZES
    args.step_bs, args.step_classes, args.step_features = 256, 32000, 8
    args.step_batches, args.step_reps = (4, 2) if args.quick else (6, 6)
    args.img_bs, args.img_size = 64, 128
    args.mem_size = (512, 32000)
    timer = Timer(args.timer, dev)
    only = set(args.only.split(','))
    res = {}
    print(f"device {dev}, timer {args.timer}, torch threads {torch.get_num_threads()}, reps {args.reps}", flush=True)
    if 'losses' in only: res['losses'] = bench_losses(args, timer, dev)
    if 'weighted' in only: res['weighted'] = bench_weighted(args, timer, dev)
    if 'step' in only: res['mixup_step'] = bench_mixup_step(args, timer, dev)
    if 'before_batch' in only: res['before_batch'] = bench_before_batch(args, timer, dev)
    if 'memory' in only: res['memory'] = bench_memory(args, dev)
    res['machine'] = machine(dev, args)
    res['goals'] = goals(res)
    res['args'] = {k: v for k, v in vars(args).items()}
    md = report(res, args)
    print('\n' + md)
    if args.json: Path(args.json).write_text(json.dumps(res, indent=1, default=str) + '\n')
    if (not args.quick or args.write) and not args.no_write:
        out = ROOT / 'results'; out.mkdir(exist_ok=True)
        (out / f'speed-{dev.type}.md').write_text(md)
        (out / f'speed-{dev.type}.json').write_text(json.dumps(res, indent=1, default=str) + '\n')
        print(f"wrote {out / f'speed-{dev.type}.md'} and .json")

if __name__ == '__main__': main()
