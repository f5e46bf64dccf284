#!/usr/bin/env node
// A Node client of meter-grpc: @grpc/grpc-js + @grpc/proto-loader on the protos of this
// repository, no generated code. Run against a live server by tests/test_interop_node.py:
//
//   node client.js --target 127.0.0.1:50051 --token ADMIN_TOKEN
//   METER_TARGET=127.0.0.1:50051 METER_ADMIN_TOKEN=... node client.js
//
// Prints one line per check ("ok   name: detail") and exits 1 on the first failure
// ("FAIL name: why"), 2 on bad arguments.
'use strict';

const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const util = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

// ---------------------------------------------------------------------------------------------
// Arguments

function parseArgs(argv) {
  const opts = {
    target: process.env.METER_TARGET || '',
    token: process.env.METER_ADMIN_TOKEN || '',
    protos: process.env.METER_PROTOS_DIR || path.resolve(__dirname, '..', '..', '..', 'protos'),
    googleapis: process.env.METER_GOOGLEAPIS_PROTOS || '',
  };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    const key = { '--target': 'target', '--token': 'token', '--protos': 'protos', '--googleapis': 'googleapis' }[flag];
    if (!key || i + 1 >= argv.length) {
      usage(`unknown or incomplete argument ${JSON.stringify(flag)}`);
    }
    opts[key] = argv[++i];
  }
  if (!opts.target || !opts.token) usage('the target and the admin token are required');
  return opts;
}

function usage(message) {
  process.stderr.write(
    `${message}\nusage: node client.js --target HOST:PORT --token ADMIN_TOKEN ` +
      '[--protos DIR] [--googleapis DIR]\n' +
      '  (or METER_TARGET, METER_ADMIN_TOKEN, METER_PROTOS_DIR, METER_GOOGLEAPIS_PROTOS)\n',
  );
  process.exit(2);
}

// ---------------------------------------------------------------------------------------------
// Loading the protos

// protos/ alone resolves every import once google/rpc/*.proto is vendored there; until then a
// second include dir with googleapis' protos (e.g. the googleapis-common-protos wheel's
// site-packages) is used, and only when protos/google/rpc/status.proto is missing.
function includeDirs(opts) {
  const dirs = [opts.protos];
  if (!fs.existsSync(path.join(opts.protos, 'google', 'rpc', 'status.proto'))) {
    if (!opts.googleapis || !fs.existsSync(path.join(opts.googleapis, 'google', 'rpc', 'status.proto'))) {
      throw new Error(
        `google/rpc/status.proto is neither in ${opts.protos} nor in --googleapis ` +
          `(${JSON.stringify(opts.googleapis)})`,
      );
    }
    dirs.push(opts.googleapis);
  }
  return dirs;
}

// The loader options a Node client of meter-grpc wants:
// - longs: String   int64 fields (uses, max_uses, cores, Timestamp.seconds) arrive as decimal
//                   strings, never as lossy numbers or Long objects; requests take a number
//                   or a string.
// - enums: String   enum fields arrive as their names ("USAGE_EVENT_TYPE_INCREMENTED").
// - defaults: true  unset scalar fields arrive as their zero value ('' / '0' / false)...
// - oneofs: true    ...but fields of a oneof do not (they are absent when unset), and the
//                   oneof's name holds the name of the field that is set. A proto3 `optional`
//                   field is a synthetic oneof named "_" + field: `max_uses` is absent when
//                   unset (unlimited), and `_max_uses: 'max_uses'` accompanies it when set.
const LOADER_OPTIONS = { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true };

function load(opts) {
  const dirs = includeDirs(opts);
  const definition = protoLoader.loadSync(['meter/v1/license_service.proto', 'meter/v1/usage_service.proto'], {
    ...LOADER_OPTIONS,
    includeDirs: dirs,
  });
  const meter = grpc.loadPackageDefinition(definition).meter.v1;

  // google.rpc.Status and its details, for the `grpc-status-details-bin` trailer and the
  // `error` of StreamUsage: the same .proto files, loaded as protobufjs types.
  const root = new protobuf.Root();
  root.resolvePath = (_origin, target) => {
    for (const dir of dirs) {
      const full = path.join(dir, target);
      if (fs.existsSync(full)) return full;
    }
    return target; // google/protobuf/*.proto: bundled with protobufjs
  };
  // meter.v1.ErrorReason lists every ErrorInfo.reason (as "ERROR_REASON_" + reason).
  root.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto', 'meter/v1/error_reason.proto'], {
    keepCase: true,
  });
  return { meter, dirs, root };
}

