// Word statistics over private text: with `r3e-tee-cli invoke --encrypt`, the text is sealed to
// the enclave's attested key, so the operator relays and stores only ciphertext.
//
//   r3e-tee-cli deploy-function examples/functions/word_stats.js --name word-stats --runtime javascript
//   r3e-tee-cli invoke word-stats --data '{"text": "the quick brown fox jumps over the lazy dog the end"}' --encrypt

function handler(event, ctx) {
  const words = String(event.text || "").toLowerCase().match(/[a-z0-9']+/g) || [];
  const counts = {};
  for (const w of words) counts[w] = (counts[w] || 0) + 1;
  const top = Object.entries(counts).sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1)).slice(0, 3);
  const summary = { words: words.length, distinct: Object.keys(counts).length, top: top };
  ctx.log("counted " + words.length + " words");
  return { summary: summary, signature: ctx.sign(JSON.stringify(summary)) };
}
