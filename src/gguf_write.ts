/**
 * Writes GGUF files (version 3) and quantizes float32 rows into ggml's
 * block formats: Q8_0 and Q4_0 as ggml's reference quantizers do
 * (`quantize_row_q8_0_ref`, `quantize_row_q4_0_ref`), Q4_K written after
 * `quantize_row_q4_K_ref` (its search for each sub-block's scale and min),
 * and F16.
 *
 * @module
 */

import { GGML, GGML_TYPES, typeName } from "./gguf.ts";
import { f32ToBf16, f32ToF16 } from "./safetensors.ts";

/** A metadata value with its GGUF type. */
export type GgufEntry =
  | { type: "u32"; value: number }
  | { type: "f32"; value: number }
  | { type: "bool"; value: boolean }
  | { type: "string"; value: string }
  | { type: "string[]"; value: readonly string[] }
  | { type: "i32[]"; value: readonly number[] };

/** A tensor to write: its name, dimensions outermost first, ggml type and encoded bytes. */
export interface GgufTensorData {
  /** The tensor's name. */
  name: string;
  /** Dimensions, outermost first (written innermost first, as GGUF wants). */
  shape: readonly number[];
  /** The ggml type number. */
  type: number;
  /** The encoded values ({@link quantize}'s output). */
  data: Uint8Array;
}

const ALIGNMENT = 32;

/** A whole GGUF file: metadata in order, then tensors, each aligned to 32 bytes. */
export function writeGguf(
  metadata: ReadonlyMap<string, GgufEntry>,
  tensors: readonly GgufTensorData[],
): Uint8Array {
  const head = new ByteWriter();
  head.bytes(new TextEncoder().encode("GGUF"));
  head.u32(3);
  head.u64(tensors.length);
  head.u64(metadata.size);
  for (const [key, entry] of metadata) {
    head.string(key);
    switch (entry.type) {
      case "u32":
        head.u32(4), head.u32(entry.value);
        break;
      case "f32":
        head.u32(6), head.f32(entry.value);
        break;
      case "bool":
        head.u32(7), head.u8(entry.value ? 1 : 0);
        break;
      case "string":
        head.u32(8), head.string(entry.value);
        break;
      case "string[]":
        head.u32(9), head.u32(8), head.u64(entry.value.length);
        for (const item of entry.value) head.string(item);
        break;
      case "i32[]":
        head.u32(9), head.u32(5), head.u64(entry.value.length);
        for (const item of entry.value) head.i32(item);
        break;
    }
  }
  let offset = 0;
  const offsets: number[] = [];
  for (const tensor of tensors) {
    const { blockSize, typeSize } = GGML_TYPES.get(tensor.type)!;
    const elements = tensor.shape.reduce((a, b) => a * b, 1);
    if (tensor.data.length !== elements / blockSize * typeSize) {
      throw new RangeError(
        `Tensor "${tensor.name}" of ${elements} ${
          typeName(tensor.type)
        } values has ${tensor.data.length} bytes`,
      );
    }
    head.string(tensor.name);
    head.u32(tensor.shape.length);
    for (const d of tensor.shape.toReversed()) head.u64(d);
    head.u32(tensor.type);
    head.u64(offset);
    offsets.push(offset);
    offset = align(offset + tensor.data.length);
  }
  const dataStart = align(head.length);
  const out = new Uint8Array(dataStart + offset);
  out.set(head.result());
  tensors.forEach((tensor, i) => out.set(tensor.data, dataStart + offsets[i]));
  return out;
}

function align(n: number): number {
  return Math.ceil(n / ALIGNMENT) * ALIGNMENT;
}

class ByteWriter {
  #buffer = new Uint8Array(1 << 16);
  #view = new DataView(this.#buffer.buffer);
  length = 0;

