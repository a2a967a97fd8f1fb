// The f32 linear layer: the GEMV, a few rows against each weight row, and the
// panel matmul.
// asm/kernels.ts says what every kernel assumes.

import { hsum, madd, sums4 } from "./math";

// GEMV (rows = 1): out[o] = x · w[o] + bias[o] for o in [o0, o1), one weight
// row at a time, 16 floats per step into four accumulators, so the weights
// stream strictly sequentially, which every thread reads once. On 768 → 50280
// (weights from DRAM) this way streamed about twice as fast as four rows at a
// time, with one x load shared (docs/performance.md): interleaved streams
// defeat the hardware prefetcher more than the shared x loads save.
export function gemv(out: usize, x: usize, w: usize, bias: usize, inDim: i32, o0: i32, o1: i32): void {
  const rowBytes = <usize>inDim << 2;
  const k16 = inDim & ~15;
  const k4 = inDim & ~3;
  for (let o = o0; o < o1; o++) {
    const w0 = w + <usize>o * rowBytes;
    let a0 = f32x4.splat(0);
    let a1 = f32x4.splat(0);
    let a2 = f32x4.splat(0);
    let a3 = f32x4.splat(0);
    let k = 0;
    for (; k < k16; k += 16) {
      const p = <usize>k << 2;
      a0 = madd(v128.load(x + p), v128.load(w0 + p), a0);
      a1 = madd(v128.load(x + p, 16), v128.load(w0 + p, 16), a1);
      a2 = madd(v128.load(x + p, 32), v128.load(w0 + p, 32), a2);
      a3 = madd(v128.load(x + p, 48), v128.load(w0 + p, 48), a3);
    }
    for (; k < k4; k += 4) {
      const p = <usize>k << 2;
      a0 = madd(v128.load(x + p), v128.load(w0 + p), a0);
    }
    let s0 = hsum(f32x4.add(f32x4.add(a0, a1), f32x4.add(a2, a3)));
    for (; k < inDim; k++) {
      const p = <usize>k << 2;
      s0 += load<f32>(x + p) * load<f32>(w0 + p);
    }
    if (bias) s0 += load<f32>(bias + (<usize>o << 2));
    store<f32>(out + (<usize>o << 2), s0);
  }
}

// Weight rows per tile of the dequantizing matmuls (linearBlocks,
// linearHalf): OB rows widened to f32 (OB·inDim·4 bytes: 192 KiB for inDim
// 768) stay in L2 while the f32 matmul runs over them.
export const OB: i32 = 64;

// The f32 matmul (rows > 1) works on panels: PANEL_COLS weight rows, output
// columns, interleaved as [inDim][PANEL_COLS] (packPanel), then the bias's
// PANEL_COLS lanes. Its inner step takes two vectors of the panel and one
// input value per row, broadcast, into PANEL_ROWS × 2 accumulators: 12 of
// the 15 vector registers V8 allocates on x64 (with the two weight vectors
// and the broadcast, 15), so nothing spills, and each weight load serves six
// rows; 4×4 blocks of dot products over row-major weights, before, needed 21
// and spilled (docs/performance.md has both speeds). A panel is packed once
// per call and serves every row it covers, so the weights need no layout of
// their own. The plain-SIMD build's multiply and add need a register more
// per step, so it takes four rows (eight accumulators): six spilled there.
export const PANEL_COLS: i32 = 8;
export const PANEL_ROWS: i32 = ASC_FEATURE_RELAXED_SIMD ? 6 : 4;

/** Bytes of per-thread scratch the f32 matmul needs: one panel and its bias. */
export function panelBytes(inDim: i32): i32 {
  return ((inDim + 1) * PANEL_COLS * 4 + 63) & ~63;
}

