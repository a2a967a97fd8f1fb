/**
 * The "auto" dispatcher: capability checks, fallbacks with reasons, explicit
 * choices, the decision cache and the CLI's --verbose report. The runtime's
 * capabilities and the candidate backends are injected, so no global is
 * patched.
 */

import {
  assert,
  assertEquals,
  assertMatch,
  assertRejects,
  assertStringIncludes,
} from "@std/assert";
import { JsBackend } from "../src/backends/js.ts";
import type { BackendCandidate, Capabilities } from "../src/backends/registry.ts";
import { parseConfig } from "../src/config.ts";
import { type BackendCache, formatBackendReport, selectBackend } from "../src/dispatch.ts";
import { loadModel } from "../src/load.ts";
import { readSamples, runCli, SHARED } from "./helpers.ts";

const TINY_MODEL = `${SHARED}/models/tiny-shakespeare`;
/** The tiny-shakespeare model's real shapes, for the tests that measure real backends. */
const TINY_CONFIG = parseConfig(
  JSON.parse(await Deno.readTextFile(`${TINY_MODEL}/config.json`)),
  "config.json",
);
/** Smaller still, for the fake backends (which compute in plain TypeScript). */
const FAKE_CONFIG = parseConfig({ d_model: 16, n_layer: 2, vocab_size: 32 }, "config.json");

/** WebAssembly SIMD but no WebGPU and no threads (one-thread wasm measures steadily). */
const NO_GPU: Capabilities = { gpu: undefined, wasmSimd: true, threads: false };
const NO_ADAPTER: Capabilities = {
  ...NO_GPU,
  gpu: { requestAdapter: () => Promise.resolve(null) } as unknown as GPU,
};

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
    const end = performance.now() + this.#delayMs;
    while (performance.now() < end) {
      // Busy: a backend this much slower per call.
    }
    super.linear(...args);
  }

  override selectiveScan(...args: Parameters<JsBackend["selectiveScan"]>): void {
    if (this.#scanFails) throw new Error("This scan is not supported");
    super.selectiveScan(...args);
  }
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

Deno.test("auto without a WebGPU adapter measures wasm and js and picks wasm", async (t) => {
  for (
    const [label, capabilities, reason] of [
      ["no navigator.gpu", NO_GPU, "WebGPU is not available: no navigator.gpu"],
      ["an adapter-less navigator.gpu", NO_ADAPTER, "navigator.gpu has no adapter"],
    ] as const
  ) {
    await t.step(label, async () => {
      const { backend, report } = await selectBackend("auto", TINY_CONFIG, {
        capabilities,
        cache: null,
      });
      backend.dispose?.();
      assertEquals(backend.name, "wasm");
      assertEquals(report.chosen, "wasm");
      assertEquals(report.mode, "auto");
      assertEquals(report.cached, false);
      const byName = Object.fromEntries(report.candidates.map((c) => [c.name, c]));
      assertEquals(byName.webgpu.available, false);
      assertStringIncludes(byName.webgpu.reason!, reason);
      assert(byName.wasm.totalMs! > 0 && byName.wasm.perOp!["in_proj@1"] > 0);
      assertStringIncludes(byName.wasm.device!, "1 thread");
      assertStringIncludes(report.reason, "wasm");
    });
  }
});

Deno.test("explicit webgpu without an adapter fails naming the alternatives", async () => {
  await assertRejects(
    () => selectBackend("webgpu", TINY_CONFIG, { capabilities: NO_ADAPTER }),
    Error,
    'WebGPU is not available: navigator.gpu has no adapter. Use backend "js" or "wasm", ' +
      'or "auto" to pick the fastest available',
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
  assertEquals(
    flakyReport.reason,
    "Failed while being measured: scan on 1 row threw: This scan is not supported",
  );
  assert(steadyReport.available && steadyReport.totalMs !== undefined);
  assertStringIncludes(report.reason, "steady");
});

Deno.test("an explicit backend is used as named, with no measuring", async () => {
  const fast = fake("fast");
  const slow = fake("slow", { delayMs: 0.2 });
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

Deno.test("a cached decision is reused without measuring; a new shape or remeasure measures", async () => {
  const a = fake("a");
  const b = fake("b", { delayMs: 0.2 });
  const cache = mapCache();
  const options = { candidates: [a.candidate, b.candidate], cache };
  const calls = () => a.counter.calls + b.counter.calls;

  const first = await selectBackend("auto", FAKE_CONFIG, options);
  assertEquals([first.report.chosen, first.report.cached], ["a", false]);
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

  const fourth = await selectBackend("auto", FAKE_CONFIG, { ...options, remeasure: true });
  assertEquals(fourth.report.cached, false);
  assert(calls() > before);
});

Deno.test("the report reads as a table", async () => {
  const { report } = await selectBackend("auto", FAKE_CONFIG, {
    candidates: [fake("a").candidate, fake("b", { delayMs: 0.2 }).candidate],
    cache: null,
  });
  const text = formatBackendReport(report);
  assertMatch(text, /^backend a \(auto, measured in [\d.]+ ms\)$/m);
  assertMatch(text, /^ {2}in_proj@1 +[\d.]+ +([\d.]+|-)$/m);
  assertMatch(text, /^ {2}total: 64 \+ 128 tokens +[\d.]+ +([\d.]+|-)$/m);
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
