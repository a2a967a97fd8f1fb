// The repetition penalty of Sampler.sample (src/sampler.ts), in place on each
// row of logits whose settings have one (choose_rows.wgsl is prepended): for
// each distinct id among the last repeatLastN ids before the row's pick (all
// of them for -1), its logit is divided by the penalty when positive and
// multiplied by it otherwise. One workgroup per row; its threads take window
// positions, and a bitmap of the ids seen makes the first thread to claim an
// id the one that applies its penalty, so each id is penalized once. The
// bitmap is the row's part of a storage buffer: one in workgroup memory large
// enough for a vocabulary takes llvmpipe minutes to compile.
@group(0) @binding(1) var<storage, read_write> logits: array<f32>;
@group(0) @binding(5) var<storage, read> history: array<f32>;
@group(0) @binding(7) var<storage, read_write> seen: array<atomic<u32>>; // [rows, ⌈vocab / 32⌉]

@compute @workgroup_size(256)
fn main(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  let row = wg.x;
  let penalty = penaltyOf(row);
  let window = windowOf(row);
  if (penalty == 1.0 || window == 0) {
    return; // the same for the whole workgroup
  }
  let position = positionOf(row);
  var size = position;
  if (window > 0) {
    size = min(u32(window), position);
  }
  size = min(size, p.historyLength);
  let words = (p.vocab + 31u) / 32u;
  let first = row * words;
  for (var w = li; w < words; w += 256u) {
    atomicStore(&seen[first + w], 0u);
  }
  storageBarrier();
  for (var i = li; i < size; i += 256u) {
    let id = u32(history[historyAt(row, position - size + i)]);
    if (id >= p.vocab) {
      continue;
    }
    let bit = 1u << (id % 32u);
    if ((atomicOr(&seen[first + id / 32u], bit) & bit) == 0u) {
      let at = row * p.vocab + id;
      let v = logits[at];
      logits[at] = select(v * penalty, v / penalty, v > 0.0);
    }
  }
}