  #grow(count: number): number {
    if (this.length + count > this.#buffer.length) {
      const grown = new Uint8Array(Math.max(this.#buffer.length * 2, this.length + count));
      grown.set(this.#buffer);
      this.#buffer = grown;
      this.#view = new DataView(grown.buffer);
    }
    const at = this.length;
    this.length += count;
    return at;
  }
  // Each grows first: `this.#view.set…(this.#grow(n), …)` would read the
  // view before a growth replaces it, and write past the old buffer.
  u8(v: number) {
    const at = this.#grow(1);
    this.#view.setUint8(at, v);
  }
  u32(v: number) {
    const at = this.#grow(4);
    this.#view.setUint32(at, v, true);
  }
  i32(v: number) {
    const at = this.#grow(4);
    this.#view.setInt32(at, v, true);
  }
  f32(v: number) {
    const at = this.#grow(4);
    this.#view.setFloat32(at, v, true);
  }
  u64(v: number) {
    const at = this.#grow(8);
    this.#view.setBigUint64(at, BigInt(v), true);
  }
  bytes(b: Uint8Array) {
    const at = this.#grow(b.length);
    this.#buffer.set(b, at);
  }
  string(s: string) {
    const b = new TextEncoder().encode(s);
    this.u64(b.length);
    this.bytes(b);
  }
  result(): Uint8Array {
    return this.#buffer.subarray(0, this.length);
  }
}

/** The types {@link quantize} writes. */
export const QUANTIZED_TYPES = {
  f32: GGML.F32,
  f16: GGML.F16,
  bf16: GGML.BF16,
  q8_0: GGML.Q8_0,
  q4_0: GGML.Q4_0,
  q4_k: GGML.Q4_K,
} as const;

/**
 * `values` (whole rows, a multiple of the type's block) encoded as ggml
 * type `type` (F32, F16, BF16, Q8_0, Q4_0 or Q4_K).
 */
export function quantize(type: number, values: Float32Array): Uint8Array {
  const ggmlType = GGML_TYPES.get(type);
  if (!ggmlType || values.length % ggmlType.blockSize !== 0) {
    throw new RangeError(`Cannot write ${values.length} values as ${typeName(type)}`);
  }
  const out = new Uint8Array(values.length / ggmlType.blockSize * ggmlType.typeSize);
  const view = new DataView(out.buffer);
  switch (type) {
    case GGML.F32:
      new Float32Array(out.buffer).set(values);
      break;
    case GGML.F16:
      values.forEach((v, i) => view.setUint16(2 * i, f32ToF16(v), true));
      break;
    case GGML.BF16:
      values.forEach((v, i) => view.setUint16(2 * i, f32ToBf16(v), true));
      break;
    case GGML.Q8_0:
      quantizeQ8_0(values, view);
      break;
    case GGML.Q4_0:
      quantizeQ4_0(values, out, view);
      break;
    case GGML.Q4_K:
      quantizeQ4_K(values, out, view);
      break;
    default:
      throw new RangeError(`Cannot write ${typeName(type)}`);
  }
  return out;
}

const f = Math.fround;

/** C's roundf: halves away from zero. */
function roundHalfAway(x: number): number {
  return Math.sign(x) * Math.floor(Math.abs(x) + 0.5);
}

/** f16 bits of `x` and the f32 value they hold. */
function toHalf(x: number): { bits: number; value: number } {
  const bits = f32ToF16(x);
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >> 10) & 0x1f;
  const mantissa = bits & 0x3ff;
  const value = exponent === 0
    ? sign * mantissa * 2 ** -24
    : sign * (1 + mantissa / 1024) * 2 ** (exponent - 15);
  return { bits, value };
}

/** ggml's quantize_row_q8_0_ref: d = max|x| / 127, q = round(x / d). */
function quantizeQ8_0(values: Float32Array, view: DataView): void {
  for (let block = 0; block < values.length / 32; block++) {
    const x = values.subarray(block * 32, block * 32 + 32);
    let amax = 0;
    for (const v of x) amax = Math.max(amax, Math.abs(v));
    const d = f(amax / 127);
    const id = d ? f(1 / d) : 0;
    const at = block * 34;
    view.setUint16(at, toHalf(d).bits, true);
    for (let j = 0; j < 32; j++) view.setInt8(at + 2 + j, roundHalfAway(f(x[j] * id)));
  }
}

/** ggml's quantize_row_q4_0_ref: d = (the value largest in magnitude) / -8, q = trunc(x / d + 8.5) up to 15. */
function quantizeQ4_0(values: Float32Array, out: Uint8Array, view: DataView): void {
  for (let block = 0; block < values.length / 32; block++) {
    const x = values.subarray(block * 32, block * 32 + 32);
    let amax = 0;
    let max = 0;
    for (const v of x) {
      if (amax < Math.abs(v)) (amax = Math.abs(v), max = v);
    }
    const d = f(max / -8);
    const id = d ? f(1 / d) : 0;
    const at = block * 18;
    view.setUint16(at, toHalf(d).bits, true);
    for (let j = 0; j < 16; j++) {
      const low = Math.min(15, Math.trunc(f(f(x[j] * id) + 8.5)));
      const high = Math.min(15, Math.trunc(f(f(x[j + 16] * id) + 8.5)));
      out[at + 2 + j] = low | (high << 4);
    }
  }
}

/**
 * C's nearest_int as ggml uses it: round half to even, as the float magic
 * number trick does.
 */
function nearestInt(x: number): number {
  const floor = Math.floor(x);
  const fraction = x - floor;
  if (fraction !== 0.5) return Math.round(x);
  return floor % 2 === 0 ? floor : floor + 1;
}

/**
 * ggml's make_qkx2_quants: the scale and min of 32 values in 15 steps that
 * minimise the weighted squared error, searching 21 step counts around the
 * plain min/max fit, each refined by least squares. Writes the levels to
 * `levels`; returns the scale and the (non-negative) min subtracted.
 */
function fitScaleMin(
  x: Float32Array,
  weights: Float64Array,
  levels: Uint8Array,
): { scale: number; min: number } {
  const candidate = new Uint8Array(x.length);
  let low = x[0], high = x[0], sumW = 0, sumX = 0;
  for (let i = 0; i < x.length; i++) {
    low = Math.min(low, x[i]);
    high = Math.max(high, x[i]);
    sumW += weights[i];
    sumX += weights[i] * x[i];
  }
  if (low > 0) low = 0;
  if (high === low) {
    levels.fill(0);
    return { scale: 0, min: -low };
  }
  let iscale = 15 / (high - low);
  let scale = 1 / iscale;
  let best = 0;
  for (let i = 0; i < x.length; i++) {
    levels[i] = Math.max(0, Math.min(15, nearestInt(iscale * (x[i] - low))));
    const diff = scale * levels[i] + low - x[i];
    best += weights[i] * diff * diff;
  }
  for (let step = 0; step <= 20; step++) {
    iscale = (-1 + 0.1 * step + 15) / (high - low);
    let sumL = 0, sumL2 = 0, sumXL = 0;
    for (let i = 0; i < x.length; i++) {
      const l = Math.max(0, Math.min(15, nearestInt(iscale * (x[i] - low))));
      candidate[i] = l;
      sumL += weights[i] * l;
      sumL2 += weights[i] * l * l;
      sumXL += weights[i] * l * x[i];
    }
    const det = sumW * sumL2 - sumL * sumL;
    if (det <= 0) continue;
    let thisScale = (sumW * sumXL - sumX * sumL) / det;
    let thisMin = (sumL2 * sumX - sumL * sumXL) / det;
    if (thisMin > 0) (thisMin = 0, thisScale = sumXL / sumL2);
    let error = 0;
    for (let i = 0; i < x.length; i++) {
      const diff = thisScale * candidate[i] + thisMin - x[i];
      error += weights[i] * diff * diff;
    }
    if (error < best) {
      levels.set(candidate);
      best = error;
      scale = thisScale;
      low = thisMin;
    }
  }
  return { scale, min: -low };
}

/**
 * Q4_K as ggml's quantize_row_q4_K_ref does it: each sub-block of 32 fitted
 * by {@link fitScaleMin} with weights |x| + rms(x), the 8 scales and mins in
 * 6 bits against the super-block's f16 d and dmin, then each value to the
 * nearest of the 16 levels those give.
 */
function quantizeQ4_K(values: Float32Array, out: Uint8Array, view: DataView): void {
  const scales = new Float64Array(8);
  const mins = new Float64Array(8);
  const scaleCodes = new Uint8Array(8);
  const minCodes = new Uint8Array(8);
  const weights = new Float64Array(32);
  const levels = new Uint8Array(32);
  for (let block = 0; block < values.length / 256; block++) {
    const x = values.subarray(block * 256, block * 256 + 256);
    for (let sub = 0; sub < 8; sub++) {
      const part = x.subarray(sub * 32, sub * 32 + 32);
      let squares = 0;
      for (const v of part) squares += v * v;
      const rms = Math.sqrt(squares / 32);
      part.forEach((v, l) => weights[l] = rms + Math.abs(v));
      ({ scale: scales[sub], min: mins[sub] } = fitScaleMin(part, weights, levels));
    }
    const maxScale = Math.max(...scales);
    const maxMin = Math.max(...mins);
    const inverseScale = maxScale > 0 ? 63 / maxScale : 0;
    const inverseMin = maxMin > 0 ? 63 / maxMin : 0;
    for (let sub = 0; sub < 8; sub++) {
      scaleCodes[sub] = Math.min(63, nearestInt(inverseScale * scales[sub]));
      minCodes[sub] = Math.min(63, nearestInt(inverseMin * mins[sub]));
    }
    const d = toHalf(maxScale / 63);
    const dmin = toHalf(maxMin / 63);
    const at = block * 144;
    view.setUint16(at, d.bits, true);
    view.setUint16(at + 2, dmin.bits, true);
    for (let j = 0; j < 4; j++) {
      out[at + 4 + j] = scaleCodes[j] | ((scaleCodes[j + 4] >> 4) << 6);
      out[at + 4 + j + 4] = minCodes[j] | ((minCodes[j + 4] >> 4) << 6);
      out[at + 4 + j + 8] = (scaleCodes[j + 4] & 0x0f) | ((minCodes[j + 4] & 0x0f) << 4);
    }
    for (let sub = 0; sub < 8; sub++) {
      // The levels of the scale and min as stored, as the dequantizer computes them.
      const step = f(d.value * scaleCodes[sub]);
      if (step === 0) continue;
      const offset = f(dmin.value * minCodes[sub]);
      const chunk = at + 16 + (sub >> 1) * 32;
      const shift = (sub & 1) * 4;
      for (let l = 0; l < 32; l++) {
        const q = Math.max(0, Math.min(15, nearestInt(f(f(x[sub * 32 + l] + offset) / step))));
        out[chunk + l] |= q << shift;
      }
    }
  }
}
