// ids[index] = the lowest i < limit with the largest logits[i], as an f32 (ids
// below 2^24 are exact), or -1 when no logit is a number above -3.4e38. Greedy
// decoding on the device: the next step's embedding reads the id from `ids`,
// so no token travels to the host between steps. One workgroup: each thread
// scans a strided slice keeping its first maximum, then a tree reduction.
struct Params {
  limit: u32,
  index: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> ids: array<f32>;

const NONE: u32 = 0xffffffffu;

var<workgroup> bestValue: array<f32, 256>;
var<workgroup> bestIndex: array<u32, 256>;

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) li: u32) {
  var value = -3.4028235e38;
  var index = NONE;
  for (var i = li; i < p.limit; i += 256u) {
    let v = logits[i];
    // NaN compares false, so it is never chosen.
    if (v > value) {
      value = v;
      index = i;
    }
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
      ids[p.index] = -1.0;
    } else {
      ids[p.index] = f32(bestIndex[0]);
    }
  }
}