// Packs weight rows [o, o + n) (n <= PANEL_COLS) of w [*, inDim] into
// `panel` as [inDim][PANEL_COLS], then their bias (zeros without one); lanes
// past n are zeros.
function packPanel(panel: usize, w: usize, bias: usize, inDim: i32, o: i32, n: i32): void {
  const rowBytes = <usize> inDim << 2;
  const w0 = w + <usize> o * rowBytes;
  let k = 0;
  if (n == PANEL_COLS) {
    // 4×4 transposes: four k of rows 0..3, then of rows 4..7.
    const k4 = inDim & ~3;
    for (; k < k4; k += 4) {
      const src = w0 + (<usize> k << 2);
      const dst = panel + (<usize> k << 5);
      transpose4(src, rowBytes, dst);
      transpose4(src + 4 * rowBytes, rowBytes, dst + 16);
    }
  }
  for (; k < inDim; k++) {
    for (let j = 0; j < PANEL_COLS; j++) {
      const value = j < n ? load<f32>(w0 + <usize> j * rowBytes + (<usize> k << 2)) : 0;
      store<f32>(panel + (<usize> k << 5) + (<usize> j << 2), value);
    }
  }
  const biasLanes = panel + (<usize> inDim << 5);
  for (let j = 0; j < PANEL_COLS; j++) {
    store<f32>(biasLanes + (<usize> j << 2), bias && j < n ? load<f32>(bias + (<usize> (o + j) << 2)) : 0);
  }
}

// Four floats of four rows (stride bytes apart) at src, transposed: float k
// of the rows as one vector at dst + 32·k.
// @ts-ignore: decorator
@inline
function transpose4(src: usize, stride: usize, dst: usize): void {
  const r0 = v128.load(src);
  const r1 = v128.load(src + stride);
  const r2 = v128.load(src + 2 * stride);
  const r3 = v128.load(src + 3 * stride);
  const t0 = v128.shuffle<f32>(r0, r1, 0, 4, 1, 5);
  const t1 = v128.shuffle<f32>(r0, r1, 2, 6, 3, 7);
  const t2 = v128.shuffle<f32>(r2, r3, 0, 4, 1, 5);
  const t3 = v128.shuffle<f32>(r2, r3, 2, 6, 3, 7);
  v128.store(dst, v128.shuffle<f32>(t0, t2, 0, 1, 4, 5));
  v128.store(dst, v128.shuffle<f32>(t0, t2, 2, 3, 6, 7), 32);
  v128.store(dst, v128.shuffle<f32>(t1, t3, 0, 1, 4, 5), 64);
  v128.store(dst, v128.shuffle<f32>(t1, t3, 2, 3, 6, 7), 96);
}

// One tile: out[r .. r + rows, o .. o + cols] from a packed panel, rows <=
// computed <= PANEL_ROWS (computed 4 or PANEL_ROWS, a constant where
// inlined) and cols <= PANEL_COLS. Rows from `rows` to `computed` are
// computed on the last row's input again and not stored.
// @ts-ignore: decorator
@inline
function panelTile(
  out: usize,
  x: usize,
  panel: usize,
  inDim: i32,
  outDim: i32,
  r: i32,
  computed: i32,
  rows: i32,
  o: i32,
  cols: i32,
): void {
  const rowBytes = <usize> inDim << 2;
  const last = rows - 1;
  const x0 = x + <usize> r * rowBytes;
  const x1 = x0 + <usize> min(1, last) * rowBytes;
  const x2 = x0 + <usize> min(2, last) * rowBytes;
  const x3 = x0 + <usize> min(3, last) * rowBytes;
  const x4 = x0 + <usize> min(4, last) * rowBytes;
  const x5 = x0 + <usize> min(5, last) * rowBytes;
  let a00 = f32x4.splat(0), a01 = f32x4.splat(0);
  let a10 = f32x4.splat(0), a11 = f32x4.splat(0);
  let a20 = f32x4.splat(0), a21 = f32x4.splat(0);
  let a30 = f32x4.splat(0), a31 = f32x4.splat(0);
  let a40 = f32x4.splat(0), a41 = f32x4.splat(0);
  let a50 = f32x4.splat(0), a51 = f32x4.splat(0);
  let p = panel;
  for (let k: usize = 0; k < rowBytes; k += 4) {
    const w0 = v128.load(p);
    const w1 = v128.load(p, 16);
    let b = v128.load32_splat(x0 + k);
    a00 = madd(b, w0, a00);
    a01 = madd(b, w1, a01);
    b = v128.load32_splat(x1 + k);
    a10 = madd(b, w0, a10);
    a11 = madd(b, w1, a11);
    b = v128.load32_splat(x2 + k);
    a20 = madd(b, w0, a20);
    a21 = madd(b, w1, a21);
    b = v128.load32_splat(x3 + k);
    a30 = madd(b, w0, a30);
    a31 = madd(b, w1, a31);
    if (computed > 4) {
      b = v128.load32_splat(x4 + k);
      a40 = madd(b, w0, a40);
      a41 = madd(b, w1, a41);
      b = v128.load32_splat(x5 + k);
      a50 = madd(b, w0, a50);
      a51 = madd(b, w1, a51);
    }
    p += 32;
  }
  // p is at the panel's bias lanes.
  const b0 = v128.load(p);
  const b1 = v128.load(p, 16);
  const outRow = <usize> outDim << 2;
  const op = out + <usize> r * outRow + (<usize> o << 2);
  storeTileRow(op, f32x4.add(a00, b0), f32x4.add(a01, b1), cols);
  if (rows > 1) storeTileRow(op + outRow, f32x4.add(a10, b0), f32x4.add(a11, b1), cols);
  if (rows > 2) storeTileRow(op + 2 * outRow, f32x4.add(a20, b0), f32x4.add(a21, b1), cols);
  if (rows > 3) storeTileRow(op + 3 * outRow, f32x4.add(a30, b0), f32x4.add(a31, b1), cols);
  if (rows > 4) storeTileRow(op + 4 * outRow, f32x4.add(a40, b0), f32x4.add(a41, b1), cols);
  if (rows > 5) storeTileRow(op + 5 * outRow, f32x4.add(a50, b0), f32x4.add(a51, b1), cols);
}

