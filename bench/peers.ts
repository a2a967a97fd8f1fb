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
 * On the GPU machine `bench/gpu_peers.sh` runs mamba_ssm's
 * `gpu_e2e_anchor.py` and `api_bench.ts` on webgpu in one call, then this
 * script with `--mamba-ssm=FILE --ours=FILE` prints the table from their JSON.
 *
 * @module
 */

import { parseArgs } from "@std/cli/parse-args";
import { benchModelDir } from "./make_random_model.ts";

/** One row of the ratio table. */
export interface PeerRow {
  /** What is measured, e.g. "decode 128 tok, 1 stream". */
  metric: string;
  /** Our tokens/s. */
  ours: number;
  /** The peer's tokens/s. */
  peer: number;
}

/** The rows as a text table with ours / peer ratios. */
export function formatPeerTable(peerName: string, ourName: string, rows: PeerRow[]): string {
  const width = Math.max(6, ...rows.map((row) => row.metric.length));
  const lines = [
    `${"metric".padEnd(width)}  ${ourName.padStart(14)}  ${peerName.padStart(14)}  ours/peer`,
  ];
  for (const row of rows) {
    lines.push(
      `${row.metric.padEnd(width)}  ${row.ours.toFixed(1).padStart(14)}  ${
        row.peer.toFixed(1).padStart(14)
      }  ${(row.ours / row.peer).toFixed(2).padStart(8)}x`,
    );
  }
  return lines.join("\n");
}

/** Our figures from `bench/api_bench.ts`'s JSON report. */
interface ApiReport {
  streams: { streams: number; mode: string; totalTokPerS: number }[];
  prefill?: { tokens: number; tokPerS: number };
}

function greedyStreams(report: ApiReport, count: number): number {
  const run = report.streams.find((entry) => entry.streams === count && entry.mode === "greedy");
  if (!run) throw new Error(`The api_bench report has no greedy run of ${count} stream(s)`);
  return run.totalTokPerS;
}

/** Rows for the GPU: mamba_ssm's gpu_e2e_anchor.py JSON beside api_bench on webgpu. */
export function gpuRows(mambaSsm: Record<string, number>, ours: ApiReport): PeerRow[] {
  const peer = (key: string) => {
    const value = mambaSsm[key];
    if (typeof value !== "number") throw new Error(`The mamba_ssm report has no "${key}"`);
    return value;
  };
  if (!ours.prefill) throw new Error("The api_bench report has no prefill figure");
  return [
    {
      metric: `prefill ${ours.prefill.tokens} tok`,
      ours: ours.prefill.tokPerS,
      peer: peer("prefill_2048_tok_per_s_float32"),
    },
    {
      metric: "decode 128 tok, 1 stream",
      ours: greedyStreams(ours, 1),
      peer: peer("decode_b1_tok_per_s_float32"),
    },
    {
      metric: "decode 128 tok, 16 streams",
      ours: greedyStreams(ours, 16),
      peer: peer("decode_b16_tok_per_s_float32"),
    },
  ];
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
    { metric: "prefill 512 tok", ours: ours.prefill!.tokPerS, peer: llamaRate(true) },
    { metric: "decode 128 tok, 1 stream", ours: greedyStreams(ours, 1), peer: llamaRate(false) },
  ]));
  console.log(
    "Same weights, same sitting; llama.cpp on 2 threads, ours with loadModel's default threads. " +
      "Our decode figure includes the 16-token prompt (as mamba_ssm times it).",
  );
}

if (import.meta.main) {
  const flags = parseArgs(Deno.args, { string: ["model", "mamba-ssm", "ours"] });
  if (flags["mamba-ssm"] || flags.ours) {
    if (!flags["mamba-ssm"] || !flags.ours) {
      throw new Error("--mamba-ssm=FILE and --ours=FILE go together");
    }
    const mambaSsm = JSON.parse(await Deno.readTextFile(flags["mamba-ssm"]));
    const ours = JSON.parse(await Deno.readTextFile(flags.ours));
    console.log(`GPU: ${mambaSsm.device ?? "unknown device"}, fp32, mamba-130m shape`);
    console.log(formatPeerTable("mamba_ssm", "mamba webgpu", gpuRows(mambaSsm, ours)));
  } else {
    await cpuPeers(flags.model ?? await benchModelDir());
  }
}
