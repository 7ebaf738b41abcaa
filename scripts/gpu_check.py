"""`make gpu-check`: the one command a machine with CUDA runs, ending in a summary a note can quote.

1. the tests marked `gpu` (skipped without CUDA): the losses' CUDA path against `F.cross_entropy` (tests/test_gpu.py),
   the differential properties on CUDA (tests/test_differential.py), the mixing callbacks under fastai's real
   `to_fp16()`, the GradScaler skipping an inf step (tests/test_compat.py), and the other CUDA-only tests;
2. the rest of the compatibility grid (tests/test_compat.py), whose learners live on CUDA when it is there;
3. `benchmarks/speed.py --device cuda` (writes benchmarks/results/speed-cuda.{md,json}; `--quick`: a few repetitions,
   nothing written there).

Without CUDA it prints one line and exits 0. `--dry-run` runs the same steps on a machine without CUDA (the gpu tests
skip, the grid runs on the CPU, the speed run is the CPU's, quick), to try this script itself. Exit status 1 when a
test fails or a step does not finish.
"""
from __future__ import annotations
import argparse, json, os, subprocess, sys, tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def _pytest(args:list, xml:Path)->dict:
    "Run pytest with `args`; its counts from the JUnit XML report (all zero, and ok False, if it did not write one)"
    r = subprocess.run([sys.executable, '-m', 'pytest', *args, '-q', '-p', 'no:cacheprovider', f'--junitxml={xml}'],
                       cwd=ROOT, env={**os.environ, 'MPLBACKEND': 'Agg'})
    if not xml.exists(): return dict(passed=0, failed=0, skipped=0, ok=False)
    root = ET.parse(xml).getroot()
    suites = [root] if root.tag == 'testsuite' else root.findall('testsuite')
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ('tests', 'failures', 'errors', 'skipped')}
    failed = n['failures'] + n['errors']
    # exit 5: every test deselected (no gpu test in a run that asked only for them), not a failure
    return dict(passed=n['tests'] - failed - n['skipped'], failed=failed, skipped=n['skipped'], ok=r.returncode in (0, 5))

def _speed_lines(res:dict)->list:
    "The ratios of a speed.py run (median ours / median theirs; below 1: ours is faster), one line per section"
    L = []
    for r in res.get('losses', []):
        q = r['ratio']
        L.append(f"LS-CE fwd+bwd {r['N']}×{r['C']}: {q['plain CE']:.2f}x plain CE, {q['torch LS']:.2f}x torch label_smoothing, "
                 f"{q['fastai LS']:.2f}x fastai LS, {q['timm LS']:.2f}x timm LS")
    if 'mixup_step' in res: L.append(f"MixUp+LS training step (C={res['mixup_step']['C']}): {res['mixup_step']['ratio']:.2f}x fastai's")
    if 'before_batch' in res:
        b = res['before_batch']['ratio']
        L.append(f"MixUp before_batch: {b['bare lerp']:.2f}x a bare lerp, {b['fastai MixUp']:.2f}x fastai's")
    goals = res.get('goals', [])
    if goals: L.append(f"speed goals met: {sum(g['met'] for g in goals)} of {len(goals)}"
                       + ''.join(f"; not met: {g['goal']} ({g['value']})" for g in goals if not g['met']))
    return L

def main(argv=None)->int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--quick', action='store_true', help='speed.py --quick: a few repetitions, its results files left alone')
    ap.add_argument('--dry-run', action='store_true', help='the same steps on a machine without CUDA, to try this script')
    args = ap.parse_args(argv)
    import torch
    if not torch.cuda.is_available() and not args.dry_run:
        built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
        print(f"gpu-check: skipped, no CUDA device here (torch {torch.__version__}, {built})")
        return 0
    dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    name = torch.cuda.get_device_name(0) if dev == 'cuda' else 'no GPU (dry run on the CPU)'
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gpu = _pytest(['tests/', '-m', 'gpu'], tmp/'gpu.xml')
        grid = _pytest(['tests/test_compat.py', '-m', 'not gpu'], tmp/'grid.xml')
        speed_args = ['--device', dev, '--json', str(tmp/'speed.json')] + (['--quick'] if args.quick or args.dry_run else [])
        sp = subprocess.run([sys.executable, 'benchmarks/speed.py', *speed_args], cwd=ROOT)
        res = json.loads((tmp/'speed.json').read_text()) if (tmp/'speed.json').exists() else {}
    import fastai
    print(f"\n== gpu-check: {name} · torch {torch.__version__} (CUDA {torch.version.cuda}) · fastai {fastai.__version__}")
    for what,r in (('tests marked gpu', gpu), ('compatibility grid (tests/test_compat.py) on ' + dev, grid)):
        print(f"{what}: {r['passed']} passed, {r['failed']} failed, {r['skipped']} skipped" + ('' if r['ok'] else ' (pytest did not finish)'))
    if sp.returncode or not res: print(f"benchmarks/speed.py --device {dev}: failed (exit {sp.returncode})")
    else:
        print(f"benchmarks/speed.py --device {dev}{' --quick' if '--quick' in speed_args else ''}, "
              f"{res['args']['reps']} interleaved repetitions, ratios of medians (below 1: ours faster):")
        for line in _speed_lines(res): print('  ' + line)
    return 0 if gpu['ok'] and grid['ok'] and not gpu['failed'] and not grid['failed'] and not sp.returncode and res else 1

if __name__ == '__main__': sys.exit(main())
