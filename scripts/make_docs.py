"""Render README.md and every notebook in nbs/, executed, with its outputs, into a static site in _docs/, with an API
index of every exported name (stand-in for `nbdev-docs`, which needs Quarto).

Each notebook is run as `nbdev-test` runs it (in nbs/, cells marked `#| eval: false` or `#| slow` left out, keeping
what they store), and the page shows what its cells print and draw; a cell that raises stops the build.
`--no-exec` renders the outputs stored in the notebooks instead (faster; most store none).

_docs/index.html is README.md, _docs/<notebook>.html each notebook, _docs/api.html the API index: each name in a
module's `__all__` with its signature, docstring and parameter comments, linked to the cell of its notebook that
defines it. Relative links to notebooks become links to their pages; other local files they reference (images) are
copied into _docs/ at their path in the repository."""
import ast, base64, html, importlib, inspect, json, re, shutil, sys, warnings
from pathlib import Path

from markdown_it import MarkdownIt
from mdit_py_plugins.dollarmath import dollarmath_plugin
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_by_name, PythonLexer
from pygments.util import ClassNotFound

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT/'scripts'))
from make_readme import cell_flags, strip_directives  # the README's reading of nbdev directives  # noqa: E402

OUT = ROOT/'_docs'
PKG = 'fastai_regularize'
_ANSI = re.compile(r'\x1b\[[0-9;]*[A-Za-z]')

def math_html(tex:str, opts:dict)->str:
    "TeX as MathML, which browsers render without scripts; the TeX itself where the converter fails"
    from latex2mathml.converter import convert
    block = opts.get('display_mode', False) if isinstance(opts, dict) else False
    try: return convert(tex, display='block' if block else 'inline')
    except Exception: return f'<code class="tex">{html.escape(tex)}</code>'

def code_html(code:str, lang:str='python')->str:
    try: lexer = get_lexer_by_name(lang or 'text')
    except ClassNotFound: lexer = get_lexer_by_name('text')
    return f'<pre class="code">{highlight(code, lexer, HtmlFormatter(nowrap=True))}</pre>'

def slug(text:str)->str: return re.sub(r'[^\w\- ]', '', text.strip().lower()).replace(' ', '-') or 'section'

class Page:
    "One HTML page: its ids (unique), and the local files its links and images need"
    def __init__(self, name:str, src_dir:Path): self.name,self.src_dir,self.ids,self.files = name,src_dir,set(),set()
    def new_id(self, base:str)->str:
        i,n = base,1
        while i in self.ids: i,n = f'{base}-{n}',n+1
        self.ids.add(i)
        return i
    def fix_url(self, url:str)->str:
        "Notebook links to their pages, local files to their copy in _docs/ (at their path in the repository)"
        if re.match(r'^[a-z][a-z0-9+.-]*:', url, re.I) or url.startswith(('#', '/')): return url
        path,_,frag = url.partition('#')
        target = (self.src_dir/path).resolve()
        if target.suffix == '.ipynb': return target.stem + '.html' + (f'#{frag}' if frag else '')
        if target == ROOT/'README.md': return 'index.html' + (f'#{frag}' if frag else '')
        if target.is_file() and ROOT in target.parents:
            rel = target.relative_to(ROOT).as_posix()
            self.files.add(rel)
            return rel + (f'#{frag}' if frag else '')
        return url  # left as written: docs-check reports it if it is broken

def markdown(src:str, page:Page)->str:
    md = MarkdownIt('commonmark', {'html': True, 'highlight': lambda code, lang, _: code_html(code, lang)}).enable('table')
    dollarmath_plugin(md, allow_space=False, allow_digits=False, renderer=math_html)
    tokens = md.parse(src)
    for i,t in enumerate(tokens):
        if t.type == 'heading_open': t.attrSet('id', page.new_id(slug(tokens[i+1].content.replace('`', ''))))
        for c in [t, *(t.children or [])]:
            for attr in ('href', 'src'):
                if c.attrGet(attr): c.attrSet(attr, page.fix_url(c.attrGet(attr)))
    return md.renderer.render(tokens, md.options, {})

def inline(src:str)->str: return MarkdownIt('commonmark').renderInline(src)

