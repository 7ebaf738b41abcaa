"""Imbalanced-data study: class-weighted losses on long-tailed Fashion-MNIST, several paired seeds (not a test; `make imbalanced`).

Training set: the first `--per-class` (1,000) training images of each class, of which class k keeps
round(per_class / rho^(k/9)) (rho = 100: 1,000 images of class 0 down to 10 of class 9, 2,480 in all). Evaluation: all
10,000 test images (1,000 per class, so the error is also the balanced error). Every configuration trains with the
class-balanced weights w_c = n / (C n_c) (scikit-learn's 'balanced': 0.25 for class 0, 24.8 for class 9) in its loss:
the registered configuration's loss factory gets `weight=w` (`partial(config.loss, weight=w)`), so

- baseline:        CrossEntropyLossFlat(weight=w): w[y] CE, mean over sum w[y] (PyTorch's weighted mean)
- label_smoothing: LabelSmoothingCrossEntropyFlat(eps=0.1, weight=w), PyTorch's weighting (w_c inside the smoothing term)
- ls-target:       the same with class_weighting='target': w[y] times the smoothed loss, smoothed uniformly
- focal:           AdaptiveFocalLoss(weight=w), FLSD-53 (gamma 5 where p_y < 0.2, else 3), w[y] times the item's loss
- conf-penalty:    ConfidencePenalty(beta=0.1, weight=w): w[y] (CE - 0.1 H(p))
- mixup:           CrossEntropyLossFlat(weight=w) + MixUp(0.4): per item lam w[y1] CE(y1) + (1-lam) w[y2] CE(y2), mean
- mixup+ls, mixup+ls-target: the same with label smoothing, PyTorch's or the target weighting

The runs go through `fastai_regularize.experiment.run_experiment` (the runner of `fastai-regularize compare` and
quality.py): seed s gives every configuration the same data order and initial weights, each finished run is appended
to OUT/runs.csv and its test logits saved to OUT/preds/{config}__s{seed}.pt, the same command resumes, and
OUT/summary.* hold the runner's tables. This script then reads the saved logits and adds, per run, the balanced error,
the error on the three rarest classes (7-9) and on the three commonest (0-2), the share of test images predicted as the
rarest class, and the classwise ECE (and each class's recall and share of the predictions); every calibrated number is out of sample (temperature cross-fitted on the test set,
2 folds, the runner's folds): OUT/imbalanced-runs.csv (one row per run), OUT/imbalanced.csv (mean, std, paired
differences with 95% t-intervals) and OUT/imbalanced.md (the tables).

    python benchmarks/imbalanced.py                            # -> benchmarks/results/imbalanced-fmnist-r100-e15/ (make imbalanced)
    python benchmarks/imbalanced.py --seeds 1 --epochs 1 --configs baseline,ls-target --out /tmp/imb   # a quick check
"""
import argparse, math, os, sys, time, warnings
from functools import partial
from pathlib import Path

warnings.filterwarnings('ignore', message=r'`torch\.jit\.script` is deprecated', category=FutureWarning)
import torch
from fastai.callback.core import Callback, CancelValidException
from fastai.learner import Learner
from fastai.metrics import error_rate
from fastai.vision.augment import aug_transforms
from fastai.vision.models.xresnet import xresnet18

from fastai_regularize.data import FASHION_MNIST_CLASSES, load_idx_pair, tensor_image_dls
from fastai_regularize.experiment import CONFIGS, Config, SettingsMismatch, Task, paired_ci, run_experiment, summarize
from fastai_regularize.losses import LabelSmoothingCrossEntropyFlat
from fastai_regularize.mixup import MixUp
from fastai_regularize.calibration import cross_fit_scaler
from fastai_regularize.calibration_metrics import calibration_error

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from quality import _idx  # noqa: E402 (the IDX file finder quality.py uses)

