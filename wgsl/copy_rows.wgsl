// Rows copied by index (gathers and scatters): for r < count, row dstRow(r) of
// dst = row srcRow(r) of src, rows of `width` floats from dstOffset and
// srcOffset. With flag 1, srcRow(r) = srcIndex[srcIndexOffset + r] (a float),
// else r; with flag 2, dstRow(r) = dstIndex[dstIndexOffset + r], else r. A
// matrix split over several buffers runs once per part, which holds rows
// [srcRowStart, srcRowStart + srcRows). A row number outside the rows a
// buffer holds (such as an id of -1) copies nothing. One thread per float.
// src is read through a weight prelude (weight_f32.wgsl, or one of a packed
// format: binding 2), so that rows of a quantized embedding (the decode
// step's gather of token ids) come from its blocks.
struct Params {
  width: u32,
  count: u32,
  dstOffset: u32,
  srcOffset: u32,
  srcIndexOffset: u32,
  dstIndexOffset: u32,
  flags: u32,
  srcRowStart: u32,
  srcRows: u32,
  dstRows: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> dst: array<f32>;
@group(0) @binding(3) var<storage, read> srcIndex: array<f32>;
@group(0) @binding(4) var<storage, read> dstIndex: array<f32>;

// Row r's number in an index (as a float), or r; -1 when it is not a whole
// number below `rows` (compared as floats: a negative float converts to 0).
fn rowOf(index: f32, useIndex: bool, r: u32, first: u32, rows: u32) -> i32 {
  if (!useIndex) {
    return i32(r);
  }
  let v = index - f32(first);
  if (!(v >= 0.0 && v < f32(rows)) || v != floor(v)) {
    return -1;
  }
  return i32(v);
}

@compute @workgroup_size(256)
fn main(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) nwg: vec3u,
  @builtin(local_invocation_index) li: u32,
) {
  let i = (wg.y * nwg.x + wg.x) * 256u + li;
  if (i >= p.count * p.width) {
    return;
  }
  let r = i / p.width;
  let k = i - r * p.width;
  let useSrc = (p.flags & 1u) != 0u;
  let useDst = (p.flags & 2u) != 0u;
  var srcValue = 0.0;
  if (useSrc) {
    srcValue = srcIndex[p.srcIndexOffset + r];
  }
  var dstValue = 0.0;
  if (useDst) {
    dstValue = dstIndex[p.dstIndexOffset + r];
  }
  let readRow = rowOf(srcValue, useSrc, r, p.srcRowStart, p.srcRows);
  let writeRow = rowOf(dstValue, useDst, r, 0u, p.dstRows);
  if (readRow < 0 || writeRow < 0 || (!useSrc && r >= p.srcRows) || (!useDst && r >= p.dstRows)) {
    return;
  }
  dst[p.dstOffset + u32(writeRow) * p.width + k] = weightAt(p.srcOffset + u32(readRow) * p.width + k);
}
