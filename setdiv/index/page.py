"""The query page `setdiv serve` answers on `/`: a search box, thumbnails for image hits, the
matched captions for text hits. Everything a hit shows is set as text, never as HTML."""

__all__ = ["PAGE"]

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>setdiv search</title>
<style>body{font:15px sans-serif;max-width:60em;margin:2em auto}
ol{list-style:none;padding:0;display:flex;flex-wrap:wrap;gap:12px}
li.hit{width:170px;font-size:12px} li.hit img{width:160px;height:160px;object-fit:contain;
background:#eee;display:block} .s{color:#888;font-family:monospace}
li.text{width:100%}</style></head><body>
<h1>setdiv search</h1><form id="f"><input id="q" size="50" placeholder="a red circle" autofocus>
<button>search</button></form><p id="info"></p><ol id="hits"></ol><script>
fetch('/health').then(r => r.json()).then(h => {
  document.getElementById('info').textContent = h.items + ' ' + h.modality + ' items, ' + h.ann; });
const form = document.getElementById('f');
form.onsubmit = async e => {
  if (e) e.preventDefault();
  const r = await fetch('/search', {method: 'POST', headers: {'Content-Type': 'application/json'},
    body: JSON.stringify({text: document.getElementById('q').value, k: 10})});
  const out = document.getElementById('hits'); out.replaceChildren();
  const data = await r.json();
  if (!r.ok) { out.textContent = data.error; return; }
  const res = data.results[0];
  document.getElementById('info').textContent += ' - ' + res.scored + ' scored exactly';
  for (const h of res.hits) {
    const li = document.createElement('li'); const s = document.createElement('div');
    s.className = 's'; s.textContent = '#' + h.rank + ' ' + h.score.toFixed(5) + ' ' + h.id;
    if (h.picture) {
      li.className = 'hit'; const img = document.createElement('img');
      img.onload = () => { img.dataset.loaded = String(img.naturalWidth); };
      img.src = h.picture; img.alt = String(h.id); img.title = (h.captions || []).join('\\n');
      li.append(img, s);
    } else {
      li.className = 'text'; li.append(s, (h.captions || [h.text]).join(' | '));
    }
    out.append(li); }
};
const q = new URLSearchParams(location.search).get('q');  // /?q=...: search on load
if (q) { document.getElementById('q').value = q; form.onsubmit(); }
</script></body></html>"""
