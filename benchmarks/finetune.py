"""Fine-tuning benchmark: where MixUp, CutMix and label smoothing pay when a pretrained body is fine-tuned (not a test; `make finetune`).

The seed's regime is fastai's `fine_tune` of a pretrained body: a new head, the body frozen for an epoch, then everything
unfrozen with discriminative learning rates, for few epochs on a small training set. No pretrained weights can be
downloaded here, so this script makes them:

1. "Pretrain" fastai's xresnet18 (half width, one input channel, fastai's head) on Fashion-MNIST classes 0-4 (T-shirt,
   trouser, pullover, dress, coat: all 30,000 training images), scored on their 5,000 test images, and keep its body.
   The body is cached under `data_home()/pretrained/` by a hash of the pretraining settings (versions included), so a
   rerun or a resumed study reuses it; the record (settings, hash, error, minutes) goes to `OUT/pretrain.json`.
2. `fine_tune` it on classes 5-9 (sandal, shirt, sneaker, bag, ankle boot) with a small training set (the first
   `--per-class` training images of each class, 1,000 by default) under each `--configs` configuration, scored on all
   5,000 test images of those classes: `fastai_regularize.experiment.run_experiment` with
   `Task.fit = partial(Learner.fine_tune, freeze_epochs=...)`, paired seeds, into `OUT/fine_tune/`.
3. The same model from scratch on the same images (baseline only, `fit_one_cycle` for the same number of epochs:
   frozen + unfrozen), same seeds, into `OUT/scratch/`: what pretraining buys.

Each run resumes (the runner's `runs.csv`); `OUT/summary.md` holds the tables. Seed s gives every configuration, and the
from-scratch run, the same data order and the same initial head, so all differences are paired by seed.

    python benchmarks/finetune.py                          # -> benchmarks/results/finetune-fmnist-n1000-e1+7/ (make finetune)
    python benchmarks/finetune.py --seeds 1 --epochs 1 --pretrain-epochs 1 --pretrain-per-class 500 --configs baseline,mixup --out /tmp/ft
"""
import argparse, hashlib, json, math, os, sys, time, warnings
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

# fastai's import of torch.jit.script warns on torch >= 2.10 (as in the CLI)
warnings.filterwarnings('ignore', message=r'`torch\.jit\.script` is deprecated', category=FutureWarning)
import torch
from fastai.callback.hook import num_features_model
from fastai.learner import Learner
from fastai.metrics import error_rate
from fastai.vision.augment import aug_transforms
from fastai.vision.learner import add_head, cut_model, model_meta
from fastai.vision.models.xresnet import xresnet18
import fastai.callback.schedule  # noqa: F401 (`Learner.fine_tune`)

from fastai_regularize.data import FASHION_MNIST_CLASSES, DataError, data_home, load_idx_pair, tensor_image_dls
from fastai_regularize.experiment import (CONFIGS, SettingsMismatch, Task, _machine, _versions, get_configs, paired_ci,
                                          read_runs, run_experiment, train_run)

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIGS = 'baseline,label_smoothing,mixup,mixup+ls,cutmix,mixup-off,manifold,regmixup'
AUGMENT = 'flip, zoom 1.1'
SOURCE, TARGET = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)  # pretrain on these classes, fine-tune on those
SPLIT = model_meta[xresnet18]['split']  # fastai's xresnet groups: stem, the four stages, the head


def _idx(path: Path, stem: str) -> Path:
    for name in (stem + '.gz', stem):
        if (path/name).is_file(): return path/name
    raise DataError(f"{path} has no {stem}[.gz]; install Debian's dataset-fashion-mnist (make finetune does)")


def load_fashion(path):
    p = Path(path)
    return (load_idx_pair(_idx(p, 'train-images-idx3-ubyte'), _idx(p, 'train-labels-idx1-ubyte')),
            load_idx_pair(_idx(p, 't10k-images-idx3-ubyte'), _idx(p, 't10k-labels-idx1-ubyte')))


def pick(x, y, classes, per_class=0):
    "The images of `classes` in file order (the first `per_class` of each if given), labels renumbered 0..len(classes)-1"
    keep = torch.zeros(len(y), dtype=torch.bool)
    for c in classes:
        i = (y == c).nonzero()[:, 0]
        if per_class:
            if len(i) < per_class: raise DataError(f"class {c} has {len(i)} images, fewer than --per-class {per_class}")
            i = i[:per_class]
        keep[i] = True
    lut = torch.full((256,), -1, dtype=torch.long)
    lut[list(classes)] = torch.arange(len(classes))
    return x[keep], lut[y[keep].long()]


