"""Honest outputs of a finished study: what TTA and calibration do to the probabilities users submit, and how large
conformal prediction sets are at the same coverage, per configuration (not a test; `make honest`).

Reads an experiment's OUT/runs.csv and OUT/preds/{config}__s{seed}.pt (the evaluation set's plain logits and every
TTA pass's logits, `tta_logits`, as `compare`/`run_experiment` save them). Two tables:

1. **TTA calibration**, from runs.csv (the runner computes it, every calibrated number cross-fitted): ECE of the single
   pass and of TTA's output, raw; TTA's output scaled by the single-pass temperature against scaled by the temperature
   fitted on TTA's output (NLL, ECE); and the paired difference between the two (fitted on TTA − single-pass) over seeds,
   with its 95% t-interval.
2. **Conformal sets** on the probabilities users submit: TTA's output through the temperature fitted for TTA (and, for
   comparison, the single pass through its own temperature). For each config and seed, `--splits` random halvings of
   the evaluation set: the temperature and the conformal threshold are fitted on one half (the calibration half), the
   coverage and the mean set size measured on the other; the splits are averaged per seed. Scores: LAC (1 − p_y) and
   randomized APS (Romano et al. 2020; the randomized form is the one with exact coverage, and TorchCP's default),
   at alpha 0.1 and 0.05. Mean ± std over seeds, and each configuration's paired difference in set size to the
   baseline (same seed, same splits) with its 95% t-interval.

Writes results/honest-NAME.csv (one row per config, seed, source, score and alpha, appended as each run is scored, so
an interrupted call resumes) and results/honest-NAME.md.

    python benchmarks/honest.py benchmarks/results/fmnist-n2000-e10 --name fashion-mnist      # (make honest)
"""
import argparse, csv, math, platform, re, sys, time, warnings
from datetime import datetime, timezone
from pathlib import Path

# fastai's import of torch.jit.script warns on torch >= 2.10 (as in the CLI)
warnings.filterwarnings('ignore', message=r'`torch\.jit\.script` is deprecated', category=FutureWarning)
import torch
from scipy import stats

from fastai_regularize.activations import combine_tta
from fastai_regularize.calibration import fit_tta_scaler, fit_temperature
from fastai_regularize.conformal import conformal_sets

HERE = Path(__file__).resolve().parent
FIELDS = ['config', 'seed', 'source', 'score', 'alpha', 'coverage', 'size', 'coverage_sd', 'size_sd', 'splits', 'n_cal', 'n_test']
SCORES = (('lac', False), ('aps', True))        # (score, randomized)
ALPHAS = (0.1, 0.05)
SOURCES = ('tta', 'single')

def t_interval(d:list)->tuple:
    "Mean and 95% t-interval of the paired differences `d` (nan interval for fewer than 2)"
    n = len(d)
    if not n: return (math.nan,)*3
    m = sum(d)/n
    if n < 2: return m,math.nan,math.nan
    h = stats.t.ppf(0.975, n - 1)*math.sqrt(sum((x - m)**2 for x in d)/(n - 1))/math.sqrt(n)
    return m,m - h,m + h

def split_probs(P:torch.Tensor, y:torch.Tensor, beta:float, cal:torch.Tensor)->dict:
    "{source: probabilities of every item}, each map fitted on the items `cal` only"
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')   # a temperature at its bracket's end warns; the numbers say what happened
        act = fit_tta_scaler(P[:, cal], y[cal], 'temperature', beta)
        t = fit_temperature(P[-1, cal], y[cal])
    return {'tta': combine_tta(torch.stack([act(z) for z in P]), beta), 'single': torch.softmax(P[-1]/t, -1)}

