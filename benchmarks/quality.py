"""Quality benchmark: the regularizers side by side on Fashion-MNIST, several paired seeds (not a test; `make quality`).

Fashion-MNIST comes from Debian's `dataset-fashion-mnist` package (IDX files under /usr/share/datasets/fashion-mnist),
read as uint8 tensors (no PIL per item). `--subset N` trains on the first N of the 60,000 training images; every run
is evaluated on the full 10,000-image test set. The comparison is `fastai_regularize.experiment.run_experiment`: seed s
gives every configuration the same data order and initial weights, each finished run is appended to `OUT/runs.csv`
(its test-set logits to `OUT/preds/`), the same command resumes after an interruption, and `OUT/summary.md` holds the
tables: mean ± std over seeds and the paired difference to the baseline with its 95% t-interval. Calibrated NLL/ECE
are out of sample (2-fold cross-fitted temperature on the test set).

    python benchmarks/quality.py --subset 2000 --epochs 40 --bs 128       # -> benchmarks/results/fmnist-n2000-e40/ (make quality)
"""
import argparse, sys, time, warnings
from pathlib import Path

# fastai's import of torch.jit.script warns on torch >= 2.10 (as in the CLI)
warnings.filterwarnings('ignore', message=r'`torch\.jit\.script` is deprecated', category=FutureWarning)
import torch
from fastai.learner import Learner
from fastai.metrics import error_rate
from fastai.vision.augment import aug_transforms
from fastai.vision.models.xresnet import xresnet18

from fastai_regularize.data import FASHION_MNIST_CLASSES, DataError, load_idx_pair, tensor_image_dls
from fastai_regularize.experiment import CONFIGS, SettingsMismatch, Task, get_configs, run_experiment

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIGS = 'baseline,label_smoothing,mixup,mixup+ls,cutmix,mixup-off,mixup-dominant,manifold,regmixup'


def _idx(path: Path, stem: str) -> Path:
    for name in (stem + '.gz', stem):
        if (path/name).is_file(): return path/name
    raise DataError(f"{path} has no {stem}[.gz]; install Debian's dataset-fashion-mnist (make quality does)")


def fashion_task(path: str, subset: int, bs: int, widen: float) -> Task:
    "Fashion-MNIST (the first `subset` training images, all 10,000 test images), fastai's xresnet18 from scratch"
    p = Path(path)
    xt, yt = load_idx_pair(_idx(p, 'train-images-idx3-ubyte'), _idx(p, 'train-labels-idx1-ubyte'))
    xv, yv = load_idx_pair(_idx(p, 't10k-images-idx3-ubyte'), _idx(p, 't10k-labels-idx1-ubyte'))
    if subset: xt, yt = xt[:subset], yt[:subset]

    def make_dls(seed):
        tfms = aug_transforms(size=28, do_flip=True, max_rotate=0., max_zoom=1.1, max_lighting=0., max_warp=0.)
        return tensor_image_dls(xt, yt, xv, yv, FASHION_MNIST_CLASSES, bs=bs, batch_tfms=tfms)

    def make_learner(dls, loss_func, cbs):
        learn = Learner(dls, xresnet18(n_out=10, c_in=1, widen=widen), loss_func=loss_func, metrics=error_rate, cbs=cbs)
        return learn.to_fp16() if torch.cuda.is_available() else learn

    return Task(make_dls, make_learner, dict(data='fashion-mnist', subset=subset or len(xt), test_images=len(xv),
                                             model=f'xresnet18(widen={widen:g}, c_in=1)', bs=bs, augment='flip, zoom 1.1'))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--path', default='/usr/share/datasets/fashion-mnist')
    ap.add_argument('--subset', type=int, default=10000, help='train on the first N training images (0: all 60,000)')
    ap.add_argument('--epochs', type=int, default=20)
    ap.add_argument('--seeds', type=int, default=3, help='seeds --seed, --seed+1, ... per configuration')
    ap.add_argument('--seed', type=int, default=42, help='first seed')
    ap.add_argument('--lr', type=float, default=3e-3)
    ap.add_argument('--bs', type=int, default=256)
    ap.add_argument('--widen', type=float, default=0.5, help="width of fastai's xresnet18 (0.5: half the channels)")
    ap.add_argument('--configs', default=DEFAULT_CONFIGS, help=f"comma-separated, among: {', '.join(CONFIGS)}")
    ap.add_argument('--out', default=None, help='default: benchmarks/results/fmnist-n{subset}-e{epochs}')
    ap.add_argument('--fresh', action='store_true', help='delete the runs already in --out and start over')
    a = ap.parse_args(argv)
    if not Path(a.path).exists():
        sys.exit(f"quality.py: no Fashion-MNIST at {a.path}; install Debian's dataset-fashion-mnist (make quality does)")
    if a.seeds < 1 or a.epochs < 1 or a.subset < 0: sys.exit("quality.py: --seeds and --epochs must be >= 1, --subset >= 0")
    try: configs = get_configs(a.configs)
    except ValueError as e: sys.exit(f"quality.py: {e}")
    out = Path(a.out) if a.out else HERE/'results'/f"fmnist-n{a.subset or 60000}-e{a.epochs}"
    task = fashion_task(a.path, a.subset, a.bs, a.widen)
    start = time.perf_counter()
    try: run_experiment(task, configs, list(range(a.seed, a.seed + a.seeds)), a.epochs, a.lr, out, fresh=a.fresh)
    except SettingsMismatch as e: sys.exit(f"quality.py: {e}")
    except KeyboardInterrupt as e: sys.exit(f"quality.py: {e or 'interrupted'}")
    print(f"{(time.perf_counter() - start)/60:.1f} min in this call")


if __name__ == '__main__': main()
