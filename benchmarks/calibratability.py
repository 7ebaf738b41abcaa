"""Calibratability: how well each configuration's predictions calibrate, every number out of sample (not a test).

Reads an experiment's saved predictions, `PREDS/{config}__s{seed}.pt` (`{'logits': (N, C) float32, 'targs': (N,)
int64}`, the evaluation set's raw logits, the same items for every config and seed), and scores, for every config,
seed and method, the plain softmax ('before') and each post-hoc scaler of `fastai_regularize.calibration`. The
scalers are fitted and scored on the same evaluation set by cross-fitting (`cross_fit_scaler`: every item's
probabilities come from a map fitted on the other folds), so no number is scored on items its map was fitted on.

Wang et al. (CVPR 2023, "On the pitfall of mixup for uncertainty calibration") found that MixUp makes models less
*calibratable*: better calibrated before temperature scaling, worse after. The table asks the same of this package's
configurations. For every config, method and metric it gives the mean ± std over seeds and the paired difference to
the baseline (same seed, same method) with a 95% t-interval over seeds.

    python benchmarks/calibratability.py OUT/preds --name digits
    python benchmarks/calibratability.py OUT/preds --name fashion-mnist --methods temperature,dirichlet
    python benchmarks/calibratability.py OUT/preds --name fashion-mnist --tta --methods temperature

Writes `results/calibratability-NAME.csv` (one row per config, seed and method, appended as each finished, so an
interrupted run resumes), `results/calibratability-NAME-summary.csv` and `results/calibratability-NAME.md`.

`--tta` scores the probabilities `learn.tta()` returns instead, from the files' `tta_logits` (every TTA pass's logits,
(n+1, N, C), the plain pass last, saved by `compare` since it saves them) combined as `tta` combines them (`combine_tta`,
the files' `tta_beta`): 'before' is TTA's raw output, each method is fitted for TTA's combination by cross-fitting
(`cross_fit_tta_scaler`), and `single-pass-METHOD` is the same method cross-fitted on the plain pass alone and applied
to every pass (what a single-pass calibration does to a TTA submission). Its files are `calibratability-NAME-tta.*`.
"""
import argparse, csv, math, platform, re, sys, time, warnings
from datetime import datetime, timezone
from pathlib import Path

import torch, torch.nn.functional as F
from scipy import stats

from fastai_regularize.activations import combine_tta
from fastai_regularize.calibration import cross_fit_scaler, cross_fit_tta_scaler, SCALERS
from fastai_regularize.calibration_metrics import calibration_report

HERE = Path(__file__).resolve().parent
METRICS = [('ece', 'ECE'), ('adaptive_ece', 'adaptive ECE'), ('classwise_ece', 'classwise ECE'), ('smooth_ece', 'smooth ECE'),
           ('nll', 'NLL'), ('brier', 'Brier'), ('error', 'error')]
PCT = {'ece', 'adaptive_ece', 'classwise_ece', 'smooth_ece', 'error'}        # shown in percent
ORDER = ['baseline', 'label_smoothing', 'mixup', 'mixup+ls', 'mixup-off', 'cutmix', 'manifold', 'regmixup', 'mixup-dominant']
FIELDS = ['config', 'seed', 'method', 'n', 'n_classes'] + [k for k,_ in METRICS] + ['seconds']

def read_preds(folder:Path)->dict:
    "{(config, seed): path} of every `{config}__s{seed}.pt` in `folder`"
    found = {}
    for f in sorted(folder.glob('*__s*.pt')):
        m = re.fullmatch(r'(.+)__s(\d+)\.pt', f.name)
        if m: found[(m.group(1), int(m.group(2)))] = f
    return found

def score(logits:torch.Tensor, targs:torch.Tensor, method:str, n_folds:int, seed:int, n_bins:int, beta:float|None=None)->dict:
    "Out-of-sample metrics of `method` ('before': the plain softmax); `beta`: `logits` are TTA passes (n+1, N, C), combined"
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # a temperature at its bracket's end warns; the row records the result
        if beta is not None:
            if method == 'before': probs = combine_tta(F.softmax(logits.double(), -1), beta)
            else:
                single = method.startswith('single-pass-')
                probs = cross_fit_tta_scaler(logits, targs, method.removeprefix('single-pass-'), beta, n_folds=n_folds, seed=seed,
                                             single_pass=single)[0]
        elif method == 'before': probs = F.softmax(logits.double(), -1)
        else: probs = cross_fit_scaler(logits, targs, method, n_folds=n_folds, seed=seed)[0]
    rep = calibration_report(probs, targs, n_bins=n_bins)
    rep['error'] = 1 - rep.pop('accuracy')
    return rep

