"""The query page `setdiv serve` answers on `/`: a search box for an image gallery, an image
upload for a text gallery, thumbnails for image hits, the matched captions for text hits.
Everything a hit shows is set as text, never as HTML."""

__all__ = ["page_html"]

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>setdiv search</title>
<style>body{font:15px sans-serif;max-width:60em;margin:2em auto}
ol{list-style:none;padding:0;display:flex;flex-wrap:wrap;gap:12px}
li.hit{width:170px;font-size:12px} li.hit img{width:160px;height:160px;object-fit:contain;
background:#eee;display:block} .s{color:#888;font-family:monospace}
li.text{width:100%}</style></head><body>
<h1>setdiv search</h1><form id="f"><input id="q" size="50" placeholder="a red circle" autofocus>
<button>search</button></form>
<form id="u" hidden><label>an image query: <input type="file" id="img"
accept="image/jpeg,image/png,image/webp"></label> <span class="s">JPEG, PNG or WebP, at most
@MAX_BYTES@ bytes and @MAX_PIXELS@ pixels</span></form>
<p id="info"></p><ol id="hits"></ol><script>
const MAX_BYTES = @MAX_BYTES@, MAX_PIXELS = @MAX_PIXELS@;
const out = document.getElementById('hits');
fetch('/health').then(r => r.json()).then(h => {
  document.getElementById('info').textContent = h.items + ' ' + h.modality + ' items, ' + h.ann;
  if (h.modality === 'text') {  // a gallery of captions is searched with images
    document.getElementById('f').hidden = true; document.getElementById('u').hidden = false; }
});
async function search(body) {
  const r = await fetch('/search', {method: 'POST', headers: {'Content-Type': 'application/json'},
    body: JSON.stringify(body)});
  out.replaceChildren();
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
}
const form = document.getElementById('f');
form.onsubmit = e => {
  if (e) e.preventDefault();
  return search({text: document.getElementById('q').value, k: 10});
};
document.getElementById('u').onsubmit = e => e.preventDefault();
document.getElementById('img').onchange = async e => {
  const file = e.target.files[0];
  if (!file) return;
  if (file.size > MAX_BYTES) {
    out.textContent = file.name + ': over ' + MAX_BYTES + ' bytes'; return; }
  try {  // the pixel limit, checked here when the browser can decode the file
    const bitmap = await createImageBitmap(file);
    const n = bitmap.width * bitmap.height; bitmap.close();
    if (n > MAX_PIXELS) { out.textContent = file.name + ': ' + n + ' pixels, over ' + MAX_PIXELS;
      return; }
  } catch (err) {}  // not decodable here: the server says why
  const b64 = await new Promise((ok, fail) => {
    const reader = new FileReader();
    reader.onload = () => ok(reader.result.slice(reader.result.indexOf(',') + 1));
    reader.onerror = () => fail(reader.error); reader.readAsDataURL(file); });
  await search({image: b64, k: 10});
};
const q = new URLSearchParams(location.search).get('q');  // /?q=...: search on load
if (q) { document.getElementById('q').value = q; form.onsubmit(); }
</script></body></html>"""


def page_html(max_bytes: int, max_pixels: int) -> str:
    """The page, refusing in the browser an image file over `max_bytes` or `max_pixels`."""
    return PAGE.replace("@MAX_BYTES@", str(max_bytes)).replace("@MAX_PIXELS@", str(max_pixels))
