// out [rows, outDim] = x [rows, inDim] · weightᵀ + bias, weight [outDim, inDim].
// Tiled: a 16×16 workgroup computes a 64×64 tile of out, 4×4 values per thread
// (rows ty + 16i, columns tx + 16j, so neighbouring threads touch neighbouring
// columns), staging 64×BK slices of x and weight in workgroup memory.
// Prepended by the backend: linear_io.wgsl (parameters, bias, out) and
// weight_f32.wgsl or weight_f16.wgsl (the weight and its accessors).

@group(0) @binding(1) var<storage, read> x: array<f32>;

const TM: u32 = 64u;
const TN: u32 = 64u;
const BK: u32 = 16u;

var<workgroup> xs: array<f32, 1024>; // [BK][TM]
var<workgroup> ws: array<f32, 1024>; // [BK][TN]

// Writes out[r, c + 16j] = v[j] (+ bias) for the columns in range.
fn store(r: u32, c: u32, v: vec4<f32>) {
  if (r >= p.rows) {
    return;
  }
  for (var j = 0u; j < 4u; j++) {
    let col = c + 16u * j;
    if (col < p.outDim) {
      var value = v[j];
      if (p.hasBias != 0u) {
        value += bias[p.colOffset + col];
      }
      out[r * p.outStride + p.colOffset + col] = value;
    }
  }
}

@compute @workgroup_size(16, 16)
fn main(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(local_invocation_id) lid: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  let row0 = wg.y * TM;
  let col0 = wg.x * TN;
  let K = p.inDim;
  // Row i of the thread's 4×4 block is acc<i>; column j is component j.
  var acc0 = vec4<f32>(0.0);
  var acc1 = vec4<f32>(0.0);
  var acc2 = vec4<f32>(0.0);
  var acc3 = vec4<f32>(0.0);
  for (var k0 = 0u; k0 < K; k0 += BK) {
    for (var j = 0u; j < 4u; j++) {
      let e = li + j * 256u;
      let r = e / BK;
      let kk = e % BK;
      let gk = k0 + kk;
      var xv = 0.0;
      if (row0 + r < p.rows && gk < K) {
        xv = x[(row0 + r) * K + gk];
      }
      xs[kk * TM + r] = xv;
      var wv = 0.0;
      if (col0 + r < p.outDim && gk < K) {
        wv = weightAt((col0 + r) * K + gk);
      }
      ws[kk * TN + r] = wv;
    }
    workgroupBarrier();
    for (var kk = 0u; kk < BK; kk++) {
      let xb = kk * TM + lid.y;
      let wb = kk * TN + lid.x;
      let a = vec4<f32>(xs[xb], xs[xb + 16u], xs[xb + 32u], xs[xb + 48u]);
      let b = vec4<f32>(ws[wb], ws[wb + 16u], ws[wb + 32u], ws[wb + 48u]);
      acc0 = fma(vec4<f32>(a.x), b, acc0);
      acc1 = fma(vec4<f32>(a.y), b, acc1);
      acc2 = fma(vec4<f32>(a.z), b, acc2);
      acc3 = fma(vec4<f32>(a.w), b, acc3);
    }
    workgroupBarrier();
  }
  store(row0 + lid.y, col0 + lid.x, acc0);
  store(row0 + lid.y + 16u, col0 + lid.x, acc1);
  store(row0 + lid.y + 32u, col0 + lid.x, acc2);
  store(row0 + lid.y + 48u, col0 + lid.x, acc3);
}