def t_interval(d:list)->tuple:
    "Mean and 95% t-interval of the paired differences `d` (nan interval for fewer than 2)"
    n = len(d)
    m = sum(d)/n
    if n < 2: return m,math.nan,math.nan
    sd = math.sqrt(sum((x - m)**2 for x in d)/(n - 1))
    h = stats.t.ppf(0.975, n - 1)*sd/math.sqrt(n)
    return m,m - h,m + h

def summarise(rows:list, baseline:str, methods:list)->list:
    "One row per config, method and metric: mean, std, seeds, and the paired difference to `baseline` with its interval"
    by = {}
    for r in rows: by.setdefault((r['config'], r['method']), {})[int(r['seed'])] = r
    configs = sorted({r['config'] for r in rows}, key=lambda c: (ORDER.index(c) if c in ORDER else len(ORDER), c))
    out = []
    for c in configs:
        for m in methods:
            runs = by.get((c, m), {})
            if not runs: continue
            for k,_ in METRICS:
                v = [float(runs[s][k]) for s in sorted(runs)]
                mean = sum(v)/len(v)
                sd = math.sqrt(sum((x - mean)**2 for x in v)/(len(v) - 1)) if len(v) > 1 else math.nan
                base = by.get((baseline, m), {})
                paired = [float(runs[s][k]) - float(base[s][k]) for s in sorted(runs) if s in base]
                d,lo,hi = t_interval(paired) if paired and c != baseline else (math.nan,)*3
                out.append(dict(config=c, method=m, metric=k, mean=mean, std=sd, seeds=len(v), diff=d, diff_lo=lo,
                                diff_hi=hi, paired_seeds=len(paired) if c != baseline else 0))
    return out

def fmt(k:str, v:float, sign:bool=False)->str:
    if math.isnan(v): return '–'
    return f"{100*v:{'+' if sign else ''}.2f}" if k in PCT else f"{v:{'+' if sign else ''}.4f}"

def markdown(summary:list, methods:list, meta:dict)->str:
    get = {(s['config'], s['method'], s['metric']): s for s in summary}
    configs = list(dict.fromkeys(s['config'] for s in summary))
    what = (f"TTA's output ({meta['tta']}): 'before' is `tta()`'s raw probabilities, each method is fitted for TTA's "
            f"combination, `single-pass-*` fitted on the plain pass and applied to every pass; " if meta.get('tta') else '')
    lines = [f"# Calibratability{' of TTA' if meta.get('tta') else ''}: {meta['name']}", '',
             f"{what}{meta['n_items']} evaluation items, {meta['n_classes']} classes; seeds {meta['seeds']}; "
             f"every scaler cross-fitted on the evaluation set ({meta['n_folds']} folds, fold seed {meta['fold_seed']}), so "
             f"every number is out of sample; ECEs with {meta['n_bins']} bins. Percentages for the ECEs and the error, "
             f"mean ± std over seeds; Δ is the paired difference to `{meta['baseline']}` (same seed, same method) with its "
             f"95% t-interval over seeds. Predictions from `{meta['preds']}`; {meta['machine']}, {meta['date']}.", '']
    lines += ['## Methods × metrics, per config', '']
    for c in configs:
        lines += [f"### {c}", '', '| method | ' + ' | '.join(lbl for _,lbl in METRICS) + ' |', '|---|' + '---|'*len(METRICS)]
        for m in methods:
            cells = []
            for k,_ in METRICS:
                s_ = get.get((c, m, k))
                cells.append('–' if s_ is None else f"{fmt(k, s_['mean'])} ± {fmt(k, s_['std'])}".replace(' ± –', ''))
            lines.append(f"| {m} | " + ' | '.join(cells) + ' |')
        lines.append('')
    lines += ['## Each metric, configs × methods', '']
    head = '| config | ' + ' | '.join(methods) + ' |'
    rule = '|---|' + '---|'*len(methods)
    for k,lbl in METRICS:
        lines += [f"### {lbl}", '', head, rule]
        for c in configs:
            cells = []
            for m in methods:
                s = get.get((c, m, k))
                cells.append('–' if s is None else f"{fmt(k, s['mean'])} ± {fmt(k, s['std'])}".replace(' ± –', ''))
            lines.append(f"| {c} | " + ' | '.join(cells) + ' |')
        lines += ['', f"Δ {lbl} to `{meta['baseline']}` [95% CI]:", '', head, rule]
        for c in configs:
            if c == meta['baseline']: continue
            cells = []
            for m in methods:
                s = get.get((c, m, k))
                cells.append('–' if s is None or math.isnan(s['diff']) else
                             f"{fmt(k, s['diff'], True)} [{fmt(k, s['diff_lo'], True)}, {fmt(k, s['diff_hi'], True)}]")
            lines.append(f"| {c} | " + ' | '.join(cells) + ' |')
        lines.append('')
    return '\n'.join(lines)

