/**
 * The public surface: typed errors users can branch on, and models that free
 * their backend with `dispose()` or `await using`.
 */

import {
  assert,
  assertEquals,
  assertInstanceOf,
  assertRejects,
  assertStringIncludes,
  assertThrows,
} from "@std/assert";
import { BackendUnavailableError, loadModel, selectiveScan, SnapshotError } from "../mod.ts";
import { createBackend } from "../src/backends/registry.ts";
import { maxAbsDiff, SHARED } from "./helpers.ts";

const SHAKESPEARE = `${SHARED}/models/tiny-shakespeare`;

Deno.test("await using frees the model's wasm memory at the end of the scope", async () => {
  let escaped;
  {
    await using model = await loadModel(SHAKESPEARE, { backend: "wasm", threads: 1 });
    escaped = model;
    const logits = await model.forward(model.tokenizer.encode("ROMEO:"));
    assertEquals(logits.length % model.vocabSize, 0);
  }
  await assertRejects(() => escaped.forward([1, 2]), Error, "The wasm backend was disposed");
  escaped.dispose(); // A second dispose does nothing.
});

Deno.test("a backend that cannot run throws BackendUnavailableError naming it", async () => {
  const noGpu = { gpu: undefined, wasmSimd: false, wasmRelaxedSimd: false, threads: false };
  const webgpu = await assertRejects(
    () => createBackend("webgpu", {}, noGpu),
    BackendUnavailableError,
    "WebGPU is not available",
  );
  assertEquals((webgpu as BackendUnavailableError).backend, "webgpu");
  const wasm = await assertRejects(() => createBackend("wasm", {}, noGpu), BackendUnavailableError);
  assertStringIncludes(wasm.message, 'Use backend "js"');
});

Deno.test("a malformed snapshot throws SnapshotError", async () => {
  await using model = await loadModel(SHAKESPEARE, { backend: "js" });
  const error = assertThrows(() => model.session(new Uint8Array(4)));
  assertInstanceOf(error, SnapshotError);
  assertStringIncludes(
    error.message,
    "Invalid snapshot: it does not start with the MAMBASS2 header",
  );
});

Deno.test("selectiveScan runs on a caller's backend and leaves it to the caller", async () => {
  const [batch, dim, len, dState] = [2, 3, 5, 4];
  const fill = (n: number, seed: number) =>
    Float32Array.from({ length: n }, (_, i) => Math.sin(i * 1.7 + seed) * 0.5);
  const args = {
    u: fill(batch * dim * len, 1),
    delta: fill(batch * dim * len, 2).map(Math.abs),
    A: fill(dim * dState, 3).map((v) => -Math.abs(v) - 0.1),
    B: fill(batch * dState * len, 4),
    C: fill(batch * dState * len, 5),
    D: fill(dim, 6),
    batch,
    dim,
    len,
    dState,
  };
  const reference = await selectiveScan(args);
  const backend = await createBackend("wasm", { threads: 1 });
  try {
    for (let run = 0; run < 2; run++) {
      const { y, lastState } = await selectiveScan(args, { backend });
      assert(maxAbsDiff(y, reference.y) < 1e-6);
      assert(maxAbsDiff(lastState, reference.lastState) < 1e-6);
    }
    // Still the caller's: it runs after the scans.
    backend.release(backend.upload(new Float32Array(4)));
  } finally {
    backend.dispose();
  }
});
