/**
 * The wasm backend's worker threads: the control block they watch in the
 * shared memory, the job codes of asm/kernels/jobs.ts, and starting and
 * stopping the workers (see src/backends/wasm.ts for how a job runs).
 *
 * @module
 */

// Control block (i32 words) shared with the workers; see runJob in asm/kernels/jobs.ts.
export const GEN = 0;
export const DONE = 1;
export const OP = 2;
export const ARGS = 3;
export const ERROR = 31;
export const CTRL_WORDS = 32;
export const OP_LINEAR = 1;
export const OP_SCAN = 2;
export const OP_SCAN_STEP = 3;
export const OP_SSD = 4;
export const OP_SSD_STEP = 5;
export const OP_GATED_NORM = 6;
export const OP_LINEAR_BLOCKS = 7;
export const OP_LINEAR_HALF = 8;
export const OP_CONV = 9;
const OP_EXIT = -1;

/**
 * The worker's source: instantiates the kernels on the shared memory, then
 * loops on the control block. Written to run both as a web module worker and
 * as a `node:worker_threads` eval worker (CommonJS).
 */
const WORKER_SOURCE = `
"use strict";
const SPIN_MS = 2;
function start(data, post) {
  const { module, memory, ctrl, part, parts } = data;
  const kernels = new WebAssembly.Instance(module, { env: { memory } }).exports;
  const c = new Int32Array(memory.buffer, ctrl, ${CTRL_WORDS});
  let seen = Atomics.load(c, ${GEN});
  post("ready");
  for (;;) {
    let spins = 0;
    let since = 0;
    while (Atomics.load(c, ${GEN}) === seen) {
      if ((++spins & 1023) === 0) {
        const now = performance.now();
        if (since === 0) since = now;
        else if (now - since > SPIN_MS) Atomics.wait(c, ${GEN}, seen);
      }
    }
    seen = Atomics.load(c, ${GEN});
    if (Atomics.load(c, ${OP}) === ${OP_EXIT}) break;
    try {
      kernels.runJob(ctrl, part, parts);
    } catch (_) {
      Atomics.store(c, ${ERROR}, 1);
    }
    if (Atomics.add(c, ${DONE}, 1) === parts - 2) Atomics.notify(c, ${DONE});
  }
}
if (typeof require === "function") {
  const { parentPort } = require("node:worker_threads");
  parentPort.once("message", (data) => start(data, (m) => parentPort.postMessage(m)));
} else {
  self.onmessage = (event) => start(event.data, (m) => self.postMessage(m));
}
`;

/** What a worker handle must offer, whichever kind of worker it is. */
export interface ThreadHandle {
  terminate(): void;
  unref?(): void;
}

interface NodeWorker {
  once(event: string, listener: (value: unknown) => void): void;
  postMessage(value: unknown): void;
  unref(): void;
  terminate(): unknown;
}

function isServerRuntime(): boolean {
  const g = globalThis as { Deno?: unknown; process?: { versions?: { node?: string } } };
  return g.Deno !== undefined || g.process?.versions?.node !== undefined;
}

/**
 * Starts `parts - 1` workers on `memory`, worker i running part i of every job
 * written at `ctrl`; resolves once each has instantiated the kernels.
 */
export async function startWorkers(
  module: WebAssembly.Module,
  memory: WebAssembly.Memory,
  ctrl: number,
  parts: number,
): Promise<ThreadHandle[]> {
  const message = (part: number) => ({ module, memory, ctrl, part, parts });
  const ready: Promise<unknown>[] = [];
  const handles: ThreadHandle[] = [];
  let url: string | undefined;
  if (isServerRuntime()) {
    // A computed specifier keeps bundlers for the web from resolving it.
    const specifier = ["node", "worker_threads"].join(":");
    const { Worker } = await import(specifier) as {
      Worker: new (source: string, options: { eval: boolean }) => NodeWorker;
    };
    for (let part = 1; part < parts; part++) {
      const worker = new Worker(WORKER_SOURCE, { eval: true });
      ready.push(
        new Promise((resolve, reject) => {
          worker.once("message", resolve);
          worker.once("error", reject);
        }),
      );
      worker.postMessage(message(part));
      // Unref'd once started (awaiting "ready" needs them referenced).
      handles.push({ terminate: () => void worker.terminate(), unref: () => worker.unref() });
    }
  } else {
    url = URL.createObjectURL(new Blob([WORKER_SOURCE], { type: "text/javascript" }));
    for (let part = 1; part < parts; part++) {
      const worker = new Worker(url, { type: "module" });
      ready.push(
        new Promise((resolve, reject) => {
          worker.onmessage = resolve;
          worker.onerror = reject;
        }),
      );
      worker.postMessage(message(part));
      handles.push(worker);
    }
  }
  try {
    await Promise.all(ready);
  } catch (error) {
    for (const handle of handles) handle.terminate();
    throw new Error(`A wasm backend worker failed to start: ${error}`);
  } finally {
    if (url) URL.revokeObjectURL(url);
  }
  for (const handle of handles) handle.unref?.();
  return handles;
}

/** Stops the workers of a backend that is disposed or garbage collected. */
export function stopWorkers(ctrl: Int32Array, handles: ThreadHandle[]): void {
  Atomics.store(ctrl, OP, OP_EXIT);
  Atomics.add(ctrl, GEN, 1);
  Atomics.notify(ctrl, GEN);
  for (const handle of handles) handle.terminate();
}

/** Stops the workers of a backend that is garbage collected before its dispose(). */
export const finalizer = new FinalizationRegistry<{ ctrl: Int32Array; handles: ThreadHandle[] }>(
  ({ ctrl, handles }) => stopWorkers(ctrl, handles),
);

/** Whether this thread may block in Atomics.wait (not a browser's main thread). */
export function canBlock(ctrl: Int32Array): boolean {
  try {
    Atomics.wait(ctrl, ERROR, 12345, 0);
    return true;
  } catch {
    return false;
  }
}
