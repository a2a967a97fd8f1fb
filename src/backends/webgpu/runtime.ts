/**
 * The GPU runtime of the WebGPU backend: the device, one command encoder
 * (inside one compute pass where possible) submitted when a result is read,
 * the caches of shader modules, pipelines, bind group layouts and bind
 * groups, the uniform arena that holds every dispatch's parameters, and
 * capture/replay of recorded work ({@link GpuRecording}).
 *
 * Kernels reach the GPU through {@link GpuRuntime.run}: a {@link Program},
 * its parameters by name, its buffers by binding and its workgroups.
 *
 * @module
 */

import type { CopyArgs, Recording } from "../../backend.ts";
import { bufferSource, byteSize, GpuBuffer, type GpuMemory } from "./memory.ts";
import { MAX_GROUPS, type Program } from "./program.ts";

const PARAM_SLOT = 256; // bytes per dispatch's uniform block (≥ minUniformBufferOffsetAlignment)
// Bytes per uniform arena buffer: large enough for a whole greedy batch (32
// tokens × 171 dispatches for mamba-130m), so each kernel's bind group, which
// names the arena buffer, stays the same from token to token and is reused.
const PARAM_CHUNK = 1 << 22;
const MAX_BIND_GROUPS = 4096; // cached bind groups before the cache is cleared
// Launches per buffer of recordings' uniform blocks: a recorded decode step of
// mamba-130m is about 200.
const RECORDING_CHUNK_SLOTS = 4096;

/** copyBufferToBuffer's arguments: source, its byte offset, destination, its byte offset, bytes. */
type BufferCopy = [GPUBuffer, number, GPUBuffer, number, number];

/** One kernel launch or buffer copy of a {@link GpuRecording}. */
type RecordedStep =
  | {
    /** The program's key and grid, for {@link KernelTimes}. */
    label: string;
    pipeline: GPUComputePipeline;
    bindGroup: GPUBindGroup;
    /** The uniform block's dynamic offset: a typed array takes Deno's faster overload. */
    offsets: Uint32Array;
    groups: [number, number, number];
  }
  | { copy: BufferCopy };

/**
 * A uniform buffer that recordings share, each taking a run of its slots.
 * Bind groups name the buffer, not the slot (a dynamic offset does), so a
 * recording of the same kernels on the same storage buffers as an earlier
 * one (the next step of a decode round, say) reuses that one's bind groups:
 * creating them was most of what a capture cost the host. Its slots are
 * taken afresh once every recording in it has been released.
 */
interface RecordingChunk {
  readonly buffer: GPUBuffer;
  readonly slots: number;
  /** Slots taken since it was last empty. */
  used: number;
  /** Recordings holding slots in it. */
  live: number;
}

/** Work recorded by {@link GpuRuntime.capture}: ready-made launches and their uniform blocks. */
export class GpuRecording implements Recording {
  constructor(
    readonly steps: readonly RecordedStep[],
    /** Holds every launch's parameters, written once; null for copies only. */
    readonly chunk: RecordingChunk | null,
  ) {}

  get dispatches(): number {
    return this.steps.filter((step) => !("copy" in step)).length;
  }
}

/** GPU time per kernel: calls and nanoseconds, by program key and grid. */
export type KernelTimes = Map<string, { calls: number; ns: number }>;

/**
 * Times every dispatch on the GPU (the "timestamp-query" feature): each gets
 * its own compute pass with timestamps at its start and end, resolved at
 * submission and read back later. For benchmarks: the extra passes and
 * reads slow the work down, but each kernel's own time is what it is.
 */
class KernelTimer {
  static readonly CAPACITY = 4096; // queries per set: the most WebGPU allows
  readonly querySet: GPUQuerySet;
  readonly resolved: GPUBuffer;
  /** Labels of the passes recorded into the current encoder, in order. */
  labels: string[] = [];
  readonly #reads: Promise<void>[] = [];
  readonly #times: KernelTimes = new Map();

  constructor(readonly device: GPUDevice) {
    this.querySet = device.createQuerySet({ type: "timestamp", count: KernelTimer.CAPACITY });
    this.resolved = device.createBuffer({
      size: KernelTimer.CAPACITY * 8,
      usage: GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC,
    });
  }