# mixup+ls-target is not a registered configuration: MixUp with the target-weighted label smoothing
EXTRA = {'mixup+ls-target': Config('mixup+ls-target', partial(LabelSmoothingCrossEntropyFlat, class_weighting='target'), (MixUp,))}
DEFAULT_CONFIGS = 'baseline,label_smoothing,ls-target,focal,conf-penalty,mixup,mixup+ls,mixup+ls-target'
# (key, label, format) of the tables: '%' for rates
METRICS = [('error_rate', 'error', '%'), ('balanced_error', 'balanced error', '%'), ('tail_error', 'error, classes 7-9', '%'),
           ('head_error', 'error, classes 0-2', '%'), ('rarest_share', 'predicted as class 9', '%'), ('nll', 'NLL', '.3f'),
           ('ece', 'ECE', '%'), ('cw_ece', 'classwise ECE', '%'), ('temperature', 'T', '.2f'),
           ('nll_calibrated', 'NLL cal.', '.3f'), ('ece_calibrated', 'ECE cal.', '%'), ('cw_ece_calibrated', 'classwise ECE cal.', '%')]
PAIRS = [('ls-target', 'label_smoothing'), ('mixup+ls-target', 'mixup+ls'), ('mixup+ls-target', 'mixup')]


def long_tail_counts(per_class: int, rho: float, C: int = 10) -> list:
    "Images kept of each class: round(per_class / rho^(k/(C-1)))"
    return [max(1, round(per_class * rho ** (-k / (C - 1)))) for k in range(C)]


def long_tail(x: torch.Tensor, y: torch.Tensor, counts: list) -> tuple:
    "The first counts[k] items of each class k, in file order"
    keep = torch.cat([torch.nonzero(y == k)[:n, 0] for k, n in enumerate(counts)]).sort().values
    got = torch.bincount(y[keep], minlength=len(counts)).tolist()
    if got != counts: raise SystemExit(f"imbalanced.py: the training set has fewer images of a class than asked: {got} < {counts}")
    return x[keep], y[keep]


def balanced_weights(y: torch.Tensor, C: int) -> torch.Tensor:
    "scikit-learn's 'balanced' class weights n / (C n_c), rounded to 4 decimals (as runs.csv prints them)"
    n_c = torch.bincount(y, minlength=C).double()
    return (len(y) / (C * n_c)).round(decimals=4).float()


class ValidateLastEpoch(Callback):
    "During `fit`, the validation pass (all 10,000 test images, four times the training set) runs in the last epoch only"
    order = 1000 # After every other `before_validate`, so the `after_validate`s that follow the cancellation find their state
    # `get_preds` runs before_fit and before_epoch too, but no training phase: only an epoch that trained is a fit's
    def before_epoch(self): self.trained = False
    def before_train(self): self.trained = True
    def before_validate(self):
        if getattr(self, 'trained', False) and self.epoch < self.n_epoch - 1: raise CancelValidException()


def imbalanced_task(path: str, per_class: int, rho: float, bs: int, widen: float, valid_every_epoch: bool = False) -> tuple:
    "(Task, class weights, counts): the long-tailed training set, all 10,000 test images, fastai's xresnet18 from scratch"
    p = Path(path)
    xt, yt = load_idx_pair(_idx(p, 'train-images-idx3-ubyte'), _idx(p, 'train-labels-idx1-ubyte'))
    xv, yv = load_idx_pair(_idx(p, 't10k-images-idx3-ubyte'), _idx(p, 't10k-labels-idx1-ubyte'))
    counts = long_tail_counts(per_class, rho)
    xt, yt = long_tail(xt, yt, counts)
    w = balanced_weights(yt, 10)

    def make_dls(seed):
        tfms = aug_transforms(size=28, do_flip=True, max_rotate=0., max_zoom=1.1, max_lighting=0., max_warp=0.)
        return tensor_image_dls(xt, yt, xv, yv, FASHION_MNIST_CLASSES, bs=bs, batch_tfms=tfms)

    def make_learner(dls, loss_func, cbs):
        cbs = list(cbs) + ([] if valid_every_epoch else [ValidateLastEpoch()])
        learn = Learner(dls, xresnet18(n_out=10, c_in=1, widen=widen), loss_func=loss_func, metrics=error_rate, cbs=cbs)
        return learn.to_fp16() if torch.cuda.is_available() else learn

    settings = dict(data='fashion-mnist long-tailed', rho=rho, per_class=per_class, train_images=len(yt),
                    class_counts=' '.join(map(str, counts)), test_images=len(yv),
                    class_weights='balanced n/(C n_c): ' + ' '.join(f'{v:.4f}' for v in w.tolist()),
                    model=f'xresnet18(widen={widen:g}, c_in=1)', bs=bs, augment='flip, zoom 1.1',
                    validation='every epoch' if valid_every_epoch else 'last epoch only')
    return Task(make_dls, make_learner, settings), w, counts