// A tile of up to PANEL_ROWS rows, and one of up to 4 rows that computes
// only 4 (the last tile of 16 rows, say). Each is a function of its own:
// with both copies inlined into matmul, V8 compiled even the full tiles'
// copy slower (docs/performance.md).
function fullTile(
  out: usize, x: usize, panel: usize, inDim: i32, outDim: i32, r: i32, rows: i32, o: i32, cols: i32,
): void {
  panelTile(out, x, panel, inDim, outDim, r, PANEL_ROWS, rows, o, cols);
}

function shortTile(
  out: usize, x: usize, panel: usize, inDim: i32, outDim: i32, r: i32, rows: i32, o: i32, cols: i32,
): void {
  panelTile(out, x, panel, inDim, outDim, r, 4, rows, o, cols);
}

// The first `cols` (<= 8) of the eight floats lo, hi at op.
// @ts-ignore: decorator
@inline
function storeTileRow(op: usize, lo: v128, hi: v128, cols: i32): void {
  if (cols == PANEL_COLS) {
    v128.store(op, lo);
    v128.store(op, hi, 16);
    return;
  }
  if (cols > 0) store<f32>(op, f32x4.extract_lane(lo, 0));
  if (cols > 1) store<f32>(op, f32x4.extract_lane(lo, 1), 4);
  if (cols > 2) store<f32>(op, f32x4.extract_lane(lo, 2), 8);
  if (cols > 3) store<f32>(op, f32x4.extract_lane(lo, 3), 12);
  if (cols > 4) store<f32>(op, f32x4.extract_lane(hi, 0), 16);
  if (cols > 5) store<f32>(op, f32x4.extract_lane(hi, 1), 20);
  if (cols > 6) store<f32>(op, f32x4.extract_lane(hi, 2), 24);
}

// out [rows, outDim] = x [rows, inDim] · wᵀ + bias over rows [r0, r1) and
// output columns [o0, o1), a panel at a time through `panel` (panelBytes).
export function matmul(
  out: usize,
  x: usize,
  w: usize,
  bias: usize,
  inDim: i32,
  outDim: i32,
  o0: i32,
  o1: i32,
  r0: i32,
  r1: i32,
  panel: usize,
): void {
  for (let o = o0; o < o1; o += PANEL_COLS) {
    const cols = min(PANEL_COLS, o1 - o);
    packPanel(panel, w, bias, inDim, o, cols);
    for (let r = r0; r < r1; r += PANEL_ROWS) {
      const rows = min(PANEL_ROWS, r1 - r);
      if (rows > 4) fullTile(out, x, panel, inDim, outDim, r, rows, o, cols);
      else shortTile(out, x, panel, inDim, outDim, r, rows, o, cols);
    }
  }
}

