/**
 * The backends and what each needs from the runtime: the one place that says
 * which backends exist and whether they can run here. Each entry probes its
 * capability (WebGPU adapter, WebAssembly SIMD, shared-memory threads) and, when
 * it can run, hands back a function that creates it.
 *
 * Picking among them for a model ("auto") is done by measuring, in
 * `../dispatch.ts`.
 *
 * @module
 */

import type { Backend } from "../backend.ts";
import { JsBackend } from "./js.ts";
import { describeAdapter, type ScanPrecision, WebGpuBackend } from "./webgpu/mod.ts";
import { navigatorGpu } from "./webgpu/backend.ts";
import {
  defaultThreads,
  WasmBackend,
  wasmRelaxedSimdSupported,
  type WasmSimd,
  wasmSimdSupported,
} from "./wasm.ts";
import { BackendUnavailableError } from "../errors.ts";

/** Backends that can be asked for by name. */
export type BackendName = "js" | "wasm" | "webgpu" | "auto";

/** Options passed to the backend; each backend reads those it knows. */
export interface BackendOptions {
  /**
   * CPU threads for the "wasm" backend (default `navigator.hardwareConcurrency`
   * where threads are allowed, else 1; 1: no workers).
   */
  threads?: number;
  /**
   * Which build of the "wasm" backend's kernels runs: "relaxed" (relaxed
   * SIMD: fused multiply-adds, int8 dot products) or "plain" (fixed-width
   * SIMD only). Default: "relaxed" where the runtime validates relaxed SIMD,
   * else "plain".
   */
  simd?: WasmSimd;
  /**
   * Arithmetic of the "webgpu" backend's scan: "float32" (default) or
   * "double-float", a slower reference mode that meets the float64 scan
   * fixtures as js and wasm do (they always carry float64 in the scan).
   */
  scanPrecision?: ScanPrecision;
}

/** What the runtime offers. {@link probeCapabilities} reads the real ones; tests pass their own. */
export interface Capabilities {
  /** `navigator.gpu`, or undefined where the runtime has no WebGPU. */
  gpu: GPU | undefined;
  /** Whether WebAssembly SIMD (fixed-width, 128-bit) validates. */
  wasmSimd: boolean;
  /** Whether WebAssembly relaxed SIMD validates too. */
  wasmRelaxedSimd: boolean;
  /** Whether workers can share a WebAssembly.Memory (Worker exists, shared memory constructs). */
  threads: boolean;
}

/** The capabilities of this runtime. */
export function probeCapabilities(): Capabilities {
  return {
    gpu: navigatorGpu(),
    wasmSimd: wasmSimdSupported(),
    wasmRelaxedSimd: wasmRelaxedSimdSupported(),
    threads: threadsAllowed(),
  };
}

function threadsAllowed(): boolean {
  if (typeof Worker !== "function") return false;
  try {
    // Browsers without cross-origin isolation refuse shared memory here.
    new WebAssembly.Memory({ initial: 1, maximum: 1, shared: true });
    return true;
  } catch {
    return false;
  }
}

/** The outcome of a backend's capability check. */
export type Probe =
  | {
    available: true;
    /** What it would run on (adapter, threads): shown in reports, part of cache keys. */
    device: string;
    /** Creates the backend; may still fail (a device that will not open). */
    create(): Promise<Backend>;
  }
  | {
    available: false;
    /** Why not, as a sentence. */
    reason: string;
  };

/** A registered backend: its name and its capability check. */
export interface BackendCandidate {
  /** The name users ask for. */
  readonly name: string;
  /** Checks whether the backend can run here with these options. */
  probe(capabilities: Capabilities, options: BackendOptions): Promise<Probe>;
}

