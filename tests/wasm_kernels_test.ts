/**
 * What the wasm backend alone does, against the JS reference: 16-bit and
 * quantized matrices with their gathers and both builds' dot products,
 * single- and multi-threaded, on both builds of the kernels (relaxed SIMD and
 * plain SIMD); which build runs where; worker threads; the accuracy of its
 * exp and softplus. The operations every backend shares are in the kernel
 * table of `ops_test.ts`.
 */

import { assert, assertEquals, assertRejects } from "@std/assert";
import { xorshiftUniforms } from "../bench/make_random_model.ts";
import type { Backend } from "../src/backend.ts";
import { JsBackend, silu, softplus } from "../src/backends/js.ts";
import {
  WasmBackend,
  type WasmBuffer,
  wasmRelaxedSimdSupported,
  type WasmSimd,
} from "../src/backends/wasm.ts";
import { BLOCK_ELEMENTS, quantizedMatrix } from "../src/quant.ts";
import { loadCheckpoint, loadModel } from "../src/load.ts";
import { MambaModel } from "../src/model.ts";
import { SafetensorsFile, writeSafetensors } from "../src/safetensors.ts";
import { maxAbsDiff, SHARED, tempDir } from "./helpers.ts";

/**
 * max |a - b| / max |b|: error relative to the output's scale, for sums whose
 * terms cancel (float32 against the reference's float64 accumulation).
 */
function maxScaledDiff(a: Float32Array, b: Float32Array): number {
  let scale = 1e-30;
  for (const v of b) scale = Math.max(scale, Math.abs(v));
  let max = 0;
  for (let i = 0; i < a.length; i++) {
    const diff = Math.abs(a[i] - b[i]);
    if (!(diff <= max)) max = Number.isNaN(diff) ? Infinity : diff;
  }
  return max / scale;
}

/**
 * `linear` (with and without a bias) and `linearSplit` over `w`, a wasm
 * buffer holding `weights` in some stored form, against the reference on
 * the float32 values, within 1e-5 (scaled); `name` labels the form.
 */
async function linearMatches(
  wasm: WasmBackend,
  w: WasmBuffer,
  weights: Float32Array,
  rows: number,
  inDim: number,
  outDim: number,
  rand: (n: number) => Float32Array,
  name: string,
): Promise<void> {
  const js = new JsBackend();
  for (const withBias of [false, true]) {
    const x = rand(rows * inDim);
    const bias = withBias ? rand(outDim) : null;
    const want = js.zeros(rows * outDim);
    js.linear({ out: want, x, weight: weights, bias, rows, inDim, outDim });
    const out = wasm.zeros(rows * outDim);
    wasm.linear({
      out,
      x: wasm.upload(x),
      weight: w,
      bias: bias && wasm.upload(bias),
      rows,
      inDim,
      outDim,
    });
    const diff = maxScaledDiff(await wasm.read(out), want);
    assert(diff <= 1e-5, `${name} linear ${rows}x${inDim}x${outDim} bias=${withBias}: ${diff}`);
  }
  if (outDim < 9) return;
  const widths = [outDim - 7, 4, 3];
  const x = rand(rows * inDim);
  const want = js.zeros(rows * outDim);
  js.linear({ out: want, x, weight: weights, rows, inDim, outDim });
  const outs = widths.map((width) => wasm.zeros(rows * width));
  wasm.linearSplit({ outs, widths, x: wasm.upload(x), weight: w, rows, inDim });
  let first = 0;
  for (const [i, width] of widths.entries()) {
    const part = new Float32Array(rows * width);
    for (let r = 0; r < rows; r++) {
      part.set(want.subarray(r * outDim + first, r * outDim + first + width), r * width);
    }
    const diff = maxScaledDiff(await wasm.read(outs[i]), part);
    assert(diff <= 1e-5, `${name} linearSplit ${rows}x${inDim}x${outDim} part ${i}: ${diff}`);
    first += width;
  }
}

