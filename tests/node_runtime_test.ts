/**
 * The wasm backend in a runtime other than Deno: tests/node_runtime.ts,
 * bundled, under Node.js (which npm, and so the README's install of Deno,
 * brings). Node 20 validates SIMD but not relaxed SIMD, so there the backend
 * must pick its plain build by itself.
 */

import { assert, assertEquals } from "@std/assert";
import { SHARED } from "./helpers.ts";

Deno.test("[wasm] under Node.js the backend picks the build the runtime validates and meets the fixture's logits", async () => {
  const dir = await Deno.makeTempDir({ prefix: "mamba-node-" });
  try {
    const bundle = `${dir}/node_runtime.mjs`;
    const bundled = await new Deno.Command(Deno.execPath(), {
      args: [
        "bundle",
        "--platform",
        "browser",
        "--external",
        "node:fs",
        "-o",
        bundle,
        new URL("./node_runtime.ts", import.meta.url).pathname,
      ],
      stdout: "piped",
      stderr: "piped",
    }).output();
    assert(bundled.success, new TextDecoder().decode(bundled.stderr));
    /** The JSON line node prints, run with `flags`. */
    const runNode = async (...flags: string[]) => {
      const run = await new Deno.Command("node", {
        args: [...flags, bundle, `${SHARED}/models/tiny-shakespeare`],
        stdout: "piped",
        stderr: "piped",
      }).output().catch((error) => {
        throw new Error(`This test runs node (npm brings it): ${error.message}`);
      });
      assert(run.success, new TextDecoder().decode(run.stderr));
      return JSON.parse(new TextDecoder().decode(run.stdout));
    };
    const { relaxed, simd, maxDiff } = await runNode();
    assertEquals(simd, relaxed ? "relaxed" : "plain", "the build node runs");
    assert(maxDiff <= 1e-3, `max |Δlogit| ${maxDiff} against prompt0_logits`);
    if (!relaxed) {
      // A node whose V8 has relaxed SIMD behind a flag: with it, the relaxed build.
      const flagged = await runNode("--experimental-wasm-relaxed-simd");
      assertEquals([flagged.relaxed, flagged.simd], [true, "relaxed"], "with the flag");
      assert(flagged.maxDiff <= 1e-3, `flagged: max |Δlogit| ${flagged.maxDiff}`);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
