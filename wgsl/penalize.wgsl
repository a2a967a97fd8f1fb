// The repetition penalty of Sampler.sample (src/sampler.ts) on the device, in
// place: for each distinct id among the last `window` ids of row r's history,
// its logit is divided by `penalty` when positive and multiplied by it
// otherwise. A row's history is the ids the host knew, then the ids chosen on
// the device so far:
// - history[r · (window + 1)] = how many host ids follow it (at most
//   window), oldest first, all as f32s;
// - ids[deviceFirst + j · deviceStride + r], j < deviceCount, as f32s (the
//   buffer that greedy and sampled decoding write their ids to).
// One workgroup per row. A thread takes window positions; the first position
// of each id applies the penalty, so each id is penalized once.
struct Params {
  window: u32,
  deviceFirst: u32,
  deviceStride: u32,
  deviceCount: u32,
  stride: u32, // floats from one row of logits to the next
  penalty: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> logits: array<f32>;
@group(0) @binding(2) var<storage, read> ids: array<f32>;
@group(0) @binding(3) var<storage, read> history: array<f32>;

// Row r's id at position i of its combined history (host ids, then device ids).
fn idAt(row: u32, hostCount: u32, i: u32) -> u32 {
  if (i < hostCount) {
    return u32(history[row * (p.window + 1u) + 1u + i]);
  }
  return u32(ids[p.deviceFirst + (i - hostCount) * p.deviceStride + row]);
}

@compute @workgroup_size(256)
fn main(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  let row = wg.x;
  let hostCount = u32(history[row * (p.window + 1u)]);
  let total = hostCount + p.deviceCount;
  let size = min(p.window, total);
  let start = total - size; // first position in the window
  for (var i = li; i < size; i += 256u) {
    let id = idAt(row, hostCount, start + i);
    var first = true;
    for (var j = 0u; j < i; j++) {
      if (idAt(row, hostCount, start + j) == id) {
        first = false;
        break;
      }
    }
    if (first) {
      let at = row * p.stride + id;
      let v = logits[at];
      logits[at] = select(v * p.penalty, v / p.penalty, v > 0.0);
    }
  }
}
