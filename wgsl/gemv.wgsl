// out [rows, outDim] = x [rows, inDim] · weightᵀ + bias for rows ≤ MAXROWS: each
// weight is read once. A workgroup of 256 threads computes 8 outputs, 32 threads
// per output striding along inDim (coalesced 128-byte reads), reduced in
// workgroup memory.
// Prepended by the backend: linear_io.wgsl (parameters, bias, out) and
// weight_f32.wgsl or weight_f16.wgsl (the weight and its accessors).

@group(0) @binding(1) var<storage, read> x: array<f32>;

const MAXROWS: u32 = 4u;
const LANES: u32 = 32u;
const PER_GROUP: u32 = 8u; // 256 / LANES

var<workgroup> red: array<f32, 1024>; // [MAXROWS][256]

@compute @workgroup_size(256)
fn main(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) nwg: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  let lane = li % LANES;
  let o = (wg.y * nwg.x + wg.x) * PER_GROUP + li / LANES;
  let K = p.inDim;
  var acc: array<f32, MAXROWS>;
  for (var r = 0u; r < MAXROWS; r++) {
    acc[r] = 0.0;
  }
  if (o < p.outDim) {
    let wBase = o * K;
    for (var k = lane; k < K; k += LANES) {
      let w = weightAt(wBase + k);
      for (var r = 0u; r < MAXROWS; r++) {
        if (r < p.rows) {
          acc[r] = fma(w, x[r * K + k], acc[r]);
        }
      }
    }
  }
  for (var r = 0u; r < MAXROWS; r++) {
    red[r * 256u + li] = acc[r];
  }
  workgroupBarrier();
  for (var stride = LANES / 2u; stride > 0u; stride >>= 1u) {
    if (lane < stride) {
      for (var r = 0u; r < MAXROWS; r++) {
        red[r * 256u + li] += red[r * 256u + li + stride];
      }
    }
    workgroupBarrier();
  }
  if (lane == 0u && o < p.outDim) {
    for (var r = 0u; r < MAXROWS; r++) {
      if (r < p.rows) {
        storeOut(r, o, red[r * 256u + li]);
      }
    }
  }
}
