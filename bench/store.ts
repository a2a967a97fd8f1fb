/**
 * Runs `deno bench --json` on the user-facing benches (or the bench files
 * given) and stores the result where a later `deno task bench:compare` can read
 * it:
 *
 * ```sh
 * deno task bench:json                      # tmp/bench/<time>-<commit>.json
 * deno task bench:json --out=before.json bench/wasm_bench.ts
 * ```
 *
 * The environment passes through, so `MAMBA_BENCH_MODEL` and
 * `MAMBA_BENCH_BACKENDS` apply. The bench's own messages go to stderr.
 *
 * @module
 */

import { parseArgs } from "@std/cli/parse-args";

const flags = parseArgs(Deno.args, { string: ["out"] });
const files = flags._.length > 0 ? flags._.map(String) : ["bench/user_bench.ts"];

async function commit(): Promise<string> {
  try {
    const output = await new Deno.Command("git", { args: ["rev-parse", "--short", "HEAD"] })
      .output();
    return output.success ? new TextDecoder().decode(output.stdout).trim() : "unknown";
  } catch {
    return "unknown";
  }
}

const out = flags.out ??
  `tmp/bench/${new Date().toISOString().replaceAll(":", "").slice(0, 15)}-${await commit()}.json`;
const bench = await new Deno.Command(Deno.execPath(), {
  args: ["bench", "-A", "--json", ...files],
  stderr: "inherit",
}).output();
const text = new TextDecoder().decode(bench.stdout);
if (!bench.success) throw new Error(`deno bench failed (exit ${bench.code})`);
// Anything a bench file logged to stdout comes before the JSON object.
const json = text.slice(text.indexOf("{\n"));
JSON.parse(json);
const slash = out.lastIndexOf("/");
if (slash > 0) await Deno.mkdir(out.slice(0, slash), { recursive: true });
await Deno.writeTextFile(out, json);
console.log(`wrote ${out}`);
