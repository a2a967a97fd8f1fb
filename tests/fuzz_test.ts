/**
 * A seeded slice of the fuzzing campaign of `tests/fuzz.ts` (`deno task fuzz`
 * runs long ones): every case must end in a clean rejection or a correct
 * acceptance.
 */

import { assert, assertEquals } from "@std/assert";
import { fixtures, runCampaign, runCase } from "./fuzz.ts";

const COUNTS = { safetensors: 1000, config: 100, snapshot: 200, tokenizer: 50 };

Deno.test("fuzzing: mutated safetensors, configs, snapshots and tokenizers are rejected cleanly or work", async () => {
  const report = await runCampaign({ seed: 20261203, counts: COUNTS, timeoutMs: 60_000 });
  console.log(JSON.stringify(report.counts));
  assertEquals(report.failures, []);
  for (const [kind, count] of Object.entries(COUNTS)) {
    const classes = report.counts[kind];
    assertEquals(classes.rejected + classes.accepted, count, kind);
    // Both classes occur, so the mutations reach past the first check.
    assert(classes.rejected > 0 && classes.accepted > 0, `${kind}: ${JSON.stringify(classes)}`);
  }
});

Deno.test("fuzzing: a case is the same for the same seed", async () => {
  const f = await fixtures();
  assertEquals(await runCase(f, "safetensors", 5, 17), await runCase(f, "safetensors", 5, 17));
});
