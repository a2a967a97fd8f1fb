// Causal depthwise convolution with SiLU, carrying the last kernel-1 inputs in
// `state` [kernel-1, channels] (oldest first). Weights [channels, kernel]: tap
// kernel-1 multiplies the current token. Sequence b = workgroup_id.z of a batch
// has x and out at b·len·channels and its state in row s·(kernel-1)·channels of
// `state`: s = slots[b] with hasSlots (a pool of states), else b.
//
// Entry points:
// - `outputs`: one thread per (token, channel), reads the old state; then
// - `update_state`: one thread per channel writes the new state.
// - `outputs_quads`: the same in one dispatch, for Mamba's kernel of 4 taps
//   and channels in whole vec4s: a thread takes 4 channels over QUAD_TOKENS
//   tokens, each input loaded once as a vec4 and kept for the taps after it.
//   The thread of a sequence's first tokens, the only one that reads the old
//   state, writes the new one after (longer inputs than `sequential` takes,
//   whose new state is all x).
// - `sequential`: one thread per channel walks all tokens and updates the
//   state itself (one dispatch: used for decode steps and short inputs).
// - `step_on_parts`: a decode step (len 1) whose input x is a block of
//   columns of in_proj's product [batch, width] while it is still KPARTS
//   partial sums (a matmul split over K, matmul_parts.wgsl): each thread adds
//   up its channel's x as matmul_sum.wgsl would (same order, bias after) and
//   steps the conv on it (x is scratch and stays unwritten), and stores its
//   column of the product's other outputs, z and w, added up the same way:
//   Mamba-1's in_proj is [x | z], Mamba-2's [z | xBC | dt].
struct Params {
  len: u32,
  channels: u32,
  kernel: u32,
  hasBias: u32,
  hasSlots: u32,
  hasInBias: u32, // step_on_parts: in_proj's bias over its width columns
  width: u32, // step_on_parts: columns of in_proj's product
  xColumn: u32, // step_on_parts: x's first column in the product
  zColumn: u32, // step_on_parts: z's first column in the product
  zWidth: u32, // step_on_parts: z's columns, at most channels (0: no z)
  wColumn: u32, // step_on_parts: w's first column in the product
  wWidth: u32, // step_on_parts: w's columns, at most channels (0: no w)
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> weight: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<storage, read_write> state: array<f32>;
@group(0) @binding(6) var<storage, read> slots: array<f32>;
@group(0) @binding(7) var<storage, read> partial: array<f32>; // [KPARTS, batch, width]
@group(0) @binding(8) var<storage, read_write> z: array<f32>; // [batch, zWidth]
@group(0) @binding(9) var<storage, read> inBias: array<f32>; // [width]
@group(0) @binding(10) var<storage, read_write> w: array<f32>; // [batch, wWidth]
// outputs_quads: x, weight, out and state as vec4s (weight: a channel's 4 taps).
@group(0) @binding(11) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(12) var<storage, read> weight4: array<vec4<f32>>;
@group(0) @binding(13) var<storage, read_write> out4: array<vec4<f32>>;
@group(0) @binding(14) var<storage, read_write> state4: array<vec4<f32>>;

const MAXK: u32 = 8u;
const KPARTS: u32 = 2u; // step_on_parts
const QUAD_TOKENS: u32 = 8u; // outputs_quads: tokens per thread

fn silu(v: f32) -> f32 {
  return v / (1.0 + exp(-v));
}

fn silu4(v: vec4<f32>) -> vec4<f32> {
  return v / (1.0 + exp(-v));
}

// Offsets of sequence b's tokens and state.
fn tokens(b: u32) -> u32 {
  return b * p.len * p.channels;
}

fn history(b: u32) -> u32 {
  var row = b;
  if (p.hasSlots != 0u) {
    row = u32(slots[b]);
  }
  return row * (p.kernel - 1u) * p.channels;
}

// Input at relative position pos of sequence b (negative positions reach into the state).
fn input(b: u32, pos: i32, c: u32) -> f32 {
  if (pos >= 0) {
    return x[tokens(b) + u32(pos) * p.channels + c];
  }
  return state[history(b) + u32(i32(p.kernel) - 1 + pos) * p.channels + c];
}

@compute @workgroup_size(256)
fn outputs(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) nwg: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  let i = (wg.y * nwg.x + wg.x) * 256u + li;
  let b = wg.z;
  if (i >= p.len * p.channels) {
    return;
  }
  let t = i / p.channels;
  let c = i - t * p.channels;
  var sum = 0.0;
  if (p.hasBias != 0u) {
    sum = bias[c];
  }
  let first = i32(t) - i32(p.kernel) + 1;
  for (var k = 0u; k < p.kernel; k++) {
    sum = fma(weight[c * p.kernel + k], input(b, first + i32(k), c), sum);
  }
  out[tokens(b) + i] = silu(sum);
}

