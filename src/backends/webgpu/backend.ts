/**
 * The WebGPU backend: every operation is a WGSL compute kernel (see `wgsl/`,
 * embedded by `deno task build:wgsl`), weights and states stay on the GPU.
 *
 * Organisation, after tfjs-backend-webgpu: the backend below is thin; each
 * family of kernels (linear.ts, scan.ts, ssd.ts, conv.ts, rows.ts,
 * sample.ts) owns its programs ({@link Program}: shader, entry point,
 * constants, bindings and named parameters), their selection, grid and
 * bindings; runtime.ts records their dispatches into one command encoder
 * (inside one compute pass where possible), submitted when a result is read,
 * so a decode step is a single submission that reads back only what it must;
 * memory.ts holds buffers, uploads and the pool. Per-dispatch parameters go
 * into a uniform arena written once per submission.
 * {@link WebGpuBackend.capture} records a decode step's launches once, with
 * their own uniform block, so that replaying them costs three calls each.
 *
 * The hot kernels (scan, matmul, gemv4, argmax) index no private array in a
 * loop: Naga emits every loop as a while-loop, which the NVIDIA compiler does
 * not unroll, so such an array lives in local memory. Their registers are
 * named vec4s instead. conv.wgsl and the scalar gemv.wgsl (inputs whose
 * width is not a multiple of 4) still use small arrays.
 *
 * @module
 */

import type {
  AddArgs,
  Backend,
  ChooseArgs,
  ConvArgs,
  CopyArgs,
  CopyRowsArgs,
  EmbedArgs,
  GatedNormArgs,
  LinearArgs,
  LinearSplitArgs,
  OptionalOp,
  RmsNormArgs,
  ScanArgs,
  SsdArgs,
} from "../../backend.ts";
import { mayUse } from "../../permissions.ts";
import type { HalfMatrix, QuantizedMatrix } from "../../quant.ts";
import { causalConv } from "./conv.ts";
import { LinearKernels } from "./linear.ts";
import { type GpuBuffer, GpuMemory } from "./memory.ts";
import { type GpuRecording, GpuRuntime, type KernelTimes } from "./runtime.ts";
import { addInPlace, copyRows, embed } from "./rows.ts";
import { chooseTokens } from "./sample.ts";
import { ScanKernels, type ScanOptions } from "./scan.ts";
import { SsdKernels, type SsdOptions } from "./ssd.ts";

/**
 * Tuning knobs of {@link WebGpuBackend}; the defaults suit large GPUs. The
 * scan's (see {@link ScanOptions}) and the SSD scan's ({@link SsdOptions})
 * are their kernels' own.
 */
export interface WebGpuOptions extends ScanOptions, SsdOptions {
  /** Adapter preference passed to `requestAdapter`. */
  powerPreference?: GPUPowerPreference;
  /** An adapter already requested (by a capability check); `powerPreference` is then unused. */
  adapter?: GPUAdapter;
  /**
   * Bytes above which a matrix is split by rows, below the device's binding
   * limit (the default); lets tests exercise the splitting on any device.
   */
  splitMatricesOver?: number;
  /**
   * Time every kernel on the GPU (the adapter must offer "timestamp-query"),
   * for {@link WebGpuBackend.kernelTimes}. Each dispatch then runs in a pass
   * of its own, which slows the whole down: for profiling only.
   */
  profile?: boolean;
}

/** A short description of an adapter, for reports and cache keys. */
export function describeAdapter(adapter: GPUAdapter): string {
  const info = adapter.info;
  const name = info.description || [info.vendor, info.architecture, info.device].join(" ");
  return name.trim();
}

/** Raised when WebGPU is missing or refuses what the backend needs. */
export class WebGpuUnavailableError extends Error {
  override name = "WebGpuUnavailableError";
}

/**
 * `navigator.gpu`, or undefined where the runtime has none; the first access
 * starts the GPU instance, after {@link quietWaylandLookup}.
 */
