"""Runs side by side against one after another: the demo's comparison with `--workers 2 --threads-per-run 1` and with
`--workers 1 --threads-per-run 2` (not a test; `make bench-parallel`).

Each setup is a fresh `fastai-regularize compare` process with an --out of its own (`--fresh`), timed by the wall clock
from its start to its exit (Python's start, the local Dask cluster's start, the 15 runs, the tables). The two timed
setups alternate in every repetition, the first of them rotating, so drifts in the machine's load hit both alike; the
ratio is side-by-side / one-after-another per repetition, and its median (goal of issue 20: <= 0.7 on 2 cores).

Equality: `--workers 1 --threads-per-run 1` runs once beside them. Its rows must equal those of
`--workers 2 --threads-per-run 1` per (config, seed), to the last digit, logits included (same threads per run: the
worker count must not matter); every repetition of a setup must equal its first (a fresh process gives the same
numbers). Whether 1 and 2 threads per run give the same digits is reported, not required.

    python benchmarks/parallel.py                       # the demo's 15 runs, 3 repetitions (about 35 min on 2 idle cores)
    python benchmarks/parallel.py --quick               # 1 epoch at 16 px, 2 configurations x 2 seeds, 1 repetition; writes nothing
    python benchmarks/parallel.py --quick --write       # ... into results/parallel-cpu-quick.{json,md}

Writes results/parallel-cpu.json (every time and check, the machine, the load) and results/parallel-cpu.md (the table).
"""
import argparse, json, os, platform, shutil, statistics, subprocess, sys, tempfile, time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NUMBERS = ['error_rate', 'tta_error_rate', 'nll', 'ece', 'temperature', 'nll_calibrated', 'ece_calibrated',
           'nll_calibrated_in_sample', 'ece_calibrated_in_sample', 'valid_error_by_epoch', 'train_loss_by_epoch', 'valid_targets_sha1']
SETUPS = {'serial-2t': ['--workers', '1', '--threads-per-run', '2'],   # `make demo` today on 2 cores
          'side-2x1t': ['--workers', '2', '--threads-per-run', '1'],
          'serial-1t': ['--workers', '1', '--threads-per-run', '1']}   # the equality check's reference
QUICK = ['--epochs', '1', '--size', '16', '--seeds', '2', '--configs', 'baseline,mixup']


