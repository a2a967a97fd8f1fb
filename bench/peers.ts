/**
 * The project beside its peers, on the same weights in the same sitting, as
 * one table of ratios (ours / peer: above 1 is faster than the peer).
 *
 * On the CPU (`deno task bench:peers [--model=DIR]`): llama.cpp's
 * `llama-bench` from ../shared/peers on a GGUF that `make-gguf.sh` writes from
 * the model's safetensors (kept in tmp/peers/), against `bench/api_bench.ts`
 * on the wasm backend: prefill 512 tokens and decode 128 tokens on one stream,
 * 2 threads each. The model is `--model=DIR` or `$MAMBA_BENCH_MODEL`, else the
 * mamba-130m-shaped random model (written first, ~0.5 GB).
 *
 * On the GPU machine `bench/gpu_peers.sh` runs mamba_ssm's scripts and our
 * `api_bench.ts` and `mamba2_bench.ts` on webgpu in one call, then this
 * script with `--gpu-out=DIR` prints, from their JSON in DIR, one table per
 * build of ours: every speed goal of issues 13 and 14 that the peer
 * measures, with its bar.
 *
 * @module
 */

import { parseArgs } from "@std/cli/parse-args";
import { benchModelDir } from "./make_random_model.ts";

/** One row of the ratio table. */
export interface PeerRow {
  /** What is measured, e.g. "decode 128 tok, 1 stream". */
  metric: string;
  /** Our tokens/s (or G elements/s), one figure per round. */
  ours: number[];
  /** The peer's figure, in the same unit. */
  peer: number;
  /** The least ours / peer that an issue asks for, where one does. */
  bar?: number;
}

/**
 * The rows as a text table: our rounds, the peer, ours / peer over the
 * rounds (above 1 is faster than the peer) and, where a row has a bar,
 * whether every round meets it.
 */
export function formatPeerTable(peerName: string, ourName: string, rows: PeerRow[]): string {
  const width = Math.max(6, ...rows.map((row) => row.metric.length));
  const oursText = rows.map((row) => row.ours.map((value) => value.toFixed(1)).join(" / "));
  const oursWidth = Math.max(14, ourName.length, ...oursText.map((text) => text.length));
  const withBars = rows.some((row) => row.bar !== undefined);
  const header = `${"metric".padEnd(width)}  ${ourName.padStart(oursWidth)}  ${
    peerName.padStart(14)
  }  ${"ours/peer".padStart(11)}`;
  const lines = [withBars ? `${header}  bar` : header];
  rows.forEach((row, i) => {
    const ratios = row.ours.map((value) => value / row.peer);
    const [low, high] = [Math.min(...ratios), Math.max(...ratios)];
    const ratio = low.toFixed(2) === high.toFixed(2)
      ? `${low.toFixed(2)}x`
      : `${low.toFixed(2)}–${high.toFixed(2)}x`;
    let line = `${row.metric.padEnd(width)}  ${oursText[i].padStart(oursWidth)}  ${
      row.peer.toFixed(1).padStart(14)
    }  ${ratio.padStart(11)}`;
    if (row.bar !== undefined) {
      line += `  ${row.bar.toFixed(1)} ${
        low >= row.bar ? "met" : high >= row.bar ? "within the rounds" : "not met"
      }`;
    }
    lines.push(line);
  });
  return lines.join("\n");
}

/** Our figures from `bench/api_bench.ts`'s JSON report. */
export interface ApiReport {
  streams: { streams: number; mode: string; totalTokPerS: number; firstTokenMsMedian?: number }[];
  prefill?: { tokens: number; tokPerS: number };
  prefillInFlight?: { sessions: number; tokens: number; totalTokPerS: number };
  http?: { streams: number; totalTokPerS: number; firstTokenMsMedian: number }[];
  auto?: { picked: string; report: string };
}

/** The report's run of `count` streams in `mode` ("greedy" or "sampled"), if it has one. */
function streamRun(report: ApiReport, count: number, mode = "greedy") {
  return report.streams.find((entry) => entry.streams === count && entry.mode === mode);
}

