/**
 * Mamba-2's speed on one backend, the figures of issue 14, printed as JSON:
 *
 * - `ssd`: the SSD scan alone (Backend.ssdScan), fp32, head_dim 64, d_state
 *   128, one group, in G elements (batch · len · heads · head_dim) per second,
 *   at the (batch, len, heads) shapes `--shapes` lists (default those that
 *   `../shared/device/peers/gpu_mamba2.py` measures mamba_ssm's Triton kernel on);
 * - `model`: a mamba2-130m-shaped model with random weights (d_model 768, 24
 *   layers, d_state 128, head_dim 64, vocab 50277 padded to 50280, F32;
 *   `--mamba1` for mamba-130m's shape instead): a prompt of `--prefill` ids
 *   fed to one session with its logits read back (none with `--prefill 0`),
 *   and to `--prefill-sessions` sessions at once, then at each of `--streams` concurrent streams, new
 *   sessions given a 16-token prompt and `--decode` greedy ids each through
 *   the decode engine (the prompt inside the time, as `gpu_mamba2.py` times
 *   mamba_ssm's generate), in generated tokens/s.
 *
 * ```sh
 * deno run -A bench/mamba2_bench.ts --backend webgpu
 * deno run -A bench/mamba2_bench.ts --backend wasm --shapes 1x512x24 --prefill 512 --decode 128 --streams 1
 * deno run -A bench/mamba2_bench.ts --backend webgpu --ssd-chunk 128 --no-model
 * ```
 *
 * `--ssd-chunk` sets webgpu's `ssdChunkLen` (tokens per chunk of its SSD scan).
 * `--profile` (webgpu) also times each pass of the SSD scan with timestamp
 * queries and prints GPU µs per scan by pass (`ssdPassMicroseconds`); each
 * dispatch then runs in a pass of its own, so the rates read lower.
 *
 * Each figure is the best of `--repeats` runs after one warm-up run.
 *
 * @module
 */

import { parseArgs } from "@std/cli/parse-args";
import type { Backend } from "../src/backend.ts";
import { type BackendName, createBackend } from "../src/backends/registry.ts";
import { WebGpuBackend } from "../src/backends/webgpu/mod.ts";
import { MambaModel } from "../src/model.ts";
import { Sampler } from "../src/sampler.ts";
import { Session } from "../src/session.ts";
import {
  MAMBA2_130M_CONFIG,
  promptIds,
  randomCheckpoint,
  randomMamba2Weights,
  xorshiftUniforms,
} from "./make_random_model.ts";
import { loadCheckpoint } from "../src/load.ts";

const flags = parseArgs(Deno.args, {
  string: [
    "backend",
    "shapes",
    "prefill",
    "prefill-sessions",
    "decode",
    "streams",
    "repeats",
    "threads",
    "ssd-chunk",
  ],
  boolean: ["mamba1", "no-ssd", "no-model", "profile"],
  default: {
    backend: "webgpu",
    shapes: "1x2048x24,1x16384x24,8x2048x24,1x4096x80",
    prefill: "2048",
    "prefill-sessions": "5",
    decode: "64",
    streams: "1,16,64",
    repeats: "3",
  },
});
const backendName = flags.backend as BackendName;
const repeats = Number(flags.repeats);
const backendOptions = flags.threads ? { threads: Number(flags.threads) } : {};

/** The best time in ms of `repeats` runs of `run` after a warm-up run. */
async function best(run: () => Promise<void>): Promise<number> {
  await run();
  let fastest = Infinity;
  for (let i = 0; i < repeats; i++) {
    const start = performance.now();
    await run();
    fastest = Math.min(fastest, performance.now() - start);
  }
  return fastest;
}

/** SSD scans timed per read-back. */
const CALLS = 20;

/** GPU µs per SSD scan of each pass (entry point), with `--profile`. */
const passMicroseconds: Record<string, Record<string, number>> = {};