def weighted(config: Config, w: torch.Tensor) -> Config:
    "The configuration with the class weights in its loss: `partial(config.loss, weight=w)`"
    return Config(config.name, partial(config.loss, weight=w), config.cbs)


def run_metrics(logits: torch.Tensor, targs: torch.Tensor, seed: int, n_folds: int = 2) -> dict:
    "Balanced, tail and head error, the rarest class's share, NLL, ECE and classwise ECE before and after cross-fitted temperature scaling"
    z, y = logits.double(), targs.long()
    C = z.shape[1]
    pred = z.argmax(1)
    recall = torch.stack([(pred[y == k] == k).double().mean() for k in range(C)])
    p = torch.softmax(z, 1)
    pc = cross_fit_scaler(z, y, 'temperature', n_folds=n_folds, seed=seed)[0]   # the runner's folds (Learner.calibrate)
    nll = lambda q: -q.gather(1, y[:, None]).clamp(min=1e-300).log().mean().item()
    share = torch.bincount(pred, minlength=C).double() / len(y)
    return dict(error_rate=(pred != y).double().mean().item(), balanced_error=1 - recall.mean().item(),
                tail_error=1 - recall[C - 3:].mean().item(), head_error=1 - recall[:3].mean().item(),
                rarest_share=share[C - 1].item(), nll=nll(p), ece=calibration_error(p, y),
                cw_ece=calibration_error(p, y, classwise=True), nll_calibrated=nll(pc), ece_calibrated=calibration_error(pc, y),
                cw_ece_calibrated=calibration_error(pc, y, classwise=True),
                **{f'recall_{k}': recall[k].item() for k in range(C)}, **{f'predicted_{k}': share[k].item() for k in range(C)})


def _cell(v: float, f: str, sign: bool = False) -> str:
    if math.isnan(v): return '-'
    if f == '%': return f"{100 * v:{'+' if sign else ''}.2f}"
    return f"{v:{'+' if sign else ''}{f}}"


