"Write README.md from nbs/index.ipynb (stand-in for `nbdev-readme`, which needs Quarto)."
import json, re, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent
_DIRECTIVE = re.compile(r'^#\|\s*(\S+)(.*)$')

def cell_flags(src):
    "nbdev directives (`#| hide`, `#| eval: false`, ...) at the top of a cell"
    flags = {}
    for line in src.splitlines():
        m = _DIRECTIVE.match(line.strip())
        if not m: break
        flags[m.group(1).rstrip(':')] = m.group(2).strip()
    return flags

def strip_directives(src): return '\n'.join(l for l in src.splitlines() if not _DIRECTIVE.match(l.strip())).strip()

def output_text(out):
    if out.get('output_type') == 'stream': return ''.join(out.get('text', ''))
    data = out.get('data', {})
    if 'text/markdown' in data: return None
    return ''.join(data.get('text/plain', ''))

def render(nb):
    parts = ['<!-- Generated from nbs/index.ipynb by scripts/make_readme.py: edit the notebook, not this file. -->']
    for cell in nb['cells']:
        src = ''.join(cell['source'])
        flags = cell_flags(src)
        if 'hide' in flags: continue
        if cell['cell_type'] == 'markdown':
            parts.append(src.strip())
            continue
        if cell['cell_type'] != 'code': continue
        lang = 'sh' if 'lang' in flags and flags['lang'].endswith('sh') else 'python'
        code = strip_directives(src)
        if code: parts.append(f'```{lang}\n{code}\n```')
        for out in cell.get('outputs', []):
            data = out.get('data', {})
            if 'text/markdown' in data: parts.append(''.join(data['text/markdown']).strip())
            else:
                txt = output_text(out)
                if txt and txt.strip(): parts.append(f'```\n{txt.rstrip()}\n```')
    return '\n\n'.join(parts) + '\n'

def main():
    nb = json.loads((root/'nbs'/'index.ipynb').read_text())
    (root/'README.md').write_text(render(nb))

if __name__ == '__main__': sys.exit(main())
