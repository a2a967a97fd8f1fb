/**
 * Backends by name. Each entry creates its backend (asynchronously: a fast
 * backend may compile a module or open a device first).
 *
 * @module
 */

import type { Backend } from "../backend.ts";
import { JsBackend } from "./js.ts";
import { WebGpuBackend } from "./webgpu.ts";
import { WasmBackend, wasmSimdSupported } from "./wasm.ts";

/** Backends that can be asked for by name. */
export type BackendName = "js" | "wasm" | "webgpu" | "auto";

/** Options passed to the backend; each backend reads those it knows. */
export interface BackendOptions {
  /** CPU threads for the "wasm" backend (default `navigator.hardwareConcurrency`; 1: no workers). */
  threads?: number;
}

const FACTORIES: Record<
  Exclude<BackendName, "auto">,
  (options: BackendOptions) => Promise<Backend>
> = {
  js: () => Promise.resolve(new JsBackend() as Backend),
  webgpu: () => WebGpuBackend.create() as Promise<Backend>,
  wasm: (options) => WasmBackend.create(options) as Promise<Backend>,
};

/** The backend "auto" stands for here: wasm where WebAssembly SIMD runs, else js. */
function autoBackend(): Exclude<BackendName, "auto"> {
  return wasmSimdSupported() ? "wasm" : "js";
}

/** Names accepted by {@link createBackend}. */
export const BACKEND_NAMES: readonly BackendName[] = [
  ...Object.keys(FACTORIES),
  "auto",
] as BackendName[];

/** Creates the backend of that name; "auto" picks the best available one. */
export function createBackend(name: BackendName, options: BackendOptions = {}): Promise<Backend> {
  const factory = FACTORIES[name === "auto" ? autoBackend() : name];
  if (!factory) {
    throw new RangeError(
      `Unknown backend ${JSON.stringify(name)}: choose one of ${BACKEND_NAMES.join(", ")}`,
    );
  }
  return factory(options);
}