// ---------------------------------------------------------------------------------------------
// Rich errors

const CONVERT = { longs: String, enums: String, defaults: true, oneofs: true };

// The details of a google.rpc.Status (a decoded object whose `details` are Any messages):
// { ErrorInfo: {...}, QuotaFailure: {...}, ... } keyed by the message's short name.
function unpackDetails(root, details) {
  const out = {};
  for (const any of details || []) {
    const fullName = any.type_url.slice(any.type_url.lastIndexOf('/') + 1); // type.googleapis.com/google.rpc.ErrorInfo
    const type = root.lookupType(fullName);
    out[type.name] = type.toObject(type.decode(any.value), CONVERT);
  }
  return out;
}

// The google.rpc.Status of a failed call, from its `grpc-status-details-bin` trailer.
function richError(root, err) {
  const bins = err.metadata ? err.metadata.get('grpc-status-details-bin') : [];
  if (bins.length !== 1) throw new Error(`no grpc-status-details-bin trailer on ${err.code} ${err.details}`);
  const Status = root.lookupType('google.rpc.Status');
  const status = Status.toObject(Status.decode(bins[0]), CONVERT);
  return { code: status.code, message: status.message, details: unpackDetails(root, status.details) };
}

// ---------------------------------------------------------------------------------------------
// Calls

function unary(client, method, request, metadata, timeoutMs = 10000) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline: Date.now() + timeoutMs }, (err, response) =>
      err ? reject(err) : resolve(response),
    );
  });
}

async function expectError(promise, what) {
  try {
    const response = await promise;
    throw new Error(`${what} succeeded (${JSON.stringify(response)}) but an error was expected`);
  } catch (err) {
    if (err.code === undefined) throw err;
    return err;
  }
}

function assertLimitError(root, err, code, reason, limit) {
  assert.equal(err.code, code, `status code ${err.code} (${err.details}), expected ${code}`);
  const rich = richError(root, err);
  assert.equal(rich.code, code, 'google.rpc.Status.code matches the call status');
  const info = rich.details.ErrorInfo;
  assert.ok(info, `an ErrorInfo among the details (${Object.keys(rich.details)})`);
  assert.equal(info.reason, reason, 'ErrorInfo.reason');
  assert.equal(info.domain, 'meter.v1', 'ErrorInfo.domain');
  assert.equal(info.metadata.limit, limit, 'ErrorInfo.metadata.limit');
  // Clients switch on the ErrorReason enum; a reason they do not know maps to UNSPECIFIED (0).
  const known = root.lookupEnum('meter.v1.ErrorReason').values[`ERROR_REASON_${info.reason}`] ?? 0;
  assert.ok(known > 0, `ErrorReason has ERROR_REASON_${info.reason}`);
  return rich;
}

// ---------------------------------------------------------------------------------------------
// License files (SPEC §6), with Node's crypto alone

const BEGIN = '-----BEGIN LICENSE FILE-----';
const END = '-----END LICENSE FILE-----';

function parseLicenseFile(certificate) {
  const text = certificate.trim();
  assert.ok(text.startsWith(BEGIN) && text.endsWith(END), 'armored with BEGIN/END LICENSE FILE');
  const lines = text.slice(BEGIN.length, text.length - END.length).trim().split('\n');
  assert.ok(lines.every((l) => l.length <= 60), 'base64 wrapped at 60 columns');
  return JSON.parse(Buffer.from(lines.join(''), 'base64').toString('utf8'));
}

function ed25519PublicKey(raw) {
  assert.equal(raw.length, 32, 'a raw Ed25519 public key is 32 bytes');
  return crypto.createPublicKey({ key: { kty: 'OKP', crv: 'Ed25519', x: raw.toString('base64url') }, format: 'jwk' });
}

function verifyLicenseFile(file, publicKey) {
  const signed = Buffer.from(`license/${file.enc}`, 'utf8');
  return crypto.verify(null, signed, publicKey, Buffer.from(file.sig, 'base64'));
}