def score_run(P:torch.Tensor, y:torch.Tensor, beta:float, splits:int)->list:
    "One row per source, score and alpha: coverage and mean set size averaged over `splits` seeded halvings"
    N = len(y)
    acc = {}
    for r in range(splits):
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(r))
        cal,test = perm[:N//2],perm[N//2:]
        probs = split_probs(P, y, beta, cal)
        for src,p in probs.items():
            for score,rnd in SCORES:
                for alpha in ALPHAS:
                    sets = conformal_sets(p[cal], y[cal], p[test], alpha, score, randomized=rnd, seed=r)
                    cov = sets[torch.arange(len(test)), y[test]].double().mean().item()
                    acc.setdefault((src, score, alpha), []).append((cov, sets.sum(1).double().mean().item()))
    rows = []
    for (src, score, alpha),v in acc.items():
        cov,size = [x for x,_ in v],[s for _,s in v]
        sd = lambda xs: math.sqrt(sum((x - sum(xs)/len(xs))**2 for x in xs)/(len(xs) - 1)) if len(xs) > 1 else math.nan
        rows.append(dict(source=src, score=score, alpha=alpha, coverage=sum(cov)/len(cov), size=sum(size)/len(size),
                         coverage_sd=sd(cov), size_sd=sd(size), splits=splits, n_cal=N//2, n_test=N - N//2))
    return rows

def _pct(v:float, sign:bool=False)->str: return '–' if math.isnan(v) else f"{100*v:{'+' if sign else ''}.2f}"
def _num(v:float, f:str='.4f', sign:bool=False)->str: return '–' if math.isnan(v) else f"{v:{'+' if sign else ''}{f}}"
def _ci(m, lo, hi, f)->str:
    if math.isnan(m): return '–'
    txt = f"{f(m, True)} [{f(lo, True)}, {f(hi, True)}]"
    return f"**{txt}**" if lo > 0 or hi < 0 else txt

def tta_table(runs, configs:list)->list:
    "Markdown lines of table 1, from runs.csv's TTA columns"
    lines = ['| config | ECE single pass | ECE TTA | TTA + single-pass T: NLL / ECE | TTA + T fitted on TTA: NLL / ECE | '
             'Δ NLL (T on TTA − single-pass T) | Δ ECE |', '|---|---|---|---|---|---|---|']
    ms = lambda c, k: (runs[c][k].mean(), runs[c][k].std())
    for c in configs:
        cell = lambda k, pct: (f"{_pct(ms(c, k)[0])} ± {_pct(ms(c, k)[1])}%" if pct else f"{_num(ms(c, k)[0])} ± {_num(ms(c, k)[1])}")
        dn = t_interval(list(runs[c]['tta_nll_calibrated'] - runs[c]['tta_nll_single_t']))
        de = t_interval(list(runs[c]['tta_ece_calibrated'] - runs[c]['tta_ece_single_t']))
        lines.append(f"| {c} | {cell('ece', True)} | {cell('tta_ece', True)} | {cell('tta_nll_single_t', False)} / "
                     f"{cell('tta_ece_single_t', True)} | {cell('tta_nll_calibrated', False)} / {cell('tta_ece_calibrated', True)} | "
                     f"{_ci(*dn, lambda v, s: _num(v, '.4f', s))} {sum(d < 0 for d in runs[c]['tta_nll_calibrated'] - runs[c]['tta_nll_single_t'])}/{len(runs[c])} | "
                     f"{_ci(*de, lambda v, s: _pct(v, s))} |")
    return lines

def set_tables(rows:list, configs:list, baseline:str)->list:
    "Markdown lines of table 2: per alpha, coverage and size of each score on TTA's output, Δ size to the baseline"
    by = {}
    for r in rows: by.setdefault((r['config'], r['source'], r['score'], float(r['alpha'])), {})[int(r['seed'])] = r
    def stat(c, src, score, alpha, k):
        v = [float(x[k]) for x in by.get((c, src, score, alpha), {}).values()]
        m = sum(v)/len(v) if v else math.nan
        return m, (math.sqrt(sum((x - m)**2 for x in v)/(len(v) - 1)) if len(v) > 1 else math.nan)
    def delta(c, src, score, alpha, ref_c=baseline, ref_src=None):
        a,b = by.get((c, src, score, alpha), {}),by.get((ref_c, ref_src or src, score, alpha), {})
        return t_interval([float(a[s]['size']) - float(b[s]['size']) for s in sorted(a) if s in b])
    lines = []
    for alpha in ALPHAS:
        lines += ['', f"**α = {alpha}** (target coverage {1 - alpha:.0%}), TTA's output through the temperature fitted for TTA:", '',
                  '| config | LAC coverage | LAC mean size | Δ LAC size | APS coverage | APS mean size | Δ APS size |',
                  '|---|---|---|---|---|---|---|']
        for c in configs:
            cells = []
            for score,_ in SCORES:
                cv,sz = stat(c, 'tta', score, alpha, 'coverage'),stat(c, 'tta', score, alpha, 'size')
                d = delta(c, 'tta', score, alpha)
                cells += [f"{_pct(cv[0])} ± {_pct(cv[1])}%", f"{sz[0]:.3f} ± {sz[1]:.3f}",
                          '' if c == baseline else _ci(*d, lambda v, s: _num(v, '.3f', s))]
            lines.append(f"| {c} | " + ' | '.join(cells) + ' |')
    lines += ['', "TTA against the single pass (each through its own temperature): mean set size, and the paired difference "
              "TTA − single pass with its 95% t-interval over seeds:", '',
              '| config | ' + ' | '.join(f"{s.upper()} α={a}: single → TTA (Δ)" for s,_ in SCORES for a in ALPHAS) + ' |',
              '|---|' + '---|'*(len(SCORES)*len(ALPHAS))]
    for c in configs:
        cells = []
        for score,_ in SCORES:
            for alpha in ALPHAS:
                s1,s2 = stat(c, 'single', score, alpha, 'size')[0],stat(c, 'tta', score, alpha, 'size')[0]
                d = delta(c, 'tta', score, alpha, ref_c=c, ref_src='single')
                cells.append(f"{s1:.3f} → {s2:.3f} ({_ci(*d, lambda v, s: _num(v, '.3f', s))})")
        lines.append(f"| {c} | " + ' | '.join(cells) + ' |')
    return lines

def cpu_name()->str:
    try: return next(l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name'))
    except (OSError, StopIteration): return platform.processor() or 'unknown CPU'

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('study', help="an experiment's --out folder: runs.csv and preds/")
    ap.add_argument('--name', required=True, help='names the output files: results/honest-NAME.*')
    ap.add_argument('--splits', type=int, default=20, help='random calibration/test halvings per run (seeds 0, 1, ...)')
    ap.add_argument('--baseline', default='baseline')
    ap.add_argument('--out', default=str(HERE/'results'))
    ap.add_argument('--fresh', action='store_true', help='ignore the rows already in the raw CSV')
    a = ap.parse_args(argv)
    if a.splits < 2: ap.error('--splits must be at least 2')
    import pandas as pd
    study = Path(a.study)
    if not (study/'runs.csv').is_file(): ap.error(f"{study} has no runs.csv")
    runs = pd.read_csv(study/'runs.csv')
    need = ['tta_ece', 'tta_nll_single_t', 'tta_ece_single_t', 'tta_nll_calibrated', 'tta_ece_calibrated']
    if runs[need].isna().any().any():
        sys.exit(f"honest.py: {study/'runs.csv'} has runs without TTA calibration columns (made before they existed): "
                 "rerun the study with --fresh")
    configs = list(dict.fromkeys(runs['config']))
    torch.set_num_threads(1)
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    raw = out/f'honest-{a.name}.csv'
    rows = [] if a.fresh or not raw.exists() else list(csv.DictReader(open(raw)))
    if a.fresh or not raw.exists():
        with open(raw, 'w', newline='') as f: csv.DictWriter(f, FIELDS).writeheader()
    done = {(r['config'], int(r['seed'])) for r in rows}
    start = time.time()
    for _,r in runs.iterrows():
        key = (r['config'], int(r['seed']))
        if key in done: continue
        fn = study/'preds'/f"{key[0]}__s{key[1]}.pt"
        if not fn.is_file(): sys.exit(f"honest.py: {fn} is missing (preds/ is not committed: rerun the study to make it)")
        d = torch.load(fn, weights_only=True)
        if 'tta_logits' not in d: sys.exit(f"honest.py: {fn} has no tta_logits: rerun the study with --fresh")
        t0 = time.time()
        new = [dict(config=key[0], seed=key[1], **x) for x in
               score_run(d['tta_logits'].double(), d['targs'], float(d.get('tta_beta', 0.25)), a.splits)]
        with open(raw, 'a', newline='') as f: csv.DictWriter(f, FIELDS).writerows(new)
        rows += [{k: str(v) for k,v in x.items()} for x in new]
        print(f"{key[0]} s{key[1]}: {time.time() - t0:.0f} s", flush=True)
    runs_by = {c: runs[runs['config'] == c].set_index('seed') for c in configs}
    seeds = sorted(set(runs['seed']))
    meta = (f"{len(runs)} runs of `{study}` ({', '.join(configs)}; seeds {', '.join(map(str, seeds))}); "
            f"{cpu_name()}, torch {torch.__version__}, {datetime.now(timezone.utc).date()}")
    n_eval = int(runs['n_valid'].iloc[0])
    md = [f"# Honest outputs: {a.name}", '', meta, '',
          "## 1. TTA calibration", '',
          f"Each run's {n_eval} evaluation items; every calibrated number is out of sample (2-fold cross-fit, as "
          "`compare` computes it). Mean ± std over seeds; Δ: paired difference (temperature fitted on TTA's output − "
          "single-pass temperature, applied to TTA's output) with its 95% t-interval over seeds and on how many seeds it "
          "was lower; **bold**: the interval excludes 0.", ''] + tta_table(runs_by, configs)
    md += ['', "## 2. Conformal prediction sets", '',
           f"{a.splits} random halvings of the {n_eval} evaluation items per run: the temperature and the conformal "
           f"threshold fitted on one half ({n_eval//2} items), coverage and mean set size measured on the other; averaged "
           f"over the halvings, then mean ± std over seeds. Finite-sample target: coverage ⌈(n+1)(1−α)⌉/(n+1) with "
           f"n = {n_eval//2}. LAC: 1 − p_y; APS: randomized (exact coverage). Δ size: paired difference to "
           f"{a.baseline} (same seed, same halvings) with its 95% t-interval over seeds; **bold**: excludes 0."]
    md += set_tables(rows, configs, a.baseline)
    (out/f'honest-{a.name}.md').write_text('\n'.join(md) + '\n')
    print(f"wrote {raw} and {out/f'honest-{a.name}.md'} ({time.time() - start:.0f} s in this call)")

if __name__ == '__main__': main()
