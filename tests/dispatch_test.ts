/**
 * The "auto" dispatcher: capability checks, fallbacks with reasons, explicit
 * choices, measuring through the decode engine, the noise rule, the
 * decision cache and the CLI's --verbose report. The runtime's capabilities
 * and the candidate backends are injected, so no global is patched.
 *
 * The fake backends compute with the reference (js) backend on tiny shapes
 * and differ in time by large factors, so that the rankings the tests expect
 * hold on a loaded machine.
 */

import {
  assert,
  assertEquals,
  assertFalse,
  assertMatch,
  assertRejects,
  assertStringIncludes,
} from "@std/assert";
import type { ChooseArgs } from "../src/backend.ts";
import { JsBackend } from "../src/backends/js.ts";
import type { BackendCandidate, Capabilities } from "../src/backends/registry.ts";
import { parseConfig } from "../src/config.ts";
import {
  type BackendCache,
  formatBackendReport,
  type MatrixBlocks,
  selectBackend,
} from "../src/dispatch.ts";
import type { QuantizedMatrix } from "../src/quant.ts";
import { loadModel } from "../src/load.ts";
import { readSamples, runCli, SHARED } from "./helpers.ts";

const TINY_MODEL = `${SHARED}/models/tiny-shakespeare`;
/** Small enough for the reference backend to run a repetition in milliseconds. */
const FAKE_CONFIG = parseConfig({ d_model: 16, n_layer: 2, vocab_size: 32 }, "config.json");

/** WebAssembly SIMD but no WebGPU and no threads. */
const NO_GPU: Capabilities = {
  gpu: undefined,
  wasmSimd: true,
  wasmRelaxedSimd: true,
  threads: false,
};
const NO_ADAPTER: Capabilities = {
  ...NO_GPU,
  gpu: { requestAdapter: () => Promise.resolve(null) } as unknown as GPU,
};

/** Busy for `ms` milliseconds: a backend that much slower. */
function busy(ms: number): void {
  const end = performance.now() + ms;
  while (performance.now() < end) {
    // Spinning.
  }
}

/** A reference backend under another name that counts its calls and can be slowed or broken. */
class FakeBackend extends JsBackend {
  override readonly name: string;
  readonly #counter: { calls: number };
  readonly #delayMs: number;
  readonly #scanFails: boolean;

  constructor(name: string, counter: { calls: number }, delayMs: number, scanFails: boolean) {
    super();
    this.name = name;
    this.#counter = counter;
    this.#delayMs = delayMs;
    this.#scanFails = scanFails;
  }