/** Our figures from `bench/mamba2_bench.ts`'s JSON report. */
export interface Mamba2Report {
  ssdGElementsPerSecond?: Record<string, number>;
  mamba2_130m?: Record<string, number>;
}

/**
 * What `bench/gpu_peers.sh` leaves in its output folder for one of our
 * builds: the JSON of mamba_ssm's scripts from ../shared/device/peers
 * (`gpu_e2e_anchor.py`, `gpu_batch_anchor.py`, `gpu_mamba2.py`), each
 * absent where it did not run, and our reports, one per round.
 */
export interface GpuReports {
  e2e?: Record<string, unknown>;
  batch?: Record<string, unknown>;
  mamba2?: Record<string, unknown>;
  api: ApiReport[];
  ours2: Mamba2Report[];
}

/**
 * The rows of a GPU table, the metrics left out because a side has no figure,
 * and our figures that the peer has no counterpart for (the edge server over
 * HTTP, the first token, what `auto` picks), one line each.
 */
export interface GpuTable {
  rows: PeerRow[];
  missing: string[];
  oursOnly: string[];
}

/**
 * Every speed goal of issues 13 and 14 that mamba_ssm's scripts measure, fp32
 * against fp32, with the issues' bars.
 */
export function gpuRows(reports: GpuReports): GpuTable {
  const rows: PeerRow[] = [];
  const missing: string[] = [];
  const add = (
    metric: string,
    peer: unknown,
    ours: (number | undefined)[],
    bar?: number,
  ) => {
    const runs = ours.filter((value): value is number => typeof value === "number");
    if (typeof peer !== "number" || runs.length === 0) missing.push(metric);
    else rows.push({ metric, ours: runs, peer, bar });
  };
  const { e2e = {}, batch = {}, mamba2 = {}, api, ours2 } = reports;
  const streams = (count: number, mode: string) =>
    api.map((report) => streamRun(report, count, mode)?.totalTokPerS);
  add("decode 128 tok, 1 stream", e2e.decode_b1_tok_per_s_float32, streams(1, "greedy"), 1.3);
  add(
    "1 stream, top-k 40 sampled (peer greedy)",
    e2e.decode_b1_tok_per_s_float32,
    streams(1, "sampled"),
    1.3,
  );
  add("decode 128 tok, 16 streams", e2e.decode_b16_tok_per_s_float32, streams(16, "greedy"), 1);
  add("decode 128 tok, 64 streams", batch.decode_b64_tok_per_s_float32, streams(64, "greedy"), 1);
  add(
    "decode 128 tok, 256 streams",
    batch.decode_b256_tok_per_s_float32,
    streams(256, "greedy"),
    1,
  );
  add(
    "prefill 2048 tok",
    e2e.prefill_2048_tok_per_s_float32,
    api.map((report) => report.prefill?.tokens === 2048 ? report.prefill.tokPerS : undefined),
    0.9,
  );
  add(
    "prefill 2048 tok, sessions in flight",
    e2e.prefill_2048_tok_per_s_float32,
    api.map((report) =>
      report.prefillInFlight?.tokens === 2048 ? report.prefillInFlight.totalTokPerS : undefined
    ),
  );
  const model2 = (key: string) => ours2.map((report) => report.mamba2_130m?.[key]);
  for (const count of [1, 16, 64]) {
    add(
      `Mamba-2 decode, ${count} stream${count > 1 ? "s" : ""}`,
      mamba2[`m2_decode_b${count}_tok_per_s_float32`],
      model2(`decode ${count} streams tok/s`),
      1,
    );
  }
  add(
    "Mamba-2 prefill 2048 tok",
    mamba2.m2_prefill_2048_tok_per_s_float32,
    model2("prefill 2048 tok/s"),
    1,
  );
  const ssdRows = Array.isArray(mamba2.ssd_kernel) ? mamba2.ssd_kernel : [];
  for (const row of ssdRows as { dtype?: string; b_l_h_p_n?: number[]; G_elem_per_s?: number }[]) {
    if (row.dtype !== "float32" || !row.b_l_h_p_n) continue;
    const [batch, len, heads] = row.b_l_h_p_n;
    const shape = `${batch}x${len}x${heads}`;
    add(
      `SSD scan ${shape}, G elements/s`,
      row.G_elem_per_s,
      ours2.map((report) => report.ssdGElementsPerSecond?.[shape]),
      1,
    );
  }
  const oursOnly: string[] = [];
  const rounds = (values: (string | undefined)[]) => values.filter(Boolean).join(" / ");
  const firstToken = rounds(api.map((report) => {
    const ms = streamRun(report, 64)?.firstTokenMsMedian;
    return ms === undefined ? undefined : `${ms} ms`;
  }));
  if (firstToken) oursOnly.push(`first token at 64 streams, median: ${firstToken}`);
  for (const count of [16, 64]) {
    const http = rounds(api.map((report) => {
      const run = report.http?.find((entry) => entry.streams === count);
      return run &&
        `${run.totalTokPerS.toFixed(1)} tok/s (first token ${run.firstTokenMsMedian} ms)`;
    }));
    if (http) oursOnly.push(`edge server over HTTP, ${count} streams: ${http}`);
  }
  for (const report of api) {
    if (report.auto) oursOnly.push(`auto picks ${report.auto.picked}:\n${report.auto.report}`);
  }
  return { rows, missing, oursOnly };
}