// A batch of up to SMALL_BATCH rows (decode steps of a few concurrent
// streams) skips the panels: packing one costs about what a few rows'
// arithmetic on it does. Instead each weight row is read in place, one at a
// time in the order gemv streams them (interleaved rows defeat the
// prefetcher, see gemv), against every input row: dot products in two
// accumulators per row, each 8 floats of K loading two weight vectors and
// two of each input row. Past SMALL_BATCH rows the input rows' loads, two
// vectors per row for every weight row, cost more than the panels' packing
// (docs/performance.md has the speeds). The plain-SIMD build's multiply and
// add need a register more per row, so it takes four rows.
export const SMALL_BATCH: i32 = ASC_FEATURE_RELAXED_SIMD ? 6 : 4;

// Column o of out (rows <= SMALL_BATCH, a constant where inlined): weight
// row o's dot products with every row of x, plus bias. Pointers past the
// last row repeat it, so that every load of the K tail stays inside x.
// @ts-ignore: decorator
@inline
function rowDots(
  out: usize,
  x: usize,
  w: usize,
  bias: usize,
  inDim: i32,
  outDim: i32,
  rows: i32,
  o: i32,
): void {
  const rowBytes = <usize> inDim << 2;
  const last = rows - 1;
  const x0 = x;
  const x1 = x0 + <usize> min(1, last) * rowBytes;
  const x2 = x0 + <usize> min(2, last) * rowBytes;
  const x3 = x0 + <usize> min(3, last) * rowBytes;
  const x4 = x0 + <usize> min(4, last) * rowBytes;
  const x5 = x0 + <usize> min(5, last) * rowBytes;
  const w0 = w + <usize> o * rowBytes;
  let a0 = f32x4.splat(0), b0 = f32x4.splat(0);
  let a1 = f32x4.splat(0), b1 = f32x4.splat(0);
  let a2 = f32x4.splat(0), b2 = f32x4.splat(0);
  let a3 = f32x4.splat(0), b3 = f32x4.splat(0);
  let a4 = f32x4.splat(0), b4 = f32x4.splat(0);
  let a5 = f32x4.splat(0), b5 = f32x4.splat(0);
  const k8 = rowBytes & ~31;
  let k: usize = 0;
  for (; k < k8; k += 32) {
    const v = v128.load(w0 + k);
    const u = v128.load(w0 + k, 16);
    a0 = madd(v128.load(x0 + k), v, a0);
    b0 = madd(v128.load(x0 + k, 16), u, b0);
    if (rows > 1) {
      a1 = madd(v128.load(x1 + k), v, a1);
      b1 = madd(v128.load(x1 + k, 16), u, b1);
    }
    if (rows > 2) {
      a2 = madd(v128.load(x2 + k), v, a2);
      b2 = madd(v128.load(x2 + k, 16), u, b2);
    }
    if (rows > 3) {
      a3 = madd(v128.load(x3 + k), v, a3);
      b3 = madd(v128.load(x3 + k, 16), u, b3);
    }
    if (rows > 4) {
      a4 = madd(v128.load(x4 + k), v, a4);
      b4 = madd(v128.load(x4 + k, 16), u, b4);
    }
    if (rows > 5) {
      a5 = madd(v128.load(x5 + k), v, a5);
      b5 = madd(v128.load(x5 + k, 16), u, b5);
    }
  }
  if (k + 16 <= rowBytes) {
    const v = v128.load(w0 + k);
    a0 = madd(v128.load(x0 + k), v, a0);
    a1 = madd(v128.load(x1 + k), v, a1);
    a2 = madd(v128.load(x2 + k), v, a2);
    a3 = madd(v128.load(x3 + k), v, a3);
    a4 = madd(v128.load(x4 + k), v, a4);
    a5 = madd(v128.load(x5 + k), v, a5);
    k += 16;
  }
  // Lane i of lo: row i's dot product; lanes 0 and 1 of hi: rows 4 and 5's.
  let lo = sums4(f32x4.add(a0, b0), f32x4.add(a1, b1), f32x4.add(a2, b2), f32x4.add(a3, b3));
  let hi = sums4(f32x4.add(a4, b4), f32x4.add(a5, b5), a5, a5);
  for (; k < rowBytes; k += 4) {
    const wk = f32x4.splat(load<f32>(w0 + k));
    lo = madd(lanesAt(x0 + k, x1 + k, x2 + k, x3 + k), wk, lo);
    hi = madd(lanesAt(x4 + k, x5 + k, x5 + k, x5 + k), wk, hi);
  }
  if (bias) {
    const b = f32x4.splat(load<f32>(bias + (<usize> o << 2)));
    lo = f32x4.add(lo, b);
    hi = f32x4.add(hi, b);
  }
  const outRow = <usize> outDim << 2;
  const op = out + (<usize> o << 2);
  store<f32>(op, f32x4.extract_lane(lo, 0));
  if (rows > 1) store<f32>(op + outRow, f32x4.extract_lane(lo, 1));
  if (rows > 2) store<f32>(op + 2 * outRow, f32x4.extract_lane(lo, 2));
  if (rows > 3) store<f32>(op + 3 * outRow, f32x4.extract_lane(lo, 3));
  if (rows > 4) store<f32>(op + 4 * outRow, f32x4.extract_lane(hi, 0));
  if (rows > 5) store<f32>(op + 5 * outRow, f32x4.extract_lane(hi, 1));
}

