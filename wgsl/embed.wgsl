// out [count, dim] = rows ids[t] of table [rows, dim]; ids of SKIP leave
// their row alone (a table split over buffers runs once per part). One
// thread per output float. (Ids on the device go through copy_rows.wgsl.)
// The table is read through a weight prelude (weight_f32.wgsl, or one of a
// packed format: binding 2), so that a quantized embedding is gathered from
// its blocks.
struct Params {
  dim: u32,
  count: u32,
}

const SKIP: u32 = 0xffffffffu;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn main(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) nwg: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  let i = (wg.y * nwg.x + wg.x) * 256u + li;
  if (i >= p.count * p.dim) {
    return;
  }
  let t = i / p.dim;
  if (ids[t] == SKIP) {
    return;
  }
  out[i] = weightAt(ids[t] * p.dim + (i - t * p.dim));
}
