#!/usr/bin/env node
// A whole adamserve session over gRPC from Node.js, written from the .proto alone:
// create (spec, then initial chunks), steps (header, gradient chunks, half-close;
// read the status, then the parameter chunks), export state, delete.
//
//   node session.js HOST:PORT PLAN_JSON [STATE_OUT]
//
// PLAN_JSON: {"session_id": "...", "algorithm": "ALGORITHM_ADAMW",
//             "groups": [{"values": {"lr": 0.01}, "flags": {}}],
//             "tensors": [{"name": "w", "shape": [3, 4], "initial": [...]}, ...],
//             "steps": [{"w": [...gradient...], ...}, ...],
//             "chunk_elements": 5}
// Gradients and initial values are flat, row-major lists of numbers, sent as FP32
// in chunks of at most chunk_elements elements. STATE_OUT: where to write the
// exported safetensors blob. Prints one JSON document: the session as created, the
// status and parameters after each step, the size of the exported state and the
// outcome of getting the session after its deletion (the status code's name and
// the reason of the google.rpc.ErrorInfo in the status details, read with a few
// lines of protobuf wire decoding: the .proto is all this script has).
'use strict';

const path = require('path');
const fs = require('fs');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO = path.resolve(__dirname, '..', '..', '..', 'protos', 'adamserve_proto', 'v2',
  'optimizer.proto');

function loadOptimizer() {
  const definition = protoLoader.loadSync(PROTO, {
    keepCase: true, // field names as in the .proto: session_id, return_datatype
    longs: Number, // int64 (shape, offset, step) as JS numbers
    enums: String,
    defaults: true,
    oneofs: true, // the `kind` oneof names which field a message carries
  });
  return grpc.loadPackageDefinition(definition).adamserve_proto.v2.OptimizerService;
}

function numel(shape) {
  return shape.reduce((a, b) => a * b, 1);
}

function encodeFP32(values) {
  const buf = Buffer.alloc(values.length * 4);
  values.forEach((v, i) => buf.writeFloatLE(v, i * 4));
  return buf;
}

function decodeFP32(buf) {
  const out = new Array(buf.length / 4);
  for (let i = 0; i < out.length; i++) out[i] = buf.readFloatLE(i * 4);
  return out;
}

// TensorChunk messages for one tensor: in order, each element exactly once.
function* chunks(name, shape, values, chunkElements) {
  if (values.length !== numel(shape)) {
    throw new Error(`${name}: ${values.length} values for shape [${shape}]`);
  }
  for (let lo = 0; lo < values.length; lo += chunkElements) {
    const part = values.slice(lo, lo + chunkElements);
    yield { name, shape, datatype: 'FP32', offset: lo, data: encodeFP32(part) };
  }
}

function createSession(client, plan) {
  return new Promise((resolve, reject) => {
    const call = client.CreateSession((err, reply) => (err ? reject(err) : resolve(reply.session)));
    call.write({
      spec: {
        session_id: plan.session_id,
        algorithm: plan.algorithm,
        groups: plan.groups,
        tensors: plan.tensors.map((t) => ({ name: t.name, shape: t.shape, group: t.group || 0 })),
      },
    });
    for (const t of plan.tensors) {
      for (const c of chunks(t.name, t.shape, t.initial, plan.chunk_elements)) {
        call.write({ initial: c });
      }
    }
    call.end();
  });
}

// One Step stream: returns {status, params: {name: [values]}}.
function step(client, plan, grads) {
  return new Promise((resolve, reject) => {
    const call = client.Step();
    let status = null;
    const params = {};
    const seen = {};
    call.on('data', (msg) => {
      if (msg.kind === 'status') {
        if (status !== null) return reject(new Error('a second status message'));
        status = msg.status;
      } else if (msg.kind === 'param') {
        if (status === null) return reject(new Error('a param chunk before the status'));
        const c = msg.param;
        if (c.datatype !== 'FP32') return reject(new Error(`param datatype ${c.datatype}`));
        if (!(c.name in params)) {
          params[c.name] = new Array(numel(c.shape)).fill(NaN);
          seen[c.name] = 0;
        }
        const values = decodeFP32(c.data);
        if (c.offset !== seen[c.name]) {
          return reject(new Error(`${c.name}: chunk at ${c.offset}, expected ${seen[c.name]}`));
        }
        values.forEach((v, i) => { params[c.name][c.offset + i] = v; });
        seen[c.name] += values.length;
      } else {
        reject(new Error(`unexpected StepResponse ${JSON.stringify(msg)}`));
      }
    });
    call.on('error', reject);
    call.on('end', () => {
      for (const name of Object.keys(params)) {
        if (seen[name] !== params[name].length) {
          return reject(new Error(`${name}: ${seen[name]} of ${params[name].length} values`));
        }
      }
      resolve({ status, params });
    });
    call.write({
      header: { session_id: plan.session_id, return_datatype: 'FP32', require_all: true },
    });
    for (const t of plan.tensors) {
      for (const c of chunks(t.name, t.shape, grads[t.name], plan.chunk_elements)) {
        call.write({ chunk: c });
      }
    }
    call.end(); // half-close: apply the step
  });
}

