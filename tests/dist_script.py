"""Two-process CPU (gloo) training with MixUp + label smoothing through fastai's distributed route.

Launched by `tests/test_distributed.py` as
`python -m torch.distributed.run --nproc_per_node 2 --master_port PORT tests/dist_script.py OUTDIR`;
each rank writes `OUTDIR/rank{R}.json` with what it saw, and the test compares the two files.

It trains inside `fastai_regularize.distributed.cpu_distrib`, which replaces fastai's CUDA-only index broadcast
for the block; the file records whether fastai's own functions are back after it.
"""
import json, os, sys
from pathlib import Path

import torch, torch.nn as nn

torch.set_flush_denormal(True)
torch.set_num_threads(1)

from fastai.torch_core import TensorCategory, rank_distrib, num_distrib, set_seed
from fastai.data.core import DataLoaders
from fastai.callback.core import Callback
from fastai.learner import Learner
from fastai.distributed import DistributedDL, DistributedTrainer

from fastai_regularize.losses import LabelSmoothingCrossEntropyFlat
from fastai_regularize.mixup import MixUp
from fastai_regularize.distributed import cpu_distrib

N_TRAIN, N_VALID, N_CLASSES, BS = 48, 20, 3, 6

def make_items(n, seed):
    "Items (x, y): x is (2, 4, 4); channel 1 holds the item's index in every pixel, so a mixed x tells its partner"
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, 2, 4, 4, generator=g)
    xs[:, 1] = torch.arange(n, dtype=torch.float32)[:, None, None]
    ys = torch.randint(0, N_CLASSES, (n,), generator=g)
    return [(xs[i], TensorCategory(ys[i])) for i in range(n)]

class Watch(Callback):
    "Record the item indices of each training batch before MixUp (order -6) and after it (order -4)"
    def __init__(self, when): self.when,self.batches = when,[]
    order = 0
    run_valid = False
    epoch_seen = None
    def before_train(self):  # not before_fit/before_epoch: get_preds fires those too
        if self.epoch_seen is None: self.epoch_seen = []
        self.epoch_seen.append([])
    def before_batch(self):
        if self.when == 'before':
            idx = self.xb[0][:, 1, 0, 0].tolist()
            self.epoch_seen[-1] += [int(round(i)) for i in idx]
            self.batches.append(idx)
        else:
            mix = self.learn.cbs.filter(lambda c: isinstance(c, MixUp))[0]
            lam = None if mix._pending is None else mix._pending[1].tolist()
            self.batches.append((self.xb[0][:, 1, 0, 0].tolist(), lam))

def main(outdir):
    set_seed(0)  # same data on every rank; the shards come from DistributedDL
    dls = DataLoaders.from_dsets(make_items(N_TRAIN, 1), make_items(N_VALID, 2), bs=BS, device='cpu')
    model = nn.Sequential(nn.Flatten(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, N_CLASSES))
    pre,post = Watch('before'),Watch('after')
    pre.order,post.order = -6,-4  # MixUp is -5
    lf = LabelSmoothingCrossEntropyFlat(eps=0.1)
    learn = Learner(dls, model, loss_func=lf, cbs=[MixUp(1.), pre, post])
    torch.manual_seed(100 + int(os.environ.get('RANK', 0)))  # each rank draws its own λ and partners
    res = {}
    fastai_fns = DistributedDL._broadcast,DistributedTrainer._wrap_dl
    with cpu_distrib(learn):
        rank,world = rank_distrib(),num_distrib()
        learn.fit(2, lr=1e-2)
        train_losses = [float(v[0]) for v in learn.recorder.values]  # before get_preds resets the recorder
        preds,targs = learn.get_preds()
        cal = None
        try:
            import fastai_regularize.calibration  # noqa: F401  (patches Learner.calibrate)
            cal = learn.calibrate().base
        except ImportError: pass
    # partners: for every mixed item, the index it was mixed with, recovered from the index channel
    partners,bad = [],0
    for (before,(after,lam)) in zip(pre.batches, post.batches):
        if lam is None: continue
        for i,(a,l) in enumerate(zip(after, lam)):
            if l > 0.999: continue
            j = (a - l * before[i]) / (1 - l)
            if abs(j - round(j)) > 1e-2 or round(j) not in [round(b) for b in before]: bad += 1
            partners.append(round(j))
    res.update(rank=rank, world_size=world, epoch_seen=pre.epoch_seen, n_train=N_TRAIN,
               partners=partners, partners_not_in_own_batch=bad,
               final_loss=train_losses[-1], train_losses=train_losses,
               n_gathered_preds=int(preds.shape[0]), n_gathered_targs=int(targs.shape[0]), n_valid=N_VALID,
               loss_func_same=learn.loss_func is lf, reduction=lf.reduction, calibrated_base=cal,
               fastai_fns_restored=(DistributedDL._broadcast,DistributedTrainer._wrap_dl) == fastai_fns,
               model_unwrapped=type(learn.model) is nn.Sequential)
    Path(outdir, f'rank{rank}.json').write_text(json.dumps(res))

if __name__ == '__main__': main(sys.argv[1])