  override linear(...args: Parameters<JsBackend["linear"]>): void {
    this.#counter.calls++;
    busy(this.#delayMs);
    super.linear(...args);
  }

  override selectiveScan(...args: Parameters<JsBackend["selectiveScan"]>): void {
    if (this.#scanFails) throw new Error("This scan is not supported");
    super.selectiveScan(...args);
  }
}

/**
 * The reference backend as if it ran on a device: `queued`, so the engine
 * pipelines its decode rounds, and every read takes `latencyMs` (a round
 * trip to the device, as Deno's `mapAsync` costs ≥ 10 ms on a GPU), while
 * the work itself is the reference backend's. Every single operation
 * followed by a read therefore looks slow; a round of steps read once is fast.
 */
class DeviceLikeBackend extends JsBackend {
  override readonly name = "device-like";
  readonly #latencyMs: number;

  constructor(latencyMs: number) {
    super();
    this.#latencyMs = latencyMs;
    // JsBackend declares `queued` false; this one queues.
    Object.defineProperty(this, "queued", { value: true });
  }

  override async read(
    buf: Float32Array,
    offset?: number,
    length?: number,
  ): Promise<Float32Array> {
    // Copied when asked for, like a device read started then, delivered a round trip later.
    const data = super.read(buf, offset, length);
    await new Promise((resolve) => setTimeout(resolve, this.#latencyMs));
    return data;
  }
}

/**
 * A reference backend whose decoding on the real vocabulary (`headVocab`)
 * alternates between fast and slow from one decode run to the next: each
 * decode run starts with one pick over the prompt's logits (step -1), and
 * every second such pick of the full vocabulary waits `slowMs` more. With a
 * base wait above the dispatcher's 40 ms of repeats, the head model's decode
 * round runs once per repetition, so every second repetition is slow.
 */
class SeesawBackend extends JsBackend {
  override readonly name: string;
  readonly #headVocab: number;
  #firstPicks = 0;

  constructor(name: string, headVocab: number) {
    super();
    this.name = name;
    this.#headVocab = headVocab;
  }

  override chooseTokens(args: ChooseArgs<Float32Array>): void {
    if (args.step === -1 && args.vocab === this.#headVocab) {
      busy(this.#firstPicks++ % 2 === 0 ? 45 : 80);
    }
    super.chooseTokens(args);
  }
}

/** A candidate named `name` creating backends with `make`. */
function candidateOf(name: string, make: () => JsBackend): BackendCandidate {
  return {
    name,
    probe: () =>
      Promise.resolve({
        available: true,
        device: `fake ${name}`,
        create: () => Promise.resolve(make()),
      }),
  };
}

interface FakeOptions {
  delayMs?: number;
  scanFails?: boolean;
  initFails?: boolean;
}

/** A candidate creating {@link FakeBackend}s; `counter.calls` counts linear calls. */
function fake(name: string, options: FakeOptions = {}) {
  const counter = { calls: 0 };
  const candidate: BackendCandidate = {
    name,
    probe: () =>
      Promise.resolve({
        available: true,
        device: `fake ${name}`,
        create: () =>
          options.initFails
            ? Promise.reject(new Error("The fake device would not open"))
            : Promise.resolve(
              new FakeBackend(name, counter, options.delayMs ?? 0, options.scanFails ?? false),
            ),
      }),
  };
  return { candidate, counter };
}

/** A cache in a Map, standing in for localStorage. */
function mapCache(): BackendCache & { map: Map<string, string> } {
  const map = new Map<string, string>();
  return {
    map,
    getItem: (key) => map.get(key) ?? null,
    setItem: (key, value) => void map.set(key, value),
  };
}

Deno.test("auto without a WebGPU adapter measures wasm and js through the engine", async (t) => {
  for (
    const [label, capabilities, reason] of [
      ["no navigator.gpu", NO_GPU, "WebGPU is not available: no navigator.gpu"],
      ["an adapter-less navigator.gpu", NO_ADAPTER, "navigator.gpu has no adapter"],
    ] as const
  ) {
    await t.step(label, async () => {
      const { backend, report } = await selectBackend("auto", FAKE_CONFIG, {
        capabilities,
        cache: null,
      });
      backend.dispose();
      // Which of the two wins depends on the machine and its load; that both were measured does not.
      assert(["js", "wasm"].includes(report.chosen), report.chosen);
      assertEquals(backend.name, report.chosen);
      assertEquals(report.mode, "auto");
      assertEquals(report.cached, false);
      assertEquals(report.batch, 1);
      const byName = Object.fromEntries(report.candidates.map((c) => [c.name, c]));
      assertEquals(byName.webgpu.available, false);
      assertStringIncludes(byName.webgpu.reason!, reason);
      assertStringIncludes(byName.wasm.device!, "1 thread");
      const winner = byName[report.chosen];
      assert(winner.totalMs! > 0 && winner.repetitions! >= 1);
      assert(winner.decodeTokensPerSecond! > 0 && winner.prefillTokensPerSecond! > 0);
      const runs = winner.measured!;
      assertEquals([runs.layers, runs.smallVocab], [2, 32]);
      assert(runs.decodeMs.every((ms) => ms > 0) && runs.promptMs.every((ms) => ms > 0));
      assertStringIncludes(report.reason, report.chosen);
    });
  }
});

Deno.test("explicit webgpu without an adapter fails naming the alternatives", async () => {
  await assertRejects(
    () => selectBackend("webgpu", FAKE_CONFIG, { capabilities: NO_ADAPTER }),
    Error,
    'WebGPU is not available: navigator.gpu has no adapter. Use backend "js" or "wasm", ' +
      'or "auto" to pick the fastest available',
  );
});

Deno.test("auto picks a backend whose single calls are slow but whose engine rounds are fast", async () => {
  // Measured one operation at a time with a wait after each, as "auto" once
  // did, the device-like backend pays 30 ms per wait (per generated token at
  // least): seconds for the workload. Through the engine it reads once per
  // round, and its work is the plain reference backend's.
  const perCall = fake("per-call", { delayMs: 2 });
  const { backend, report } = await selectBackend("auto", FAKE_CONFIG, {
    candidates: [perCall.candidate, candidateOf("device-like", () => new DeviceLikeBackend(30))],
    cache: null,
  });
  backend.dispose();
  assertEquals(report.chosen, "device-like");
  const [slow, device] = report.candidates;
  assert(device.measured!.syncMs >= 25, `the idle wait took ${device.measured!.syncMs} ms`);
  assert(device.totalMs! < slow.totalMs!, formatBackendReport(report));
  assertStringIncludes(report.reason, "device-like");
});

Deno.test("a choice inside the noise is not cached", async () => {
  // Two identical backends whose every second repetition is slow: their
  // estimates interleave, and no number of repetitions separates them.
  const config = parseConfig({ d_model: 16, n_layer: 2, vocab_size: 128 }, "config.json");
  const cache = mapCache();
  const { backend, report } = await selectBackend("auto", config, {
    candidates: [
      candidateOf("seesaw-a", () => new SeesawBackend("seesaw-a", 128)),
      candidateOf("seesaw-b", () => new SeesawBackend("seesaw-b", 128)),
    ],
    cache,
  });
  backend.dispose();
  assert(["seesaw-a", "seesaw-b"].includes(report.chosen));
  assertEquals(report.clear, false);
  assertEquals(cache.map.size, 0, "nothing was cached");
  assertStringIncludes(report.reason, "Inside the noise");
  assert(report.candidates.every((c) => c.repetitions! >= 2), formatBackendReport(report));
  assertMatch(
    formatBackendReport(report),
    /^backend seesaw-. \(auto, measured in .*inside the noise: not cached\)$/m,
  );
});

Deno.test("backends that fail to start or throw while measured are passed over with why", async () => {
  const broken = fake("broken", { initFails: true });
  const flaky = fake("flaky", { scanFails: true });
  const steady = fake("steady");
  const { backend, report } = await selectBackend("auto", FAKE_CONFIG, {
    candidates: [broken.candidate, flaky.candidate, steady.candidate],
    cache: null,
  });
  assertEquals(backend.name, "steady");
  assertEquals(report.chosen, "steady");
  const [brokenReport, flakyReport, steadyReport] = report.candidates;
  assertEquals(brokenReport.available, false);
  assertEquals(brokenReport.reason, "Failed to initialise: The fake device would not open");
  assertEquals(flakyReport.available, false);
  assertEquals(flakyReport.reason, "Failed while being measured: This scan is not supported");
  assert(steadyReport.available && steadyReport.totalMs !== undefined);
  assertStringIncludes(report.reason, "steady");
  const text = formatBackendReport(report);
  assertStringIncludes(text, "  broken: not available. Failed to initialise");
  assertStringIncludes(text, "  flaky: not available. Failed while being measured");
});

Deno.test("an explicit backend is used as named, with no measuring", async () => {
  const fast = fake("fast");
  const slow = fake("slow", { delayMs: 2 });
  const candidates = [slow.candidate, fast.candidate];
  const auto = await selectBackend("auto", FAKE_CONFIG, { candidates, cache: null });
  assertEquals(auto.report.chosen, "fast");
  const slowReport = auto.report.candidates[0];
  assert(slowReport.totalMs! > auto.report.candidates[1].totalMs!);

  fast.counter.calls = slow.counter.calls = 0;
  const explicit = await selectBackend("slow" as "js", FAKE_CONFIG, { candidates });
  assertEquals(explicit.backend.name, "slow");
  assertEquals(explicit.report.mode, "explicit");
  assertEquals(explicit.report.candidates.map((c) => c.name), ["slow"]);
  assertEquals(slow.counter.calls + fast.counter.calls, 0);

  const model = await loadModel(TINY_MODEL, { backend: "js" });
  assertEquals(model.backend, "js");
  assertEquals(model.backendReport().mode, "explicit");
});

Deno.test("a clear decision is cached and reused; a new shape, batch or remeasure measures", async () => {
  const a = fake("a");
  const b = fake("b", { delayMs: 2 });
  const cache = mapCache();
  const options = { candidates: [a.candidate, b.candidate], cache };
  const calls = () => a.counter.calls + b.counter.calls;

  const first = await selectBackend("auto", FAKE_CONFIG, options);
  assertEquals([first.report.chosen, first.report.cached, first.report.clear], ["a", false, true]);
  assertEquals(cache.map.size, 1);
  const [key] = cache.map.keys();
  assertStringIncludes(key, "mamba-deno/backend/");
  assert(calls() > 0);

  const before = calls();
  const second = await selectBackend("auto", FAKE_CONFIG, options);
  assertEquals([second.report.chosen, second.report.cached], ["a", true]);
  assertEquals(calls(), before, "the cached decision ran no operation");
  assertEquals(second.report.candidates, first.report.candidates);

  const deeper = parseConfig({ d_model: 16, n_layer: 3, vocab_size: 32 }, "config.json");
  const third = await selectBackend("auto", deeper, options);
  assertEquals(third.report.cached, false);
  assertEquals(cache.map.size, 2);

  const batched = await selectBackend("auto", FAKE_CONFIG, { ...options, batch: 4 });
  assertEquals([batched.report.cached, batched.report.batch], [false, 4]);
  assertEquals(cache.map.size, 3);

  const fourth = await selectBackend("auto", FAKE_CONFIG, { ...options, remeasure: true });
  assertEquals(fourth.report.cached, false);
  assert(calls() > before);
});

Deno.test("the report reads as a table", async () => {
  const { report } = await selectBackend("auto", FAKE_CONFIG, {
    candidates: [fake("a").candidate, fake("b", { delayMs: 2 }).candidate],
    cache: null,
    batch: 2,
  });
  const text = formatBackendReport(report);
  assertMatch(text, /^backend a \(auto, measured in [\d.]+ m?s\)$/m);
  assertMatch(text, /^ {2}why: Lowest estimated time for 2 streams/m);
  assertMatch(text, /^ {2}decode 16 × 2, head model +[\d.,]+ +([\d.,]+|-)$/m);
  assertMatch(text, /^ {2}full model: decode tok\/s at 2 +[\d.,]+ +([\d.,]+|-)$/m);
  assertMatch(text, /^ {2}est\. ms, 2 × \(64 \+ 128 ids\) +[\d.,]+ +(≥ )?[\d.,]+$/m);
});

Deno.test("batch must be a positive integer", async () => {
  await assertRejects(
    () => selectBackend("auto", FAKE_CONFIG, { candidates: [fake("a").candidate], batch: 0 }),
    RangeError,
    "batch must be a positive integer, got 0",
  );
  // Also where the backend is named, which measures nothing but warms up at the batch.
  await assertRejects(
    () => loadModel(`${SHARED}/models/tiny-shakespeare`, { backend: "js", batch: 2.5 }),
    RangeError,
    "batch must be a positive integer, got 2.5",
  );
});

Deno.test("the CLI's --verbose prints the report on stderr and leaves stdout alone", async () => {
  const samples = await readSamples();
  const { code, stdout, stderr } = await runCli([
    "--verbose",
    "-p",
    samples[1].prompt,
    "-n",
    "48",
    "--temp",
    "0",
  ]);
  assertEquals(code, 0, stderr);
  assertEquals(stdout, samples[1].greedy_text);
  assertMatch(stderr, /^backend (js|wasm|webgpu) \(auto, /m);
  assertStringIncludes(stderr, "  why: ");
  assertMatch(stderr, /^ {2}wasm: /m);
});

/** A reference backend that notes the quantized matrices it is offered (and keeps none). */
class BlockNotingBackend extends JsBackend {
  override readonly name: string;
  readonly offered: string[];
  readonly #delayMs: number;

  constructor(name: string, offered: string[], delayMs: number) {
    super();
    this.name = name;
    this.offered = offered;
    this.#delayMs = delayMs;
  }

  override linear(...args: Parameters<JsBackend["linear"]>): void {
    busy(this.#delayMs);
    super.linear(...args);
  }

  override uploadQuantizedMatrix(matrix: QuantizedMatrix): null {
    this.offered.push(`${matrix.type} [${matrix.rows}, ${matrix.cols}]`);
    return null;
  }
}

Deno.test("auto measures a quantized file's matrices as the same blocks, and caches apart", async () => {
  // d_model 32: in_proj [128, 32], x_proj [34, 64], out_proj [32, 64] and the
  // embedding [64, 32] have rows of whole blocks; dt_proj [64, 2] does not.
  const config = parseConfig({ d_model: 32, n_layer: 2, vocab_size: 64 }, "config.json");
  const cache = mapCache();
  const offered: string[] = [];
  // One clearly slower, so that each decision is cached.
  const candidates = [["blocks-fast", 0], ["blocks-slow", 2]].map(([name, delayMs]) =>
    candidateOf(`${name}`, () => new BlockNotingBackend(`${name}`, offered, Number(delayMs)))
  );
  const run = async (matrixBlocks?: MatrixBlocks) => {
    offered.length = 0;
    const { backend } = await selectBackend("auto", config, { candidates, cache, matrixBlocks });
    backend.dispose();
    return new Set(offered);
  };

  assertEquals(await run(), new Set(), "a float file offers no blocks");
  const seen = await run({ layers: "q4_0", head: "q8_0" });
  for (const matrix of ["q4_0 [128, 32]", "q4_0 [34, 64]", "q4_0 [32, 64]", "q8_0 [64, 32]"]) {
    assert(seen.has(matrix), `${matrix} among ${[...seen]}`);
  }
  assertFalse([...seen].some((m) => m.endsWith("[64, 2]")), "dt_proj stays float");
  assert([...seen].every((m) => !m.startsWith("q8_0") || m === "q8_0 [64, 32]"));
  assertEquals(cache.map.size, 2, "a decision per weight format");

  // Q4_K: only rows of whole super-blocks of 256 (in_proj [1024, 256], x_proj [48, 512] and
  // out_proj [256, 512] of d_model 256; its dt_proj [512, 16] stays float).
  const wide = parseConfig({ d_model: 256, n_layer: 1, vocab_size: 64 }, "config.json");
  offered.length = 0;
  const q4k = await selectBackend("auto", wide, {
    candidates,
    cache,
    matrixBlocks: { layers: "q4_k", head: "q8_0" },
  });
  q4k.backend.dispose();
  assertEquals(
    new Set(offered),
    new Set(["q4_k [1024, 256]", "q4_k [48, 512]", "q4_k [256, 512]", "q8_0 [64, 256]"]),
  );
});

Deno.test(
  "probing WebGPU on Linux without XDG_RUNTIME_DIR prints no error and leaves no directory",
  {
    ignore: Deno.build.os !== "linux",
  },
  async () => {
    // Mesa's drivers look for a Wayland display as the GPU instance starts; libwayland prints an
    // error line for each adapter when XDG_RUNTIME_DIR is unset, unless the probe sets it first.
    const registry = new URL("../src/backends/registry.ts", import.meta.url).href;
    const script = `
    const { probeCapabilities } = await import(${JSON.stringify(registry)});
    const { gpu } = probeCapabilities();
    await gpu?.requestAdapter();
    console.log(Deno.env.get("XDG_RUNTIME_DIR") ?? "");
  `;
    const env: Record<string, string> = { ...Deno.env.toObject(), NO_COLOR: "1" };
    delete env.XDG_RUNTIME_DIR;
    const output = await new Deno.Command(Deno.execPath(), {
      args: ["eval", "--quiet", script],
      clearEnv: true,
      env,
      stdout: "piped",
      stderr: "piped",
    }).output();
    const stderr = new TextDecoder().decode(output.stderr);
    assertEquals(output.code, 0, stderr);
    assertFalse(stderr.includes("XDG_RUNTIME_DIR"), stderr);
    const dir = new TextDecoder().decode(output.stdout).trim();
    assertMatch(dir, /mamba-deno-runtime-/);
    // Removed when the process ended.
    await assertRejects(() => Deno.stat(dir), Deno.errors.NotFound);
  },
);
