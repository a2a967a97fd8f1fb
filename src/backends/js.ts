/**
 * The reference backend: every operation in plain TypeScript over
 * `Float32Array`s, written for clarity first. Accumulations run in float64 (JS
 * numbers) and are stored as float32. Every faster backend is tested against it.
 *
 * @module
 */

import {
  type AddArgs,
  type Backend,
  type ChooseArgs,
  type ConvArgs,
  convEachSequence,
  type CopyArgs,
  type CopyRowsArgs,
  type EmbedArgs,
  type GatedNormArgs,
  type LinearArgs,
  type LinearSplitArgs,
  type OptionalOp,
  type Recording,
  type RmsNormArgs,
  type RowIndex,
  type ScanArgs,
  scanEachSequence,
  type SsdArgs,
  stateRows,
} from "../backend.ts";
import type { HalfMatrix, QuantizedMatrix } from "../quant.ts";
import { PickScratch } from "../sampler.ts";
import { chooseOnHost, HostRecording } from "./host.ts";

/** A view of `length` floats of `buf` from `offset`. */
const view = (buf: Float32Array, offset: number, length: number) =>
  buf.subarray(offset, offset + length);

/** SiLU (swish): x * sigmoid(x). */
export function silu(x: number): number {
  return x / (1 + Math.exp(-x));
}

/** Softplus as PyTorch computes it: log(1 + e^x), and x itself above 20. */
export function softplus(x: number): number {
  return x > 20 ? x : Math.log1p(Math.exp(x));
}

/** Row r of a {@link RowIndex}, or r itself without one. */
function rowAt(index: RowIndex<Float32Array> | undefined, r: number): number {
  return index ? index.buf[index.offset + r] : r;
}

/** The plain TypeScript backend; its buffers are `Float32Array`s. */
export class JsBackend implements Backend<Float32Array> {
  readonly name: string = "js";
  readonly chunkTokens = 64;
  readonly idleChunkTokens = 64;
  readonly queued = false;
  readonly #scratch = new PickScratch();

  upload(data: Float32Array): Float32Array {
    return data;
  }

  hostBytes(_byteLength: number): undefined {
    return undefined;
  }

  /** The reference keeps float32: the model uploads the widened values. */
  uploadHalfMatrix(_matrix: HalfMatrix): null {
    return null;
  }

  /** The reference keeps float32: the model uploads the dequantized values. */
  uploadQuantizedMatrix(_matrix: QuantizedMatrix): null {
    return null;
  }

  zeros(length: number): Float32Array {
    return new Float32Array(length);
  }

  scratch(length: number): Float32Array {
    return this.zeros(length);
  }

  write(buf: Float32Array, data: Float32Array, offset = 0): void {
    buf.set(data, offset);
  }

  /** Operations here complete when they return: everything issued is submitted. */
  readSubmitted(buf: Float32Array, offset?: number, length?: number): Promise<Float32Array> {
    return this.read(buf, offset, length);
  }

  read(buf: Float32Array, offset = 0, length = buf.length - offset): Promise<Float32Array> {
    if (offset < 0 || length < 0 || offset + length > buf.length) {
      return Promise.reject(
        new RangeError(`Range [${offset}, ${offset + length}) outside a buffer of ${buf.length}`),
      );
    }
    return Promise.resolve(buf.slice(offset, offset + length));
  }

  copy({ dst, dstOffset = 0, src, srcOffset = 0, length }: CopyArgs<Float32Array>): void {
    dst.set(src.subarray(srcOffset, srcOffset + length), dstOffset);
  }

  release(_buf: Float32Array): void {
    // Garbage collected.
  }

  capture(ops: () => void): HostRecording {
    return new HostRecording(ops);
  }

  replay(recording: Recording): void {
    (recording as HostRecording).ops();
  }

  releaseRecording(_recording: Recording): void {}

  flush(): void {}

  dispose(): void {}

  embed({ out, table, ids, dim }: EmbedArgs<Float32Array>): void {
    for (let t = 0; t < ids.length; t++) {
      out.set(table.subarray(ids[t] * dim, (ids[t] + 1) * dim), t * dim);
    }
  }

