// Prelude of gemv4.wgsl for a decode step's in_proj with x_proj folded in:
// each workgroup projects the conv outputs it stored (keepConvOut) and leaves
// its share of the product in projParts; the decode step's scan (scan.wgsl
// with scan_shares.wgsl) or project_sum.wgsl adds the shares up. Its own file,
// so that the other GEMVs neither declare nor bind its two buffers; it comes
// after blocks.wgsl, which decodes a projection kept as quantized blocks.

@group(0) @binding(11) var<storage, read> projWeight: array<u32>; // [projWidth, split1], in p.projFormat
// [rows, blocks of PER_GROUP conv outputs, 4 · ⌈projWidth / 4⌉]: each block's share of the projection
@group(0) @binding(12) var<storage, read_write> projParts: array<f32>;

var<workgroup> convOut: array<vec4<f32>, PER_GROUP>; // the conv's outputs, row r in component r

// The weights of projected column li over this workgroup's conv outputs, for
// PER_GROUP ≤ 8 (two quads): loaded as the workgroup starts (loadProjAhead),
// so that projectBlock does not wait on them after the GEMV.
var<private> projAhead0: vec4<f32>;
var<private> projAhead1: vec4<f32>;

// vec4 i of x (a projecting GEMV has no gate).
fn xAt(i: u32) -> vec4<f32> {
  return x[i];
}

// Keeps output j of the workgroup (row r in component r) for projectBlock.
fn keepConvOut(j: u32, v: vec4<f32>) {
  convOut[j] = v;
}

// Four consecutive elements of projWeight from element i (a multiple of 4).
fn projQuad(i: u32) -> vec4<f32> {
  let k = i / 4u;
  if (p.projFormat == 3u) {
    let at = q8_0Words(k);
    return q8_0Quad(projWeight[at.x], projWeight[at.y]);
  }
  if (p.projFormat == 4u) {
    let at = q4_0Words(k);
    return q4_0Quad(k, projWeight[at.x], projWeight[at.y]);
  }
  if (p.projFormat == 5u) {
    let at = q4_kWords(k);
    return q4_kQuad(
      k,
      projWeight[at.x],
      projWeight[at.x + 1u],
      projWeight[at.y],
      projWeight[at.z],
      projWeight[at.w],
    );
  }
  let w = i / 2u;
  if (p.projFormat == 1u) {
    return vec4<f32>(unpack2x16float(projWeight[w]), unpack2x16float(projWeight[w + 1u]));
  }
  if (p.projFormat == 2u) {
    // bf16 pairs, each the top half of its f32 (the main weight may be of another format, so
    // weight_bf16.wgsl's unpackBf16 is not always there).
    let lo = vec2<u32>(projWeight[w], projWeight[w + 1u]);
    return bitcast<vec4<f32>>(vec4<u32>(lo.x << 16u, lo.x & 0xffff0000u, lo.y << 16u, lo.y & 0xffff0000u));
  }
  return bitcast<vec4<f32>>(
    vec4<u32>(projWeight[i], projWeight[i + 1u], projWeight[i + 2u], projWeight[i + 3u]),
  );
}

// Loads projAhead0 and projAhead1 for `block` (see projectBlock).
fn loadProjAhead(block: u32, li: u32) {
  let first = block * PER_GROUP;
  if (PER_GROUP > 8u || first >= p.split1 || li >= p.projWidth) {
    return;
  }
  projAhead0 = projQuad(li * p.split1 + first);
  if (PER_GROUP == 8u) {
    projAhead1 = projQuad(li * p.split1 + first + 4u);
  }
}

// sum plus weights w times conv outputs j … j + 3.
fn blockTerms(j: u32, w: vec4<f32>, sum: vec4<f32>) -> vec4<f32> {
  var total = fma(vec4<f32>(w.x), convOut[j], sum);
  total = fma(vec4<f32>(w.y), convOut[j + 1u], total);
  total = fma(vec4<f32>(w.z), convOut[j + 2u], total);
  return fma(vec4<f32>(w.w), convOut[j + 3u], total);
}

// The projection's share of `block`, this workgroup's PER_GROUP conv outputs
// (in convOut): for each projected column m and row, Σ_j projWeight[m, first
// + j] · output j. The reader adds the blocks' shares in a fixed order, so the
// result does not depend on timing. Every thread must call it.
fn projectBlock(block: u32, li: u32) {
  workgroupBarrier();
  let first = block * PER_GROUP;
  if (first >= p.split1) {
    return; // a block of z
  }
  let stride = (p.projWidth + 3u) / 4u * 4u;
  let blocks = (p.split1 + PER_GROUP - 1u) / PER_GROUP;
  for (var m = li; m < stride; m += 256u) {
    var sum = vec4<f32>(0.0);
    if (m < p.projWidth && PER_GROUP <= 8u && m == li) {
      sum = blockTerms(0u, projAhead0, sum);
      if (PER_GROUP == 8u) {
        sum = blockTerms(4u, projAhead1, sum);
      }
    } else if (m < p.projWidth) {
      // Eight weights per iteration, their loads in flight together.
      var j = 0u;
      for (; j + 8u <= PER_GROUP; j += 8u) {
        let w0 = projQuad(m * p.split1 + first + j);
        let w1 = projQuad(m * p.split1 + first + j + 4u);
        sum = blockTerms(j + 4u, w1, blockTerms(j, w0, sum));
      }
      if (PER_GROUP % 8u != 0u) {
        sum = blockTerms(j, projQuad(m * p.split1 + first + j), sum);
      }
    }
    let at = (row0 * blocks + block) * stride + m;
    projParts[at] = sum.x;
    if (hasRow(1u)) {
      projParts[at + blocks * stride] = sum.y;
    }
    if (hasRow(2u)) {
      projParts[at + 2u * blocks * stride] = sum.z;
    }
    if (hasRow(3u)) {
      projParts[at + 3u * blocks * stride] = sum.w;
    }
  }
}
