"""Quality benchmark: the regularizers side by side on Fashion-MNIST (not a test; `make quality`).

Fashion-MNIST comes from Debian's `dataset-fashion-mnist` package (IDX files under /usr/share/datasets/fashion-mnist),
read by `fastai_regularize.data.fashion_mnist_dls` as uint8 tensors (no PIL per item). Every configuration trains the
same model from the same seed for the same epochs and learning rate; the table reports error rate, TTA error rate,
NLL and ECE (15 bins) of the 10,000 test images, and NLL/ECE after temperature scaling fitted on those same images
(so the calibrated columns are optimistic: they show how much of the miscalibration is a temperature).
"""
import argparse, json, math, os, platform, sys, time
from datetime import datetime, timezone
from pathlib import Path

import torch
from fastai.callback.schedule import fit_one_cycle  # noqa: F401 (patches Learner)
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import error_rate
from fastai.torch_core import set_seed
from fastai.vision.augment import aug_transforms
from fastai.vision.models.xresnet import xresnet18

from fastai_regularize.cli import CONFIGS, evaluate
from fastai_regularize.data import fashion_mnist_dls, load_idx_pair, tensor_image_dls, FASHION_MNIST_CLASSES
from fastai_regularize.losses import LabelSmoothingCrossEntropyFlat
from fastai_regularize.mixup import MixUp, CutMix

HERE = Path(__file__).resolve().parent

def cpu_name():
    try: return next(l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name'))
    except (OSError, StopIteration): return platform.processor() or 'unknown CPU'

def make_learner(dls, ls, mix, widen):
    model = xresnet18(n_out=10, c_in=1, widen=widen)
    cbs = [] if mix is None else [MixUp() if mix == 'mixup' else CutMix()]
    learn = Learner(dls, model, loss_func=LabelSmoothingCrossEntropyFlat() if ls else CrossEntropyLossFlat(),
                    metrics=error_rate, cbs=cbs)
    return learn.to_fp16() if torch.cuda.is_available() else learn

def data(a, tfms):
    "Fashion-MNIST DataLoaders; with `--subset N` only the first N training images"
    if not a.subset: return fashion_mnist_dls(a.path, bs=a.bs, batch_tfms=tfms)
    p = Path(a.path)
    xt,yt = load_idx_pair(p/'train-images-idx3-ubyte.gz', p/'train-labels-idx1-ubyte.gz')
    xv,yv = load_idx_pair(p/'t10k-images-idx3-ubyte.gz', p/'t10k-labels-idx1-ubyte.gz')
    return tensor_image_dls(xt[:a.subset], yt[:a.subset], xv, yv, FASHION_MNIST_CLASSES, bs=a.bs, batch_tfms=tfms)

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--path', default='/usr/share/datasets/fashion-mnist')
    ap.add_argument('--epochs', type=int, default=4)
    ap.add_argument('--lr', type=float, default=3e-3)
    ap.add_argument('--bs', type=int, default=256)
    ap.add_argument('--widen', type=float, default=0.5, help="width of fastai's xresnet18 (0.5: half the channels)")
    ap.add_argument('--seed', type=int, default=42)
    ap.add_argument('--configs', default=','.join(CONFIGS))
    ap.add_argument('--subset', type=int, default=0, help='train on the first N images only (a quick check)')
    ap.add_argument('--out', default=str(HERE/'results'))
    a = ap.parse_args(argv)
    if not Path(a.path).exists():
        sys.exit(f"quality.py: no Fashion-MNIST at {a.path}; install Debian's dataset-fashion-mnist (make quality does)")
    torch.set_flush_denormal(True)
    dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    tfms = aug_transforms(size=28, do_flip=True, max_rotate=0., max_zoom=1.1, max_lighting=0., max_warp=0.)
    rows, losses, start = [], {}, time.time()
    for name in a.configs.split(','):
        ls, mix = CONFIGS[name]
        print(f'== {name}', flush=True)
        set_seed(a.seed, reproducible=True)
        dls = data(a, tfms)
        learn = make_learner(dls, ls, mix, a.widen)
        t = time.time()
        learn.fit_one_cycle(a.epochs, a.lr)
        spe = (time.time() - t) / a.epochs
        losses[name] = [float(l) for l in learn.recorder.losses]  # first: validate() restarts the Recorder
        rows.append(dict(config=name, **evaluate(learn, calibrate=True, seed=a.seed), seconds_per_epoch=spe))
        print(rows[-1], flush=True)
    machine = dict(device=torch.cuda.get_device_name() if dev == 'cuda' else cpu_name(), cores=os.cpu_count(),
                   torch=torch.__version__, date=datetime.now(timezone.utc).strftime('%Y-%m-%d'),
                   minutes=round((time.time() - start) / 60, 1))
    settings = dict(model=f'xresnet18(widen={a.widen}, c_in=1)', epochs=a.epochs, lr=a.lr, bs=a.bs, seed=a.seed,
                    schedule='fit_one_cycle', augment='flip + zoom 1.1', fp16=dev == 'cuda', subset=a.subset or None)
    cols = [('error_rate', 'error'), ('tta_error_rate', 'TTA error'), ('nll', 'NLL'), ('ece', 'ECE'),
            ('temperature', 'T'), ('nll_calibrated', 'NLL cal.'), ('ece_calibrated', 'ECE cal.'), ('seconds_per_epoch', 's/epoch')]
    md = ['| config | ' + ' | '.join(c for _, c in cols) + ' |', '|---|' + '---|' * len(cols)]
    for r in rows:
        md.append(f"| {r['config']} | " + ' | '.join(f"{r[k]:.1f}" if k == 'seconds_per_epoch' else
                                                    f"{100*r[k]:.2f}%" if k in ('error_rate', 'tta_error_rate', 'ece', 'ece_calibrated') else
                                                    f"{r[k]:.3f}" for k, _ in cols) + ' |')
    best_err = min(rows, key=lambda r: r['error_rate'])['config']
    best_ece = min(rows, key=lambda r: r['ece'])['config']
    header = (f"Fashion-MNIST (60,000 train / 10,000 test), {settings['model']}, {a.epochs} epochs of fit_one_cycle at lr {a.lr}, "
              f"bs {a.bs}, seed {a.seed}; {machine['device']}, {machine['cores']} cores, torch {machine['torch']}, "
              f"{machine['date']}, {machine['minutes']} min in all. Lowest error: {best_err}; lowest ECE before calibration: {best_ece}.")
    text = header + '\n\n' + '\n'.join(md) + '\n'
    print(text)
    if not a.subset:
        out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
        tag = 'gpu' if dev == 'cuda' else 'cpu'
        (out/f'quality-{tag}.md').write_text(text)
        (out/f'quality-{tag}.json').write_text(json.dumps(dict(machine=machine, settings=settings, results=rows,
                                                               train_losses=losses), indent=1))

if __name__ == '__main__': main()
