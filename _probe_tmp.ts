import { loadModel } from "./mod.ts";
const model = await loadModel(new URL("./models/tiny-shakespeare/", import.meta.url));
console.log(model.backend);
let s = "";
for await (const e of model.generate("ROMEO:", { maxNewTokens: 48, temperature: 0 })) s += e.text;
console.log(JSON.stringify(s));
