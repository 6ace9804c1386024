// A Node.js client for faceseald: proves the API works from another gRPC stack (grpc-js), with
// the .proto files loaded at run time (no generated code) and mutual TLS with the dev PKI.
//
//   node client.mjs TARGET DEV_DIR PROTOS_DIR [SERVER_NAME]
//
//   TARGET       host:port of faceseald, e.g. 127.0.0.1:50051
//   DEV_DIR      a folder written by `faceseald init --dev` (ca.crt, clients/{enroller,gateway}.{crt,key})
//   PROTOS_DIR   the repository's protos/ folder
//   SERVER_NAME  the name to verify in the server's certificate when TARGET's host is not in it
//                (or is an IP address: TLS cannot send an IP as the server name), e.g. localhost
//
// It enrolls two synthetic subjects as the enroller, matches and identifies as the gateway,
// deletes as the enroller, and makes calls the daemon must refuse, then prints one JSON object
// with every result and status code on stdout. Exit status: 0 when every call got an answer
// (successful or refused), 1 on a local error (bad arguments, unreadable files).
// The encodings are random unit vectors, never real biometric data.

import { readFileSync } from "node:fs";
import { join } from "node:path";
import process from "node:process";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

const DIMENSION = 128; // the dev setup's default gallery: 128-d euclidean, threshold 0.6
const DEADLINE_MS = 10_000;

function usage(message) {
  process.stderr.write(`client.mjs: ${message}\nusage: node client.mjs TARGET DEV_DIR PROTOS_DIR [SERVER_NAME]\n`);
  process.exit(1);
}

// mulberry32: a small seeded generator, so every run sends the same vectors.
function rng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function gaussian(next) {
  // Box-Muller; 1 - u keeps the logarithm finite.
  return Math.sqrt(-2 * Math.log(1 - next())) * Math.cos(2 * Math.PI * next());
}

function scaled(vector, length) {
  const norm = Math.hypot(...vector);
  return vector.map((x) => (x * length) / norm);
}

function unitVector(seed) {
  const next = rng(seed);
  return scaled(Array.from({ length: DIMENSION }, () => gaussian(next)), 1);
}

// A vector `distance` away from `base` (euclidean).
function nearby(base, distance, seed) {
  const next = rng(seed);
  const step = scaled(Array.from({ length: DIMENSION }, () => gaussian(next)), distance);
  return base.map((x, i) => x + step[i]);
}

function loadService(protosDir) {
  const definition = protoLoader.loadSync(join(protosDir, "faceseal", "v1", "faceseal.proto"), {
    includeDirs: [protosDir],
    keepCase: true, // field names exactly as in the .proto (subject_id, top_k)
    longs: String,
    enums: String,
    defaults: true, // proto3 scalars always present (match: false, not missing)
    oneofs: true, // `optional` fields are synthetic oneofs: absent stays absent
  });
  return grpc.loadPackageDefinition(definition).faceseal.v1.FaceSealService;
}

function stubFor(Service, target, devDir, profile, serverName) {
  const credentials = grpc.credentials.createSsl(
    readFileSync(join(devDir, "ca.crt")),
    readFileSync(join(devDir, "clients", `${profile}.key`)),
    readFileSync(join(devDir, "clients", `${profile}.crt`)),
  );
  const options = serverName ? { "grpc.ssl_target_name_override": serverName } : {};
  return new Service(target, credentials, options);
}

// One unary call -> {ok: true, response} or {ok: false, code, status}; never throws for an RPC error.
function call(stub, method, request) {
  return new Promise((resolve) => {
    stub[method](request, { deadline: Date.now() + DEADLINE_MS }, (error, response) => {
      if (error) {
        resolve({ ok: false, code: error.code, status: grpc.status[error.code], details: error.details });
      } else {
        resolve({ ok: true, response });
      }
    });
  });
}

// The distance is `optional float`: report null when the daemon left it out (decision-only callers).
function distanceOf(message) {
  return message._distance === "distance" ? message.distance : null;
}

async function main() {
  const [target, devDir, protosDir, serverName] = process.argv.slice(2);
  if (!target || !devDir || !protosDir) usage("three arguments are required");

  let Service;
  let enroller;
  let gateway;
  try {
    Service = loadService(protosDir);
    enroller = stubFor(Service, target, devDir, "enroller", serverName);
    gateway = stubFor(Service, target, devDir, "gateway", serverName);
  } catch (err) {
    usage(err.message);
  }

  const alice = unitVector(1);
  const bob = unitVector(2);
  const aliceAgain = nearby(alice, 0.2, 3); // well within the 0.6 threshold
  const out = {};

  const enrolls = [];
  for (const [subject_id, encoding] of [
    ["alice", alice],
    ["bob", bob],
  ]) {
    const r = await call(enroller, "Enroll", { gallery: "", subject_id, encoding, replace: false });
    enrolls.push(
      r.ok
        ? { subject_id: r.response.subject_id, template_count: r.response.template_count, has_template_id: r.response.template_id.length > 0 }
        : { subject_id, error: r.status },
    );
  }
  out.enroll = enrolls;

  const matches = [];
  for (const [name, probe] of [
    ["alice_vs_alice", aliceAgain],
    ["alice_vs_bob", bob],
  ]) {
    const r = await call(gateway, "Match", { gallery: "", subject_id: "alice", probe });
    matches.push(r.ok ? { name, match: r.response.match, distance: distanceOf(r.response) } : { name, error: r.status });
  }
  out.match = matches;

  const identify = await call(gateway, "Identify", { gallery: "", probe: aliceAgain, top_k: 5 });
  out.identify = identify.ok
    ? { candidates: identify.response.candidates.map((c) => ({ subject_id: c.subject_id, distance: distanceOf(c) })) }
    : { error: identify.status };

  const removed = await call(enroller, "Delete", { gallery: "", subject_id: "bob" });
  out.delete = removed.ok ? { deleted: removed.response.deleted } : { error: removed.status };

  // Calls the daemon must refuse, with the status code it refuses them with.
  const refusals = {
    gateway_enroll: await call(gateway, "Enroll", { gallery: "", subject_id: "mallory", encoding: bob }),
    enroller_match: await call(enroller, "Match", { gallery: "", subject_id: "alice", probe: alice }),
    match_deleted_subject: await call(gateway, "Match", { gallery: "", subject_id: "bob", probe: bob }),
    wrong_dimension: await call(enroller, "Enroll", { gallery: "", subject_id: "carol", encoding: [0.1, 0.2, 0.3] }),
  };
  out.refused = Object.fromEntries(
    Object.entries(refusals).map(([name, r]) => [name, r.ok ? { unexpectedly_ok: true } : { code: r.code, status: r.status }]),
  );

  enroller.close();
  gateway.close();
  process.stdout.write(`${JSON.stringify(out)}\n`);
}

await main();