function decryptEnc(enc, licenseKey) {
  const [ciphertext, iv, tag] = enc.split('.').map((p) => Buffer.from(p, 'base64'));
  assert.equal(iv.length, 12, 'AES-GCM IV of 12 bytes');
  assert.equal(tag.length, 16, 'AES-GCM tag of 16 bytes');
  const key = crypto.createHash('sha256').update(licenseKey).digest();
  const decipher = crypto.createDecipheriv('aes-256-gcm', key, iv);
  decipher.setAuthTag(tag);
  return JSON.parse(Buffer.concat([decipher.update(ciphertext), decipher.final()]).toString('utf8'));
}

// One line saying why a check failed.
function describe(err) {
  if (err.code !== undefined && err.details !== undefined) {
    return `gRPC status ${err.code} (${grpc.status[err.code]}): ${err.details}`;
  }
  if (err instanceof assert.AssertionError) {
    const what = err.generatedMessage ? 'values differ' : err.message;
    return `${what}: got ${util.inspect(err.actual)}, expected ${util.inspect(err.expected)}`;
  }
  return String(err.message || err).replace(/\s*\n\s*/g, ' ');
}

// ---------------------------------------------------------------------------------------------
// The checks

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  let current = 'load protos';
  const ok = (name, detail) => console.log(`ok   ${name}${detail ? `: ${detail}` : ''}`);
  const check = async (name, fn) => {
    current = name;
    const detail = await fn();
    ok(name, detail);
  };

  // Whatever happens, never hang: the caller's timeout is the second line of defence.
  const watchdog = setTimeout(() => {
    console.log(`FAIL ${current}: timed out`);
    process.exit(1);
  }, Number(process.env.METER_NODE_TIMEOUT_MS || 20000));
  watchdog.unref();

  try {
    const { meter, dirs, root } = load(opts);
    ok('load protos', `include dirs ${dirs.join(', ')}`);

    const credentials = grpc.credentials.createInsecure();
    const licenses = new meter.LicenseService(opts.target, credentials);
    const usage = new meter.UsageService(opts.target, credentials);
    const admin = new grpc.Metadata();
    admin.set('authorization', `Bearer ${opts.token}`);
    const byKey = (key) => {
      const md = new grpc.Metadata();
      md.set('authorization', `License ${key}`);
      return md;
    };
    const run = Math.random().toString(36).slice(2, 10);

    // -- usage limit, with the ErrorInfo of the grpc-status-details-bin trailer ----------------
    let policy, lic;
    await check('create policy and license', async () => {
      ({ policy } = await unary(licenses, 'CreatePolicy', {
        policy: { name: `node ${run}`, max_uses: 3, max_cores: 8, floating: true, max_machines: 2 },
      }, admin));
      assert.ok(policy.id, 'policy id');
      assert.equal(policy.max_uses, '3', 'int64 max_uses as a string');
      assert.equal(policy._max_uses, 'max_uses', 'optional max_uses: synthetic oneof _max_uses names it');
      ({ license: lic } = await unary(licenses, 'CreateLicense', { license: { policy_id: policy.id } }, admin));
      assert.ok(lic.id && lic.key, 'license id and key');
      assert.equal(lic.max_uses, '3', 'effective max_uses');
      return `policy ${policy.id}, license ${lic.id}`;
    });

    await check('optional fields', async () => {
      const { policy: unlimited } = await unary(licenses, 'CreatePolicy', { policy: { name: `node unlimited ${run}` } }, admin);
      assert.equal(unlimited.max_uses, undefined, 'unset optional int64: absent, not "0"');
      assert.equal(unlimited._max_uses, undefined, 'unset optional: no synthetic oneof name');
      assert.equal(unlimited.floating, false, 'unset plain bool: its default (defaults: true)');
      assert.equal(unlimited.name, `node unlimited ${run}`);
      const { license: free } = await unary(licenses, 'CreateLicense', { license: { policy_id: unlimited.id } }, admin);
      const got = await unary(usage, 'GetUsage', { license_id: free.id }, admin);
      assert.equal(got.uses, '0', 'plain int64 at zero: "0"');
      assert.ok(!('max_uses' in got) && !('remaining' in got), 'unlimited: max_uses and remaining absent');
      return 'unset optional int64 is absent (undefined); set: a string plus _max_uses: "max_uses"';
    });

    await check('IncrementUsage 2 then 1', async () => {
      const first = await unary(usage, 'IncrementUsage', { license_id: lic.id, amount: 2, request_id: `a-${run}` }, admin);
      assert.deepEqual([first.uses, first.max_uses, first.remaining], ['2', '3', '1']);
      assert.equal(first._remaining, 'remaining');
      const second = await unary(usage, 'IncrementUsage', { license_id: lic.id, amount: '1' }, admin);
      assert.deepEqual([second.uses, second.remaining], ['3', '0']);
      return `uses ${first.uses} then ${second.uses} of ${second.max_uses}, remaining ${second.remaining}`;
    });

    await check('usage limit: RESOURCE_EXHAUSTED with ErrorInfo from grpc-status-details-bin', async () => {
      const err = await expectError(unary(usage, 'IncrementUsage', { license_id: lic.id, amount: 1 }, admin), 'a 4th use');
      const rich = assertLimitError(root, err, grpc.status.RESOURCE_EXHAUSTED, 'USAGE_LIMIT_EXCEEDED', '3');
      const info = rich.details.ErrorInfo;
      assert.equal(info.metadata.uses, '3');
      assert.equal(info.metadata.requested, '1');
      assert.ok(rich.details.QuotaFailure, 'a QuotaFailure beside the ErrorInfo');
      const after = await unary(usage, 'GetUsage', { license_id: lic.id }, admin);
      assert.equal(after.uses, '3', 'nothing counted');
      return `${info.reason} ${info.domain} ${JSON.stringify(info.metadata)}; details ${Object.keys(rich.details).join(', ')}`;
    });

    // -- cores ---------------------------------------------------------------------------------
    await check('cores: 6 then 4 of max_cores 8 -> CORE_LIMIT_EXCEEDED', async () => {
      const { machine } = await unary(licenses, 'ActivateMachine', {
        license_id: lic.id, fingerprint: `node-a-${run}`, cores: 6, name: 'node a',
      }, admin);
      assert.ok(machine.id);
      assert.equal(machine.cores, '6');
      const err = await expectError(
        unary(licenses, 'ActivateMachine', { license_id: lic.id, fingerprint: `node-b-${run}`, cores: 4 }, admin),
        'a second machine of 4 cores',
      );
      const rich = assertLimitError(root, err, grpc.status.RESOURCE_EXHAUSTED, 'CORE_LIMIT_EXCEEDED', '8');
      const { license: now } = await unary(licenses, 'GetLicense', { id: lic.id }, admin);
      assert.deepEqual([now.machines_count, now.cores_count], ['1', '6'], 'the refused machine is not counted');
      return `machine ${machine.id} (6 cores); then ${rich.details.ErrorInfo.reason} ${JSON.stringify(rich.details.ErrorInfo.metadata)}`;
    });

    // -- StreamUsage ---------------------------------------------------------------------------
    await check('StreamUsage: 10 increments against max_uses 5, answered in order', async () => {
      const { policy: p5 } = await unary(licenses, 'CreatePolicy', { policy: { name: `node stream ${run}`, max_uses: 5 } }, admin);
      const { license: l5 } = await unary(licenses, 'CreateLicense', { license: { policy_id: p5.id } }, admin);
      const call = usage.StreamUsage(admin, { deadline: Date.now() + 10000 });
      const answers = [];
      const done = new Promise((resolve, reject) => {
        call.on('data', (msg) => answers.push(msg));
        call.on('error', reject);
        call.on('end', resolve);
      });
      for (let i = 0; i < 10; i++) call.write({ license_id: l5.id, amount: 1, request_id: `s${i}-${run}` });
      call.end();
      await done;
      assert.equal(answers.length, 10, 'one answer per request');
      answers.forEach((a, i) => {
        assert.equal(a.request_id, `s${i}-${run}`, `answer ${i} in request order`);
        if (i < 5) {
          assert.equal(a.outcome, 'result', `answer ${i} is a result`);
          assert.equal(a.result.uses, String(i + 1));
          assert.equal(a.error, undefined, 'the other member of the oneof is absent');
        } else {
          assert.equal(a.outcome, 'error', `answer ${i} is an error`);
          assert.equal(a.error.code, grpc.status.RESOURCE_EXHAUSTED);
          const details = unpackDetails(root, a.error.details);
          assert.equal(details.ErrorInfo.reason, 'USAGE_LIMIT_EXCEEDED');
          assert.equal(details.ErrorInfo.domain, 'meter.v1');
          assert.equal(details.ErrorInfo.metadata.limit, '5');
        }
      });
      return `uses ${answers.slice(0, 5).map((a) => a.result.uses).join(',')}; then 5 x ${answers[9].error.code} USAGE_LIMIT_EXCEEDED`;
    });

    // -- WatchUsage ----------------------------------------------------------------------------
    await check('WatchUsage: subscribe, increment, receive INCREMENTED', async () => {
      const { license: lw } = await unary(licenses, 'CreateLicense', { license: { policy_id: policy.id } }, admin);
      // after_event_id "0-0": from the oldest event the license has kept (this license has none
      // yet), so the increment below cannot race the subscription; no sleep needed.
      const call = usage.WatchUsage({ license_id: lw.id, after_event_id: '0-0' }, byKey(lw.key));
      const first = new Promise((resolve, reject) => {
        call.on('data', (msg) => resolve(msg));
        call.on('error', reject);
        call.on('end', () => reject(new Error('the watch ended before any event')));
      });
      const inc = await unary(usage, 'IncrementUsage', { license_id: lw.id, amount: 2, request_id: `w-${run}` }, admin);
      const msg = await first;
      call.cancel();
      const e = msg.event;
      assert.equal(e.type, 'USAGE_EVENT_TYPE_INCREMENTED');
      assert.deepEqual([e.amount, e.uses, e.max_uses, e.request_id], ['2', inc.uses, '3', `w-${run}`]);
      assert.ok(e.event_id, 'event_id to resume from');
      assert.ok(Number(e.event_time.seconds) > 0, 'event_time (Timestamp.seconds as a string)');
      return `${e.type} amount ${e.amount} uses ${e.uses} event_id ${e.event_id}`;
    });

    // -- license files -------------------------------------------------------------------------
    let publicKey;
    await check('GetPublicKey: raw 32-byte Ed25519 key', async () => {
      const res = await unary(licenses, 'GetPublicKey', {}, admin);
      assert.ok(Buffer.isBuffer(res.public_key), 'bytes arrive as a Buffer');
      publicKey = ed25519PublicKey(res.public_key);
      assert.equal(publicKey.asymmetricKeyType, 'ed25519');
      return `${res.algorithm}, ${res.public_key.toString('hex')}`;
    });

    await check('CheckOutLicense (plain) verified with node:crypto', async () => {
      const out = await unary(licenses, 'CheckOutLicense', { id: lic.id, ttl: { seconds: 3600 }, encrypt: false }, admin);
      const file = parseLicenseFile(out.certificate);
      assert.equal(file.alg, 'base64+ed25519');
      assert.ok(verifyLicenseFile(file, publicKey), 'the Ed25519 signature of "license/" + enc verifies');
      const payload = JSON.parse(Buffer.from(file.enc, 'base64').toString('utf8'));
      assert.equal(payload.data.id, lic.id, 'the file is of this license');
      assert.equal(payload.data.attributes.uses, 3);
      assert.equal(payload.meta.ttl, 3600);
      assert.ok(payload.meta.issued && payload.meta.expiry, 'meta.issued and meta.expiry');
      // One changed character of enc and the signature no longer holds.
      const forged = { ...file, enc: Buffer.from(JSON.stringify({ ...payload, meta: { ...payload.meta, ttl: 9e9 } })).toString('base64') };
      assert.equal(verifyLicenseFile(forged, publicKey), false, 'a forged payload fails verification');
      return `${file.alg}, license ${payload.data.id}, issued ${payload.meta.issued}, expiry ${payload.meta.expiry}`;
    });

    await check('CheckOutLicense (encrypted, by license key) decrypted with node:crypto', async () => {
      const out = await unary(licenses, 'CheckOutLicense', { id: lic.id, encrypt: true }, byKey(lic.key));
      const file = parseLicenseFile(out.certificate);
      assert.equal(file.alg, 'aes-256-gcm+ed25519');
      assert.ok(verifyLicenseFile(file, publicKey), 'the signature verifies');
      const payload = decryptEnc(file.enc, lic.key);
      assert.equal(payload.data.id, lic.id);
      assert.throws(() => decryptEnc(file.enc, `${lic.key}x`), 'another key fails the GCM tag');
      return `${file.alg}, license ${payload.data.id}, ${payload.included.length} included resources`;
    });

    licenses.close();
    usage.close();
    console.log('all Node checks passed');
  } catch (err) {
    console.log(`FAIL ${current}: ${describe(err)}`);
    if (process.env.METER_NODE_DEBUG) console.error(err);
    process.exit(1);
  }
}

main();