// The floats at a, b, c and d as one vector.
// @ts-ignore: decorator
@inline
function lanesAt(a: usize, b: usize, c: usize, d: usize): v128 {
  let v = f32x4.replace_lane(f32x4.splat(load<f32>(a)), 1, load<f32>(b));
  v = f32x4.replace_lane(v, 2, load<f32>(c));
  return f32x4.replace_lane(v, 3, load<f32>(d));
}

// out [rows, outDim] = x [rows, inDim] · wᵀ + bias over output columns
// [o0, o1), for 2 <= rows <= SMALL_BATCH: a weight row at a time, the row
// count a constant in each copy of rowDots.
export function smallMatmul(
  out: usize,
  x: usize,
  w: usize,
  bias: usize,
  rows: i32,
  inDim: i32,
  outDim: i32,
  o0: i32,
  o1: i32,
): void {
  for (let o = o0; o < o1; o++) {
    if (rows == 6) rowDots(out, x, w, bias, inDim, outDim, 6, o);
    else if (rows == 5) rowDots(out, x, w, bias, inDim, outDim, 5, o);
    else if (rows == 4) rowDots(out, x, w, bias, inDim, outDim, 4, o);
    else if (rows == 3) rowDots(out, x, w, bias, inDim, outDim, 3, o);
    else rowDots(out, x, w, bias, inDim, outDim, 2, o);
  }
}

// out [rows, outDim] = x [rows, inDim] · wᵀ + bias over output columns
// [o0, o1), rows > 1: pairs of weight rows for a few rows, else panels
// (through `panel`, panelBytes(inDim)).
export function matmulRows(
  out: usize,
  x: usize,
  w: usize,
  bias: usize,
  rows: i32,
  inDim: i32,
  outDim: i32,
  o0: i32,
  o1: i32,
  panel: usize,
): void {
  if (rows <= SMALL_BATCH) smallMatmul(out, x, w, bias, rows, inDim, outDim, o0, o1);
  else matmul(out, x, w, bias, inDim, outDim, o0, o1, 0, rows, panel);
}

// out [rows, outDim] = x [rows, inDim] · wᵀ + bias, output columns [o0, o1),
// with `panel` scratch of panelBytes(inDim) for more than one row.
export function linear(
  out: usize,
  x: usize,
  w: usize,
  bias: usize,
  rows: i32,
  inDim: i32,
  outDim: i32,
  o0: i32,
  o1: i32,
  panel: usize,
): void {
  if (rows == 1) gemv(out, x, w, bias, inDim, o0, o1);
  else matmulRows(out, x, w, bias, rows, inDim, outDim, o0, o1, panel);
}

// Bytes of OB weight rows widened to f32, then the f32 matmul's panel.
// @ts-ignore: decorator
@inline
export function tileBytes(inDim: i32): i32 {
  return OB * inDim * 4 + panelBytes(inDim);
}
