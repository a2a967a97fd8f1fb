/**
 * The public surface: typed errors users can branch on, and models that free
 * their backend with `dispose()` or `await using`.
 */

import {
  assertEquals,
  assertInstanceOf,
  assertRejects,
  assertStringIncludes,
  assertThrows,
} from "@std/assert";
import { BackendUnavailableError, loadModel, SnapshotError } from "../mod.ts";
import { createBackend } from "../src/backends/registry.ts";
import { SHARED } from "./helpers.ts";

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
  const noGpu = { gpu: undefined, wasmSimd: false, threads: false };
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
    "Invalid snapshot: it does not start with the MAMBASS1 header",
  );
});
