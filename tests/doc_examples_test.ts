/**
 * The JSDoc examples are tests (`deno task test:doc` runs them, CI too): every
 * example in mod.ts, advanced.ts and src/ runs, and shows its result with an
 * assertion rather than a console.log.
 */

import { assert, assertEquals } from "@std/assert";

const ROOT = new URL("../", import.meta.url);

/** The TypeScript files of mod.ts, advanced.ts and src/, recursively. */
async function sources(): Promise<string[]> {
  const files = ["mod.ts", "advanced.ts"];
  const walk = async (dir: string) => {
    for await (const entry of Deno.readDir(new URL(dir, ROOT))) {
      const path = `${dir}/${entry.name}`;
      if (entry.isDirectory) await walk(path);
      else if (path.endsWith(".ts")) files.push(path);
    }
  };
  await walk("src");
  return files;
}

/** The info strings and bodies of the fenced code blocks in a file's JSDoc comments. */
function examples(text: string): { info: string; body: string }[] {
  const found = [];
  for (const match of text.matchAll(/^[ \t]*\* ```(.*)\n((?:[ \t]*\*.*\n)*?)[ \t]*\* ```$/gm)) {
    found.push({ info: match[1].trim(), body: match[2] });
  }
  return found;
}

Deno.test("test:doc runs the examples of mod.ts, advanced.ts and all of src/", async () => {
  const config = JSON.parse(await Deno.readTextFile(new URL("deno.json", ROOT)));
  assertEquals(
    config.tasks["test:doc"],
    "deno test --doc --allow-read --allow-env mod.ts advanced.ts src/",
  );
});

Deno.test("every TypeScript example runs and asserts its result", async () => {
  let count = 0;
  for (const file of await sources()) {
    for (const { info, body } of examples(await Deno.readTextFile(new URL(file, ROOT)))) {
      if (!/^(ts|typescript)\b/.test(info)) continue;
      count++;
      assert(!/\bignore\b/.test(info), `${file}: an example is marked "${info}" and never runs`);
      assert(/\bassert\w*\(/.test(body), `${file}: an example asserts nothing:\n${body}`);
      assert(!body.includes("console.log"), `${file}: an example prints instead of asserting`);
    }
  }
  // mod.ts 3, config, gguf, safetensors, sampler, scan, tokenizer 2.
  assert(count >= 10, `only ${count} examples found`);
});
