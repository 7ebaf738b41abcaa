"""Open every page of the docs site in headless Chromium and fail on a console error, an uncaught exception, a resource
that does not load, an image that does not render, or an internal link to a missing page or anchor; save screenshots.

Usage: python scripts/check_docs.py [SITE [SHOTS]]   (default _docs/ and out/docs-check/)

Speaks the Chrome DevTools protocol to the system's Chromium over a websocket (the `websockets` package), so nothing
downloads a browser. Exit status: 0 clean, 1 problems found (listed), 2 no Chromium."""
import base64, contextlib, json, shutil, subprocess, sys, tempfile, time
from pathlib import Path
from urllib.parse import urlparse, unquote

from websockets.sync.client import connect

ROOT = Path(__file__).resolve().parent.parent
SHOTS = {'home.png': 'index.html', 'api.png': 'api.html', 'notebook.png': '05b_distributed.html',
         'output.png': '04_calibration.html'}
# shots taken with an element scrolled into view: a figure a notebook drew when `make docs` ran it
SCROLL_TO = {'output.png': 'img.out'}
PAGE_JS = """JSON.stringify({
  ids: [...document.querySelectorAll('[id]')].map(e => e.id),
  links: [...document.querySelectorAll('a[href]')].map(a => a.href),
  bad_images: [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src')),
  title: document.title, text: document.body ? document.body.innerText.length : 0})"""

def chromium()->str|None:
    for name in ('chromium', 'chromium-browser', 'google-chrome'):
        if p := shutil.which(name): return p
    return None

class Browser:
    "A headless Chromium and one tab, driven over the DevTools protocol"
    def __init__(self, exe:str):
        self.profile = tempfile.mkdtemp(prefix='docs-check-')
        self.proc = subprocess.Popen([exe, '--headless=new', '--no-sandbox', '--disable-gpu', '--no-first-run',
            '--no-default-browser-check', '--disable-extensions', '--allow-file-access-from-files',
            '--remote-debugging-port=0', f'--user-data-dir={self.profile}', 'about:blank'],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.stack,self.n,self.events = contextlib.ExitStack(),0,[]
        try: self._attach(exe)
        except BaseException:
            self.close()
            raise

    def _attach(self, exe:str):
        port_file,t0 = Path(self.profile, 'DevToolsActivePort'),time.time()
        while not (port_file.exists() and len(port_file.read_text().split()) == 2):
            if self.proc.poll() is not None or time.time() - t0 > 60: raise RuntimeError(f'{exe} did not start')
            time.sleep(0.1)
        port,path = port_file.read_text().split()
        self.ws = self.stack.enter_context(connect(f'ws://127.0.0.1:{port}{path}', max_size=None, open_timeout=30))
        target = self.call('Target.createTarget', url='about:blank')['targetId']
        self.session = self.call('Target.attachToTarget', targetId=target, flatten=True)['sessionId']
        for domain in ('Page', 'Runtime', 'Log', 'Network'): self.call(f'{domain}.enable', session=True)
        self.call('Emulation.setDeviceMetricsOverride', session=True, width=1280, height=900, deviceScaleFactor=1, mobile=False)

    def call(self, method:str, session:bool=False, timeout:float=60, **params)->dict:
        self.n += 1
        msg = dict(id=self.n, method=method, params=params)
        if session: msg['sessionId'] = self.session
        self.ws.send(json.dumps(msg))
        deadline = time.time() + timeout
        while True:
            m = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.time())))
            if m.get('id') == self.n:
                if 'error' in m: raise RuntimeError(f"{method}: {m['error']}")
                return m.get('result', {})
            self.events.append(m)

    def wait_for(self, method:str, timeout:float=60):
        deadline = time.time() + timeout
        while True:
            for i,e in enumerate(self.events):
                if e.get('method') == method: return self.events.pop(i)
            self.events.append(json.loads(self.ws.recv(timeout=max(0.1, deadline - time.time()))))

    def drain(self, seconds:float):
        "Collect the events that arrive in the next `seconds` (late console messages)"
        deadline = time.time() + seconds
        while (left := deadline - time.time()) > 0:
            try: self.events.append(json.loads(self.ws.recv(timeout=left)))
            except TimeoutError: break

    def open(self, url:str)->tuple:
        "Load `url`; return what the page holds and the problems its console and network reported"
        self.events = []
        self.call('Page.navigate', session=True, url=url)
        self.wait_for('Page.loadEventFired')
        self.drain(0.3)
        info = json.loads(self.call('Runtime.evaluate', session=True, expression=PAGE_JS, returnByValue=True)['result']['value'])
        problems,urls = [],{e['params']['requestId']: e['params']['request']['url'] for e in self.events
                             if e.get('method') == 'Network.requestWillBeSent'}
        for e in self.events:
            m,p = e.get('method'),e.get('params', {})
            if m == 'Runtime.consoleAPICalled' and p.get('type') in ('error', 'assert'):
                problems.append('console error: ' + ' '.join(str(a.get('value', a.get('description', ''))) for a in p.get('args', [])))
            elif m == 'Runtime.exceptionThrown':
                d = p.get('exceptionDetails', {})
                problems.append(f"uncaught exception: {d.get('exception', {}).get('description') or d.get('text')}")
            elif m == 'Log.entryAdded' and p.get('entry', {}).get('level') == 'error':
                problems.append(f"console error: {p['entry'].get('text')} {p['entry'].get('url', '')}".strip())
            elif m == 'Network.loadingFailed' and not p.get('canceled'):
                problems.append(f"failed to load ({p.get('errorText')}): {urls.get(p.get('requestId'), p.get('requestId'))}")
        return info,problems

    def screenshot(self, fn:Path, selector:str|None=None)->bool:
        "Save the viewport as PNG, first scrolled to `selector`'s first element if given; False if there is none"
        if selector:
            js = f"(e => e ? (e.scrollIntoView({{block: 'center'}}), true) : false)(document.querySelector({json.dumps(selector)}))"
            if not self.call('Runtime.evaluate', session=True, expression=js, returnByValue=True)['result']['value']: return False
            self.drain(0.2)
        data = self.call('Page.captureScreenshot', session=True, format='png')['data']
        fn.write_bytes(base64.b64decode(data))
        return True

    def close(self):
        try: self.stack.close()
        finally:
            self.proc.terminate()
            try: self.proc.wait(10)
            except subprocess.TimeoutExpired: self.proc.kill()
            shutil.rmtree(self.profile, ignore_errors=True)