Deno.test("[wasm] gguf-py's random blocks gather to its values bit for bit and multiply as them", async () => {
  // Random bytes (every scale and min bit pattern, scales of both signs) and what gguf-py's
  // reference dequantizer makes of them (tests/fixtures/gguf/make_quants.py).
  const fixture = SafetensorsFile.parse(
    await Deno.readFile(new URL("./fixtures/gguf/quants.safetensors", import.meta.url)),
    "quants.safetensors",
  );
  const rand = xorshiftUniforms(400);
  for (const threads of [1, 2]) {
    using wasm = await WasmBackend.create({ threads });
    for (const type of ["q8_0", "q4_0", "q4_k"] as const) {
      const info = fixture.info(`${type}.blocks`);
      const blocks = fixture.bytes.subarray(info.byteOffset, info.byteOffset + info.byteLength);
      const values = fixture.float32(`${type}.values`).slice();
      const cols = BLOCK_ELEMENTS[type];
      const rows = values.length / cols;
      const w = wasm.uploadQuantizedMatrix(quantizedMatrix(type, rows, cols, blocks, type));
      const ids = Int32Array.from({ length: rows }, (_, i) => rows - 1 - i);
      const embedded = wasm.zeros(rows * cols);
      wasm.embed({ out: embedded, table: w, ids, dim: cols });
      const want = new Float32Array(rows * cols);
      ids.forEach((id, t) => want.set(values.subarray(id * cols, (id + 1) * cols), t * cols));
      assertEquals(await wasm.read(embedded), want, `${threads} threads: ${type} embed`);
      for (const tokens of [1, 3]) {
        await linearMatches(wasm, w, values, tokens, cols, rows, rand, `gguf-py ${type}`);
      }
    }
  }
});

Deno.test("[wasm] exp, softplus and silu accuracy", async () => {
  using wasm = await WasmBackend.create({ threads: 1 });
  const count = 1 << 20;
  const x = new Float32Array(count);
  for (let i = 0; i < count; i++) x[i] = -87 + (175 * i) / count;
  const exp = wasm.mathTest(x, 0);
  let worst = 0;
  for (let i = 0; i < count; i++) {
    worst = Math.max(worst, Math.abs(exp[i] - Math.exp(x[i])) / Math.exp(x[i]));
  }
  // The documented bound of exp4 in asm/kernels/math.ts.
  assert(worst < 1.5e-7, `exp: max relative error ${worst}`);
  const y = new Float32Array(count);
  for (let i = 0; i < count; i++) y[i] = -30 + (60 * i) / count;
  const sp = wasm.mathTest(y, 1);
  const si = wasm.mathTest(y, 2);
  let worstSoftplus = 0;
  let worstSilu = 0;
  for (let i = 0; i < count; i++) {
    const want = softplus(y[i]);
    worstSoftplus = Math.max(worstSoftplus, Math.abs(sp[i] - want) / want);
    const wantSilu = silu(y[i]);
    worstSilu = Math.max(
      worstSilu,
      Math.abs(si[i] - wantSilu) / Math.max(Math.abs(wantSilu), 1e-30),
    );
  }
  assert(worstSoftplus < 1e-6, `softplus: max relative error ${worstSoftplus}`);
  assert(worstSilu < 1e-6, `silu: max relative error ${worstSilu}`);
  // The scan's f64 exp and softplus (documented bound of exp: 6.0e-11).
  const z = new Float64Array(count);
  for (let i = 0; i < count; i++) z[i] = -700 + (1400 * i) / count;
  const exp64 = wasm.mathTest64(z, 0);
  let worst64 = 0;
  for (let i = 0; i < count; i++) {
    worst64 = Math.max(worst64, Math.abs(exp64[i] - Math.exp(z[i])) / Math.exp(z[i]));
  }
  assert(worst64 < 1e-10, `f64 exp: max relative error ${worst64}`);
  const sp64 = wasm.mathTest64(Float64Array.from(y), 1);
  let worstSoftplus64 = 0;
  for (let i = 0; i < count; i++) {
    const want = softplus(y[i]);
    worstSoftplus64 = Math.max(worstSoftplus64, Math.abs(sp64[i] - want) / want);
  }
  assert(worstSoftplus64 < 2e-10, `f64 softplus: max relative error ${worstSoftplus64}`);
  console.log(
    `exp ${worst}, softplus ${worstSoftplus}, silu ${worstSilu}; ` +
      `f64 exp ${worst64}, f64 softplus ${worstSoftplus64}`,
  );
});

