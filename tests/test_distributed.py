"""Two CPU processes (gloo) through fastai's distributed route, training with MixUp + label smoothing.

`tests/dist_script.py` holds the run, inside `fastai_regularize.distributed.cpu_distrib` as the README's CPU route
says; this file launches it with `torch.distributed.run` and checks what each rank wrote."""
import json, os, socket, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

def _free_port()->int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]

@pytest.fixture(scope='module')
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp('dist')
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]),
           'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': ''}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(_free_port()),
           str(ROOT/'tests'/'dist_script.py'), str(out)]
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return [json.loads((out/f'rank{i}.json').read_text()) for i in range(2)]

@pytest.mark.slow
def test_two_ranks_ran(ranks):
    assert [r['rank'] for r in ranks] == [0, 1] and all(r['world_size'] == 2 for r in ranks)

@pytest.mark.slow
def test_each_rank_trains_on_half_and_the_halves_cover_the_training_set(ranks):
    n = ranks[0]['n_train']
    for e in range(2):
        a,b = (set(r['epoch_seen'][e]) for r in ranks)
        assert len(ranks[0]['epoch_seen'][e]) == len(ranks[1]['epoch_seen'][e]) == n // 2  # 48 items: no padding
        assert not a & b and a | b == set(range(n))

@pytest.mark.slow
def test_each_rank_mixes_within_its_own_shard(ranks):
    for r in ranks:
        assert len(r['partners']) > 0                      # mixing happened (alpha=1: λ<0.999 almost surely)
        assert r['partners_not_in_own_batch'] == 0         # every partner recovered from the mixed input is a local item
        assert set(r['partners']) <= {i for ep in r['epoch_seen'] for i in ep}

@pytest.mark.slow
def test_loss_finite_and_loss_func_kept(ranks):
    import math
    for r in ranks:
        assert all(math.isfinite(v) for v in r['train_losses'])
        assert r['loss_func_same'] and r['reduction'] == 'mean'

@pytest.mark.slow
def test_predictions_gathered_from_both_ranks(ranks):
    for r in ranks: assert r['n_gathered_preds'] == r['n_gathered_targs'] == r['n_valid']

@pytest.mark.slow
def test_calibrated_base_equal_across_ranks(ranks):
    pytest.importorskip('fastai_regularize.calibration')
    b0,b1 = (r['calibrated_base'] for r in ranks)
    assert b0 is not None and b0 == b1

@pytest.mark.slow
def test_fastai_functions_restored_after_the_block(ranks):
    for r in ranks: assert r['fastai_fns_restored'] and r['model_unwrapped']