  copyRows(args: CopyRowsArgs<Float32Array>): void {
    const { dst, src, width, count, srcRows, dstRows, dstOffset = 0, srcOffset = 0 } = args;
    const srcCount = Math.floor((src.length - srcOffset) / width);
    const dstCount = Math.floor((dst.length - dstOffset) / width);
    const inside = (row: number, rows: number) => Number.isInteger(row) && row >= 0 && row < rows;
    for (let r = 0; r < count; r++) {
      const from = rowAt(srcRows, r);
      const to = rowAt(dstRows, r);
      if (!inside(from, srcCount) || !inside(to, dstCount)) continue;
      const at = srcOffset + from * width;
      dst.set(src.subarray(at, at + width), dstOffset + to * width);
    }
  }

  chooseTokens(args: ChooseArgs<Float32Array>): void {
    const { logits, settings, randoms, history, slots, ids } = args;
    chooseOnHost(args, { logits, settings, randoms, history, slots, ids }, this.#scratch);
  }

  rmsNorm({ out, x, weight, rows, dim, eps }: RmsNormArgs<Float32Array>): void {
    for (let r = 0; r < rows; r++) {
      const row = r * dim;
      let sumSquares = 0;
      for (let i = 0; i < dim; i++) sumSquares += x[row + i] * x[row + i];
      const scale = 1 / Math.sqrt(sumSquares / dim + eps);
      for (let i = 0; i < dim; i++) out[row + i] = x[row + i] * scale * weight[i];
    }
  }

  linear(args: LinearArgs<Float32Array>): void {
    const { out, x, weight, bias, rows, inDim, outDim, accumulate = false } = args;
    for (let r = 0; r < rows; r++) {
      const xRow = r * inDim;
      for (let o = 0; o < outDim; o++) {
        const wRow = o * inDim;
        let sum = bias ? bias[o] : 0;
        for (let i = 0; i < inDim; i++) sum += x[xRow + i] * weight[wRow + i];
        if (accumulate) out[r * outDim + o] += sum;
        else out[r * outDim + o] = sum;
      }
    }
  }

  linearSplit({ outs, widths, x, weight, bias, rows, inDim }: LinearSplitArgs<Float32Array>): void {
    let first = 0;
    outs.forEach((out, i) => {
      const end = first + widths[i];
      this.linear({
        out,
        x,
        weight: weight.subarray(first * inDim, end * inDim),
        bias: bias?.subarray(first, end),
        rows,
        inDim,
        outDim: widths[i],
      });
      first = end;
    });
  }

  addInPlace({ acc, x, length }: AddArgs<Float32Array>): void {
    for (let i = 0; i < length; i++) acc[i] += x[i];
  }

  causalConv(args: ConvArgs<Float32Array>): void {
    const batch = args.batch ?? 1;
    if (batch > 1 || args.slots) {
      const kept = (args.kernel - 1) * args.channels;
      const rows = stateRows(args.slots, batch, kept > 0 ? args.state.length / kept : Infinity);
      return convEachSequence(args, view, rows, (one) => this.causalConv(one));
    }
    const { out, x, weight, bias, state, len, channels, kernel } = args;
    const history = kernel - 1;
    // Input at relative position p (p < 0 reaches into the carried state).
    const input = (p: number, c: number) =>
      p >= 0 ? x[p * channels + c] : state[(history + p) * channels + c];
    for (let t = 0; t < len; t++) {
      for (let c = 0; c < channels; c++) {
        let sum = bias ? bias[c] : 0;
        for (let k = 0; k < kernel; k++) {
          sum += weight[c * kernel + k] * input(t - history + k, c);
        }
        out[t * channels + c] = silu(sum);
      }
    }
    const next = new Float32Array(history * channels);
    for (let j = 0; j < history; j++) {
      for (let c = 0; c < channels; c++) next[j * channels + c] = input(len - history + j, c);
    }
    state.set(next);
  }

  selectiveScan(args: ScanArgs<Float32Array>): void {
    const batch = args.batch ?? 1;
    if (batch > 1 || args.slots) {
      const rows = stateRows(args.slots, batch, args.state.length / (args.dim * args.dState));
      return scanEachSequence(args, view, rows, (one) => this.selectiveScan(one));
    }
    const { y, u, delta, A, B, C, D, z, deltaBias, deltaSoftplus, state, len, dim, dState } = args;
    // The state stays float64 within a call, stored as float32 at its end: a
    // float32 state rounded at every token drifts from mamba_ssm's float64
    // reference by up to 3e-4 relative over 1024 tokens (the "long" fixture).
    const h = Float64Array.from(state.subarray(0, dim * dState));
    for (let t = 0; t < len; t++) {
      for (let d = 0; d < dim; d++) {
        const i = t * dim + d;
        let dt = delta[i] + (deltaBias ? deltaBias[d] : 0);
        if (deltaSoftplus) dt = softplus(dt);
        const dtu = dt * u[i];
        let out = 0;
        for (let n = 0; n < dState; n++) {
          const s = d * dState + n;
          h[s] = Math.exp(dt * A[s]) * h[s] + dtu * B[t * dState + n];
          out += h[s] * C[t * dState + n];
        }
        if (D) out += D[d] * u[i];
        if (z) out *= silu(z[i]);
        y[i] = out;
      }
    }
    state.set(h);
  }

  supports(op: OptionalOp): boolean {
    return op !== "channelMajorScan";
  }

  /**
   * The SSD scan as its recurrence, token by token (see {@link SsdArgs}); the
   * state stays float64 within a call, as in {@link selectiveScan}.
   */
  ssdScan(args: SsdArgs<Float32Array>): void {
    const { y, xBC, dt, dtBias, dtLimit, A, D, state, len, batch } = args;
    const { heads, headDim, groups, dState } = args;
    const dInner = heads * headDim;
    const width = dInner + 2 * groups * dState; // one token's x, B and C
    const headsPerGroup = heads / groups;
    const stateLength = dInner * dState;
    const rows = stateRows(args.slots, batch, state.length / stateLength);
    for (let b = 0; b < batch; b++) {
      const h = Float64Array.from(view(state, rows[b] * stateLength, stateLength));
      for (let t = b * len; t < (b + 1) * len; t++) {
        const x = t * width; // x[t, head, p] at x + head * headDim + p
        for (let head = 0; head < heads; head++) {
          const g = Math.floor(head / headsPerGroup);
          const B = x + dInner + g * dState; // B[t, g, n] at B + n
          const C = x + dInner + groups * dState + g * dState;
          const delta = Math.min(
            Math.max(softplus(dt[t * heads + head] + dtBias[head]), dtLimit[0]),
            dtLimit[1],
          );
          const decay = Math.exp(delta * A[head]);
          for (let p = 0; p < headDim; p++) {
            const xp = xBC[x + head * headDim + p];
            const row = (head * headDim + p) * dState;
            let out = 0;
            for (let n = 0; n < dState; n++) {
              h[row + n] = decay * h[row + n] + delta * xp * xBC[B + n];
              out += h[row + n] * xBC[C + n];
            }
            if (D) out += D[head] * xp;
            y[t * dInner + head * headDim + p] = out;
          }
        }
      }
      state.set(h, rows[b] * stateLength);
    }
  }

  gatedRmsNorm(args: GatedNormArgs<Float32Array>): void {
    const { out, x, gate, weight, rows, dim, groupSize, eps } = args;
    const gated = new Float64Array(groupSize);
    for (let start = 0; start < rows * dim; start += groupSize) {
      let sumSquares = 0;
      for (let i = 0; i < groupSize; i++) {
        gated[i] = x[start + i] * silu(gate[start + i]);
        sumSquares += gated[i] * gated[i];
      }
      const scale = 1 / Math.sqrt(sumSquares / groupSize + eps);
      const channel = start % dim;
      for (let i = 0; i < groupSize; i++) {
        out[start + i] = gated[i] * scale * weight[channel + i];
      }
    }
  }
}