  get full(): boolean {
    return 2 * (this.labels.length + 1) > KernelTimer.CAPACITY;
  }

  /** Resolves this encoder's timestamps into a buffer read after `submit`. */
  resolve(encoder: GPUCommandEncoder, submit: () => void): void {
    const labels = this.labels;
    this.labels = [];
    if (labels.length === 0) return submit();
    const bytes = labels.length * 16;
    const staging = this.device.createBuffer({
      size: bytes,
      usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
    });
    encoder.resolveQuerySet(this.querySet, 0, 2 * labels.length, this.resolved, 0);
    encoder.copyBufferToBuffer(this.resolved, 0, staging, 0, bytes);
    submit();
    this.#reads.push(
      staging.mapAsync(GPUMapMode.READ).then(() => {
        const stamps = new BigUint64Array(staging.getMappedRange());
        labels.forEach((label, i) => {
          const entry = this.#times.get(label) ?? { calls: 0, ns: 0 };
          entry.calls++;
          entry.ns += Number(stamps[2 * i + 1] - stamps[2 * i]);
          this.#times.set(label, entry);
        });
        staging.destroy();
      }),
    );
  }

  /** The times of the work submitted so far, from the last take on. */
  async take(): Promise<KernelTimes> {
    await Promise.all(this.#reads.splice(0));
    const times = new Map(this.#times);
    this.#times.clear();
    return times;
  }
}

/** A launch seen while capturing, before its uniform block exists. */
interface PendingLaunch {
  program: Program;
  words: Uint32Array;
  storage: GPUBuffer[];
  groups: [number, number, number];
}

/** What {@link GpuRuntime.capture} has seen so far. */
type CaptureLog = (PendingLaunch | { copy: BufferCopy })[];

/** A dispatch's name in kernel times and for {@link GpuRuntime.skipKernels}: program key and grid. */
function dispatchLabel(program: Program, groups: readonly number[]): string {
  return `${program.key} ${groups.join("×")}`;
}

/** A copy of the first `length` floats of a mapped staging buffer (its range detaches at unmap). */
function mappedFloats(staging: GPUBuffer, length: number): Float32Array {
  return new Float32Array(staging.getMappedRange().slice(0, length * 4));
}

/** {@link mappedFloats} if the buffer's mapping is in place already, else null. */
function mappedFloatsIfReady(staging: GPUBuffer, length: number): Float32Array | null {
  try {
    return mappedFloats(staging, length);
  } catch {
    return null; // not mapped yet: the promise will say when
  }
}

/** See the module documentation. */
export class GpuRuntime {
  /** Compute dispatches recorded so far (for benchmarks and tests). */
  dispatches = 0;
  /** Submissions so far. */
  submissions = 0;
  /** Reads that took their floats before Deno's `mapAsync` resolved (see {@link #readBack}). */
  earlyReads = 0;
  /**
   * Runs before any recorded work and any transfer: a backend finishes here
   * what it deferred in the hope of fusing it into the next kernel.
   */
  beforeWork: () => void = () => {};

  readonly #modules = new Map<string, GPUShaderModule>();
  readonly #pipelines = new Map<string, GPUComputePipeline>();
  readonly #layouts = new Map<string, GPUBindGroupLayout>();
  readonly #bindGroups = new Map<string, GPUBindGroup>();
  readonly #ids = new WeakMap<GPUBuffer, number>();
  #nextId = 0;
  readonly #offset = new Uint32Array(1); // a dispatch's uniform offset (typed: the faster overload)
  #encoder: GPUCommandEncoder | null = null;
  #pass: GPUComputePassEncoder | null = null;
  readonly #paramBuffers: GPUBuffer[] = [];
  /** Host copies of the uniform arena chunks, as u32 and f32 views of the same bytes. */
  readonly #paramWords: Uint32Array<ArrayBuffer>[] = [];
  readonly #paramFloats: Float32Array<ArrayBuffer>[] = [];
  #paramSlots = 0;
  readonly #recordingChunks: RecordingChunk[] = [];
  /** Unmapped MAP_READ buffers for {@link read}, by byte size. */
  readonly #staging = new Map<number, GPUBuffer[]>();
  /** Launches and copies of a {@link capture} in progress, else null. */
  #capturing: CaptureLog | null = null;
  #error: unknown = null;
  #disposed = false;
  readonly #timer: KernelTimer | null;
  /** Dispatches whose label matches are left out (see {@link skipKernels}); null runs all. */
  #skipped: RegExp | null = null;

  /** With `timed`, every dispatch is timed on the GPU (see {@link kernelTimes}). */
  constructor(readonly device: GPUDevice, readonly memory: GpuMemory, timed = false) {
    this.#timer = timed ? new KernelTimer(device) : null;
    device.addEventListener("uncapturederror", (event) => {
      this.#error ??= (event as GPUUncapturedErrorEvent).error;
    });
  }

  /** Whether a {@link capture} is recording. */
  get capturing(): boolean {
    return this.#capturing !== null;
  }

  /**
   * Records a dispatch of `program` with its parameters `params`, its
   * storage buffers by binding (those of `program.bindings` but 0) and
   * `groups` workgroups; none where a count is 0.
   */
  run<P>(
    program: Program<P>,
    params: NoInfer<P>,
    buffers: Record<number, GPUBuffer>,
    groups: [number, number, number],
  ): void {
    this.beforeWork();
    if (groups.some((g) => g === 0)) return;
    if (groups.some((g) => g > MAX_GROUPS)) {
      throw new RangeError(`${program.key}: ${groups.join("×")} workgroups exceed ${MAX_GROUPS}`);
    }
    const storage = program.bindings.filter((b) => b !== 0).map((b) => buffers[b]);
    if (this.#capturing) {
      const words = new Uint32Array(PARAM_SLOT / 4);
      program.writeParams(params, words, new Float32Array(words.buffer), 0);
      this.#capturing.push({ program: program as Program, words, storage, groups });
      return;
    }
    const label = this.#timer || this.#skipped ? dispatchLabel(program as Program, groups) : "";
    if (this.#skipped?.test(label)) return;
    const pipeline = this.#pipeline(program as Program);
    const pass = this.#computePass(label);
    const uniform = this.#params(program, params);
    pass.setPipeline(pipeline);
    this.#offset[0] = uniform.offset;
    const bindGroup = this.#bindGroup(program as Program, uniform.buffer, storage);
    pass.setBindGroup(0, bindGroup, this.#offset, 0, 1);
    pass.dispatchWorkgroups(...groups);
    this.#endTimedPass();
    this.dispatches++;
  }

  /**
   * From now on, leaves out every dispatch whose label (program key and grid,
   * as {@link kernelTimes} names them) matches `pattern`, issued directly or
   * in a replay; null runs everything again. For measuring what kernels cost
   * where they run: the results are wrong while any is left out.
   */
  skipKernels(pattern: RegExp | null): void {
    // Without g and y, test() keeps no state from one label to the next.
    this.#skipped = pattern && new RegExp(pattern.source, pattern.flags.replace(/[gy]/g, ""));
  }

  /**
   * GPU time per kernel of the work submitted since the last call, where the
   * runtime was made `timed`.
   */
  async kernelTimes(): Promise<KernelTimes> {
    if (!this.#timer) throw new Error("Kernel times need a backend created with profile: true");
    this.flush();
    return await this.#timer.take();
  }

  /** The command encoder, outside any compute pass, for copies and clears. */
  encoder(): GPUCommandEncoder {
    if (this.#disposed) throw new Error("The WebGPU backend was disposed");
    if (this.#pass) {
      this.#pass.end();
      this.#pass = null;
    }
    return this.#encoder ??= this.device.createCommandEncoder();
  }

  /** A pooled buffer of `length` floats, cleared to zeros by the recorded work. */
  zeros(length: number): GpuBuffer {
    this.notCapturing("Allocating a buffer");
    const bytes = byteSize(length);
    this.memory.checkSize(bytes);
    const buffer = this.memory.pool.acquire(bytes, false);
    this.encoder().clearBuffer(buffer);
    return new GpuBuffer(buffer, length);
  }

  /** Writes `data` at float `offset` of `buf`, after the work recorded so far. */
  write(buf: GpuBuffer, data: Float32Array, offset = 0): void {
    this.notCapturing("A write from the host");
    this.beforeWork();
    if (offset + data.length > buf.length) throw new RangeError("write past the end of the buffer");
    this.flush(); // recorded work that uses `buf` must run before the write
    this.device.queue.writeBuffer(buf.buffer, offset * 4, bufferSource(data));
  }

  /** Submits the recorded work and reads `length` floats of `buf` from `offset`. */
  // deno-lint-ignore require-await -- async so that a bad range or a capture rejects.
  async read(buf: GpuBuffer, offset = 0, length = buf.length - offset): Promise<Float32Array> {
    this.#checkRead(buf, offset, length);
    this.beforeWork();
    return this.#readBack(buf, offset, length, () => this.encoder(), () => this.flush(), true);
  }

  /**
   * Reads `length` floats of `buf` from `offset` as the work submitted so far
   * leaves them: the copy goes in a submission of its own, and the recorded
   * work stays unsubmitted until the next {@link flush}. Unlike {@link read},
   * it resolves when Deno's `mapAsync` does, 10 ms or more after the device is
   * idle: it is the decode engine's read of a round while the next one runs,
   * and that wait leaves the thread to other requests and lets newcomers
   * gather to join together (taken early, the edge server's concurrent
   * streams ran slower: docs/performance.md).
   */
  // deno-lint-ignore require-await -- as read.
  async readSubmitted(
    buf: GpuBuffer,
    offset = 0,
    length = buf.length - offset,
  ): Promise<Float32Array> {
    this.#checkRead(buf, offset, length);
    if (this.#disposed) throw new Error("The WebGPU backend was disposed");
    const encoder = this.device.createCommandEncoder();
    return this.#readBack(buf, offset, length, () => encoder, () => {
      this.device.queue.submit([encoder.finish()]);
    }, false);
  }

  #checkRead(buf: GpuBuffer, offset: number, length: number): void {
    this.notCapturing("A read to the host");
    if (offset < 0 || length < 0 || offset + length > buf.length) {
      throw new RangeError(
        `read of [${offset}, ${offset + length}) from a buffer of ${buf.length}`,
      );
    }
  }

  /**
   * Copies the floats into a staging buffer on `encoder()`, `submit`s that and
   * maps the buffer.
   *
   * Deno's `mapAsync` blocks until the device is idle and then resolves 10 ms
   * later, whatever the work (ext/webgpu/buffer.rs: a blocking poll, then a
   * sleep before it looks at the map's result). The mapping itself is in place
   * once the poll returns, so with `early` the floats are taken from it as soon
   * as the call returns, where `getMappedRange` allows it; the staging buffer
   * goes back to the pool when the promise resolves. Deno's `getMappedRange` takes the
   * map's mode from the last mapping that resolved and has none before the
   * first, so a staging buffer is made mapped (at creation) and unmapped
   * at once: its first read is early too.
   */
  async #readBack(
    buf: GpuBuffer,
    offset: number,
    length: number,
    encoder: () => GPUCommandEncoder,
    submit: () => void,
    early: boolean,
  ): Promise<Float32Array> {
    // Staging buffers are kept by size: a decode step reads back every token.
    const bytes = Math.max(4, length * 4);
    const staging = this.#staging.get(bytes)?.pop() ?? this.#newStaging(bytes);
    if (length > 0) encoder().copyBufferToBuffer(buf.buffer, offset * 4, staging, 0, length * 4);
    submit();
    const mapped = staging.mapAsync(GPUMapMode.READ);
    const floats = early ? mappedFloatsIfReady(staging, length) : null;
    if (floats) {
      this.earlyReads++;
      mapped
        .then(() => this.#returnStaging(staging, bytes))
        .catch(() => staging.destroy()); // the device was lost or destroyed meanwhile
      this.throwIfFailed();
      return floats;
    }
    try {
      await mapped;
    } catch (error) {
      staging.destroy();
      throw error;
    }
    const out = mappedFloats(staging, length);
    this.#returnStaging(staging, bytes);
    this.throwIfFailed();
    return out;
  }

  #newStaging(bytes: number): GPUBuffer {
    const staging = this.device.createBuffer({
      size: bytes,
      usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
      mappedAtCreation: true,
    });
    staging.unmap();
    return staging;
  }

  #returnStaging(staging: GPUBuffer, bytes: number): void {
    staging.unmap();
    const free = this.#staging.get(bytes);
    if (free) free.push(staging);
    else this.#staging.set(bytes, [staging]);
  }

  /** Records a copy of `length` floats, through a scratch buffer within one buffer. */
  copy({ dst, dstOffset = 0, src, srcOffset = 0, length }: CopyArgs<GpuBuffer>): void {
    if (length <= 0) return;
    if (dstOffset + length > dst.length || srcOffset + length > src.length) {
      throw new RangeError("copy past the end of a buffer");
    }
    this.beforeWork();
    if (this.#capturing) {
      if (dst.buffer === src.buffer) this.notCapturing("A copy within one buffer");
      this.#capturing.push({
        copy: [src.buffer, srcOffset * 4, dst.buffer, dstOffset * 4, length * 4],
      });
      return;
    }
    const encoder = this.encoder();
    if (dst.buffer === src.buffer) {
      const tmp = this.memory.pool.acquire(byteSize(length), false);
      encoder.copyBufferToBuffer(src.buffer, srcOffset * 4, tmp, 0, length * 4);
      encoder.copyBufferToBuffer(tmp, 0, dst.buffer, dstOffset * 4, length * 4);
      this.memory.pool.release(tmp);
    } else {
      encoder.copyBufferToBuffer(src.buffer, srcOffset * 4, dst.buffer, dstOffset * 4, length * 4);
    }
  }

  /**
   * `x`'s buffer, or a copy of its first `length` floats when `x` is also one
   * of `outputs`; the function given back releases the copy.
   */
  unaliased(x: GpuBuffer, length: number, ...outputs: GpuBuffer[]): [GPUBuffer, () => void] {
    if (!outputs.some((o) => o.buffer === x.buffer)) return [x.buffer, () => {}];
    this.notCapturing("An operation whose input is also its output");
    const tmp = this.memory.pool.acquire(byteSize(length), false);
    this.encoder().copyBufferToBuffer(x.buffer, 0, tmp, 0, length * 4);
    return [tmp, () => this.memory.pool.release(tmp)];
  }

  /**
   * Submits the recorded work (no wait). Inside a {@link capture} it does
   * nothing: what is captured is submitted where it is replayed.
   */
  flush(): void {
    if (this.#capturing) return;
    this.beforeWork();
    if (!this.#encoder) return;
    if (this.#pass) {
      this.#pass.end();
      this.#pass = null;
    }
    const slotsPerChunk = PARAM_CHUNK / PARAM_SLOT;
    for (let i = 0; i * slotsPerChunk < this.#paramSlots; i++) {
      const used = Math.min(this.#paramSlots - i * slotsPerChunk, slotsPerChunk) * PARAM_SLOT;
      this.device.queue.writeBuffer(this.#paramBuffers[i], 0, this.#paramWords[i], 0, used / 4);
    }
    const encoder = this.#encoder;
    const submit = () => this.device.queue.submit([encoder.finish()]);
    if (this.#timer) this.#timer.resolve(encoder, submit);
    else submit();
    this.#encoder = null;
    this.#paramSlots = 0;
    this.submissions++;
    this.memory.pool.submitted();
  }

  /** Submits the recorded work and waits until the GPU has done it. */
  async sync(): Promise<void> {
    this.flush();
    await this.device.queue.onSubmittedWorkDone();
    this.throwIfFailed();
  }

  /** Destroys the device and every buffer on it. */
  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    if (this.#pass) this.#pass.end();
    this.#pass = null;
    this.#encoder = null;
    this.device.destroy();
  }

  /** Throws the first error the device reported since the last check, if any. */
  throwIfFailed(): void {
    if (this.#error) {
      const error = this.#error as { message?: string };
      this.#error = null;
      throw new Error(`WebGPU error: ${error.message ?? String(error)}`);
    }
  }

  /** Fails for what a recording cannot hold: host transfers and temporary buffers. */
  notCapturing(what: string): void {
    if (this.#capturing) {
      throw new Error(`${what} cannot be recorded by capture()`);
    }
  }

  // ---- recordings ---------------------------------------------------------------------------

  /**
   * Records the launches and copies `ops` issues without running them; see
   * {@link Backend.capture}. A replay then costs three calls per launch, with
   * no parameter packing, bind group lookup or uniform upload.
   */
  capture(ops: () => void): GpuRecording {
    if (this.#capturing) throw new Error("A capture is already in progress");
    this.beforeWork(); // work from before the capture is not part of it
    const log: CaptureLog = this.#capturing = [];
    try {
      ops();
      this.beforeWork(); // nor does a recording leave work for after it
    } finally {
      this.#capturing = null;
    }
    const launches = log.filter((entry): entry is PendingLaunch => !("copy" in entry));
    let chunk: RecordingChunk | null = null;
    let slot = 0;
    if (launches.length > 0) {
      chunk = this.#recordingChunk(launches.length);
      slot = chunk.used - launches.length;
      const words = new Uint32Array(launches.length * PARAM_SLOT / 4);
      launches.forEach((launch, i) => words.set(launch.words, i * PARAM_SLOT / 4));
      this.device.queue.writeBuffer(chunk.buffer, slot * PARAM_SLOT, words);
    }
    const steps = log.map((entry): RecordedStep => {
      if ("copy" in entry) return entry;
      return {
        label: dispatchLabel(entry.program, entry.groups),
        pipeline: this.#pipeline(entry.program),
        bindGroup: this.#bindGroup(entry.program, chunk!.buffer, entry.storage),
        offsets: Uint32Array.of(slot++ * PARAM_SLOT),
        groups: entry.groups,
      };
    });
    return new GpuRecording(steps, chunk);
  }

  /**
   * Takes `slots` slots for a new recording, at the end of the chunk it
   * returns: the last one made, an empty one, or a new one.
   */
  #recordingChunk(slots: number): RecordingChunk {
    let chunk = this.#recordingChunks.at(-1);
    if (!chunk || chunk.slots - chunk.used < slots) chunk = this.#freeRecordingChunk(slots);
    chunk.used += slots;
    chunk.live++;
    return chunk;
  }

  /** An empty chunk of at least `slots` slots, made the last one: a released one, or a new one. */
  #freeRecordingChunk(slots: number): RecordingChunk {
    let chunk = this.#recordingChunks.find((c) => c.live === 0 && c.slots >= slots);
    if (chunk) {
      // Replays of its released recordings may wait in the encoder: they run before it is rewritten.
      this.flush();
      chunk.used = 0;
      // The chunk goes last, where the next captures look first.
      this.#recordingChunks.splice(this.#recordingChunks.indexOf(chunk), 1);
    } else {
      const count = Math.max(slots, RECORDING_CHUNK_SLOTS);
      chunk = {
        buffer: this.device.createBuffer({
          size: count * PARAM_SLOT,
          usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST,
        }),
        slots: count,
        used: 0,
        live: 0,
      };
    }
    this.#recordingChunks.push(chunk);
    return chunk;
  }

  /** Records the launches and copies of `recording` again. */
  replay(recording: GpuRecording): void {
    this.beforeWork();
    let pipeline: GPUComputePipeline | null = null;
    for (const step of recording.steps) {
      if ("copy" in step) {
        this.encoder().copyBufferToBuffer(...step.copy);
        pipeline = null;
        continue;
      }
      if (this.#skipped?.test(step.label)) continue;
      const pass = this.#computePass(step.label);
      if (step.pipeline !== pipeline) pass.setPipeline(pipeline = step.pipeline);
      pass.setBindGroup(0, step.bindGroup, step.offsets, 0, 1);
      pass.dispatchWorkgroups(...step.groups);
      if (this.#endTimedPass()) pipeline = null;
      this.dispatches++;
    }
  }

  /** Gives back a recording's uniform blocks. */
  releaseRecording(recording: GpuRecording): void {
    if (recording.chunk) recording.chunk.live--;
  }

  // ---- caches -------------------------------------------------------------------------------

  /** The open compute pass, or with a timer a new one of its own for the dispatch `label`. */
  #computePass(label: string): GPUComputePassEncoder {
    const timer = this.#timer;
    if (!timer) return this.#pass ??= this.encoder().beginComputePass();
    if (timer.full) this.flush();
    const index = timer.labels.push(label) - 1;
    return this.#pass = this.encoder().beginComputePass({
      timestampWrites: {
        querySet: timer.querySet,
        beginningOfPassWriteIndex: 2 * index,
        endOfPassWriteIndex: 2 * index + 1,
      },
    });
  }

  /** Ends a timed dispatch's own pass; whether there was one. */
  #endTimedPass(): boolean {
    if (!this.#timer || !this.#pass) return false;
    this.#pass.end();
    this.#pass = null;
    return true;
  }

  /**
   * The bind group layout of a program: its uniform block with a dynamic offset
   * (so that one bind group serves every dispatch on the same buffers), then
   * its storage buffers.
   */
  #layout(program: Program): GPUBindGroupLayout {
    const key = program.layoutKey;
    let layout = this.#layouts.get(key);
    if (!layout) {
      const writable = program.writable;
      layout = this.device.createBindGroupLayout({
        label: key,
        entries: program.bindings.map((binding) => ({
          binding,
          visibility: GPUShaderStage.COMPUTE,
          buffer: binding === 0
            ? { type: "uniform", hasDynamicOffset: true, minBindingSize: 0 }
            : { type: writable.includes(binding) ? "storage" : "read-only-storage" },
        })),
      });
      this.#layouts.set(key, layout);
    }
    return layout;
  }

  #pipeline(program: Program): GPUComputePipeline {
    let pipeline = this.#pipelines.get(program.key);
    if (!pipeline) {
      let module = this.#modules.get(program.moduleKey);
      if (!module) {
        module = this.device.createShaderModule({ label: program.shader, code: program.source() });
        this.#modules.set(program.moduleKey, module);
      }
      pipeline = this.device.createComputePipeline({
        label: program.key,
        layout: this.device.createPipelineLayout({ bindGroupLayouts: [this.#layout(program)] }),
        compute: { module, entryPoint: program.entry },
      });
      this.#pipelines.set(program.key, pipeline);
    }
    return pipeline;
  }

  /** A small number naming each buffer in bind group cache keys. */
  #id(buffer: GPUBuffer): number {
    let id = this.#ids.get(buffer);
    if (id === undefined) this.#ids.set(buffer, id = this.#nextId++);
    return id;
  }

  /** A uniform block holding `params`, valid for the current encoder. */
  #params<P>(program: Program<P>, params: P): { buffer: GPUBuffer; offset: number } {
    const slotsPerChunk = PARAM_CHUNK / PARAM_SLOT;
    const chunk = Math.floor(this.#paramSlots / slotsPerChunk);
    const slot = this.#paramSlots % slotsPerChunk;
    this.#paramSlots++;
    if (chunk === this.#paramBuffers.length) {
      this.#paramBuffers.push(this.device.createBuffer({
        size: PARAM_CHUNK,
        usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST,
      }));
      const data = new ArrayBuffer(PARAM_CHUNK);
      this.#paramWords.push(new Uint32Array(data));
      this.#paramFloats.push(new Float32Array(data));
    }
    const offset = slot * PARAM_SLOT;
    const word = offset / 4;
    const words = this.#paramWords[chunk];
    words.fill(0, word, word + PARAM_SLOT / 4);
    program.writeParams(params, words, this.#paramFloats[chunk], word);
    return { buffer: this.#paramBuffers[chunk], offset };
  }

  /** The bind group of `program` over a uniform arena buffer and its storage buffers, cached. */
  #bindGroup(program: Program, params: GPUBuffer, storage: GPUBuffer[]): GPUBindGroup {
    let key = `${program.layoutKey}|${this.#id(params)}`;
    for (const buffer of storage) key += `|${this.#id(buffer)}`;
    let bindGroup = this.#bindGroups.get(key);
    if (!bindGroup) {
      if (this.#bindGroups.size >= MAX_BIND_GROUPS) this.#bindGroups.clear();
      bindGroup = this.device.createBindGroup({
        layout: this.#layout(program),
        entries: program.bindings.map((binding, i) => ({
          binding,
          resource: binding === 0
            ? { buffer: params, offset: 0, size: PARAM_SLOT }
            : { buffer: storage[i - 1] },
        })),
      });
      this.#bindGroups.set(key, bindGroup);
    }
    return bindGroup;
  }
}
