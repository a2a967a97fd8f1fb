// The greedy pick of each row whose temperature is 0 (choose_rows.wgsl is
// prepended): ids[idsOffset + r] = the lowest i below the row's limit with
// the largest logits[r·vocab + i], as an f32 (ids below 2^24 are exact), or
// -1 when no logit is a number above -3.4e38; the id is also written into the
// row's history. Decoding on the device: the next step's embedding reads the
// ids from `ids`, so no token travels to the host between steps. One
// workgroup per row: each thread scans a strided slice keeping its first
// maximum, then a tree reduction.
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> ids: array<f32>;
@group(0) @binding(5) var<storage, read_write> history: array<f32>;

const NONE: u32 = 0xffffffffu;

var<workgroup> bestValue: array<f32, 256>;
var<workgroup> bestIndex: array<u32, 256>;

// This thread's best so far.
var<private> value: f32 = -3.4028235e38;
var<private> index: u32 = NONE;

fn consider(v: f32, i: u32) {
  // NaN compares false, so it is never chosen.
  if (v > value) {
    value = v;
    index = i;
  }
}

@compute @workgroup_size(256)
fn main(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  let row = wg.x;
  if (samples(row)) {
    return; // the same for the whole workgroup
  }
  let base = row * p.vocab;
  let limit = limitOf(row);
  // Eight loads in flight per iteration (the loop is not unrolled for us);
  // indices rise within a thread, so `>` keeps its first maximum.
  var i = li;
  for (; i + 7u * 256u < limit; i += 8u * 256u) {
    let v0 = logits[base + i];
    let v1 = logits[base + i + 256u];
    let v2 = logits[base + i + 512u];
    let v3 = logits[base + i + 768u];
    let v4 = logits[base + i + 1024u];
    let v5 = logits[base + i + 1280u];
    let v6 = logits[base + i + 1536u];
    let v7 = logits[base + i + 1792u];
    consider(v0, i);
    consider(v1, i + 256u);
    consider(v2, i + 512u);
    consider(v3, i + 768u);
    consider(v4, i + 1024u);
    consider(v5, i + 1280u);
    consider(v6, i + 1536u);
    consider(v7, i + 1792u);
  }
  for (; i < limit; i += 256u) {
    consider(logits[base + i], i);
  }
  bestValue[li] = value;
  bestIndex[li] = index;
  workgroupBarrier();
  for (var stride = 128u; stride > 0u; stride >>= 1u) {
    if (li < stride) {
      let v = bestValue[li + stride];
      let j = bestIndex[li + stride];
      if (v > bestValue[li] || (v == bestValue[li] && j < bestIndex[li])) {
        bestValue[li] = v;
        bestIndex[li] = j;
      }
    }
    workgroupBarrier();
  }
  if (li == 0u) {
    if (bestIndex[0] == NONE) {
      ids[p.idsOffset + row] = -1.0;
    } else {
      ids[p.idsOffset + row] = f32(bestIndex[0]);
      history[historyAt(row, positionOf(row))] = f32(bestIndex[0]);
    }
  }
}