Deno.test("[wasm] auto picks wasm where SIMD runs; threads are validated", async () => {
  const { createBackend } = await import("../src/backends/registry.ts");
  const auto = await createBackend("auto", { threads: 1 });
  assert(auto.name === "wasm", `auto gave ${auto.name}`);
  auto.dispose?.();
  let error: unknown;
  try {
    await WasmBackend.create({ threads: 0 });
  } catch (e) {
    error = e;
  }
  assert(error instanceof RangeError, `threads: 0 gave ${error}`);
});

Deno.test("[wasm] the relaxed-SIMD build runs where relaxed SIMD validates, as in Deno's V8", async () => {
  assert(wasmRelaxedSimdSupported(), "Deno's V8 validates relaxed SIMD");
  using byDefault = await WasmBackend.create({ threads: 1 });
  assertEquals(byDefault.simd, "relaxed");
  using plain = await WasmBackend.create({ threads: 1, simd: "plain" });
  assertEquals(plain.simd, "plain");
  const { createBackend } = await import("../src/backends/registry.ts");
  const registered = await createBackend("wasm", { threads: 1 }) as unknown as WasmBackend;
  assertEquals(registered.simd, "relaxed");
  registered.dispose();
  await assertRejects(
    () => WasmBackend.create({ threads: 1, simd: "fast" as WasmSimd }),
    RangeError,
    'simd must be "relaxed" or "plain"',
  );
});

Deno.test("[wasm] tiny-shakespeare on the plain-SIMD build: logits within 1e-4 of js", async () => {
  const { config, weights } = await loadCheckpoint(`${SHARED}/models/tiny-shakespeare`);
  const expected = SafetensorsFile.parse(
    await Deno.readFile(`${SHARED}/models/tiny-shakespeare/expected.safetensors`),
    "expected",
  );
  const prompt = expected.int32("prompt0_greedy_ids");
  const logits = async (backend: Backend) => {
    const model = new MambaModel(backend, config, weights);
    const slot = model.pool.acquire();
    const got = await model.forward(slot, prompt);
    model.pool.release(slot);
    backend.dispose?.();
    return got;
  };
  const want = await logits(new JsBackend());
  for (const threads of [1, 2]) {
    const got = await logits(await WasmBackend.create({ threads, simd: "plain" }));
    const diff = maxAbsDiff(got, want);
    assert(diff <= 1e-4, `${threads} thread(s): max abs diff ${diff}`);
  }
});

Deno.test("[wasm] loadModel's simd option picks the build: the plain one meets the reference logits", async () => {
  const dir = `${SHARED}/models/tiny-shakespeare`;
  const expected = SafetensorsFile.parse(
    await Deno.readFile(`${dir}/expected.safetensors`),
    "expected",
  );
  const mamba = await loadModel(dir, { backend: "wasm", simd: "plain", threads: 2 });
  try {
    assertEquals((mamba.model.backend as WasmBackend).simd, "plain");
    const got = await mamba.forward(expected.int32("prompt0_greedy_ids"));
    const diff = maxAbsDiff(got, expected.float32("prompt0_logits"));
    assert(diff <= 1e-3, `max abs diff ${diff}`);
  } finally {
    mamba.dispose();
  }
});

/**
 * Whether a module's bytes hold a relaxed-SIMD instruction: the prefix 0xfd,
 * then an opcode in [0x100, 0x113] as LEB128 (a byte in [0x80, 0x93], then 2).
 */
function holdsRelaxedSimd(bytes: Uint8Array): boolean {
  for (let i = 0; i + 2 < bytes.length; i++) {
    if (bytes[i] === 0xfd && bytes[i + 1] >= 0x80 && bytes[i + 1] <= 0x93 && bytes[i + 2] === 2) {
      return true;
    }
  }
  return false;
}