export function navigatorGpu(): GPU | undefined {
  quietWaylandLookup();
  return (globalThis.navigator as Navigator | undefined)?.gpu;
}

/** Whether {@link quietWaylandLookup} has run in this process. */
let waylandLookupQuieted = false;

/**
 * On Linux without `XDG_RUNTIME_DIR` (a headless server, a container), Mesa's
 * drivers look for a Wayland display as the first adapter is requested, and
 * libwayland prints "error: XDG_RUNTIME_DIR is invalid or not set" for each
 * one, which reads like a failure. Pointing the variable at an empty
 * directory of the process's own (removed at exit) makes that lookup fail
 * quietly. Only where the environment and temporary files may be written
 * without a prompt; otherwise nothing changes.
 */
function quietWaylandLookup(): void {
  if (waylandLookupQuieted || typeof Deno === "undefined" || Deno.build?.os !== "linux") return;
  waylandLookupQuieted = true;
  const variable = "XDG_RUNTIME_DIR";
  if (!mayUse({ name: "env", variable }) || !mayUse({ name: "write" })) return;
  try {
    if (Deno.env.get(variable)) return;
    const dir = Deno.makeTempDirSync({ prefix: "mamba-deno-runtime-" });
    Deno.env.set(variable, dir);
    globalThis.addEventListener("unload", () => {
      try {
        Deno.removeSync(dir);
      } catch {
        // Already gone: nothing to tidy.
      }
    });
  } catch {
    // No environment or temporary directory here: the lookup stays as it is.
  }
}

/** The WebGPU backend; see the module documentation. */
export class WebGpuBackend implements Backend<GpuBuffer> {
  readonly name = "webgpu";
  readonly queued = true;
  /**
   * A prompt's tokens per chunk: the projections of 512 rows leave most of an
   * H100's SMs idle, those of 2048 have more tiles than SMs
   * (docs/performance.md).
   */
  readonly chunkTokens = 2048;
  /**
   * Five prompts of 2048 ids in one chunk: five prefills in flight and 256
   * new streams ran faster so on an H100 (docs/performance.md).
   */
  readonly idleChunkTokens = 5 * 2048;
  /** The device; destroyed by {@link dispose}. */
  readonly device: GPUDevice;
  /** Description of the adapter, for reports. */
  readonly adapterInfo: string;

  readonly #memory: GpuMemory;
  readonly #rt: GpuRuntime;
  readonly #linear: LinearKernels;
  readonly #scan: ScanKernels;
  readonly #ssd: SsdKernels;

  /** Wraps an existing device (the caller keeps no other use of it). */
  constructor(device: GPUDevice, adapterInfo = "", options: WebGpuOptions = {}) {
    this.device = device;
    this.adapterInfo = adapterInfo;
    this.#memory = new GpuMemory(device, options.splitMatricesOver);
    this.#rt = new GpuRuntime(device, this.#memory, options.profile);
    this.#linear = new LinearKernels(this.#rt);
    this.#scan = new ScanKernels(this.#rt, this.#linear, options);
    try {
      this.#ssd = new SsdKernels(this.#rt, options);
    } catch (error) {
      device.destroy(); // refused options: the device is not left open
      throw error;
    }
    // Shares of a folded x_proj are added up before any other work could read them.
    this.#rt.beforeWork = () => this.#linear.settle();
  }

