/**
 * The compiled kernels (asm/kernels/, embedded by `deno task build`): which
 * build a runtime can run, the module of each build, and the functions it
 * exports.
 *
 * @module
 */

import {
  KERNELS_PLAIN_SHARED_BASE64,
  KERNELS_PLAIN_SINGLE_BASE64,
  KERNELS_RELAXED_SHARED_BASE64,
  KERNELS_RELAXED_SINGLE_BASE64,
} from "../../generated/kernels_wasm.ts";

/**
 * The two builds of the same kernels: "relaxed" uses relaxed SIMD (fused
 * multiply-adds, whose last bit may differ between CPUs, and the Q8_0 GEMV's
 * int8 dot products); "plain" only fixed-width SIMD, multiplying and adding
 * separately, for runtimes that validate SIMD but not relaxed SIMD.
 */
export type WasmSimd = "relaxed" | "plain";

/** What the kernel module exports (asm/kernels.ts): pointers are byte offsets into its memory. */
export interface Kernels {
  scan(
    y: number,
    u: number,
    delta: number,
    A: number,
    B: number,
    C: number,
    D: number,
    z: number,
    bias: number,
    softplus: number,
    state: number,
    len: number,
    dim: number,
    dState: number,
    tokenStride: number,
    channelStride: number,
    d0: number,
    d1: number,
    scratch: number,
  ): void;
  scanScratchBytes(dState: number): number;
  scanStep(
    y: number,
    u: number,
    delta: number,
    A: number,
    B: number,
    C: number,
    D: number,
    z: number,
    bias: number,
    softplus: number,
    state: number,
    slots: number,
    batch: number,
    dim: number,
    dState: number,
    i0: number,
    i1: number,
  ): void;
  linear(
    out: number,
    x: number,
    w: number,
    bias: number,
    rows: number,
    inDim: number,
    outDim: number,
    o0: number,
    o1: number,
    panel: number,
  ): void;
  /** Bytes of the matmul's per-thread panel for rows of inDim. */
  panelBytes(inDim: number): number;
  /** Bytes of the conv's per-thread scratch for a kernel of `kernel` taps. */
  convScratchBytes(kernel: number): number;
  convStepScratchBytes(channels: number, kernel: number): number;
  rmsNorm(out: number, x: number, weight: number, rows: number, dim: number, eps: number): void;
  addInPlace(acc: number, x: number, n: number): void;
  convStep(
    out: number,
    x: number,
    weight: number,
    bias: number,
    states: number,
    slots: number,
    batch: number,
    channels: number,
    kernel: number,
    scratch: number,
  ): void;
  causalConv(
    out: number,
    x: number,
    weight: number,
    bias: number,
    state: number,
    len: number,
    channels: number,
    kernel: number,
    scratch: number,
    c0: number,
    c1: number,
  ): void;
  ssd(
    y: number,
    xBC: number,
    dt: number,
    dtBias: number,
    A: number,
    D: number,
    state: number,
    slots: number,
    len: number,
    heads: number,
    headDim: number,
    groups: number,
    dState: number,
    chunk: number,
    dtMin: number,
    dtMax: number,
    u0: number,
    u1: number,
    scratch: number,
  ): void;
  ssdScratchBytes(chunk: number, headDim: number): number;
  ssdStep(
    y: number,
    xBC: number,
    dt: number,
    dtBias: number,
    A: number,
    D: number,
    state: number,
    slots: number,
    heads: number,
    headDim: number,
    groups: number,
    dState: number,
    dtMin: number,
    dtMax: number,
    u0: number,
    u1: number,
  ): void;
  gatedRmsNorm(
    out: number,
    x: number,
    gate: number,
    weight: number,
    dim: number,
    groupSize: number,
    eps: number,
    r0: number,
    r1: number,
  ): void;
  linearBlocks(
    out: number,
    x: number,
    w: number,
    bias: number,
    rows: number,
    inDim: number,
    outDim: number,
    o0: number,
    o1: number,
    scratch: number,
    blockType: number,
  ): void;
  blocksScratchBytes(rows: number, inDim: number): number;
  linearHalf(
    out: number,
    x: number,
    w: number,
    bias: number,
    rows: number,
    inDim: number,
    outDim: number,
    o0: number,
    o1: number,
    scratch: number,
    bf16: number,
  ): void;
  halfScratchBytes(inDim: number): number;
  threadStride(bytes: number): number;
  widenHalfRow(out: number, src: number, n: number, bf16: number): void;
  runJob(ctrl: number, part: number, parts: number): void;
  mathTest(out: number, x: number, n: number, which: number): void;
  mathTest64(out: number, x: number, n: number, which: number): void;
  heapBase(): number;
}