function exportState(client, sessionId) {
  return new Promise((resolve, reject) => {
    const parts = [];
    const call = client.ExportState({ session_id: sessionId });
    call.on('data', (c) => parts.push(c.data));
    call.on('error', reject);
    call.on('end', () => resolve(Buffer.concat(parts)));
  });
}

// Protobuf wire decoding, just enough for google.rpc.Status: its fields as
// [number, bytes] pairs (length-delimited ones; varints skipped).
function fields(buf) {
  const out = [];
  let i = 0;
  const varint = () => {
    let n = 0;
    let shift = 0;
    for (;;) {
      const b = buf[i++];
      n += (b & 0x7f) * 2 ** shift;
      shift += 7;
      if (b < 0x80) return n;
    }
  };
  while (i < buf.length) {
    const key = varint();
    if ((key & 7) === 0) {
      varint();
    } else if ((key & 7) === 2) {
      const len = varint();
      out.push([Math.floor(key / 8), buf.subarray(i, i + len)]);
      i += len;
    } else {
      throw new Error(`unexpected wire type ${key & 7}`);
    }
  }
  return out;
}

// The reason of the ErrorInfo in a google.rpc.Status (details = repeated Any, field 3;
// Any.value = field 2; ErrorInfo.reason = field 1).
function errorInfoReason(statusBytes) {
  for (const [n, any] of fields(statusBytes)) {
    if (n !== 3) continue;
    const parts = Object.fromEntries(fields(any));
    if (parts[1].toString() !== 'type.googleapis.com/google.rpc.ErrorInfo') continue;
    const info = Object.fromEntries(fields(parts[2]));
    return info[1].toString();
  }
  return null;
}

function unary(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, (err, reply) => (err ? reject(err) : resolve(reply)));
  });
}

async function main() {
  const [target, planJson, stateOut] = process.argv.slice(2);
  if (!target || !planJson) {
    throw new Error('usage: node session.js HOST:PORT PLAN_JSON [STATE_OUT]');
  }
  const plan = { chunk_elements: 1 << 20, ...JSON.parse(planJson) };
  const Optimizer = loadOptimizer();
  const client = new Optimizer(target, grpc.credentials.createInsecure());
  const out = { steps: [] };
  try {
    const info = await createSession(client, plan);
    out.created = { session_id: info.session_id, algorithm: info.algorithm, step: info.step,
      tensors: info.tensors.map((t) => ({ name: t.name, shape: t.shape })) };
    for (const grads of plan.steps) {
      const { status, params } = await step(client, plan, grads);
      out.steps.push({ step: status.step, skipped: status.skipped, params });
    }
    const blob = await exportState(client, plan.session_id);
    if (stateOut) fs.writeFileSync(stateOut, blob);
    out.state_bytes = blob.length;
    await unary(client, 'DeleteSession', { session_id: plan.session_id });
    try {
      await unary(client, 'GetSession', { session_id: plan.session_id });
      out.after_delete = 'OK';
    } catch (err) {
      out.after_delete = grpc.status[err.code]; // expected: NOT_FOUND
      const [details] = err.metadata.get('grpc-status-details-bin');
      out.after_delete_reason = details ? errorInfoReason(details) : null;
    }
  } finally {
    client.close();
  }
  process.stdout.write(JSON.stringify(out) + '\n');
}

main().catch((err) => {
  process.stderr.write(`session.js: ${err.stack || err}\n`);
  process.exit(1);
});