  /** Opens the default adapter with raised limits; fails clearly without WebGPU. */
  static async create(options: WebGpuOptions = {}): Promise<WebGpuBackend> {
    const alternatives = 'use backend "wasm" or "js" instead';
    const gpu = options.adapter ? undefined : navigatorGpu();
    if (!options.adapter && !gpu) {
      throw new WebGpuUnavailableError(
        `WebGPU is not available here (no navigator.gpu): ${alternatives}`,
      );
    }
    const adapter = options.adapter ??
      await gpu!.requestAdapter({ powerPreference: options.powerPreference });
    if (!adapter) {
      throw new WebGpuUnavailableError(`No WebGPU adapter was found: ${alternatives}`);
    }
    const limits = adapter.limits;
    const requiredLimits: Record<string, number> = {
      maxStorageBufferBindingSize: limits.maxStorageBufferBindingSize,
      maxBufferSize: limits.maxBufferSize,
      maxStorageBuffersPerShaderStage: limits.maxStorageBuffersPerShaderStage,
      maxComputeWorkgroupStorageSize: limits.maxComputeWorkgroupStorageSize,
      maxComputeInvocationsPerWorkgroup: limits.maxComputeInvocationsPerWorkgroup,
      maxComputeWorkgroupSizeX: limits.maxComputeWorkgroupSizeX,
    };
    if (limits.maxStorageBuffersPerShaderStage < 12) {
      throw new WebGpuUnavailableError(
        `The WebGPU adapter allows ${limits.maxStorageBuffersPerShaderStage} storage buffers ` +
          `per shader stage; the scan kernel needs 12: ${alternatives}`,
      );
    }
    const requiredFeatures: GPUFeatureName[] = [];
    if (options.profile) {
      if (!adapter.features.has("timestamp-query")) {
        throw new WebGpuUnavailableError(
          `The WebGPU adapter cannot time kernels (no "timestamp-query"), which profile: true needs`,
        );
      }
      requiredFeatures.push("timestamp-query");
    }
    let device: GPUDevice;
    try {
      device = await adapter.requestDevice({ requiredLimits, requiredFeatures });
    } catch (error) {
      throw new WebGpuUnavailableError(`The WebGPU device could not be opened: ${alternatives}`, {
        cause: error,
      });
    }
    return new WebGpuBackend(device, describeAdapter(adapter), options);
  }

  /** Compute dispatches recorded so far (for benchmarks and tests). */
  get dispatches(): number {
    return this.#rt.dispatches;
  }

  /** Submissions so far. */
  get submissions(): number {
    return this.#rt.submissions;
  }

  /** Reads that took their floats before Deno's `mapAsync` resolved (for tests). */
  get earlyReads(): number {
    return this.#rt.earlyReads;
  }

  /**
   * GPU time per kernel (program key and grid) of the work done since the
   * last call; needs the option `profile`.
   */
  kernelTimes(): Promise<KernelTimes> {
    return this.#rt.kernelTimes();
  }

  /**
   * Leaves out, from now on, every kernel whose name (program key and grid,
   * as in {@link kernelTimes}) matches `pattern`; null runs them all again.
   * The time a workload saves without them is what they cost where they run,
   * which kernels timed alone or one per pass do not show
   * (`bench/gpu_ablate.ts`). Results are wrong meanwhile: for measurement
   * only.
   */
  skipKernels(pattern: RegExp | null): void {
    this.#rt.skipKernels(pattern);
  }

  // ---- buffers ----------------------------------------------------------------------------

  upload(data: Float32Array, rowLength?: number): GpuBuffer {
    return this.#memory.upload(data, rowLength);
  }

  /** GPU memory cannot be lent to the host. */
  hostBytes(_byteLength: number): undefined {
    return undefined;
  }

  /** See {@link GpuMemory.uploadHalfMatrix}. */
  uploadHalfMatrix(matrix: HalfMatrix): GpuBuffer {
    return this.#memory.uploadHalfMatrix(matrix);
  }

  /** See {@link GpuMemory.uploadQuantizedMatrix}. */
  uploadQuantizedMatrix(matrix: QuantizedMatrix): GpuBuffer {
    return this.#memory.uploadQuantizedMatrix(matrix);
  }

  zeros(length: number): GpuBuffer {
    return this.#rt.zeros(length);
  }

  /** A zeroed buffer that a fused kernel may leave unwritten (see {@link GpuBuffer.transient}). */
  scratch(length: number): GpuBuffer {
    const buf = this.#rt.zeros(length);
    buf.transient = true;
    return buf;
  }