def make_model(widen: float, n_out: int):
    "fastai's xresnet18 cut where fastai cuts it (stem and four stages: the body) and fastai's head, as `vision_learner` builds it"
    body = cut_model(xresnet18(c_in=1, widen=widen), model_meta[xresnet18]['cut'])
    return add_head(body, num_features_model(body), n_out)


def image_task(xt, yt, xv, yv, vocab, bs, widen, settings, body_file=None, fit=None):
    "A `Task` on uint8 images: the xresnet18 above, its body loaded from `body_file` if given"
    def make_dls(seed):
        tfms = aug_transforms(size=28, do_flip=True, max_rotate=0., max_zoom=1.1, max_lighting=0., max_warp=0.)
        return tensor_image_dls(xt, yt, xv, yv, vocab, bs=bs, batch_tfms=tfms)

    def make_learner(dls, loss_func, cbs):
        model = make_model(widen, len(vocab))  # the same draws with or without the body file: the head starts the same
        if body_file is not None: model[0].load_state_dict(torch.load(body_file, map_location='cpu', weights_only=True))
        learn = Learner(dls, model, loss_func=loss_func, metrics=error_rate, cbs=cbs, splitter=SPLIT)
        return learn.to_fp16() if torch.cuda.is_available() else learn

    return Task(make_dls, make_learner, settings, fit=fit)


def pretrain(a, data, cache: Path, out: Path) -> tuple:
    "The body pretrained on classes 0-4, from the cache when its settings' hash is there: (body file, record)"
    settings = dict(data='fashion-mnist', classes='0-4', train_images='all' if not a.pretrain_per_class else f"first {a.pretrain_per_class} per class",
                    model=f"xresnet18(widen={a.widen:g}, c_in=1) + fastai head", bs=a.pretrain_bs, augment=AUGMENT,
                    schedule='fit_one_cycle', epochs=a.pretrain_epochs, lr=a.pretrain_lr, seed=a.pretrain_seed, **_versions())
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    body_file, rec_file = cache/f"xresnet18-fmnist0-4-{key}.pt", cache/f"xresnet18-fmnist0-4-{key}.json"
    if a.fresh: body_file.unlink(missing_ok=True); rec_file.unlink(missing_ok=True)
    if body_file.exists() and rec_file.exists():
        rec = json.loads(rec_file.read_text())
        print(f"pretrained body {key} from {body_file} (test error on classes 0-4: {100*rec['test_error_rate']:.2f}%)", flush=True)
    else:
        (xt, yt), (xv, yv) = data
        xs, ys = pick(xt, yt, SOURCE, a.pretrain_per_class)
        xsv, ysv = pick(xv, yv, SOURCE)
        print(f"== pretraining xresnet18 on {len(xs)} images of classes 0-4 ({a.pretrain_epochs} epochs), scored on {len(xsv)}", flush=True)
        task = image_task(xs, ys, xsv, ysv, FASHION_MNIST_CLASSES[:5], a.pretrain_bs, a.widen, {})
        start = time.perf_counter()
        learn = train_run(task, CONFIGS['baseline'], a.pretrain_seed, a.pretrain_epochs, a.pretrain_lr, bars=False, prefix='pretrain  ')
        minutes = (time.perf_counter() - start)/60
        cache.mkdir(parents=True, exist_ok=True)
        tmp = body_file.with_name(f".{body_file.name}.{os.getpid()}.tmp")
        torch.save(learn.model[0].state_dict(), tmp)
        os.replace(tmp, body_file)
        rec = dict(hash=key, settings=settings, n_train=len(xs), n_test=len(xsv),
                   test_error_rate=learn.epoch_values['error_rate'][-1], valid_error_by_epoch=learn.epoch_values['error_rate'],
                   body_sha1=hashlib.sha1(body_file.read_bytes()).hexdigest(), minutes=round(minutes, 2), machine=_machine(),
                   load_1min=round(os.getloadavg()[0], 2), finished=datetime.now(timezone.utc).isoformat(timespec='seconds'))
        rec_file.write_text(json.dumps(rec, indent=1) + '\n')
        print(f"pretrained body {key}: test error on classes 0-4 {100*rec['test_error_rate']:.2f}% in {minutes:.1f} min -> {body_file}", flush=True)
    (out/'pretrain.json').write_text(json.dumps(rec, indent=1) + '\n')
    return body_file, rec