def cpu_name():
    try: return next(l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name'))
    except (OSError, StopIteration): return platform.processor() or 'unknown CPU'

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('preds', help='folder of {config}__s{seed}.pt files (an experiment\'s OUT/preds)')
    ap.add_argument('--name', required=True, help='names the output files: results/calibratability-NAME.*')
    ap.add_argument('--methods', default=','.join(SCALERS), help="scalers to cross-fit, from " + ', '.join(SCALERS + ('auto',)))
    ap.add_argument('--baseline', default='baseline', help='config the paired differences are taken to')
    ap.add_argument('--configs', default='', help='comma-separated configs to score (default: every one found)')
    ap.add_argument('--n-folds', type=int, default=2)
    ap.add_argument('--fold-seed', type=int, default=0, help='seed of the fold assignment (the same for every run)')
    ap.add_argument('--n-bins', type=int, default=15)
    ap.add_argument('--out', default=str(HERE/'results'))
    ap.add_argument('--fresh', action='store_true', help='ignore the rows already in the raw CSV')
    ap.add_argument('--tta', action='store_true', help="score TTA's output from the files' tta_logits (see the docstring)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)  # small tensors: more threads only add contention on a shared machine
    methods = ['before'] + [m for m in a.methods.split(',') if m]
    for m in methods[1:]:
        if m not in SCALERS + ('auto',): ap.error(f"unknown method {m!r}; choose from {SCALERS + ('auto',)}")
    if a.tta: methods += [f'single-pass-{m}' for m in methods[1:]]
    found = read_preds(Path(a.preds))
    if a.configs: found = {k: v for k,v in found.items() if k[0] in a.configs.split(',')}
    if not found: ap.error(f"no {{config}}__s{{seed}}.pt files in {a.preds}")
    name = f"{a.name}-tta" if a.tta else a.name
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    raw = out/f'calibratability-{name}.csv'
    rows = [] if a.fresh or not raw.exists() else list(csv.DictReader(open(raw)))
    done = {(r['config'], int(r['seed']), r['method']) for r in rows}
    if a.fresh or not raw.exists():
        with open(raw, 'w', newline='') as f: csv.DictWriter(f, FIELDS).writeheader()
    start,ref_targs,betas = time.time(),None,set()
    for (config, seed),path in found.items():
        d = torch.load(path, weights_only=True)
        logits,targs,beta = d['logits'],d['targs'],None
        if a.tta:
            if 'tta_logits' not in d: sys.exit(f"{path} has no tta_logits: it was saved without TTA, or before compare saved them")
            logits,beta = d['tta_logits'],float(d.get('tta_beta', 0.25))
            betas.add(beta)
        if ref_targs is None: ref_targs = targs
        elif not torch.equal(targs, ref_targs):
            sys.exit(f"{path}: targets differ from the other files'; every run must score the same evaluation items")
        for m in methods:
            if (config, seed, m) in done: continue
            t = time.time()
            rep = score(logits, targs, m, a.n_folds, a.fold_seed, a.n_bins, beta)
            row = dict(config=config, seed=seed, method=m, n=len(targs), n_classes=logits.shape[-1],
                       **{k: f"{rep[k]:.6g}" for k,_ in METRICS}, seconds=f"{time.time() - t:.2f}")
            with open(raw, 'a', newline='') as f: csv.DictWriter(f, FIELDS).writerow(row)
            rows.append(row)
            print(f"{config:>16} s{seed} {m:>11}: ECE {100*rep['ece']:.2f}%  NLL {rep['nll']:.4f}  ({row['seconds']} s)", flush=True)
    summary = summarise(rows, a.baseline, methods)
    with open(out/f'calibratability-{name}-summary.csv', 'w', newline='') as f:
        w = csv.DictWriter(f, list(summary[0]))
        w.writeheader(); w.writerows(summary)
    seeds = sorted({int(r['seed']) for r in rows})
    tta = f"{len(logits) - 1} augmented passes and the plain one, beta {', '.join(map(str, sorted(betas)))}" if a.tta else None
    meta = dict(name=a.name, tta=tta, n_items=rows[0]['n'], n_classes=rows[0]['n_classes'], seeds=', '.join(map(str, seeds)),
                n_folds=a.n_folds, fold_seed=a.fold_seed, n_bins=a.n_bins, baseline=a.baseline, preds=a.preds,
                machine=f"{cpu_name()}, torch {torch.__version__}",
                date=datetime.now(timezone.utc).strftime('%Y-%m-%d'))
    (out/f'calibratability-{name}.md').write_text(markdown(summary, methods, meta) + '\n')
    print(f"wrote {raw}, its summary and calibratability-{name}.md ({time.time() - start:.0f} s)")

if __name__ == '__main__': main()