def defined_names(code:str)->list:
    "Names a cell defines at top level (functions, classes, assignments)"
    try: tree = ast.parse(code)
    except SyntaxError: return []
    names = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)): names.append(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                names += [n.id for n in ast.walk(t) if isinstance(n, ast.Name)]
    return names

def output_html(out:dict, page:Page, img_n:list)->str:
    kind = out.get('output_type')
    if kind == 'stream':
        txt = _ANSI.sub('', ''.join(out.get('text', '')))
        return f'<pre class="out {out.get("name", "stdout")}">{html.escape(txt)}</pre>'
    if kind == 'error':
        txt = _ANSI.sub('', '\n'.join(out.get('traceback', [])) or f"{out.get('ename')}: {out.get('evalue')}")
        return f'<pre class="out stderr">{html.escape(txt)}</pre>'
    data = out.get('data', {})
    for mime in ('image/png', 'image/jpeg'):
        if mime in data:
            img_n[0] += 1
            fn = f'img/{page.name}_{img_n[0]}.{mime.split("/")[1]}'
            (OUT/fn).parent.mkdir(parents=True, exist_ok=True)
            (OUT/fn).write_bytes(base64.b64decode(''.join(data[mime])))
            return f'<img class="out" src="{fn}" alt="output {img_n[0]}">'
    if 'text/markdown' in data: return markdown(''.join(data['text/markdown']), page)
    if 'text/html' in data: return f'<div class="out">{"".join(data["text/html"])}</div>'
    if 'text/plain' in data: return f'<pre class="out">{html.escape(_ANSI.sub("", "".join(data["text/plain"])))}</pre>'
    return ''

def notebook_html(nb:dict, page:Page, defs:dict)->tuple:
    "The page body and title of a notebook; records in `defs` the anchor of each name its exported cells define"
    parts,title,img_n = [],page.name,[0]
    for cell in nb['cells']:
        src = ''.join(cell['source'])
        if cell['cell_type'] == 'markdown':
            if title == page.name and (m := re.match(r'#\s+(.+)', src.strip())): title = m.group(1).strip()
            parts.append(markdown(src, page))
            continue
        if cell['cell_type'] != 'code': continue
        flags = cell_flags(src)
        if 'hide' in flags: continue
        code = strip_directives(src)
        if not code and not cell.get('outputs'): continue
        anchors = ''
        if 'export' in flags or 'exports' in flags:
            for n in defined_names(code):
                if n in defs or n.startswith('_'): continue
                if n not in page.ids: anchors += f'<span id="{page.new_id(n)}"></span>'
                defs[n] = f'{page.name}.html#{n}'
        lang = 'bash' if flags.get('lang', '').endswith('sh') else 'python'
        label = '<span class="tag">exported</span>' if 'export' in flags or 'exports' in flags else ''
        outs = ''.join(output_html(o, page, img_n) for o in cell.get('outputs', []))
        parts.append(f'<div class="cell">{anchors}{label}{code_html(code, lang) if code else ""}{outs}</div>')
    return '\n'.join(parts),title

def api_html(mods:list, defs:dict, page:Page)->str:
    "One section per module: each name in its `__all__` with signature, docstring and parameter comments"
    from fastcore.docments import docments
    parts = ['<h1 id="api">API index</h1>',
             '<p>Every name each module exports (its <code>__all__</code>), linked to the notebook cell that defines it.</p>']
    listed = set()
    for nb_name,mod_name in mods:
        mod = importlib.import_module(f'{PKG}.{mod_name}')
        parts.append(f'<h2 id="{page.new_id(mod_name)}"><a href="{nb_name}.html">{PKG}.{mod_name}</a></h2>')
        if mod.__doc__: parts.append(markdown(inspect.cleandoc(mod.__doc__), page))
        names = list(getattr(mod, '__all__', []))
        if names and set(names) <= listed:
            parts.append(f'<p>Re-exports the {len(names)} names above.</p>')
            continue
        listed |= set(names)
        for n in names:
            obj = getattr(mod, n)
            href = defs.get(n, f'{nb_name}.html')
            is_code = inspect.isclass(obj) or callable(obj)
            sig = _signature(obj) if is_code else ''
            head = f'{"class " if inspect.isclass(obj) else ""}{n}{sig}' if is_code else f'{n} = {_short(obj)}'
            parts.append(f'<div class="api" id="{page.new_id("api-" + n)}"><h3><a href="{href}"><code>{html.escape(head)}</code></a></h3>')
            doc = inspect.getdoc(obj) if is_code else None
            if doc: parts.append(markdown(doc, page))
            if is_code:
                try: params = docments(obj, full=True)
                except Exception: params = {}
                rows = [(k, v) for k,v in params.items() if k not in ('self', 'return') and (v.get('docment') or v.get('anno') is not inspect._empty)]
                if rows:
                    parts.append('<table class="params"><tr><th>parameter</th><th>type</th><th>default</th><th></th></tr>' + ''.join(
                        f'<tr><td><code>{html.escape(k)}</code></td><td>{html.escape(_anno(v.get("anno")))}</td>'
                        f'<td>{html.escape(_default(v.get("default")))}</td><td>{inline(v.get("docment") or "")}</td></tr>' for k,v in rows) + '</table>')
            parts.append('</div>')
    return '\n'.join(parts)

def _signature(obj)->str:
    "The signature with annotations as written (the modules use `from __future__ import annotations`)"
    for kw in (dict(eval_str=True), {}):
        try: return re.sub(r'<function (\w+) at 0x[0-9a-f]+>', r'\1', str(inspect.signature(obj, **kw))).replace("'", '')
        except Exception: pass
    if inspect.isclass(obj): return f"({', '.join(b.__name__ for b in obj.__bases__)})"
    return '(…)'

def _short(o, n:int=100)->str:
    r = re.sub(r' at 0x[0-9a-f]+>', '>', repr(o))  # no addresses: the same site from the same source
    return r if len(r) <= n else r[:n-1] + '…'
def _anno(a)->str: return '' if a is inspect._empty else getattr(a, '__name__', None) or str(a)
def _default(d)->str: return '' if d is inspect._empty else _short(d, 40)

TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} – fastai_regularize</title><link rel="stylesheet" href="style.css"></head>
<body><nav><a class="home" href="index.html">fastai_regularize</a>{nav}</nav>
<main>{body}</main></body></html>
"""

CSS = """body{margin:0;display:flex;font:16px/1.55 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1f2328}
nav{position:sticky;top:0;align-self:flex-start;height:100vh;overflow:auto;box-sizing:border-box;width:15rem;flex:none;
 padding:1.2rem 1rem;background:#f6f8fa;border-right:1px solid #d0d7de}
nav a{display:block;padding:.2rem .4rem;color:#1f2328;text-decoration:none;border-radius:4px}
nav a:hover,nav a.current{background:#dde4ea}
nav a.home{font-weight:700;margin-bottom:.8rem}
main{min-width:0;max-width:62rem;padding:1.2rem 2.5rem 4rem}
h1,h2,h3{line-height:1.25}h2{border-bottom:1px solid #d0d7de;padding-bottom:.2rem;margin-top:2rem}
a{color:#0969da}code{font:.88em ui-monospace,SFMono-Regular,Menlo,monospace;background:#eff1f3;padding:.1em .3em;border-radius:4px}
pre{overflow:auto;padding:.7rem .9rem;border-radius:6px;font:.84em/1.45 ui-monospace,SFMono-Regular,Menlo,monospace}
pre code{background:none;padding:0}pre.code{background:#f6f8fa;border:1px solid #d0d7de;margin:0}
pre.out{background:#fff;border:1px solid #d0d7de;border-top:none;margin:0;border-radius:0 0 6px 6px}
pre.out.stderr{background:#fff5f5}img{max-width:100%}.cell{margin:1rem 0;position:relative}
.tag{position:absolute;right:.5rem;top:.3rem;font-size:.72em;color:#57606a}
blockquote{margin:0;padding:0 1rem;color:#57606a;border-left:.25em solid #d0d7de}
table{border-collapse:collapse;margin:1rem 0;font-size:.92em;display:block;overflow:auto}
th,td{border:1px solid #d0d7de;padding:.3rem .6rem;text-align:left;vertical-align:top}th{background:#f6f8fa}
.api{margin:1.2rem 0 1.8rem}.api h3{font-size:1rem;margin-bottom:.3rem}.api h3 code{font-size:.95em}
table.params td:first-child{white-space:nowrap}
"""

def executed(path:Path)->dict:
    "The notebook at `path` after running it as `nbdev-test` does: its code cells with their outputs, as plain dicts"
    from fastcore.nbio import read_nb
    from execnb.shell import CaptureShell
    from fastcore.xtras import working_directory
    nb = read_nb(path)
    def skip(cell):
        if cell.cell_type != 'code': return True
        flags = cell_flags(cell.source)
        return flags.get('eval') == 'false' or 'slow' in flags
    shell = CaptureShell(path)
    with working_directory(path.parent): shell.run_all(nb, exc_stop=True, preproc=skip)
    for cell in nb.cells:  # read_nb joins the source into one string; the renderer takes both forms
        if cell.cell_type == 'code' and not skip(cell): cell.outputs = [o for o in map(_no_bars, cell.outputs) if o]
    return json.loads(json.dumps(nb, default=dict))

# fastprogress draws its bars as text lines when it is not in a live notebook: `|████----| 25.00% [1/4 00:00<00:00]`;
# in `fit` each frame starts with the epoch (`Epoch 2/4 : |███---| ...`), frames end with `\r`, and a line of spaces
# after the label wipes the bar
_BAR = re.compile(r'^\s*(Epoch \d+/\d+ :)?\s*(\|[█\-]*\|\s*[\d.]+% \[.*\]|█+)?\s*$')
def _is_bar(line:str)->bool: return bool(_BAR.match(line)) and (bool(line.strip()) or line.endswith('\r'))

def _lone_header(lines:list)->bool:
    "Is the text only the header of fastai's epoch table (`epoch train_loss ...`), no row under it? (`tta` prints that)"
    rows = [l.split() for l in lines if l.strip()]
    return len(rows) == 1 and rows[0][:2] == ['epoch', 'train_loss']

def _no_bars(out)->dict|None:
    "An output without progress-bar lines (None if nothing else is left)"
    out = dict(out)
    if out.get('output_type') != 'stream': return out
    text = ''.join(out.get('text', ''))
    kept = [l for l in text.splitlines(keepends=True) if not _is_bar(l)]
    if not ''.join(kept).strip() or _lone_header(kept): return None
    out['text'] = ''.join(kept)
    return out

def nbs()->list:
    "(notebook name, module or None) for every notebook but index.ipynb (README.md is the home page), in order"
    res = []
    for p in sorted((ROOT/'nbs').glob('*.ipynb')):
        if p.stem == 'index': continue
        src = '\n'.join(''.join(c['source']) for c in json.loads(p.read_text())['cells'][:3] if c['cell_type'] == 'code')
        m = re.search(r'^#\|\s*default_exp\s+(\S+)', src, re.M)
        res.append((p.stem, m.group(1) if m else None))
    return res

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if set(argv) - {'--no-exec'}: sys.exit(f"make_docs.py: unknown arguments {argv}; the only option is --no-exec")
    run = '--no-exec' not in argv
    warnings.filterwarnings('ignore', message=r'`torch\.jit\.script` is deprecated', category=FutureWarning)
    if OUT.exists(): shutil.rmtree(OUT)
    OUT.mkdir()
    (OUT/'style.css').write_text(CSS + HtmlFormatter(style='default').get_style_defs('pre.code'))
    pages,defs,files = [],{},set()
    home = Page('index', ROOT)
    pages.append(('index', 'Home', markdown((ROOT/'README.md').read_text(), home)))
    files |= home.files
    for name,_ in nbs():
        page = Page(name, ROOT/'nbs')
        path = ROOT/'nbs'/f'{name}.ipynb'
        if run: print(f"make_docs: running {path.name}", flush=True)
        body,title = notebook_html(executed(path) if run else json.loads(path.read_text()), page, defs)
        pages.append((name, title, body))
        files |= page.files
    api = Page('api', ROOT)
    pages.append(('api', 'API index', api_html([(n, m) for n,m in nbs() if m], defs, api)))
    for name,title,body in pages:
        nav = ''.join(f'<a href="{n}.html"{" class=current" if n == name else ""}>{html.escape(t)}</a>' for n,t,_ in pages[1:])
        (OUT/f'{name}.html').write_text(TEMPLATE.format(title=html.escape(title), nav=nav, body=body))
    for rel in files:
        (OUT/rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT/rel, OUT/rel)
    print(f"make_docs: {len(pages)} pages, {len(files)} files copied, {len(defs)} exported names -> {OUT.relative_to(ROOT)}/")

if __name__ == '__main__': sys.exit(main())
