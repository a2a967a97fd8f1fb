/**
 * The fuzz campaign of issue #18. Each kind's cases run in child processes
 * (`fuzz_worker.ts`) under a heap and a resident memory cap; a case that crashes its child, runs
 * past the time cap or ends in a wrong way is a failure, and the next case
 * starts in a fresh child. A child runs cases one after another until one
 * fails, so that the campaign does not pay a process start per case.
 *
 * `deno task fuzz [--seed N] [--cases N]` runs a long campaign: N cases of
 * each kind (default 3000) and prints the counts per class and each failure.
 *
 * @module
 */

import { parseArgs } from "@std/cli/parse-args";
import { FUZZ_KINDS, type FuzzClass, type FuzzKind } from "./fuzz_cases.ts";

/** Limits of one case. */
export interface FuzzLimits {
  /** V8 heap cap of a child, in MiB. */
  heapMiB: number;
  /**
   * Resident memory cap of a child, in MiB (array buffers and wasm memory
   * included, which the heap cap leaves out): read from /proc where there is one.
   */
  rssMiB: number;
  /** Wall-clock cap of one case, in milliseconds. */
  caseMs: number;
}

/** What a kind's cases came to. */
export interface FuzzReport {
  kind: FuzzKind;
  counts: Record<FuzzClass, number>;
  /** Each failure: its index (replay with the same seed) and what happened. */
  failures: { index: number; detail: string }[];
}

const WORKER = new URL("./fuzz_worker.ts", import.meta.url).pathname;

/** Runs cases [0, cases) of `kind` for `seed`. */
export async function fuzzKind(
  kind: FuzzKind,
  seed: number,
  cases: number,
  limits: FuzzLimits = { heapMiB: 512, rssMiB: 1536, caseMs: 20_000 },
): Promise<FuzzReport> {
  const report: FuzzReport = {
    kind,
    counts: { rejected: 0, accepted: 0, failure: 0 },
    failures: [],
  };
  const scratch = await Deno.makeTempDir({ prefix: `fuzz-${kind}-` });
  try {
    let next = 0;
    while (next < cases) {
      next = await runChild(kind, seed, next, cases, scratch, limits, report);
    }
  } finally {
    await Deno.remove(scratch, { recursive: true });
  }
  return report;
}

/** Runs a child from case `from` until it ends; returns the next case to run. */
async function runChild(
  kind: FuzzKind,
  seed: number,
  from: number,
  to: number,
  scratch: string,
  limits: FuzzLimits,
  report: FuzzReport,
): Promise<number> {
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "--allow-read",
      "--allow-write",
      "--allow-env",
      `--v8-flags=--max-old-space-size=${limits.heapMiB}`,
      WORKER,
      kind,
      String(seed),
      String(from),
      String(to),
      scratch,
    ],
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const stderr = new Response(child.stderr).text();
  let current = -1;
  let timer: ReturnType<typeof setTimeout> | undefined;
  let timedOut = false;
  const arm = () => {
    clearTimeout(timer);
    timer = setTimeout(() => {
      timedOut = true;
      child.kill("SIGKILL");
    }, limits.caseMs);
  };
  arm(); // The first case's cap includes the child's start.
  let overMemory = 0;
  let watching = true;
  const watch = (async () => {
    while (watching) {
      const rssKiB = await residentKiB(child.pid);
      if (rssKiB > limits.rssMiB * 1024) {
        overMemory = rssKiB;
        child.kill("SIGKILL");
        return;
      }
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  })();
  const fail = (index: number, detail: string) => {
    report.counts.failure++;
    report.failures.push({ index, detail });
  };
  let pending = "";
  for await (const chunk of child.stdout.pipeThrough(new TextDecoderStream())) {
    pending += chunk;
    let newline;
    while ((newline = pending.indexOf("\n")) >= 0) {
      const line = JSON.parse(pending.slice(0, newline));
      pending = pending.slice(newline + 1);
      if ("start" in line) {
        current = line.start;
        arm();
      } else {
        report.counts[line.cls as FuzzClass]++;
        if (line.cls === "failure") report.failures.push({ index: line.done, detail: line.detail });
        current = -1;
      }
    }
  }
  const status = await child.status;
  clearTimeout(timer);
  watching = false;
  await watch;
  const errors = (await stderr).trim().split("\n").slice(-3).join(" | ");
  if (current >= 0) {
    fail(
      current,
      timedOut
        ? `ran past ${limits.caseMs} ms`
        : overMemory
        ? `took ${Math.round(overMemory / 1024)} MiB, past ${limits.rssMiB} MiB`
        : `child died (${status.code}): ${errors}`,
    );
    return current + 1;
  }
  if (!status.success) {
    // Died between cases: count it against the next one, so that no case is skipped silently.
    const next = report.counts.rejected + report.counts.accepted + report.counts.failure;
    fail(next, `child died between cases (${status.code}): ${errors}`);
    return next + 1;
  }
  return to;
}

if (import.meta.main) {
  const args = parseArgs(Deno.args, { string: ["seed", "cases", "kind"] });
  const seed = Number(args.seed ?? Date.now() % 1_000_000);
  const cases = Number(args.cases ?? 3000);
  const kinds = args.kind ? [args.kind as FuzzKind] : FUZZ_KINDS;
  console.log(`Fuzzing with seed ${seed}, ${cases} cases of each kind`);
  let failed = false;
  for (const kind of kinds) {
    const started = performance.now();
    const { counts, failures } = await fuzzKind(kind, seed, cases);
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    console.log(
      `${kind}: ${counts.rejected} rejected cleanly, ${counts.accepted} accepted correctly, ` +
        `${counts.failure} failures (${seconds} s)`,
    );
    for (const { index, detail } of failures) console.log(`  case ${index}: ${detail}`);
    failed ||= failures.length > 0;
  }
  if (failed) Deno.exit(1);
}

/**
 * A process's resident memory in KiB, or 0 where it cannot be had (not Linux,
 * or the process has ended). Read through `cat`: Deno lets only --allow-all
 * read /proc/<pid>, and the tests run with narrower permissions.
 */
async function residentKiB(pid: number): Promise<number> {
  try {
    const { stdout } = await new Deno.Command("cat", {
      args: [`/proc/${pid}/status`],
      stdout: "piped",
      stderr: "null",
    }).output();
    return Number(/VmRSS:\s+(\d+)/.exec(new TextDecoder().decode(stdout))?.[1] ?? 0);
  } catch {
    return 0;
  }
}
