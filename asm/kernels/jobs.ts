// The jobs the worker threads run: each splits one kernel call between the
// threads.
// asm/kernels.ts says what every kernel assumes.

import { scan, scanScratchBytes, scanStep } from "./scan";
import {
  OB, PANEL_COLS, PANEL_ROWS, SMALL_BATCH, gemv, matmul, panelBytes,
  smallMatmul,
} from "./linear";
import { blocksScratchBytes, linearBlocks } from "./blocks";
import { halfScratchBytes, linearHalf } from "./half";
import { causalConv, convScratchBytes } from "./norm_conv";
import { gatedRmsNorm, ssd, ssdScratchBytes, ssdStep } from "./mamba2";

// A job for the worker threads, written by src/backends/wasm.ts into a control
// block of i32 words at `ctrl`: [0] generation, [1] done count, [2] op,
// [3..] arguments. Each of `parts` threads runs part `part`.
const OP_LINEAR = 1;
const OP_SCAN = 2;
const OP_SCAN_STEP = 3;
const OP_SSD = 4;
const OP_SSD_STEP = 5;
const OP_GATED_NORM = 6;
const OP_LINEAR_BLOCKS = 7;
const OP_LINEAR_HALF = 8;
const OP_CONV = 9;

// @ts-ignore: decorator
@inline
function arg(ctrl: usize, i: i32): i32 {
  return load<i32>(ctrl + (<usize> (3 + i) << 2));
}

// Threads' pieces of a per-thread scratch buffer start threadStride(bytes)
// apart: the bytes each needs, rounded up to 64 KiB. Laid back to back, one
// thread's last lines next to the next one's first, the two-thread prefill
// scan ran slower (docs/performance.md).
export function threadStride(bytes: i32): i32 {
  return (bytes + 0xffff) & ~0xffff;
}

// The address of thread `part`'s piece of the scratch buffer at `base`.
// @ts-ignore: decorator
@inline
function partScratch(base: i32, part: i32, bytes: i32): i32 {
  return base + part * threadStride(bytes);
}

// The range of part `part` of `parts` over [0, n), in multiples of `align`.
// @ts-ignore: decorator
@inline
function splitStart(n: i32, part: i32, parts: i32, align: i32): i32 {
  const units = (n + align - 1) / align;
  return min(n, <i32> ((<i64> units * part) / parts) * align);
}

// Part `part` of the f32 matmul of OP_LINEAR (arguments out, x, w, bias,
// rows, inDim, outDim, panel scratch of panelBytes per thread). The work is
// split into units of one panel over a slice of the rows, panel by panel, so
// that each thread packs each of its panels once; rows are sliced only as
// much as it takes to give every thread about four units (x_proj's 80
// columns are ten panels: on 16 threads each would else get one or none).
function linearPart(ctrl: usize, rows: i32, outDim: i32, part: i32, parts: i32): void {
  const inDim = arg(ctrl, 5);
  const panels = (outDim + PANEL_COLS - 1) / PANEL_COLS;
  const tiles = (rows + PANEL_ROWS - 1) / PANEL_ROWS;
  const slices = max(1, min(tiles, (4 * parts + panels - 1) / panels));
  const u0 = splitStart(panels * slices, part, parts, 1);
  const u1 = splitStart(panels * slices, part + 1, parts, 1);
  const panel = <usize> partScratch(arg(ctrl, 7), part, panelBytes(inDim));
  for (let u = u0; u < u1;) {
    const p = u / slices;
    const end = min(u1, (p + 1) * slices);
    const s0 = u - p * slices;
    const s1 = end - p * slices;
    matmul(
      arg(ctrl, 0),
      arg(ctrl, 1),
      arg(ctrl, 2),
      arg(ctrl, 3),
      inDim,
      outDim,
      p * PANEL_COLS,
      min(outDim, (p + 1) * PANEL_COLS),
      min(rows, splitStart(tiles, s0, slices, 1) * PANEL_ROWS),
      min(rows, splitStart(tiles, s1, slices, 1) * PANEL_ROWS),
      panel,
    );
    u = end;
  }
}