function greedyStreams(report: ApiReport, count: number): number {
  const run = streamRun(report, count);
  if (!run) throw new Error(`The api_bench report has no greedy run of ${count} stream(s)`);
  return run.totalTokPerS;
}

/**
 * A JSON file's object, or undefined where the file is not there or empty
 * (gpu_peers.sh leaves a run that failed as an empty file).
 */
async function readJson<T>(path: string): Promise<T | undefined> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return undefined;
    throw error;
  }
  if (text.trim() === "") return undefined;
  try {
    return JSON.parse(text) as T;
  } catch (error) {
    throw new Error(`${path} is not JSON: ${(error as Error).message}`);
  }
}

/**
 * The tables of `bench/gpu_peers.sh`'s output folder `dir`: one per build of
 * ours (`<build>.api.<round>.json`, `<build>.mamba2.<round>.json`) against
 * the peers' JSON beside them.
 */
export async function gpuTables(dir: string): Promise<string> {
  const [e2e, batch, mamba2] = await Promise.all(
    ["mamba_ssm_e2e.json", "mamba_ssm_batch.json", "mamba2.json"].map((name) =>
      readJson<Record<string, unknown>>(`${dir}/${name}`)
    ),
  );
  const builds = new Map<string, { api: string[]; ours2: string[] }>();
  for await (const entry of Deno.readDir(dir)) {
    const match = entry.name.match(/^(.+)\.(api|mamba2)\.\d+\.json$/);
    if (!match) continue;
    const files = builds.get(match[1]) ?? { api: [], ours2: [] };
    (match[2] === "api" ? files.api : files.ours2).push(`${dir}/${entry.name}`);
    builds.set(match[1], files);
  }
  if (builds.size === 0) throw new Error(`${dir} holds no <build>.api.<round>.json of ours`);
  const device = e2e?.device ?? batch?.device ?? mamba2?.device ?? "unknown device";
  const reports = async <T>(paths: string[]) =>
    (await Promise.all(paths.sort().map((path) => readJson<T>(path))))
      .filter((report): report is Awaited<T> => report !== undefined);
  const tables: string[] = [];
  for (const [build, files] of [...builds].sort(([a], [b]) => a.localeCompare(b))) {
    const table = gpuRows({
      e2e,
      batch,
      mamba2,
      api: await reports<ApiReport>(files.api),
      ours2: await reports<Mamba2Report>(files.ours2),
    });
    const lines = [
      `GPU: ${device}, fp32, 130m shapes, build ${build} (its rounds in order)`,
      formatPeerTable("mamba_ssm", "mamba webgpu", table.rows),
    ];
    if (table.missing.length > 0) lines.push(`no figure on one side: ${table.missing.join("; ")}`);
    lines.push(...table.oursOnly);
    tables.push(lines.join("\n"));
  }
  return tables.join("\n\n");
}