/**
 * A module of one function `() -> v128` whose body, without locals, is
 * `code`: a probe for {@link WebAssembly.validate}.
 */
function probeModule(code: number[]): Uint8Array<ArrayBuffer> {
  const body = [0x00, ...code, 0x0b]; // no locals, the code, end
  // deno-fmt-ignore
  return new Uint8Array([
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // "\0asm", version 1
    0x01, 0x05, 0x01, 0x60, 0x00, 0x01, 0x7b, // types: () -> v128
    0x03, 0x02, 0x01, 0x00, // functions: one, of type 0
    0x0a, body.length + 2, 0x01, body.length, ...body, // code: one body
  ]);
}

/** i32.const 0, i8x16.splat: a zero v128 on the stack. */
const ZERO_V128 = [0x41, 0x00, 0xfd, 0x0f];

/** Validates only where WebAssembly SIMD is supported: i8x16.popcnt of a zero vector. */
const SIMD_PROBE = probeModule([...ZERO_V128, 0xfd, 0x62]);

/**
 * Validates only where relaxed SIMD is supported too: the two relaxed
 * instructions the kernels use, f32x4.relaxed_madd(0, 0,
 * i32x4.relaxed_dot_i8x16_i7x16_add_s(0, 0, 0)).
 */
const RELAXED_SIMD_PROBE = probeModule([
  ...ZERO_V128,
  ...ZERO_V128,
  ...ZERO_V128,
  ...ZERO_V128,
  ...ZERO_V128,
  ...[0xfd, 0x93, 0x02], // i32x4.relaxed_dot_i8x16_i7x16_add_s (0x113)
  ...[0xfd, 0x85, 0x02], // f32x4.relaxed_madd (0x105)
]);

function validates(probe: Uint8Array<ArrayBuffer>): boolean {
  try {
    return typeof WebAssembly === "object" && WebAssembly.validate(probe);
  } catch {
    return false;
  }
}

/** Whether this runtime supports WebAssembly SIMD (fixed-width, 128-bit). */
export function wasmSimdSupported(): boolean {
  return validates(SIMD_PROBE);
}

/**
 * Whether this runtime supports WebAssembly relaxed SIMD as well, so that the
 * wasm backend runs its relaxed-SIMD build (see {@link WasmSimd}).
 */
export function wasmRelaxedSimdSupported(): boolean {
  return validates(RELAXED_SIMD_PROBE);
}

function decodeBase64(text: string): Uint8Array<ArrayBuffer> {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

/** The generated modules, base64, by SIMD build and by memory. */
const KERNELS: Record<WasmSimd, { shared: string; single: string }> = {
  relaxed: { shared: KERNELS_RELAXED_SHARED_BASE64, single: KERNELS_RELAXED_SINGLE_BASE64 },
  plain: { shared: KERNELS_PLAIN_SHARED_BASE64, single: KERNELS_PLAIN_SINGLE_BASE64 },
};

let compiled = new Map<string, Promise<WebAssembly.Module>>();

/** The module of a build, compiled once per process (a failed compile is retried). */
export function kernelModule(simd: WasmSimd, shared: boolean): Promise<WebAssembly.Module> {
  const memory = shared ? "shared" : "single";
  const key = `${simd} ${memory}`;
  let module = compiled.get(key);
  if (!module) {
    module = WebAssembly.compile(decodeBase64(KERNELS[simd][memory])).catch((error) => {
      compiled = new Map();
      throw error;
    });
    compiled.set(key, module);
  }
  return module;
}