def main(site:str='_docs', shots:str='out/docs-check')->int:
    site,shots = (ROOT/site).resolve(),(ROOT/shots).resolve()
    pages = sorted(site.rglob('*.html'))
    if not pages: print(f'check_docs: no pages in {site}; run `make docs`', file=sys.stderr); return 1
    exe = chromium()
    if exe is None: print('check_docs: no chromium on PATH (Debian: apt-get install chromium)', file=sys.stderr); return 2
    shots.mkdir(parents=True, exist_ok=True)
    b,problems,seen = Browser(exe),{},{}
    try:
        for p in pages:
            info,probs = b.open(p.as_uri())
            if info['text'] < 50: probs.append(f"page is (nearly) empty: {info['text']} characters")
            probs += [f'image does not load: {s}' for s in info['bad_images']]
            seen[p] = info
            if probs: problems[p] = probs
            for shot in [k for k,v in SHOTS.items() if site/v == p]:
                if not b.screenshot(shots/shot, SCROLL_TO.get(shot)):
                    problems.setdefault(p, []).append(f'no {SCROLL_TO[shot]} to show in {shot}: did `make docs` run the notebook?')
    finally: b.close()
    n_links = 0
    for p,info in seen.items():
        for href in info['links']:
            u = urlparse(href)
            if u.scheme != 'file': continue
            n_links += 1
            target = Path(unquote(u.path))
            if site not in target.parents and target != site: problems.setdefault(p, []).append(f'link leaves the site: {href}')
            elif not target.exists(): problems.setdefault(p, []).append(f'broken link: {href}')
            elif u.fragment and target in seen and unquote(u.fragment) not in seen[target]['ids']:
                problems.setdefault(p, []).append(f'broken anchor: {href}')
    for p,probs in problems.items():
        for pr in probs: print(f'{p.relative_to(site)}: {pr}', file=sys.stderr)
    missing = [k for k,v in SHOTS.items() if not (shots/k).exists()]
    if missing: print(f'check_docs: no screenshot {missing}: their pages are missing', file=sys.stderr)
    n = sum(map(len, problems.values()))
    print(f"check_docs: {len(seen)} pages, {n_links} internal links, {n} problems; screenshots in {shots}/")
    return 1 if n or missing else 0

if __name__ == '__main__': sys.exit(main(*sys.argv[1:]))
