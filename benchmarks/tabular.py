"""Mixing a tabular model (not a test; `make tabular`): the digits as a table through `tabular_learner`.

`fastai_regularize.data.digits_tabular_dls` gives the 1,797 sklearn digits as 64 continuous pixel columns and two
categorical columns derived from each item (`ink_row`, `ink_col`: the row and the column with the most ink), split
as `digits_folder` splits the images (the same 359 validation items). `MixUp` cannot mix this input (categorical
codes are integers); `ManifoldMixUp` mixes the model's hidden representation instead (after the embeddings, or
after a hidden block). Configurations: the baseline, label smoothing, Manifold MixUp, and Manifold MixUp trained on
the dominant item's hard label. The experiment runner of `fastai_regularize.experiment` pairs the seeds and writes
runs.csv / summary.* / compare.png / preds/ as `compare` does (see benchmarks/README.md).
"""
import argparse, sys, time
from functools import partial
from pathlib import Path

import torch
from fastai.metrics import error_rate
from fastai.tabular.learner import tabular_learner

from fastai_regularize.data import digits_tabular_dls
from fastai_regularize.experiment import CONFIGS, Config, SettingsMismatch, Task, get_configs, run_experiment
from fastai_regularize.manifold import ManifoldMixUp

HERE = Path(__file__).resolve().parent
# `manifold-dominant` is this study's own: Manifold MixUp with the larger share's hard label (Wang et al. 2023)
EXTRA = {'manifold-dominant': Config('manifold-dominant', cbs=(partial(ManifoldMixUp, label='dominant'),))}
DEFAULT_CONFIGS = 'baseline,label_smoothing,manifold,manifold-dominant'


def digits_table_task(bs: int, layers: list, split_seed: int = 42) -> Task:
    "The digits as a table (the same validation items for every seed), fastai's `tabular_learner` from scratch"
    def make_dls(seed): return digits_tabular_dls(bs=bs, seed=split_seed)
    def make_learner(dls, loss_func, cbs):
        return tabular_learner(dls, layers=layers, loss_func=loss_func, metrics=error_rate, cbs=cbs)
    return Task(make_dls, make_learner, dict(data='digits-table', split_seed=split_seed, bs=bs,
                                             model=f'tabular_learner(layers={layers})'))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--epochs', type=int, default=20)
    ap.add_argument('--seeds', type=int, default=5, help='seeds --seed, --seed+1, ... per configuration')
    ap.add_argument('--seed', type=int, default=42, help='first seed')
    ap.add_argument('--lr', type=float, default=1e-2)
    ap.add_argument('--bs', type=int, default=64)
    ap.add_argument('--layers', default='200,100', help="hidden layer sizes of tabular_learner")
    ap.add_argument('--configs', default=DEFAULT_CONFIGS, help=f"comma-separated, among: {', '.join([*CONFIGS, *EXTRA])}")
    ap.add_argument('--out', default=None, help='default: benchmarks/results/digits-table-e{epochs}')
    ap.add_argument('--fresh', action='store_true', help='delete the runs already in --out and start over')
    a = ap.parse_args(argv)
    if a.seeds < 1 or a.epochs < 1: sys.exit("tabular.py: --seeds and --epochs must be >= 1")
    names = [n.strip() for n in a.configs.split(',') if n.strip()]
    try: configs = [EXTRA[n] if n in EXTRA else get_configs([n])[0] for n in names]
    except ValueError as e: sys.exit(f"tabular.py: {e}")
    out = Path(a.out) if a.out else HERE/'results'/f"digits-table-e{a.epochs}"
    torch.set_flush_denormal(True)
    task = digits_table_task(a.bs, [int(n) for n in a.layers.split(',')])
    start = time.perf_counter()
    try: run_experiment(task, configs, list(range(a.seed, a.seed + a.seeds)), a.epochs, a.lr, out, fresh=a.fresh,
                        tta=False, title='Digits as a table (64 pixel columns, 2 categorical columns), tabular_learner')
    except SettingsMismatch as e: sys.exit(f"tabular.py: {e}")
    except KeyboardInterrupt as e: sys.exit(f"tabular.py: {e or 'interrupted'}")
    print(f"{(time.perf_counter() - start)/60:.1f} min in this call")


if __name__ == '__main__': main()