@compute @workgroup_size(256)
fn update_state(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) nwg: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  let c = (wg.y * nwg.x + wg.x) * 256u + li;
  let b = wg.z;
  if (c >= p.channels) {
    return;
  }
  let kept = p.kernel - 1u;
  var next: array<f32, MAXK>;
  for (var j = 0u; j < kept; j++) {
    next[j] = input(b, i32(p.len) - i32(kept) + i32(j), c);
  }
  for (var j = 0u; j < kept; j++) {
    state[history(b) + j * p.channels + c] = next[j];
  }
}

// outputs_quads: the inputs of channels c..c+3 at position pos of sequence b
// (negative positions reach into the state).
fn inputQuad(b: u32, pos: i32, c: u32) -> vec4<f32> {
  if (pos >= 0) {
    return x4[(tokens(b) + u32(pos) * p.channels + c) / 4u];
  }
  return state4[(history(b) + u32(3 + pos) * p.channels + c) / 4u];
}

@compute @workgroup_size(256)
fn outputs_quads(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) nwg: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  let quads = p.channels / 4u;
  let i = (wg.y * nwg.x + wg.x) * 256u + li;
  let b = wg.z;
  if (i >= quads * ((p.len + QUAD_TOKENS - 1u) / QUAD_TOKENS)) {
    return;
  }
  let group = i / quads;
  let c = 4u * (i - group * quads);
  // Tap k of the 4 channels: column k of their rows of taps.
  let r0 = weight4[c];
  let r1 = weight4[c + 1u];
  let r2 = weight4[c + 2u];
  let r3 = weight4[c + 3u];
  let tap0 = vec4<f32>(r0.x, r1.x, r2.x, r3.x);
  let tap1 = vec4<f32>(r0.y, r1.y, r2.y, r3.y);
  let tap2 = vec4<f32>(r0.z, r1.z, r2.z, r3.z);
  let tap3 = vec4<f32>(r0.w, r1.w, r2.w, r3.w);
  var bias4 = vec4<f32>(0.0);
  if (p.hasBias != 0u) {
    bias4 = vec4<f32>(bias[c], bias[c + 1u], bias[c + 2u], bias[c + 3u]);
  }
  // The three inputs before the first token, oldest first.
  let first = i32(group * QUAD_TOKENS);
  var in0 = inputQuad(b, first - 3, c);
  var in1 = inputQuad(b, first - 2, c);
  var in2 = inputQuad(b, first - 1, c);
  for (var t = 0u; t < QUAD_TOKENS; t++) {
    // Past the last token, the last one again (loaded, not stored).
    let pos = min(u32(first) + t, p.len - 1u);
    let in3 = inputQuad(b, i32(pos), c);
    let sum = fma(tap3, in3, fma(tap2, in2, fma(tap1, in1, fma(tap0, in0, bias4))));
    if (u32(first) + t < p.len) {
      out4[(tokens(b) + pos * p.channels + c) / 4u] = silu4(sum);
    }
    in0 = in1;
    in1 = in2;
    in2 = in3;
  }
  if (group == 0u) {
    let s0 = history(b) + c;
    let last = i32(p.len) - 3;
    state4[s0 / 4u] = inputQuad(b, last, c);
    state4[(s0 + p.channels) / 4u] = inputQuad(b, last + 1, c);
    state4[(s0 + 2u * p.channels) / 4u] = inputQuad(b, last + 2, c);
  }
}

@compute @workgroup_size(256)
fn sequential(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) nwg: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  let c = (wg.y * nwg.x + wg.x) * 256u + li;
  let b = wg.z;
  if (c >= p.channels) {
    return;
  }
  let kept = p.kernel - 1u;
  let s0 = history(b);
  let x0 = tokens(b);
  // window[0..kept) = previous inputs, oldest first.
  var window: array<f32, MAXK>;
  for (var j = 0u; j < kept; j++) {
    window[j] = state[s0 + j * p.channels + c];
  }
  var bias0 = 0.0;
  if (p.hasBias != 0u) {
    bias0 = bias[c];
  }
  for (var t = 0u; t < p.len; t++) {
    let v = x[x0 + t * p.channels + c];
    var sum = fma(weight[c * p.kernel + kept], v, bias0);
    for (var k = 0u; k < kept; k++) {
      sum = fma(weight[c * p.kernel + k], window[k], sum);
    }
    out[x0 + t * p.channels + c] = silu(sum);
    for (var k = 0u; k + 1u < kept; k++) {
      window[k] = window[k + 1u];
    }
    if (kept > 0u) {
      window[kept - 1u] = v;
    }
  }
  for (var j = 0u; j < kept; j++) {
    state[s0 + j * p.channels + c] = window[j];
  }
}