/** The registered backends, in the order reports list them. */
export const BACKENDS: readonly BackendCandidate[] = [
  {
    name: "js",
    probe: () =>
      Promise.resolve({
        available: true,
        device: "TypeScript reference",
        create: () => Promise.resolve(new JsBackend() as Backend),
      }),
  },
  {
    name: "wasm",
    probe(capabilities, options) {
      if (!capabilities.wasmSimd) {
        return Promise.resolve({
          available: false,
          reason: "WebAssembly SIMD is not available in this runtime",
        });
      }
      // Without shared memory the backend still runs, on the calling thread only.
      const threads = options.threads ?? (capabilities.threads ? defaultThreads() : 1);
      const simd = options.simd ?? (capabilities.wasmRelaxedSimd ? "relaxed" : "plain");
      if (simd === "relaxed" && !capabilities.wasmRelaxedSimd) {
        return Promise.resolve({
          available: false,
          reason: 'WebAssembly relaxed SIMD is not available in this runtime (simd: "plain" runs)',
        });
      }
      // The build is part of the device: it is part of cache keys, and the
      // plain build is slower.
      const instructions = simd === "relaxed" ? "relaxed SIMD" : "SIMD";
      return Promise.resolve({
        available: true,
        device: `WebAssembly ${instructions}, ${threads} thread${threads === 1 ? "" : "s"}`,
        create: () => WasmBackend.create({ threads, simd }) as Promise<Backend>,
      });
    },
  },
  {
    name: "webgpu",
    async probe({ gpu }, { scanPrecision }) {
      if (!gpu) return { available: false, reason: "WebGPU is not available: no navigator.gpu" };
      let adapter: GPUAdapter | null;
      try {
        adapter = await gpu.requestAdapter();
      } catch (error) {
        return { available: false, reason: `WebGPU is not available: ${messageOf(error)}` };
      }
      if (!adapter) {
        return {
          available: false,
          reason: "WebGPU is not available: navigator.gpu has no adapter",
        };
      }
      const doubleFloat = scanPrecision === "double-float";
      return {
        available: true,
        device: `${describeAdapter(adapter)}${doubleFloat ? ", double-float scan" : ""}`,
        create: () => WebGpuBackend.create({ adapter, scanPrecision }) as Promise<Backend>,
      };
    },
  },
];

/** Names accepted by {@link createBackend} and `loadModel`. */
export const BACKEND_NAMES: readonly BackendName[] = [
  ...BACKENDS.map((entry) => entry.name),
  "auto",
] as BackendName[];

/**
 * The backend "auto" stands for where there is no model to measure with (the
 * standalone scan): wasm where it can run, else js. Models measure instead.
 */
const UNMEASURED_AUTO = ["wasm", "js"];

/**
 * Creates the backend of that name, failing (with the alternatives) where it
 * cannot run. "auto" here takes the first of wasm and js that can run; a model
 * picks by measuring, see `selectBackend` in `../dispatch.ts`.
 */
export async function createBackend(
  name: BackendName,
  options: BackendOptions = {},
  capabilities: Capabilities = probeCapabilities(),
  candidates: readonly BackendCandidate[] = BACKENDS,
): Promise<Backend> {
  if (name === "auto") {
    const reasons: string[] = [];
    for (const fallback of UNMEASURED_AUTO) {
      const probe = await candidates.find((entry) => entry.name === fallback)
        ?.probe(capabilities, options);
      if (probe?.available) return probe.create();
      if (probe) reasons.push(`${fallback}: ${probe.reason}`);
    }
    throw new BackendUnavailableError("auto", `No backend can run here (${reasons.join("; ")})`);
  }
  const candidate = candidates.find((entry) => entry.name === name);
  if (!candidate) {
    const names = [...candidates.map((entry) => entry.name), "auto"];
    throw new RangeError(
      `Unknown backend ${JSON.stringify(name)}: choose one of ${names.join(", ")}`,
    );
  }
  const probe = await candidate.probe(capabilities, options);
  if (!probe.available) {
    const others = candidates.filter((entry) => entry !== candidate).map((entry) =>
      `"${entry.name}"`
    );
    throw new BackendUnavailableError(
      name,
      `${probe.reason}. Use backend ${
        others.join(" or ")
      }, or "auto" to pick the fastest available`,
    );
  }
  return probe.create();
}

/** The message of a thrown value. */
export function messageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
