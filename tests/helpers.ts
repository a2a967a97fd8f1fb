/** Shared helpers of the test files. */

import { packHalves, SafetensorsFile } from "../src/safetensors.ts";
import type { MambaConfig } from "../src/config.ts";
import { GGML } from "../src/gguf.ts";
import { quantize } from "../src/gguf_write.ts";
import {
  type BlockType,
  type HalfFormat,
  type HalfMatrix,
  halfMatrix,
  type QuantizedMatrix,
  quantizedMatrix,
} from "../src/quant.ts";

/** What tempDir and tempFile made, still to remove after the module's tests. */
const temporaries: string[] = [];

// One hook removes what all of a module's tests made: Deno runs a top-level afterAll once per
// test module that imports this file, after that module's tests, so a test that fails before
// its own cleanup leaves nothing in /tmp either. Under `deno run` (the fuzz worker imports this file) Deno.test hooks are no-ops.
Deno.test.afterAll(async () => {
  const failures: unknown[] = [];
  for (const path of temporaries.splice(0)) {
    try {
      await Deno.remove(path, { recursive: true });
    } catch (error) {
      // A test may have removed its path itself.
      if (!(error instanceof Deno.errors.NotFound)) failures.push(error);
    }
  }
  if (failures.length > 0) throw new AggregateError(failures, "Cannot remove temporary paths");
});

/**
 * A new temporary directory, removed with all it holds after this module's tests. The prefix
 * names what a leftover belongs to, should one outlive a crashed run.
 */
export async function tempDir(prefix = "mamba-test-"): Promise<string> {
  const dir = await Deno.makeTempDir({ prefix });
  temporaries.push(dir);
  return dir;
}

/** A new, empty temporary file, removed after this module's tests. */
export async function tempFile(options: Deno.MakeTempOptions = {}): Promise<string> {
  const file = await Deno.makeTempFile({ prefix: "mamba-test-", ...options });
  temporaries.push(file);
  return file;
}

/** The shared reference data, next to the project checkout. */
export const SHARED = new URL("../../shared", import.meta.url).pathname;

/** One prompt of the tiny-shakespeare reference and its 48-token greedy continuation. */
export interface Sample {
  prompt: string;
  greedy_text: string;
}

/** The samples of `../shared/models/tiny-shakespeare/expected.json`. */
export async function readSamples(): Promise<Sample[]> {
  const path = `${SHARED}/models/tiny-shakespeare/expected.json`;
  return JSON.parse(await Deno.readTextFile(path)).samples;
}

/** Largest |a[i] - b[i]|; lengths must match. */
export function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new Error(`Length mismatch: ${a.length} vs ${b.length}`);
  let max = 0;
  for (let i = 0; i < a.length; i++) max = Math.max(max, Math.abs(a[i] - b[i]));
  return Number.isNaN(max) ? Infinity : max;
}

/**
 * Largest |a[i] - b[i]| / max(|b[i]|, 1e-3): relative error, with an absolute
 * floor so values near zero do not dominate.
 */
export function maxRelDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new Error(`Length mismatch: ${a.length} vs ${b.length}`);
  let max = 0;
  for (let i = 0; i < a.length; i++) {
    const diff = Math.abs(a[i] - b[i]) / Math.max(Math.abs(b[i]), 1e-3);
    if (!(diff <= max)) max = Number.isNaN(diff) ? Infinity : diff;
  }
  return max;
}

export const CLI = new URL("../src/cli.ts", import.meta.url).pathname;

/** Runs `deno task generate` with `args` as a user would; returns its exit code and output. */
export async function runCli(
  args: string[],
  env: Record<string, string> = {},
): Promise<{ code: number; stdout: string; stderr: string }> {
  const output = await new Deno.Command(Deno.execPath(), {
    args: ["run", "--allow-read", "--allow-write", "--allow-env", "--allow-net", CLI, ...args],
    stdout: "piped",
    stderr: "piped",
    env: { NO_COLOR: "1", ...env },
  }).output();
  const decoder = new TextDecoder();
  return {
    code: output.code,
    stdout: decoder.decode(output.stdout),
    stderr: decoder.decode(output.stderr),
  };
}

/**
 * Largest |Δlogit| of a model against a case of ../shared/fixtures/hf-oracle,
 * each of the case's prompts in a forward of its own.
 */
export async function oracleDiff(
  model: { forward(ids: Int32Array): Promise<Float32Array>; vocabSize: number },
  name: string,
): Promise<number> {
  const file = `${SHARED}/fixtures/hf-oracle/${name}/expected.safetensors`;
  const expected = SafetensorsFile.parse(await Deno.readFile(file), file);
  const [batch, len] = expected.info("input_ids").shape;
  const ids = expected.int32("input_ids");
  const logits = expected.float32("logits");
  const width = len * model.vocabSize;
  if (logits.length !== batch * width) throw new Error(`${file} holds other logits than expected`);
  let diff = 0;
  for (let b = 0; b < batch; b++) {
    const actual = await model.forward(ids.subarray(b * len, (b + 1) * len));
    diff = Math.max(diff, maxAbsDiff(actual, logits.subarray(b * width, (b + 1) * width)));
  }
  return diff;
}

/** `values` [·, cols], every one exact in `format`, as the 16-bit matrix an F16 or BF16 file gives. */
export function halfMatrixOf(values: Float32Array, format: HalfFormat, cols: number): HalfMatrix {
  const halves = packHalves(values, format);
  if (!halves) throw new Error(`The values are not all exact ${format}`);
  const rows = values.length / cols;
  return halfMatrix(format, rows, cols, halves.subarray(0, values.length), "test matrix");
}

/** `values` [rows, cols] quantized to `type` blocks by the GGUF writer. */
export function quantizedOf(
  type: BlockType,
  rows: number,
  cols: number,
  values: Float32Array,
): QuantizedMatrix {
  const ggml = { q8_0: GGML.Q8_0, q4_0: GGML.Q4_0, q4_k: GGML.Q4_K }[type];
  return quantizedMatrix(type, rows, cols, quantize(ggml, values), `a ${type} test matrix`);
}

/**
 * max |got - want| / (|want| + rms(want)): float32 sums against float64 ones
 * (js), measured against the size of what was summed where values cancel;
 * Infinity for a NaN.
 */
export function scaledError(got: Float32Array, want: Float32Array): number {
  if (got.length !== want.length) {
    throw new RangeError(`${got.length} values where ${want.length} were expected`);
  }
  const rms = Math.sqrt(want.reduce((s, v) => s + v * v, 0) / Math.max(1, want.length));
  let worst = 0;
  for (let i = 0; i < want.length; i++) {
    const diff = Math.abs(got[i] - want[i]) / (Math.abs(want[i]) + rms + 1e-30);
    if (!(diff <= worst)) worst = Number.isNaN(diff) ? Infinity : diff;
  }
  return worst;
}

/** Floats of a Mamba-1 model's vectors and small tensors (all but its matrices and embedding). */
export function otherFloats(config: MambaConfig): number {
  const { dModel, dInner, dState, dConv, nLayer, projBias, convBias } = config;
  const perLayer = dModel + dInner * dConv + (convBias ? dInner : 0) + dInner +
    dInner * dState + dInner + (projBias ? 2 * dInner + dModel : 0);
  return nLayer * perLayer + dModel;
}