export function runJob(ctrl: usize, part: i32, parts: i32): void {
  const op = load<i32>(ctrl, 8);
  if (op == OP_LINEAR) {
    const rows = arg(ctrl, 4);
    const outDim = arg(ctrl, 6);
    if (rows == 1) {
      gemv(
        arg(ctrl, 0),
        arg(ctrl, 1),
        arg(ctrl, 2),
        arg(ctrl, 3),
        arg(ctrl, 5),
        splitStart(outDim, part, parts, 4),
        splitStart(outDim, part + 1, parts, 4),
      );
    } else if (rows <= SMALL_BATCH) {
      smallMatmul(
        arg(ctrl, 0),
        arg(ctrl, 1),
        arg(ctrl, 2),
        arg(ctrl, 3),
        rows,
        arg(ctrl, 5),
        outDim,
        splitStart(outDim, part, parts, 4),
        splitStart(outDim, part + 1, parts, 4),
      );
    } else {
      linearPart(ctrl, rows, outDim, part, parts);
    }
  } else if (op == OP_LINEAR_BLOCKS) {
    const outDim = arg(ctrl, 6);
    const align = arg(ctrl, 4) > 1 ? OB : 4;
    linearBlocks(
      arg(ctrl, 0),
      arg(ctrl, 1),
      arg(ctrl, 2),
      arg(ctrl, 3),
      arg(ctrl, 4),
      arg(ctrl, 5),
      outDim,
      splitStart(outDim, part, parts, align),
      splitStart(outDim, part + 1, parts, align),
      partScratch(arg(ctrl, 7), part, blocksScratchBytes(arg(ctrl, 4), arg(ctrl, 5))),
      arg(ctrl, 8),
    );
  } else if (op == OP_LINEAR_HALF) {
    const outDim = arg(ctrl, 6);
    const align = arg(ctrl, 4) > 1 ? OB : 4;
    linearHalf(
      arg(ctrl, 0),
      arg(ctrl, 1),
      arg(ctrl, 2),
      arg(ctrl, 3),
      arg(ctrl, 4),
      arg(ctrl, 5),
      outDim,
      splitStart(outDim, part, parts, align),
      splitStart(outDim, part + 1, parts, align),
      partScratch(arg(ctrl, 7), part, halfScratchBytes(arg(ctrl, 5))),
      arg(ctrl, 8),
    );
  } else if (op == OP_CONV) {
    const channels = arg(ctrl, 6);
    const kernel = arg(ctrl, 7);
    causalConv(
      arg(ctrl, 0),
      arg(ctrl, 1),
      arg(ctrl, 2),
      arg(ctrl, 3),
      arg(ctrl, 4),
      arg(ctrl, 5),
      channels,
      kernel,
      partScratch(arg(ctrl, 8), part, convScratchBytes(kernel)),
      splitStart(channels, part, parts, 16),
      splitStart(channels, part + 1, parts, 16),
    );
  } else if (op == OP_SCAN) {
    const dim = arg(ctrl, 12);
    scan(
      arg(ctrl, 0),
      arg(ctrl, 1),
      arg(ctrl, 2),
      arg(ctrl, 3),
      arg(ctrl, 4),
      arg(ctrl, 5),
      arg(ctrl, 6),
      arg(ctrl, 7),
      arg(ctrl, 8),
      arg(ctrl, 9),
      arg(ctrl, 10),
      arg(ctrl, 11),
      dim,
      arg(ctrl, 13),
      arg(ctrl, 14),
      arg(ctrl, 15),
      splitStart(dim, part, parts, 4),
      splitStart(dim, part + 1, parts, 4),
      partScratch(arg(ctrl, 16), part, scanScratchBytes(arg(ctrl, 13))),
    );
  } else if (op == OP_SCAN_STEP) {
    const units = arg(ctrl, 12) * arg(ctrl, 13);
    scanStep(
      arg(ctrl, 0),
      arg(ctrl, 1),
      arg(ctrl, 2),
      arg(ctrl, 3),
      arg(ctrl, 4),
      arg(ctrl, 5),
      arg(ctrl, 6),
      arg(ctrl, 7),
      arg(ctrl, 8),
      arg(ctrl, 9),
      arg(ctrl, 10),
      arg(ctrl, 11),
      arg(ctrl, 12),
      arg(ctrl, 13),
      arg(ctrl, 14),
      splitStart(units, part, parts, 4),
      splitStart(units, part + 1, parts, 4),
    );
  } else if (op == OP_SSD) {
    const units = arg(ctrl, 16);
    ssd(
      arg(ctrl, 0),
      arg(ctrl, 1),
      arg(ctrl, 2),
      arg(ctrl, 3),
      arg(ctrl, 4),
      arg(ctrl, 5),
      arg(ctrl, 6),
      arg(ctrl, 7),
      arg(ctrl, 8),
      arg(ctrl, 9),
      arg(ctrl, 10),
      arg(ctrl, 11),
      arg(ctrl, 12),
      arg(ctrl, 13),
      reinterpret<f32>(arg(ctrl, 14)),
      reinterpret<f32>(arg(ctrl, 15)),
      splitStart(units, part, parts, 1),
      splitStart(units, part + 1, parts, 1),
      partScratch(arg(ctrl, 17), part, ssdScratchBytes(arg(ctrl, 13), arg(ctrl, 10))),
    );
  } else if (op == OP_SSD_STEP) {
    const units = arg(ctrl, 14);
    ssdStep(
      arg(ctrl, 0),
      arg(ctrl, 1),
      arg(ctrl, 2),
      arg(ctrl, 3),
      arg(ctrl, 4),
      arg(ctrl, 5),
      arg(ctrl, 6),
      arg(ctrl, 7),
      arg(ctrl, 8),
      arg(ctrl, 9),
      arg(ctrl, 10),
      arg(ctrl, 11),
      reinterpret<f32>(arg(ctrl, 12)),
      reinterpret<f32>(arg(ctrl, 13)),
      splitStart(units, part, parts, 1),
      splitStart(units, part + 1, parts, 1),
    );
  } else if (op == OP_GATED_NORM) {
    const rows = arg(ctrl, 7);
    gatedRmsNorm(
      arg(ctrl, 0),
      arg(ctrl, 1),
      arg(ctrl, 2),
      arg(ctrl, 3),
      arg(ctrl, 4),
      arg(ctrl, 5),
      reinterpret<f32>(arg(ctrl, 6)),
      splitStart(rows, part, parts, 1),
      splitStart(rows, part + 1, parts, 1),
    );
  }
}

// The first byte past the module's own static data: the allocator starts here.
export function heapBase(): usize {
  return __heap_base;
}
