/**
 * The CI slice of the fuzz campaign (issue #18): seeded, bounded mutations of
 * each input the library reads, each case in a child process with a heap and
 * a time cap (see `tests/fuzz.ts`; `deno task fuzz` runs a long campaign).
 * Every case must end in a clean rejection or a correct acceptance.
 */

import { assert, assertEquals } from "@std/assert";
import { fuzzKind } from "./fuzz.ts";
import type { FuzzKind } from "./fuzz_cases.ts";

const SEED = 18;
const SLICE: Record<FuzzKind, number> = {
  safetensors: 1000,
  config: 100,
  snapshot: 200,
  tokenizer: 50,
};

for (const [kind, cases] of Object.entries(SLICE) as [FuzzKind, number][]) {
  Deno.test(`fuzz: ${cases} ${kind} mutations end in a clean rejection or a correct acceptance`, async () => {
    const report = await fuzzKind(kind, SEED, cases);
    console.log(`${kind}: ${JSON.stringify(report.counts)}`);
    assertEquals(report.failures, []);
    assertEquals(report.counts.rejected + report.counts.accepted, cases);
    // Both classes occur: the mutations reach past the first check.
    assert(report.counts.rejected > 0 && report.counts.accepted > 0);
  });
}

Deno.test("fuzz: a case that hangs or takes too much memory is a failure, and the next case still runs", async () => {
  const limits = { heapMiB: 256, rssMiB: 400, caseMs: 3000 };
  // deno-lint-ignore no-explicit-any -- kinds of the worker's own that misbehave on purpose
  const hang = await fuzzKind("self-check-hang" as any, SEED, 2, limits);
  assertEquals(hang.failures.map((f) => [f.index, f.detail]), [
    [0, "ran past 3000 ms"],
    [1, "ran past 3000 ms"],
  ]);
  // A time cap far past what filling 400 MiB takes, even on a loaded machine.
  // deno-lint-ignore no-explicit-any -- as above
  const hog = await fuzzKind("self-check-memory" as any, SEED, 2, { ...limits, caseMs: 60_000 });
  assertEquals(hog.failures.map((f) => f.index), [0, 1]);
  for (const { detail } of hog.failures) assert(/past 400 MiB|child died/.test(detail), detail);
});
