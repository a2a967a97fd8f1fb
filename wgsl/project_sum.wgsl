// Adds up the shares of a projection that gemv4.wgsl left in projParts (see
// its projectBlock) into the projection's outputs, for when something other
// than the decode step's scan (which adds them up itself) reads them first:
// out, out2 and out3 [rows, ·] get the columns [0, split1), [split1, split2)
// and [split2, width) of each row. One thread per row and column.
struct Params {
  rows: u32,
  blocks: u32, // shares per row
  width: u32,
  split1: u32,
  split2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> projParts: array<f32>; // [rows, blocks, 4 · ⌈width / 4⌉]
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<storage, read_write> out2: array<f32>;
@group(0) @binding(6) var<storage, read_write> out3: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3u) {
  let r = id.x / p.width;
  let m = id.x % p.width;
  if (r >= p.rows) {
    return;
  }
  let stride = (p.width + 3u) / 4u * 4u;
  var sum = 0.0;
  for (var i = 0u; i < p.blocks; i++) {
    sum += projParts[(r * p.blocks + i) * stride + m];
  }
  if (m < p.split1) {
    out[r * p.split1 + m] = sum;
  } else if (m < p.split2) {
    out2[r * (p.split2 - p.split1) + m - p.split1] = sum;
  } else {
    out3[r * (p.width - p.split2) + m - p.split2] = sum;
  }
}