/** G elements/s of the SSD scan at each shape. */
async function ssdFigures(be: Backend<unknown>): Promise<Record<string, number>> {
  const [headDim, dState, groups] = [64, 128, 1];
  const figures: Record<string, number> = {};
  for (const shape of flags.shapes.split(",")) {
    const [batch, len, heads] = shape.split("x").map(Number);
    const next = xorshiftUniforms(batch * len + heads);
    const width = heads * headDim + 2 * groups * dState;
    const buffers = [
      next(batch * len * width, -1, 1),
      next(batch * len * heads, -4, 0),
      next(heads, -1, 0),
      next(heads, -2, -0.1),
      next(heads, -1, 1),
    ].map((data) => be.upload(data));
    const [xBC, dt, dtBias, A, D] = buffers;
    const y = be.zeros(batch * len * heads * headDim);
    const state = be.zeros(batch * heads * headDim * dState);
    // A read-back costs 10 ms or more on webgpu: the scan runs CALLS times per
    // read, and a read alone (the device idle) is taken off.
    const readMs = await best(() => be.read(y, 0, 1).then(() => {}));
    const scan = () =>
      be.ssdScan!({
        y,
        xBC,
        dt,
        dtBias,
        dtLimit: [0, Infinity],
        A,
        D,
        state,
        len,
        batch,
        heads,
        headDim,
        groups,
        dState,
        chunkSize: 256,
      });
    const ms = (await best(async () => {
      for (let i = 0; i < CALLS; i++) scan();
      await be.read(y, 0, 1);
    }) - readMs) / CALLS;
    figures[shape] = Number(((batch * len * heads * headDim) / ms / 1e6).toFixed(3));
    const profiled = flags.profile && be instanceof WebGpuBackend ? be : undefined;
    if (profiled) {
      await profiled.kernelTimes(); // drops those of the runs above
      for (let i = 0; i < CALLS; i++) scan();
      await be.read(y, 0, 1);
      const passes: Record<string, number> = {};
      for (const [label, { ns }] of await profiled.kernelTimes()) {
        // A label is "shader:constants:entry grid".
        const entry = label.slice(label.lastIndexOf(":") + 1).split(" ")[0];
        passes[entry] = Number(((passes[entry] ?? 0) + ns / 1e3 / CALLS).toFixed(1));
      }
      passMicroseconds[shape] = passes;
    }
    for (const buffer of [...buffers, y, state]) be.release(buffer);
  }
  return figures;
}

/** The model's prefill and decode figures on `be`. */
async function modelFigures(be: Backend<unknown>): Promise<Record<string, number>> {
  let model: MambaModel<unknown>;
  if (flags.mamba1) {
    const { config, safetensors } = randomCheckpoint({
      dModel: 768,
      nLayer: 24,
      vocabSize: 50280,
      dState: 16,
      dConv: 4,
      expand: 2,
    });
    const dir = await Deno.makeTempDir({ prefix: "mamba1-bench-" });
    await Deno.writeTextFile(`${dir}/config.json`, JSON.stringify(config));
    await Deno.writeFile(`${dir}/model.safetensors`, safetensors);
    const checkpoint = await loadCheckpoint(dir);
    model = new MambaModel(be, checkpoint.config, checkpoint.weights);
  } else {
    const config = MAMBA2_130M_CONFIG;
    model = new MambaModel(be, config, randomMamba2Weights(config));
  }
  const vocab = model.config.vocabSize;
  const figures: Record<string, number> = {};
  const prefill = Number(flags.prefill);
  if (prefill > 0) {
    // One session alone, then `--prefill-sessions` sessions' prefills in
    // flight at once, as mamba_ssm's prefill is timed (five forward passes,
    // then one synchronisation).
    const prefills = (sessions: number) =>
      best(() =>
        Promise.all(Array.from({ length: sessions }, async (_, i) => {
          const session = new Session(model);
          await session.prefill(promptIds(prefill, vocab).map((id) => (id + i) % vocab));
          session.dispose();
        })).then(() => {})
      );
    figures[`prefill ${prefill} tok/s`] = Math.round(prefill / (await prefills(1) / 1000));
    const sessions = Number(flags["prefill-sessions"]);
    if (sessions > 1) {
      const ms = await prefills(sessions);
      figures[`prefill ${prefill}, ${sessions} sessions in flight, tok/s`] = Math.round(
        sessions * prefill / (ms / 1000),
      );
    }
  }
  const decode = Number(flags.decode);
  // As mamba_ssm's generate is timed: `streams` new sessions at once, each
  // fed a 16-token prompt, then `decode` greedy ids, through the engine.
  const run = (streams: number) =>
    Promise.all(Array.from({ length: streams }, (_, i) => {
      const session = new Session(model);
      return session.decode({
        prompt: promptIds(16, vocab).map((id) => (id + i) % vocab),
        sampler: new Sampler({ temperature: 0 }),
        maxTokens: decode,
      }).finally(() => session.dispose());
    }));
  for (const streams of flags.streams.split(",").map(Number)) {
    const ms = await best(() => run(streams).then(() => {}));
    figures[`decode ${streams} streams tok/s`] = Math.round((streams * decode) / (ms / 1000));
  }
  return figures;
}

const ssdChunkLen = flags["ssd-chunk"] ? Number(flags["ssd-chunk"]) : undefined;
const backend = (ssdChunkLen || flags.profile) && backendName === "webgpu"
  ? await WebGpuBackend.create({ ssdChunkLen, profile: flags.profile })
  : await createBackend(backendName, backendOptions);
const result: Record<string, unknown> = { backend: backendName, ...backendOptions, ssdChunkLen };
if (!flags["no-ssd"]) {
  result.ssdGElementsPerSecond = await ssdFigures(backend);
  if (flags.profile) result.ssdPassMicroseconds = passMicroseconds;
}
if (!flags["no-model"]) {
  result[flags.mamba1 ? "mamba1_130m" : "mamba2_130m"] = await modelFigures(backend);
}
console.log(JSON.stringify(result, null, 2));
backend.dispose();