Deno.test("[wasm] a runtime that validates SIMD but not relaxed SIMD gets the plain build by default", async () => {
  // Such a runtime (V8 before 11.4, Node 20) refuses any module with a relaxed instruction.
  const validate = WebAssembly.validate;
  WebAssembly.validate = (bytes) =>
    !holdsRelaxedSimd(
      ArrayBuffer.isView(bytes)
        ? new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength)
        : new Uint8Array(bytes),
    ) &&
    validate(bytes);
  try {
    assert(!wasmRelaxedSimdSupported(), "the stand-in refuses relaxed SIMD");
    const dir = `${SHARED}/models/tiny-shakespeare`;
    const expected = SafetensorsFile.parse(
      await Deno.readFile(`${dir}/expected.safetensors`),
      "expected",
    );
    for (const backend of ["wasm", "auto"] as const) {
      const mamba = await loadModel(dir, { backend, threads: 2, backendCache: null });
      try {
        if (backend === "wasm") {
          assertEquals((mamba.model.backend as WasmBackend).simd, "plain");
        } else {
          // Which backend wins is the machine's business (js on a busy one);
          // the wasm candidate measured must be the plain build, and run.
          const wasm = mamba.backendReport().candidates.find((c) => c.name === "wasm");
          assertEquals(wasm?.available, true, wasm?.reason);
          assertEquals(wasm?.device, "WebAssembly SIMD, 2 threads");
        }
        const got = await mamba.forward(expected.int32("prompt0_greedy_ids"));
        const diff = maxAbsDiff(got, expected.float32("prompt0_logits"));
        assert(diff <= 1e-3, `${backend}: max abs diff ${diff}`);
      } finally {
        mamba.dispose();
      }
    }
    await assertRejects(
      () => WasmBackend.create({ threads: 1, simd: "relaxed" }),
      Error,
      'simd: "relaxed" needs WebAssembly relaxed SIMD, which this runtime lacks',
    );
  } finally {
    WebAssembly.validate = validate;
  }
});

Deno.test("[wasm] undisposed worker threads do not keep the process alive", async () => {
  const module = new URL("../src/backends/wasm.ts", import.meta.url).href;
  const code = `
    const { WasmBackend } = await import(${JSON.stringify(module)});
    const be = await WasmBackend.create({ threads: 2 });
    const w = be.upload(new Float32Array(256 * 256).fill(1));
    const x = be.upload(new Float32Array(4 * 256).fill(2));
    const out = be.zeros(4 * 256);
    be.linear({ out, x, weight: w, rows: 4, inDim: 256, outDim: 256 });
    console.log((await be.read(out, 0, 1))[0]);
  `;
  const child = new Deno.Command(Deno.execPath(), {
    args: ["eval", "--no-config", code],
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const timer = setTimeout(() => child.kill("SIGKILL"), 20_000);
  const { code: exitCode, stdout, stderr } = await child.output();
  clearTimeout(timer);
  const text = new TextDecoder().decode(stdout).trim();
  assert(exitCode === 0, `exit ${exitCode}: ${new TextDecoder().decode(stderr)}`);
  assert(text === "512", `printed ${text}`);
});

Deno.test("[wasm] an F32 checkpoint is read straight into wasm memory: no second copy", async () => {
  const shipped = `${SHARED}/models/tiny-shakespeare`;
  const file = SafetensorsFile.parse(await Deno.readFile(`${shipped}/model.safetensors`), "f16");
  const tensors: Parameters<typeof writeSafetensors>[0] = {};
  for (const [name, info] of file.tensors) {
    tensors[name] = { dtype: "F32", shape: [...info.shape], data: file.float32(name) };
  }
  const dir = await tempDir("mamba-f32-");
  const weights = writeSafetensors(tensors);
  await Deno.writeFile(`${dir}/model.safetensors`, weights);
  for (const name of ["config.json", "tokenizer.json", "tokenizer_config.json"]) {
    await Deno.copyFile(`${shipped}/${name}`, `${dir}/${name}`);
  }
  const expected = SafetensorsFile.parse(
    await Deno.readFile(`${shipped}/expected.safetensors`),
    "expected",
  );
  for (const threads of [1, 2]) {
    const model = await loadModel(dir, { backend: "wasm", threads });
    const backend = model.model.backend as unknown as WasmBackend;
    const got = await model.forward(expected.int32("prompt0_greedy_ids"));
    assert(maxAbsDiff(got, expected.float32("prompt0_logits")) <= 1e-3);
    // Only the small derived tensors (A = -exp(A_log), split projections) are copied.
    assert(
      backend.copiedBytes < weights.length * 0.1,
      `${backend.copiedBytes} bytes copied for a ${weights.length}-byte file`,
    );
    model.dispose();
  }
});