  write(buf: GpuBuffer, data: Float32Array, offset = 0): void {
    this.#rt.write(buf, data, offset);
  }

  read(buf: GpuBuffer, offset = 0, length = buf.length - offset): Promise<Float32Array> {
    return this.#rt.read(buf, offset, length);
  }

  readSubmitted(buf: GpuBuffer, offset = 0, length = buf.length - offset): Promise<Float32Array> {
    return this.#rt.readSubmitted(buf, offset, length);
  }

  copy(args: CopyArgs<GpuBuffer>): void {
    this.#rt.copy(args);
  }

  release(buf: GpuBuffer): void {
    this.#linear.settle(); // its shares may be meant for this buffer
    if (buf.parts.length > 0) buf.parts.forEach((part) => this.release(part));
    else this.#memory.pool.release(buf.buffer);
  }

  // ---- operations -------------------------------------------------------------------------

  embed(args: EmbedArgs<GpuBuffer>): void {
    embed(this.#rt, args);
  }

  copyRows(args: CopyRowsArgs<GpuBuffer>): void {
    copyRows(this.#rt, args);
  }

  chooseTokens(args: ChooseArgs<GpuBuffer>): void {
    chooseTokens(this.#rt, args);
  }

  rmsNorm(args: RmsNormArgs<GpuBuffer>): void {
    this.#linear.rmsNorm(args);
  }

  linear(args: LinearArgs<GpuBuffer>): void {
    this.#linear.product(args);
  }

  linearSplit(args: LinearSplitArgs<GpuBuffer>): void {
    this.#linear.linear({ ...args, accumulate: false });
  }

  addInPlace(args: AddArgs<GpuBuffer>): void {
    addInPlace(this.#rt, args);
  }

  causalConv(args: ConvArgs<GpuBuffer>): void {
    this.#linear.causalConv(args, () => causalConv(this.#rt, args));
  }

  selectiveScan(args: ScanArgs<GpuBuffer>): void {
    this.#scan.selectiveScan(args);
  }

  /** Tokens per chunk of the scan for this shape. */
  scanChunkLen(batch: number, dim: number, len: number): number {
    return this.#scan.scanChunkLen(batch, dim, len);
  }

  supports(op: OptionalOp): boolean {
    return op !== "channelMajorScan";
  }

  /** A decode step is held back for the gated RMSNorm after it; see LinearKernels. */
  ssdScan(args: SsdArgs<GpuBuffer>): void {
    const { y, len, batch, heads, headDim } = args;
    if (len !== 1) return this.#ssd.ssdScan(args);
    const run = (gate: GpuBuffer | null) => this.#ssd.ssdScan(args, gate);
    this.#linear.deferSsdStep({ y, rows: batch, dim: heads * headDim, run });
  }

  /** Folds into the held-back SSD step and the next GEMV where it can; see LinearKernels. */
  gatedRmsNorm(args: GatedNormArgs<GpuBuffer>): void {
    this.#linear.gatedRmsNorm(args, () => this.#ssd.gatedRmsNorm(args));
  }

  // ---- submission and recordings ------------------------------------------------------------

  /**
   * Submits the recorded work (no wait). Inside a {@link capture} it does
   * nothing: what is captured is submitted where it is replayed.
   */
  flush(): void {
    this.#rt.flush();
  }

  /** Submits the recorded work and waits until the GPU has done it. */
  sync(): Promise<void> {
    return this.#rt.sync();
  }

  /** Destroys the device and every buffer on it; the backend must not be used again. */
  dispose(): void {
    this.#rt.dispose();
  }

  /** See {@link GpuRuntime.capture}. */
  capture(ops: () => void): GpuRecording {
    return this.#rt.capture(ops);
  }

  replay(recording: GpuRecording): void {
    this.#rt.replay(recording);
  }

  releaseRecording(recording: GpuRecording): void {
    this.#rt.releaseRecording(recording);
  }
}
