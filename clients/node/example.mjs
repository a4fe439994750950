// Calling the Sidemesh mesh from Node.js: the same sidemesh.v1 contracts any
// language can use, loaded straight from the .proto files.
//
//   node example.mjs [ADDRESS]        (default: $SIDEMESH_ADDRESS or 127.0.0.1:50051)
//
// It lists the mesh's tools, calls tools-demo/add, streams the assistant
// agent's answer as it arrives, and shows a NOT_FOUND. Every call carries a
// W3C `traceparent`, so the mesh continues this client's trace.
//
// How it proves who it is, with the same variables as the Python client and the CLI:
//   SIDEMESH_TOKEN or SIDEMESH_TOKEN_FILE  a bearer token (`authorization: Bearer ...`)
//   SIDEMESH_TLS_CA                        connect with TLS, trusting this CA (PEM)
//   SIDEMESH_TLS_CERT, SIDEMESH_TLS_KEY    and present this client certificate (mTLS)
// With no token, for the TCP address of a mesh running on this machine, it uses that
// mesh's owner token from its state dir. On a Unix socket the mesh knows the caller's uid.
import { randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import { homedir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const here = dirname(fileURLToPath(import.meta.url));
const protoRoot = join(here, "..", "..", "proto");
const definition = protoLoader.loadSync(
  ["sidemesh/v1/agent.proto", "sidemesh/v1/tool.proto", "sidemesh/v1/mesh.proto"],
  { includeDirs: [protoRoot], keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true },
);
const v1 = grpc.loadPackageDefinition(definition).sidemesh.v1;

const address = process.argv[2] || process.env.SIDEMESH_ADDRESS || "127.0.0.1:50051";
const tcp = !address.startsWith("unix:");
const env = process.env;
const LOOPBACK = /^(127\.|localhost:|\[::1\]:)/;

// The owner token of the mesh running from the default state dir, if it serves `address`.
function ownerToken() {
  const stateDir = join(env.XDG_STATE_HOME || join(homedir(), ".local", "state"), "sidemesh");
  try {
    const { pid, addresses } = JSON.parse(readFileSync(join(stateDir, "endpoints.json"), "utf8"));
    process.kill(pid, 0); // throws when that mesh is gone
    const port = address.split(":").pop();
    const local = (a) => LOOPBACK.test(a) || a.startsWith("0.0.0.0:");
    const same = (a) => a === address || (a.endsWith(`:${port}`) && local(a) && local(address));
    return addresses.some(same) ? readFileSync(join(stateDir, "token"), "utf8").trim() : null;
  } catch {
    return null;
  }
}

const token =
  env.SIDEMESH_TOKEN ||
  (env.SIDEMESH_TOKEN_FILE && readFileSync(env.SIDEMESH_TOKEN_FILE, "utf8").trim()) ||
  (tcp ? ownerToken() : null);
const tls = tcp && (env.SIDEMESH_TLS_CA || env.SIDEMESH_TLS_CERT);
const read = (path) => (path ? readFileSync(path) : null);

let credentials;
if (tls) {
  // TLS, and mTLS when a client certificate is given; the token rides as call credentials.
  credentials = grpc.credentials.createSsl(
    read(env.SIDEMESH_TLS_CA), read(env.SIDEMESH_TLS_KEY), read(env.SIDEMESH_TLS_CERT),
  );
  if (token) {
    const bearer = grpc.credentials.createFromMetadataGenerator((_params, callback) => {
      const metadata = new grpc.Metadata();
      metadata.set("authorization", `Bearer ${token}`);
      callback(null, metadata);
    });
    credentials = grpc.credentials.combineChannelCredentials(credentials, bearer);
  }
} else {
  // Plaintext (a Unix socket or loopback TCP): grpc refuses call credentials here, so the
  // token goes in each call's metadata (see traced()). Never in clear to another host.
  if (token && tcp && !LOOPBACK.test(address)) {
    console.error(`error: refusing to send a token in clear to ${address}: set SIDEMESH_TLS_CA`);
    process.exit(2);
  }
  credentials = grpc.credentials.createInsecure();
}
const tools = new v1.ToolService(address, credentials);
const agents = new v1.AgentService(address, credentials);
const mesh = new v1.MeshService(address, credentials);

// One trace for the whole session: each call is a child of this client's root span.
const traceId = randomBytes(16).toString("hex");
function traced() {
  const metadata = new grpc.Metadata();
  metadata.set("traceparent", `00-${traceId}-${randomBytes(8).toString("hex")}-01`);
  if (token && !tls) metadata.set("authorization", `Bearer ${token}`);
  return metadata;
}

// google.protobuf.Struct <-> plain objects (numbers, strings, booleans, lists, objects).
// protobufjs keeps the well-known types' fields in camelCase, even with keepCase.
function toValue(v) {
  if (v === null) return { nullValue: "NULL_VALUE" };
  if (typeof v === "number") return { numberValue: v };
  if (typeof v === "string") return { stringValue: v };
  if (typeof v === "boolean") return { boolValue: v };
  if (Array.isArray(v)) return { listValue: { values: v.map(toValue) } };
  return { structValue: toStruct(v) };
}
function toStruct(obj) {
  return { fields: Object.fromEntries(Object.entries(obj).map(([k, v]) => [k, toValue(v)])) };
}
function fromValue(v) {
  switch (v.kind) {
    case "numberValue": return v.numberValue;
    case "stringValue": return v.stringValue;
    case "boolValue": return v.boolValue;
    case "listValue": return v.listValue.values.map(fromValue);
    case "structValue": return fromStruct(v.structValue);
    default: return null;
  }
}
function fromStruct(s) {
  return Object.fromEntries(Object.entries(s?.fields ?? {}).map(([k, v]) => [k, fromValue(v)]));
}

// A server stream as an async iterator, ending with the call's status (errors throw).
async function* stream(call) {
  for await (const message of call) yield message;
}

async function callTool(tool, args) {
  const events = stream(tools.CallTool({ tool, arguments: toStruct(args) }, traced()));
  for await (const event of events) {
    if (event.event === "progress") console.log(`  progress ${event.progress.progress}`);
    if (event.event === "result") return event.result;
  }
  throw new Error(`the stream of ${tool} ended without a result`);
}

async function main() {
  const listed = await new Promise((resolve, reject) =>
    mesh.ListTools({}, traced(), (err, reply) => (err ? reject(err) : resolve(reply))),
  );
  console.log(`tools: ${listed.tools.map((t) => t.qualified_name).join(", ")}`);

  const sum = await callTool("tools-demo/add", { a: 40, b: 2 });
  console.log(`tools-demo/add -> ${JSON.stringify(fromStruct(sum.structured_content))}`);

  process.stdout.write("assistant: ");
  const request = { agent: "assistant", input: { text: "What is 2 + 3?" } };
  for await (const event of stream(agents.Invoke(request, traced()))) {
    if (event.event === "text_delta") process.stdout.write(event.text_delta.text);
    if (event.event === "result") console.log(`\n  (${event.result.status})`);
  }

  try {
    await callTool("tools-demo/nope", {});
  } catch (err) {
    console.log(`tools-demo/nope -> ${grpc.status[err.code]}: ${err.details}`);
  }
  console.log(`trace ${traceId}`);
}

main().then(
  () => process.exit(0),
  (err) => {
    console.error(`error: ${err.code !== undefined ? grpc.status[err.code] + ": " + err.details : err}`);
    process.exit(1);
  },
);
