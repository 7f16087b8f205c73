// The labeling app's keys (pairs, rankings, ratings, arena) and drag-to-rank; labeling_ui/app.py puts it in the page's <head>.
const rankBox = () => document.querySelector('#rank-order textarea, #rank-order input');
// Set the order textbox as typing would (Gradio listens for input events).
const setRankOrder = (v) => {
  const box = rankBox();
  Object.getOwnPropertyDescriptor(Object.getPrototypeOf(box), 'value').set.call(box, v);
  box.dispatchEvent(new Event('input', {bubbles: true}));
};
// Drag a numbered chip onto another to reorder; the whole strip then becomes the order (best first).
const chipAt = (e) => e.target.closest ? e.target.closest('.rank-chip') : null;
document.addEventListener('dragstart', (e) => { const c = chipAt(e); if (c) e.dataTransfer.setData('text/plain', c.dataset.n); });
document.addEventListener('dragover', (e) => { if (chipAt(e)) e.preventDefault(); });
document.addEventListener('drop', (e) => {
  const target = chipAt(e);
  if (!target) return;
  e.preventDefault();
  const strip = target.parentElement, moved = strip.querySelector(`.rank-chip[data-n="${e.dataTransfer.getData('text/plain')}"]`);
  if (!moved || moved === target) return;
  const box = target.getBoundingClientRect();
  strip.insertBefore(moved, e.clientX > box.left + box.width / 2 ? target.nextSibling : target);
  setRankOrder([...strip.querySelectorAll('.rank-chip')].map((c) => c.dataset.n).join(' '));
});
document.addEventListener('keydown', (e) => {
  const t = e.target;
  if (t && (t.tagName === 'TEXTAREA' || (t.tagName === 'INPUT' && t.type !== 'radio' && t.type !== 'checkbox'))) {
    if (e.key === 'Escape') t.blur();  // out of a text box (a rationale, an edit), so that the keys work again
    return;
  }
  const visible = (sel) => { const el = document.querySelector(sel); return el && el.offsetParent !== null; };
  const click = (id) => document.querySelector(`#${id}`)?.click();
  const k = e.key.toLowerCase();
  const onRank = visible('#rank-submit-btn'), onPairs = visible('#submit-btn'), onArena = visible('#arena-ask-btn');
  const onRate = visible('#rate-up-btn');
  if ((e.ctrlKey || e.metaKey) && k === 'z' && (onPairs || onRank || onRate)) {
    e.preventDefault(); click(onRank ? 'rank-undo-btn' : onRate ? 'rate-undo-btn' : 'undo-btn'); return;
  }
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  if (onPairs) {
    const choices = {'1': 'left', 'a': 'left', '2': 'right', 'b': 'right', '3': 'tie', 't': 'tie', '4': 'both_bad', 'x': 'both_bad'};
    const strengths = {'q': 'slight', 'w': 'clear', 'e': 'strong'};
    if (k in choices) { e.preventDefault(); document.querySelector(`#choice input[value="${choices[k]}"]`)?.click(); }
    else if (k in strengths) { e.preventDefault(); document.querySelector(`#strength input[value="${strengths[k]}"]`)?.click(); }
    else if (k === 'enter') { e.preventDefault(); click('submit-btn'); }
    else if (k === 's') { e.preventDefault(); click('skip-btn'); }
    else if (k === 'u') { e.preventDefault(); click('undo-btn'); }
  } else if (onRank) {
    const box = rankBox();
    const set = setRankOrder;
    if (/^[1-9]$/.test(k)) { e.preventDefault(); set((box.value.trim() + (box.value.trim().endsWith('=') || !box.value.trim() ? '' : ' ') + k).trim()); }
    else if (k === '=') { e.preventDefault(); set(box.value.trim() + ' ='); }
    else if (k === 'backspace') { e.preventDefault(); set(box.value.trim().replace(/\s*=?\s*\d*$/, '').trim()); }
    else if (k === 'x') { e.preventDefault(); click('rank-bad-btn'); }
    else if (k === 'enter') { e.preventDefault(); click('rank-submit-btn'); }
    else if (k === 's') { e.preventDefault(); click('rank-skip-btn'); }
    else if (k === 'u') { e.preventDefault(); click('rank-undo-btn'); }
  } else if (onRate) {
    // A thumb saves the rating (with the score and reason chosen so far); Q-T pick the score 1-5, 0 none.
    const thumbs = {'1': 'rate-up-btn', '2': 'rate-down-btn'}, scores = {'0': '', 'q': '1', 'w': '2', 'e': '3', 'r': '4', 't': '5'};
    if (k in thumbs) { e.preventDefault(); click(thumbs[k]); }
    else if (k in scores) { e.preventDefault(); document.querySelector(`#rate-likert input[value="${scores[k]}"]`)?.click(); }
    else if (k === 's') { e.preventDefault(); click('rate-skip-btn'); }
    else if (k === 'u') { e.preventDefault(); click('rate-undo-btn'); }
  } else if (onArena) {
    const votes = {'1': 'arena-a-btn', 'a': 'arena-a-btn', '2': 'arena-b-btn', 'b': 'arena-b-btn', '3': 'arena-tie-btn', 't': 'arena-tie-btn', '4': 'arena-bad-btn', 'x': 'arena-bad-btn'};
    if (k in votes && visible('#' + votes[k])) { e.preventDefault(); click(votes[k]); }
  }
});