def derived_tables(out: Path, configs: list, seeds: list, title: str) -> str:
    "Per-run metrics from the saved logits (and T from runs.csv); mean ± std and paired differences with 95% CIs"
    import pandas as pd
    runs = pd.read_csv(out / 'runs.csv')
    rows = []
    for c in configs:
        for s in seeds:
            fn = out / 'preds' / f'{c}__s{s}.pt'
            if not fn.exists(): continue
            d = torch.load(fn)
            r = dict(config=c, seed=s, **run_metrics(d['logits'], d['targs'], s))
            ref = runs[(runs['config'] == c) & (runs['seed'] == s)].iloc[-1]
            r['temperature'] = float(ref['temperature'])
            for k in ('error_rate', 'nll', 'ece', 'nll_calibrated', 'ece_calibrated'):   # recomputed = the runner's
                if not math.isclose(r[k], float(ref[k]), rel_tol=1e-4, abs_tol=1e-6):
                    raise SystemExit(f"imbalanced.py: {c} s{s}: {k} {r[k]} from the saved logits, {ref[k]} in runs.csv")
            rows.append(r)
    df = pd.DataFrame(rows)
    df.to_csv(out / 'imbalanced-runs.csv', index=False)
    keys = [k for k, _, _ in METRICS]
    have = [c for c in configs if c in set(df['config'])]
    summ = summarize(df[df['config'].isin(have)], reference='baseline' if 'baseline' in have else have[0], metrics=keys)
    pair_rows = []
    for a, b in PAIRS:
        if a not in have or b not in have: continue
        A, B = df[df['config'] == a].set_index('seed'), df[df['config'] == b].set_index('seed')
        for k in keys:
            d = (A[k] - B[k]).dropna()
            m, lo, hi = paired_ci(list(d))
            pair_rows.append(dict(config=a, reference=b, metric=k, n_pairs=len(d), diff=m, diff_low=lo, diff_high=hi,
                                  better=int((d < 0).sum())))
    pd.concat([summ.assign(table='vs_baseline'), pd.DataFrame(pair_rows).assign(table='pairs')]).to_csv(out / 'imbalanced.csv', index=False)

    s = summ.set_index(['config', 'metric'])
    ref = summ['reference'].iloc[0]
    L = [title, '', "Mean ± standard deviation over seeds; rates in %; 'cal.': after temperature scaling, out of sample "
         "(2-fold cross-fit on the test set). The test set is balanced (1,000 images a class), so error = balanced error.", '',
         '| config | n | ' + ' | '.join(h for _, h, _ in METRICS) + ' |', '|---|---|' + '---|' * len(METRICS)]
    for c in have:
        cells = []
        for k, _, f in METRICS:
            r = s.loc[(c, k)]
            cells.append(_cell(r['mean'], f) + ('' if math.isnan(r['std']) else f" ± {_cell(r['std'], f)}"))
        L.append(f"| {c} | {int(s.loc[(c, 'error_rate')]['n'])} | " + ' | '.join(cells) + ' |')
    show = [m for m in METRICS if m[0] not in ('head_error', 'temperature', 'balanced_error')]

    def dcell(r, f):
        if math.isnan(r['diff']): return '-'
        if math.isnan(r['diff_low']): return f"{_cell(r['diff'], f, True)} (1 seed)"
        t = f"{_cell(r['diff'], f, True)} [{_cell(r['diff_low'], f, True)}, {_cell(r['diff_high'], f, True)}]"
        return (f"**{t}**" if r['diff_low'] > 0 or r['diff_high'] < 0 else t) + f" {int(r['better'])}/{int(r['n_pairs'])}"
    L += ['', f"Paired difference to {ref} (config − {ref}; rates in percentage points), its 95% t-interval over seeds, and "
          "on how many seeds the config was lower; **bold**: the interval excludes 0.", '',
          '| config | ' + ' | '.join(f"Δ {h}" for _, h, _ in show) + ' |', '|---|' + '---|' * len(show)]
    for c in have:
        if c == ref: continue
        L.append(f"| {c} | " + ' | '.join(dcell(s.loc[(c, k)], f) for k, _, f in show) + ' |')
    if pair_rows:
        P = pd.DataFrame(pair_rows).set_index(['config', 'reference', 'metric'])
        L += ['', 'The same for the pairs that isolate one change (config − reference):', '',
              '| config − reference | ' + ' | '.join(f"Δ {h}" for _, h, _ in show) + ' |', '|---|' + '---|' * len(show)]
        for a, b in dict.fromkeys((a, b) for a, b, _ in P.index):
            L.append(f"| {a} − {b} | " + ' | '.join(dcell(P.loc[(a, b, k)], f) for k, _, f in show) + ' |')
    text = '\n'.join(L) + '\n'
    (out / 'imbalanced.md').write_text(text)
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--path', default='/usr/share/datasets/fashion-mnist')
    ap.add_argument('--rho', type=float, default=100., help='imbalance ratio: images of class 0 / images of class 9')
    ap.add_argument('--per-class', type=int, default=1000, help='images of class 0 (the first of each class are taken)')
    ap.add_argument('--epochs', type=int, default=15)
    ap.add_argument('--seeds', type=int, default=3, help='seeds --seed, --seed+1, ... per configuration')
    ap.add_argument('--seed', type=int, default=42, help='first seed')
    ap.add_argument('--lr', type=float, default=3e-3)
    ap.add_argument('--bs', type=int, default=128)
    ap.add_argument('--widen', type=float, default=0.5, help="width of fastai's xresnet18 (0.5: half the channels)")
    ap.add_argument('--configs', default=DEFAULT_CONFIGS,
                    help=f"comma-separated, among: {', '.join([*CONFIGS, *EXTRA])}")
    ap.add_argument('--out', default=None, help='default: benchmarks/results/imbalanced-fmnist-r{rho}-e{epochs}')
    ap.add_argument('--fresh', action='store_true', help='delete the runs already in --out and start over')
    ap.add_argument('--valid-every-epoch', action='store_true',
                    help='score the test set after every epoch (default: after the last only, half the time)')
    a = ap.parse_args(argv)
    if not Path(a.path).exists():
        sys.exit(f"imbalanced.py: no Fashion-MNIST at {a.path}; install Debian's dataset-fashion-mnist (make imbalanced does)")
    if a.seeds < 1 or a.epochs < 1 or a.per_class < 1 or not a.rho >= 1:
        sys.exit("imbalanced.py: --seeds, --epochs and --per-class must be >= 1, --rho >= 1")
    names = [n.strip() for n in a.configs.split(',') if n.strip()]
    unknown = [n for n in names if n not in CONFIGS and n not in EXTRA]
    if unknown or not names: sys.exit(f"imbalanced.py: unknown configuration(s) {unknown}; known: {', '.join([*CONFIGS, *EXTRA])}")
    torch.set_flush_denormal(True)
    out = Path(a.out) if a.out else HERE / 'results' / f"imbalanced-fmnist-r{a.rho:g}-e{a.epochs}"
    task, w, counts = imbalanced_task(a.path, a.per_class, a.rho, a.bs, a.widen, a.valid_every_epoch)
    print(f"long-tailed Fashion-MNIST, rho {a.rho:g}: {sum(counts)} training images, per class {counts}; "
          f"class weights {[round(v, 4) for v in w.tolist()]}", flush=True)
    configs = [weighted(EXTRA.get(n) or CONFIGS[n], w) for n in names]
    seeds = list(range(a.seed, a.seed + a.seeds))
    sd = f"seeds {seeds[0]}-{seeds[-1]}" if len(seeds) > 1 else f"seed {seeds[0]}"
    title = (f"Long-tailed Fashion-MNIST (rho {a.rho:g}: {sum(counts)} training images, {counts[0]} of class 0 down to "
             f"{counts[-1]} of class 9; all 10,000 test images), class-balanced weights in every loss; xresnet18 "
             f"(widen {a.widen:g}) from scratch, {a.epochs} epochs of fit_one_cycle at lr {a.lr:g}, batch {a.bs}; {sd}")
    start = time.perf_counter()
    try: run_experiment(task, configs, seeds, a.epochs, a.lr, out, fresh=a.fresh, tta=False, title=title)
    except SettingsMismatch as e: sys.exit(f"imbalanced.py: {e}")
    except KeyboardInterrupt as e: sys.exit(f"imbalanced.py: {e or 'interrupted'}")
    print(derived_tables(out, names, seeds, title), flush=True)
    print(f"wrote {out / 'imbalanced-runs.csv'}, {out / 'imbalanced.csv'}, {out / 'imbalanced.md'}; "
          f"{(time.perf_counter() - start) / 60:.1f} min in this call", flush=True)


if __name__ == '__main__': main()