def _cpu()->str:
    try: return next(l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name'))
    except (OSError, StopIteration): return platform.processor() or platform.machine()


def run(name:str, budget:list, out:Path, log:Path)->float:
    "One `compare` in a fresh process; its wall time in seconds"
    env = {**os.environ, 'MPLBACKEND': 'Agg', 'PYTHONPATH': os.pathsep.join(p for p in (str(ROOT), os.environ.get('PYTHONPATH', '')) if p)}
    cmd = [sys.executable, '-m', 'fastai_regularize.cli', 'compare', *budget, *SETUPS[name], '--out', str(out), '--fresh']
    t = time.perf_counter()
    with open(log, 'w') as f: r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - t
    if r.returncode != 0: sys.exit(f"parallel.py: {' '.join(cmd[2:])} failed (exit {r.returncode}); see {log}")
    return wall


def rows(out:Path)->dict:
    "(config, seed) -> the numbers of runs.csv as written, and the saved logits"
    import csv, torch
    with open(out/'runs.csv') as f: rs = list(csv.DictReader(f))
    return {(r['config'], r['seed']): ({k: r[k] for k in NUMBERS},
                                       torch.load(out/'preds'/f"{r['config']}__s{r['seed']}.pt")['logits']) for r in rs}


def equal(a:dict, b:dict)->tuple:
    "(all equal?, the (config, seed)s that differ)"
    import torch
    diff = sorted(k for k in set(a) | set(b) if k not in a or k not in b or a[k][0] != b[k][0] or not torch.equal(a[k][1], b[k][1]))
    return not diff,[f"{c} s{s}" for c,s in diff]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--reps', type=int, default=3, help='repetitions of the two timed setups (default 3)')
    ap.add_argument('--quick', action='store_true', help='a tiny budget (1 epoch, 16 px, 2 configurations x 2 seeds), 1 repetition')
    ap.add_argument('--write', action='store_true', help='with --quick: write results/parallel-cpu-quick.*')
    ap.add_argument('--work', default=None, help='folder of the runs (default: a temporary one, deleted at the end)')
    a = ap.parse_args(argv)
    budget,reps = (QUICK, 1) if a.quick else ([], a.reps)
    if reps < 1: sys.exit("parallel.py: --reps must be >= 1")
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix='bench-parallel-'))
    work.mkdir(parents=True, exist_ok=True)
    load_before,start = os.getloadavg(),datetime.now(timezone.utc)
    times = {'serial-2t': [], 'side-2x1t': []}
    first = {}
    same_as_first = {k: [] for k in SETUPS}
    order = ['serial-2t', 'side-2x1t']
    plan = [('serial-1t', 0)] + [(n, r) for r in range(reps) for n in (order if r % 2 == 0 else order[::-1])]
    for name,r in plan:
        out = work/f"{name}-rep{r}"
        wall = run(name, budget, out, work/f"{name}-rep{r}.log")
        if name in times: times[name].append(wall)
        else: once = wall
        got = rows(out)
        if name not in first: first[name] = got
        else: same_as_first[name].append(equal(got, first[name])[0])
        print(f"rep {r}  {name:10} {' '.join(SETUPS[name])}: {wall:7.1f} s", flush=True)
    ratios = [s/t for s,t in zip(times['side-2x1t'], times['serial-2t'])]
    eq_side,diff_side = equal(first['side-2x1t'], first['serial-1t'])
    eq_threads,diff_threads = equal(first['serial-2t'], first['serial-1t'])
    import fastai, torch, fastai_regularize, distributed
    res = dict(date=start.isoformat(timespec='seconds'), machine=dict(cpu=_cpu(), cores=os.cpu_count(), python=platform.python_version()),
               versions=dict(fastai_regularize=fastai_regularize.__version__, fastai=fastai.__version__, torch=torch.__version__,
                             distributed=distributed.__version__),
               load_before=[round(v, 2) for v in load_before], load_after=[round(v, 2) for v in os.getloadavg()],
               budget=' '.join(budget) or "compare's defaults (the demo: digits, resnet18, 24 px, 4 epochs, 5 configurations x 3 seeds)",
               n_runs=len(first['serial-1t']), setups={k: ' '.join(v) for k,v in SETUPS.items()}, reps=reps,
               seconds=times, seconds_serial_1t=once, ratio_side_over_serial=ratios, median_ratio=statistics.median(ratios),
               side_equals_serial_same_threads=eq_side, differing_runs=diff_side,
               two_threads_equals_one_thread=eq_threads, differing_runs_two_vs_one_thread=diff_threads,
               repetitions_equal_their_first={k: all(v) for k,v in same_as_first.items() if v})
    md = [f"# Runs side by side (cpu)", '',
          f"{res['date']} · {res['machine']['cpu']} · {res['machine']['cores']} cores · torch {torch.__version__}, fastai {fastai.__version__}, "
          f"distributed {distributed.__version__} · load average before {res['load_before']}, after {res['load_after']}", '',
          f"`fastai-regularize compare` ({res['budget']}; {res['n_runs']} runs), each setup a fresh process with `--fresh`, wall clock from "
          "start to exit; the two timed setups alternate, the first rotating per repetition.", '',
          *(["**--quick: a tiny budget, a check of this script and of the equality below; its times are not a measurement of the "
             "speed-up** (a process's and a cluster's start weigh as much as the runs).", ''] if a.quick else []),
          '| rep | --workers 1 --threads-per-run 2 (s) | --workers 2 --threads-per-run 1 (s) | ratio |', '|---|---|---|---|']
    md += [f"| {i} | {t:.1f} | {s:.1f} | {s/t:.2f}x |" for i,(t,s) in enumerate(zip(times['serial-2t'], times['side-2x1t']))]
    md += ['', f"Median ratio (side by side / one after another): **{res['median_ratio']:.2f}x** (goal <= 0.7x). "
           f"`--workers 1 --threads-per-run 1`, run once for the check below: {once:.1f} s.", '']
    md += [f"- `--workers 2 --threads-per-run 1` equals `--workers 1 --threads-per-run 1` in every (config, seed), metrics, per-epoch "
           f"curves and logits: **{'yes' if eq_side else 'no: ' + ', '.join(diff_side)}**",
           f"- each repetition equals the first of its setup: {', '.join(f'{k} {v}' for k,v in res['repetitions_equal_their_first'].items()) or '(1 repetition)'}",
           f"- 2 threads per run gives the digits of 1 thread per run: {'yes' if eq_threads else 'no (' + str(len(diff_threads)) + ' of ' + str(res['n_runs']) + ' runs differ)'}",
           '', f"Regenerate: `python benchmarks/parallel.py{' --quick --write' if a.quick else f' --reps {reps}'}` (`make bench-parallel`)."]
    text = '\n'.join(md) + '\n'
    print(text)
    if not a.quick or a.write:
        stem = HERE/'results'/('parallel-cpu-quick' if a.quick else 'parallel-cpu')
        stem.with_suffix('.json').write_text(json.dumps(res, indent=1) + '\n')
        stem.with_suffix('.md').write_text(text)
        print(f"wrote {stem.with_suffix('.json')}, {stem.with_suffix('.md')}")
    if not a.work: shutil.rmtree(work, ignore_errors=True)
    if not eq_side: sys.exit("parallel.py: side by side and one after another with the same threads per run differ")


if __name__ == '__main__': main()
