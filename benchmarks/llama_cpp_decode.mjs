// Greedy decode tokens/s of llama.cpp (through node-llama-cpp's prebuilt CPU binaries) at batch 1.
//
// The other half of benchmarks/bench_decode.py, which runs it alternately with our decoder; by hand:
//
//   mkdir -p /tmp/llama && (cd /tmp/llama && npm i -E node-llama-cpp@3.21.1)
//   node benchmarks/llama_cpp_decode.mjs --llama-dir /tmp/llama --model model.gguf --prompt-ids 1,2,3 \
//        --new-tokens 128 --threads 2 --repeats 3
//
// It feeds the given token ids (no tokenizer of its own, so both decoders start from the same ids),
// takes the most likely token at every step, and prints one JSON line: the generated ids and, per
// repeat, decode tokens/s measured from the first generated token to the last (prompt processing
// excluded, as in bench_decode.py's figure for ours).
import path from "node:path";
import {pathToFileURL} from "node:url";
import {parseArgs} from "node:util";

const {values: args} = parseArgs({options: {
    "llama-dir": {type: "string"}, model: {type: "string"}, "prompt-ids": {type: "string"},
    "new-tokens": {type: "string", default: "128"}, threads: {type: "string", default: "2"},
    repeats: {type: "string", default: "3"},
}});
const entry = path.join(args["llama-dir"], "node_modules", "node-llama-cpp", "dist", "index.js");
const {getLlama, LlamaLogLevel} = await import(pathToFileURL(entry).href);

const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
const model = await llama.loadModel({modelPath: args.model});
const newTokens = Number(args["new-tokens"]);
const promptIds = args["prompt-ids"].split(",").map(Number);
const context = await model.createContext({threads: Number(args.threads), contextSize: 512, sequences: 1});
const sequence = context.getSequence();

async function decode() {
    await sequence.clearHistory();
    const ids = [];
    let first;
    for await (const token of sequence.evaluate(promptIds, {temperature: 0})) {
        ids.push(token);
        if (ids.length === 1) first = performance.now();
        if (ids.length === newTokens) break;
    }
    if (ids.length < newTokens)  // llama.cpp stops at an end-of-generation token; ours does not
        throw new Error(`llama.cpp ended after ${ids.length} of ${newTokens} tokens (an end-of-text token): ` +
                        "use another prompt or fewer --new-tokens");
    return {ids, tokensPerSecond: (newTokens - 1) / ((performance.now() - first) / 1000)};
}

const runs = [];
for (let i = 0; i < Number(args.repeats); i++) runs.push(await decode());
console.log(JSON.stringify({ids: runs[0].ids, tokens_per_s: runs.map((r) => r.tokensPerSecond),
                            library: `node-llama-cpp ${(await import(pathToFileURL(path.join(args["llama-dir"],
                                "node_modules", "node-llama-cpp", "package.json")).href, {with: {type: "json"}})).default.version}`}));
await context.dispose();
await model.dispose();
await llama.dispose();