// Columns `columns` (z's, w's and x's) of row `seq` of in_proj's product [batch,
// width]: each one's partial sums in order, then the bias. The parts of all
// three are loaded four at a time, so that a thread waits on memory once per
// four parts rather than once per part and column.
fn products(batch: u32, seq: u32, columns: vec3<u32>) -> vec3<f32> {
  let size = batch * p.width;
  let at = seq * p.width + columns;
  var sum = vec3<f32>(0.0);
  var part = 0u;
  for (; part + 4u <= KPARTS; part += 4u) {
    let o = part * size;
    let a = vec3<f32>(partial[o + at.x], partial[o + at.y], partial[o + at.z]);
    let b = vec3<f32>(partial[o + size + at.x], partial[o + size + at.y], partial[o + size + at.z]);
    let o2 = o + 2u * size;
    let c = vec3<f32>(partial[o2 + at.x], partial[o2 + at.y], partial[o2 + at.z]);
    let d = vec3<f32>(partial[o2 + size + at.x], partial[o2 + size + at.y], partial[o2 + size + at.z]);
    sum = (((sum + a) + b) + c) + d;
  }
  for (; part < KPARTS; part++) {
    let o = part * size;
    sum += vec3<f32>(partial[o + at.x], partial[o + at.y], partial[o + at.z]);
  }
  if (p.hasInBias != 0u) {
    sum += vec3<f32>(inBias[columns.x], inBias[columns.y], inBias[columns.z]);
  }
  return sum;
}

@compute @workgroup_size(256)
fn step_on_parts(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) nwg: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  let c = (wg.y * nwg.x + wg.x) * 256u + li;
  let b = wg.z;
  if (c >= p.channels) {
    return;
  }
  let kept = p.kernel - 1u;
  let s0 = history(b) + c;
  // Mamba's 4 taps: the taps and the 3 inputs of the window are loaded before
  // the product's parts, so that their waits overlap.
  let four = p.kernel == 4u;
  var taps = vec4<f32>(0.0);
  var window = vec3<f32>(0.0);
  if (four) {
    taps = vec4<f32>(weight[c * 4u], weight[c * 4u + 1u], weight[c * 4u + 2u], weight[c * 4u + 3u]);
    window = vec3<f32>(state[s0], state[s0 + p.channels], state[s0 + 2u * p.channels]);
  }
  var sum = 0.0;
  if (p.hasBias != 0u) {
    sum = bias[c];
  }
  // z's and w's columns where the thread has them, else x's again (not stored).
  let x = p.xColumn + c;
  let zColumn = select(x, p.zColumn + c, c < p.zWidth);
  let wColumn = select(x, p.wColumn + c, c < p.wWidth);
  let values = products(nwg.z, b, vec3<u32>(zColumn, wColumn, x));
  if (c < p.zWidth) {
    z[b * p.zWidth + c] = values.x;
  }
  if (c < p.wWidth) {
    w[b * p.wWidth + c] = values.y;
  }
  let v = values.z;
  if (four) {
    sum = fma(taps.w, v, sum);
    sum = fma(taps.x, window.x, sum);
    sum = fma(taps.y, window.y, sum);
    sum = fma(taps.z, window.z, sum);
    state[s0] = window.y;
    state[s0 + p.channels] = window.z;
    state[s0 + 2u * p.channels] = v;
  } else {
    sum = fma(weight[c * p.kernel + kept], v, sum);
    for (var k = 0u; k < kept; k++) {
      sum = fma(weight[c * p.kernel + k], state[s0 + k * p.channels], sum);
    }
    // The window moves on by one input: the oldest leaves, v comes in.
    for (var k = 0u; k + 1u < kept; k++) {
      state[s0 + k * p.channels] = state[s0 + (k + 1u) * p.channels];
    }
    if (kept > 0u) {
      state[s0 + (kept - 1u) * p.channels] = v;
    }
  }
  out[b * p.channels + c] = silu(sum);
}
