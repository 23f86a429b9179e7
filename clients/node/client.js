// A genrpc client that knows only the .proto file: calls Generate, then GenerateStream, then
// Generate constrained by a JSON schema, and prints one JSON object with the results.
//
//   node client.js [address] [prompt]
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = path.join(__dirname, "..", "..", "protos");
const definition = protoLoader.loadSync(path.join(PROTO_ROOT, "genrpc", "v1", "generation.proto"), {
  includeDirs: [PROTO_ROOT],
  keepCase: true,   // field names as in the .proto (max_new_tokens, token_ids, ...)
  longs: String,    // uint64 seeds do not fit a JS number
  enums: String,    // finish reasons by name
  defaults: true,
});
const genrpc = grpc.loadPackageDefinition(definition).genrpc.v1;

function generate(client, request) {
  return new Promise((resolve, reject) => {
    client.Generate(request, { deadline: Date.now() + 120000 }, (err, reply) => (err ? reject(err) : resolve(reply)));
  });
}

function generateStream(client, request) {
  return new Promise((resolve, reject) => {
    const messages = [];
    const call = client.GenerateStream(request, { deadline: Date.now() + 120000 });
    call.on("data", (m) => messages.push(m));
    call.on("error", reject);
    call.on("end", () => resolve(messages));
  });
}

async function main() {
  const address = process.argv[2] || "127.0.0.1:50051";
  const prompt = process.argv[3] || "The capital of France is";
  const client = new genrpc.Generation(address, grpc.credentials.createInsecure());
  const config = { max_new_tokens: 12, seed: 42, do_sample: true };
  const unary = await generate(client, { prompts: [prompt], config });
  const messages = await generateStream(client, { prompt, config });
  // Structured output: the completion is JSON that validates against the schema.
  const schema = {
    type: "object",
    properties: {
      city: { type: "string", maxLength: 30 },
      population: { type: "integer", minimum: 0, maximum: 50000000 },
    },
    required: ["city", "population"],
    additionalProperties: false,
  };
  const structured = await generate(client, {
    chats: [{ messages: [{ role: "user", content: "Name a large city and its population, as JSON." }] }],
    config: { max_new_tokens: 60, json_schema: JSON.stringify(schema) },
  });
  let bad = null;
  try {
    await generate(client, { prompts: [prompt], config: { top_p: 2 } });
  } catch (err) {
    bad = { code: err.code, details: err.details };
  }
  const last = messages[messages.length - 1];
  console.log(JSON.stringify({
    unary: unary.completions[0],
    stream: {
      text: messages.map((m) => m.text).join(""),
      token_ids: messages.flatMap((m) => m.token_ids),
      num_messages: messages.length,
      finish_reason: last.finish_reason,
      seed: last.seed,
    },
    invalid: bad,
    structured: { text: structured.completions[0].text, parsed: JSON.parse(structured.completions[0].text), schema },
  }));
  client.close();
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