def pretraining_table(ft_runs, sc_runs, seeds) -> str:
    "Fine-tuned baseline against the same model from scratch, paired by seed"
    import pandas as pd
    ft = pd.DataFrame(ft_runs); sc = pd.DataFrame(sc_runs)
    ft = ft[ft.config == 'baseline'].assign(seed=lambda d: d.seed.astype(int)).set_index('seed')
    sc = sc[sc.config == 'baseline'].assign(seed=lambda d: d.seed.astype(int)).set_index('seed')
    common = sorted(set(ft.index) & set(sc.index) & set(seeds))
    lines = ["| metric | from scratch | fine-tuned | fine-tuned − scratch [95% CI] | seeds lower |", '|---|---|---|---|---|']
    for m, name, k in (('error_rate', 'error (%)', 100), ('nll', 'NLL', 1), ('ece', 'ECE (%)', 100),
                       ('nll_calibrated', 'NLL cal.', 1), ('ece_calibrated', 'ECE cal. (%)', 100)):
        a_, b_ = sc.loc[common, m].astype(float)*k, ft.loc[common, m].astype(float)*k
        d, lo, hi = paired_ci(list(b_ - a_))
        ci = f"{d:+.3f} (1 seed)" if math.isnan(lo) else f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        if not math.isnan(lo) and (lo > 0 or hi < 0): ci = f"**{ci}**"
        sd = lambda s: '' if len(s) < 2 else f" ± {s.std(ddof=1):.3f}"
        lines.append(f"| {name} | {a_.mean():.3f}{sd(a_)} | {b_.mean():.3f}{sd(b_)} | {ci} | {int((b_ < a_).sum())}/{len(common)} |")
    return '\n'.join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--path', default='/usr/share/datasets/fashion-mnist')
    ap.add_argument('--per-class', type=int, default=200, help='fine-tune on the first N training images of each of classes 5-9')
    ap.add_argument('--epochs', type=int, default=7, help='unfrozen epochs of fine_tune (from scratch: --freeze-epochs + --epochs)')
    ap.add_argument('--freeze-epochs', type=int, default=1, help="fine_tune's frozen epochs (the head alone)")
    ap.add_argument('--lr', type=float, default=5e-3, help="fine_tune's base_lr; from scratch: fit_one_cycle's maximum")
    ap.add_argument('--bs', type=int, default=64)
    ap.add_argument('--seeds', type=int, default=3, help='seeds --seed, --seed+1, ... per configuration')
    ap.add_argument('--seed', type=int, default=42, help='first seed')
    ap.add_argument('--configs', default=DEFAULT_CONFIGS, help=f"comma-separated, among: {', '.join(CONFIGS)}")
    ap.add_argument('--no-scratch', action='store_true', help='skip the from-scratch baseline')
    ap.add_argument('--pretrain-epochs', type=int, default=5)
    ap.add_argument('--pretrain-lr', type=float, default=5e-3)
    ap.add_argument('--pretrain-bs', type=int, default=128)
    ap.add_argument('--pretrain-per-class', type=int, default=0, help='pretrain on the first N images of each of classes 0-4 (0: all 6,000)')
    ap.add_argument('--pretrain-seed', type=int, default=0)
    ap.add_argument('--widen', type=float, default=0.5, help="width of fastai's xresnet18 (0.5: half the channels)")
    ap.add_argument('--cache', default=None, help="pretrained bodies; default: data_home()/pretrained ($FASTAI_REGULARIZE_HOME)")
    ap.add_argument('--out', default=None, help='default: benchmarks/results/finetune-fmnist-n{5*per_class}-e{freeze_epochs}+{epochs}')
    ap.add_argument('--fresh', action='store_true', help='delete the runs already in --out, and the cached body, and start over')
    a = ap.parse_args(argv)
    if not Path(a.path).exists():
        sys.exit(f"finetune.py: no Fashion-MNIST at {a.path}; install Debian's dataset-fashion-mnist (make finetune does)")
    for k in ('per_class', 'epochs', 'freeze_epochs', 'seeds', 'pretrain_epochs'):
        if getattr(a, k) < 1: sys.exit(f"finetune.py: --{k.replace('_', '-')} must be >= 1, got {getattr(a, k)}")
    if a.pretrain_per_class < 0: sys.exit(f"finetune.py: --pretrain-per-class must be >= 0 (0: all), got {a.pretrain_per_class}")
    try: configs = get_configs(a.configs)
    except ValueError as e: sys.exit(f"finetune.py: {e}")
    torch.set_flush_denormal(True)
    out = Path(a.out) if a.out else HERE/'results'/f"finetune-fmnist-n{5*a.per_class}-e{a.freeze_epochs}+{a.epochs}"
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(a.cache) if a.cache else data_home()/'pretrained'
    seeds = list(range(a.seed, a.seed + a.seeds))
    sd = f"seed {a.seed}" if a.seeds == 1 else f"seeds {seeds[0]}-{seeds[-1]}"
    start = time.perf_counter()
    data = load_fashion(a.path)
    body_file, rec = pretrain(a, data, cache, out)

    (xt, yt), (xv, yv) = data
    xf, yf = pick(xt, yt, TARGET, a.per_class)
    xfv, yfv = pick(xv, yv, TARGET)
    common = dict(data='fashion-mnist classes 5-9', train_images=f"first {a.per_class} per class", test_images=len(xfv),
                  model=f"xresnet18(widen={a.widen:g}, c_in=1) + fastai head", bs=a.bs, augment=AUGMENT)
    vocab = FASHION_MNIST_CLASSES[5:]
    ft_task = image_task(xf, yf, xfv, yfv, vocab, a.bs, a.widen, dict(**common, body=f"pretrained on classes 0-4 ({rec['hash']})"),
                         body_file=body_file, fit=partial(Learner.fine_tune, freeze_epochs=a.freeze_epochs))
    sc_task = image_task(xf, yf, xfv, yfv, vocab, a.bs, a.widen, dict(**common, body='random init'))
    try:
        run_experiment(ft_task, configs, seeds, a.epochs, a.lr, out/'fine_tune', fresh=a.fresh, bars=False,
                       title=f"Fine-tuned: {len(xf)} training images of Fashion-MNIST classes 5-9, {len(xfv)} test images; "
                             f"body pretrained on classes 0-4 ({rec['n_train']} images, {100*rec['test_error_rate']:.2f}% test error); "
                             f"fine_tune({a.epochs}, base_lr={a.lr:g}, freeze_epochs={a.freeze_epochs}); {sd}")
        if not a.no_scratch:
            run_experiment(sc_task, [CONFIGS['baseline']], seeds, a.freeze_epochs + a.epochs, a.lr, out/'scratch', fresh=a.fresh, bars=False,
                           title=f"From scratch: the same images and model, fit_one_cycle({a.freeze_epochs + a.epochs}, {a.lr:g}); "
                                 f"{sd}")
    except SettingsMismatch as e: sys.exit(f"finetune.py: {e}")
    except KeyboardInterrupt as e: sys.exit(f"finetune.py: {e or 'interrupted'}")

    parts = [f"# Fine-tuning on Fashion-MNIST: {len(xf)} training images of classes 5-9, {a.seeds} paired seeds", '',
             f"Body: fastai's xresnet18 (widen {a.widen:g}, 1 channel) pretrained on all {rec['n_train']} training images of classes 0-4, "
             f"fit_one_cycle({a.pretrain_epochs}, {a.pretrain_lr:g}), bs {a.pretrain_bs}, seed {a.pretrain_seed}: "
             f"{100*rec['test_error_rate']:.2f}% error on their {rec['n_test']} test images (settings hash {rec['hash']}, "
             f"{rec['minutes']:.1f} min on {rec['machine']['device']}).", '',
             (out/'fine_tune'/'summary.md').read_text().strip()]
    if not a.no_scratch:
        parts += ['', f"## What pretraining buys: the baseline fine-tuned against the same model from scratch "
                  f"(fit_one_cycle({a.freeze_epochs + a.epochs}, {a.lr:g})), paired by seed; **bold**: the interval excludes 0", '',
                  pretraining_table(read_runs(out/'fine_tune'/'runs.csv'), read_runs(out/'scratch'/'runs.csv'), seeds)]
    (out/'summary.md').write_text('\n'.join(parts) + '\n')
    print(f"wrote {out/'summary.md'}; {(time.perf_counter() - start)/60:.1f} min in this call", flush=True)


if __name__ == '__main__': main()
