// A decode step's conv (one token per sequence) on in_proj's product while it
// is still KPARTS partial sums (a matmul split over K, matmul_parts.wgsl): a
// batch of decode steps too large for gemv4's folds. Each thread adds up its
// channel's x and z as matmul_sum.wgsl would (same order, bias after), stores
// z, and runs conv.wgsl's `sequential` step on x, which is scratch and stays
// unwritten.
struct Params {
  rows: u32, // sequences, one token each
  channels: u32, // in_proj's x, and its z after it, are this wide
  kernel: u32,
  hasConvBias: u32,
  hasSlots: u32, // the conv states are rows of a pool, named by slots
  hasInBias: u32, // in_proj's bias over its 2 · channels columns
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> partial: array<f32>; // [KPARTS, rows, 2 · channels]
@group(0) @binding(2) var<storage, read> weight: array<f32>; // [channels, kernel]
@group(0) @binding(3) var<storage, read> bias: array<f32>; // [channels]
@group(0) @binding(4) var<storage, read_write> out: array<f32>; // [rows, channels]
// [rows or slots, kernel - 1, channels]: the last inputs, oldest first
@group(0) @binding(5) var<storage, read_write> state: array<f32>;
@group(0) @binding(6) var<storage, read> slots: array<f32>;
@group(0) @binding(7) var<storage, read_write> z: array<f32>; // [rows, channels]
@group(0) @binding(8) var<storage, read> inBias: array<f32>; // [2 · channels]

const KPARTS: u32 = 2u;

fn silu(v: f32) -> f32 {
  return v / (1.0 + exp(-v));
}

// Element i of in_proj's product [rows, 2 · channels]: its partial sums in
// order, then the bias.
fn product(i: u32) -> f32 {
  let size = p.rows * 2u * p.channels;
  var sum = 0.0;
  for (var part = 0u; part < KPARTS; part++) {
    sum += partial[part * size + i];
  }
  if (p.hasInBias != 0u) {
    sum += inBias[i % (2u * p.channels)];
  }
  return sum;
}

// Workgroup (x, y): channels [256·x, 256·x + 256) of sequence y.
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_index) li: u32) {
  let b = wg.y;
  let c = wg.x * 256u + li;
  if (c >= p.channels) {
    return;
  }
  let row = b * 2u * p.channels;
  z[b * p.channels + c] = product(row + p.channels + c);
  let v = product(row + c);
  let kept = p.kernel - 1u;
  var s = b;
  if (p.hasSlots != 0u) {
    s = u32(slots[b]);
  }
  let base = s * kept * p.channels + c;
  var bias0 = 0.0;
  if (p.hasConvBias != 0u) {
    bias0 = bias[c];
  }
  var sum = fma(weight[c * p.kernel + kept], v, bias0);
  for (var k = 0u; k < kept; k++) {
    sum = fma(weight[c * p.kernel + k], state[base + k * p.channels], sum);
  }
  // The window moves on by one input: the oldest leaves, v comes in.
  for (var k = 0u; k + 1u < kept; k++) {
    state[base + k * p.channels] = state[base + (k + 1u) * p.channels];
  }
  if (kept > 0u) {
    state[base + (kept - 1u) * p.channels] = v;
  }
  out[b * p.channels + c] = silu(sum);
}