async function run(command: string, args: string[]): Promise<string> {
  const output = await new Deno.Command(command, { args, stderr: "inherit" }).output();
  if (!output.success) throw new Error(`${command} ${args.join(" ")} failed (exit ${output.code})`);
  return new TextDecoder().decode(output.stdout);
}

async function cpuPeers(dir: string): Promise<void> {
  const isDirectory = await Deno.stat(dir).then((info) => info.isDirectory, () => false);
  if (!isDirectory) {
    throw new Error(
      `${dir} is not a model directory: bench:peers converts a directory's config.json and ` +
        "model.safetensors for llama.cpp",
    );
  }
  const peers = new URL("../../shared/peers/", import.meta.url).pathname;
  const llamaBench = `${peers}llama.cpp/llama-bench`;
  try {
    await Deno.stat(llamaBench);
  } catch {
    console.log(`llama.cpp: skipped, ${llamaBench} is not there`);
    return;
  }
  const scratch = new URL("../tmp/peers/", import.meta.url).pathname;
  await Deno.mkdir(scratch, { recursive: true });
  const gguf = `${scratch}${dir.replaceAll("/", "_").replace(/^_+/, "")}.gguf`;
  try {
    await Deno.stat(gguf);
  } catch {
    console.error(`writing ${gguf} from ${dir}`);
    await run("bash", [`${peers}make-gguf.sh`, dir, gguf]);
  }
  console.error("llama.cpp: llama-bench -p 512 -n 128 -t 2 -r 3");
  const llama = JSON.parse(
    await run(llamaBench, [
      "-m",
      gguf,
      "-p",
      "512",
      "-n",
      "128",
      "-t",
      "2",
      "-r",
      "3",
      "-o",
      "json",
    ]),
  ) as { n_prompt: number; n_gen: number; avg_ts: number }[];
  const llamaRate = (prompt: boolean) => {
    const entry = llama.find((row) => prompt ? row.n_prompt > 0 : row.n_gen > 0);
    if (!entry) {
      throw new Error("llama-bench gave no " + (prompt ? "prompt" : "generation") + " row");
    }
    return entry.avg_ts;
  };
  console.error("mamba: api_bench.ts --backend=wasm --streams=1 --prefill=512");
  const apiBench = new URL("./api_bench.ts", import.meta.url).pathname;
  const ours = JSON.parse(
    await run(Deno.execPath(), [
      "run",
      "-A",
      apiBench,
      `--model=${dir}`,
      "--backend=wasm",
      "--streams=1",
      "--sampled=false",
      "--prefill=512",
      "--tokens=128",
      "--reps=3",
    ]),
  ) as ApiReport;
  console.log(formatPeerTable("llama.cpp CPU", "mamba wasm", [
    { metric: "prefill 512 tok", ours: [ours.prefill!.tokPerS], peer: llamaRate(true) },
    { metric: "decode 128 tok, 1 stream", ours: [greedyStreams(ours, 1)], peer: llamaRate(false) },
  ]));
  console.log(
    "Same weights, same sitting; llama.cpp on 2 threads, ours with loadModel's default threads. " +
      "Our decode figure includes the 16-token prompt (as mamba_ssm times it).",
  );
}

if (import.meta.main) {
  const flags = parseArgs(Deno.args, { string: ["model", "gpu-out"] });
  if (flags["gpu-out"]) console.log(await gpuTables(flags["gpu-out"]));
  else await cpuPeers(flags.model ?? await benchModelDir());
}
