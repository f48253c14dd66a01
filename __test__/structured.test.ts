/**
 * Structured output and tool calls over real HTTP on the default model,
 * through the clients people use: the official `openai` SDK, the Vercel AI
 * SDK (`ai` with `@ai-sdk/openai-compatible`) and LangChain
 * (`@langchain/openai`). JSON outputs are checked with a real validator
 * (ajv), not by eye.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import Ajv from 'ajv';
import addFormats from 'ajv-formats';
import OpenAI from 'openai';

import { createEngine, type Engine, type HttpServer } from '../lib/index';
import { SCHEMAS } from './schemas';

const weatherTool = {
  type: 'function' as const,
  function: {
    name: 'get_weather',
    description: 'Get the current weather for a city',
    parameters: {
      type: 'object',
      properties: { city: { type: 'string', maxLength: 40 }, unit: { enum: ['celsius', 'fahrenheit'] } },
      required: ['city', 'unit'],
      additionalProperties: false,
    },
  },
};

describe('structured output and tool calls', () => {
  let engine: Engine;
  let server: HttpServer;
  let client: OpenAI;

  before(async () => {
    engine = await createEngine();
    await engine.loadModel('default');
    server = await engine.startServer({ port: 0, maxConcurrent: 16 });
    client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: 'unused', maxRetries: 0 });
  });

  after(async () => {
    await server.close();
    await engine.shutdown();
  });

  test('openai SDK: a full tool round trip with tool_choice required, streamed and not', async () => {
    const messages: OpenAI.Chat.ChatCompletionMessageParam[] = [{ role: 'user', content: 'What is the weather in Paris?' }];
    const first = await client.chat.completions.create({
      model: 'default', messages, tools: [weatherTool], tool_choice: 'required', parallel_tool_calls: false, max_tokens: 80, temperature: 0,
    });
    const choice = first.choices[0];
    assert.equal(choice.finish_reason, 'tool_calls');
    assert.equal(choice.message.content, null);
    const call = choice.message.tool_calls![0];
    assert.equal(call.type, 'function');
    assert.match(call.id, /^call_[0-9a-f]{16}$/);
    assert.equal(call.type === 'function' && call.function.name, 'get_weather');
    const args = JSON.parse(call.type === 'function' ? call.function.arguments : '');
    assert.equal(typeof args.city, 'string');
    assert.ok(['celsius', 'fahrenheit'].includes(args.unit), JSON.stringify(args));

    // Streamed: the SDK's own accumulation of deltas gives the same call.
    const stream = client.chat.completions.stream({
      model: 'default', messages, tools: [weatherTool], tool_choice: 'required', parallel_tool_calls: false, max_tokens: 80, temperature: 0,
    });
    const final = await stream.finalChatCompletion();
    const streamed = final.choices[0].message.tool_calls![0];
    assert.equal(final.choices[0].finish_reason, 'tool_calls');
    assert.equal(streamed.type === 'function' && streamed.function.arguments, call.type === 'function' && call.function.arguments);

    // On the wire, as OpenAI streams calls: the first delta names the call
    // with empty arguments, then the arguments arrive in fragments as written.
    const raw = await client.chat.completions.create({
      model: 'default', messages, tools: [weatherTool], tool_choice: 'required', parallel_tool_calls: false, max_tokens: 80, temperature: 0, stream: true,
    });
    const deltas = [];
    for await (const chunk of raw) deltas.push(...(chunk.choices[0]?.delta.tool_calls ?? []));
    const { index, id, type, function: fn } = deltas[0];
    assert.deepEqual({ index, type, fn }, { index: 0, type: 'function', fn: { name: 'get_weather', arguments: '' } });
    assert.match(id!, /^call_[0-9a-f]{16}$/);
    assert.ok(deltas.length > 3, `arguments in fragments: ${JSON.stringify(deltas)}`);
    assert.ok(deltas.slice(1).every((d) => d.index === 0 && d.id === undefined && d.function?.name === undefined));
    assert.equal(deltas.map((d) => d.function?.arguments).join(''), call.type === 'function' && call.function.arguments);

    // The tool's result goes back; the model answers in text.
    const answer = await client.chat.completions.create({
      model: 'default',
      messages: [...messages, choice.message, { role: 'tool', tool_call_id: call.id, content: '{"temperature": 18, "sky": "clear"}' }],
      tools: [weatherTool], max_tokens: 40, temperature: 0,
    });
    assert.ok(answer.choices[0].message.content!.length > 0);
    assert.equal(answer.choices[0].message.tool_calls, undefined);
  });

  test('a named tool choice calls that tool', async () => {
    const other = { type: 'function' as const, function: { name: 'get_time', parameters: { type: 'object', properties: { zone: { type: 'string', maxLength: 20 } }, required: ['zone'] } } };
    const r = await client.chat.completions.create({
      model: 'default', messages: [{ role: 'user', content: 'Weather in Oslo?' }], tools: [weatherTool, other],
      tool_choice: { type: 'function', function: { name: 'get_time' } }, max_tokens: 60, temperature: 0,
    });
    const calls = r.choices[0].message.tool_calls!;
    assert.ok(calls.length >= 1);
    for (const c of calls) assert.equal(c.type === 'function' && c.function.name, 'get_time');
  });

  test('tool_choice auto: a call the model opens on its own is completed by the tools\' grammar', async () => {
    // Asked this way, the default model opens "<tool_call>" itself (its
    // first token leads the next by 0.15 nats, far above the 1e-3 the
    // kernel paths differ by); from there the grammar holds the call to the
    // tool's schema and ends the reply.
    const tools = [{ type: 'function' as const, function: { name: 'get_weather', parameters: { type: 'object', properties: { city: { enum: ['Paris', 'Rome', 'Oslo'] } }, required: ['city'], additionalProperties: false } } }];
    const chunks = [];
    for await (const c of engine.createGenerator({
      model: 'default', messages: [{ role: 'user', content: 'Call the get_weather function for Paris. Reply with the <tool_call> block only.' }],
      tools, parallelToolCalls: false, maxTokens: 60,
    })) chunks.push(c);
    const pieces = chunks.filter((c) => c.type === 'toolCall');
    const meta = chunks.at(-1);
    assert.ok(meta?.type === 'metadata' && meta.stats.finishReason === 'tool_calls');
    // The call's pieces: its name first, then its arguments as written, joined in the metadata.
    assert.equal(meta.toolCalls?.length, 1, JSON.stringify(chunks));
    const call = meta.toolCalls![0];
    assert.ok(pieces.length > 1 && pieces.every((p) => p.type === 'toolCall' && p.index === 0 && p.id === call.id && p.name === 'get_weather'));
    assert.equal(pieces.map((p) => (p.type === 'toolCall' ? p.argumentsDelta : '')).join(''), call.function.arguments);
    assert.ok(['Paris', 'Rome', 'Oslo'].includes(JSON.parse(call.function.arguments).city));
    assert.equal(chunks.filter((c) => c.type === 'token').map((c) => (c.type === 'token' ? c.token : '')).join('').trim(), '');
  });

  test('JSON schemas: every output validates, streamed and not, 8 requests at a time', async () => {
    const ajv = new Ajv({ strict: false });
    addFormats(ajv);
    assert.ok(SCHEMAS.length >= 30);
    const jobs = SCHEMAS.flatMap((schema, i) => [false, true].map((stream) => ({ schema, i, stream })));
    const failures: string[] = [];
    let next = 0;
    const worker = async () => {
      for (let j = next++; j < jobs.length; j = next++) {
        const { schema, i, stream } = jobs[j];
        const body = {
          model: 'default', max_tokens: 256, temperature: 0,
          messages: [{ role: 'user' as const, content: `Reply with JSON for example ${i}.` }],
          response_format: { type: 'json_schema' as const, json_schema: { name: `s${i}`, schema, strict: true } },
        };
        let text = '';
        let finish: string | null = null;
        if (stream) {
          for await (const chunk of await client.chat.completions.create({ ...body, stream: true })) {
            text += chunk.choices[0]?.delta?.content ?? '';
            finish = chunk.choices[0]?.finish_reason ?? finish;
          }
        } else {
          const r = await client.chat.completions.create(body);
          text = r.choices[0].message.content ?? '';
          finish = r.choices[0].finish_reason;
        }
        let value: unknown;
        try {
          value = JSON.parse(text);
        } catch {
          failures.push(`schema ${i} (${stream ? 'stream' : 'whole'}, ${finish}): not JSON: ${text}`);
          continue;
        }
        if (!ajv.validate(schema, value)) failures.push(`schema ${i}: ${ajv.errorsText()}: ${text}`);
        if (finish !== 'stop') failures.push(`schema ${i}: finish_reason ${finish}`);
      }
    };
    await Promise.all(Array.from({ length: 8 }, worker));
    assert.deepEqual(failures, []);
  });

  test('json_object, a regex and a grammar through vLLM-style structured_outputs', async () => {
    const obj = await client.chat.completions.create({
      model: 'default', messages: [{ role: 'user', content: 'Give me a JSON object about a cat.' }],
      response_format: { type: 'json_object' }, max_tokens: 200, temperature: 0,
    });
    const v = JSON.parse(obj.choices[0].message.content!);
    assert.equal(typeof v, 'object');
    assert.ok(v !== null && !Array.isArray(v));
    const post = (extra: object) =>
      fetch(`${server.url}/v1/chat/completions`, {
        method: 'POST', headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ model: 'default', messages: [{ role: 'user', content: 'Is the sky blue?' }], max_tokens: 20, temperature: 0, ...extra }),
      }).then(async (r) => ({ status: r.status, body: await r.json() }));
    const choice = await post({ structured_outputs: { choice: ['yes', 'no', 'it depends'] } });
    assert.ok(['yes', 'no', 'it depends'].includes(choice.body.choices[0].message.content), JSON.stringify(choice.body));
    const date = await post({ structured_outputs: { regex: '\\d{4}-\\d{2}-\\d{2}' } });
    assert.match(date.body.choices[0].message.content, /^\d{4}-\d{2}-\d{2}$/);
    const lark = await post({ structured_outputs: { grammar: 'start: "The answer is " ANSWER "."\nANSWER: "yes" | "no"' } });
    assert.match(lark.body.choices[0].message.content, /^The answer is (yes|no)\.$/);
    // A <think> block (forced here: the default model does not reason) goes
    // to reasoning_content, streamed and not, unless kept inline.
    const think = { structured_outputs: { grammar: 'start: "<think>" /[a-z ]{5,20}/ "</think>" /[A-Za-z ]{3,20}/' }, max_tokens: 40 };
    const parsed = (await post({ ...think, reasoning_format: 'parsed' })).body.choices[0].message;
    assert.match(parsed.reasoning_content, /^[a-z ]{5,20}$/);
    assert.match(parsed.content, /^[A-Za-z ]{3,20}$/);
    const inline = (await post({ ...think, reasoning_format: 'inline' })).body.choices[0].message;
    assert.equal(inline.content, `<think>${parsed.reasoning_content}</think>${parsed.content}`);
    assert.equal(inline.reasoning_content, undefined);
    const streamed = await fetch(`${server.url}/v1/chat/completions`, {
      method: 'POST', headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'default', messages: [{ role: 'user', content: 'Is the sky blue?' }], temperature: 0, stream: true, reasoning_format: 'parsed', ...think }),
    }).then((r) => r.text());
    const deltas = streamed.split('\n\n').filter((e) => e.startsWith('data: {')).map((e) => JSON.parse(e.slice(6)).choices[0]?.delta ?? {});
    assert.equal(deltas.map((d) => d.reasoning_content ?? '').join(''), parsed.reasoning_content);
    assert.equal(deltas.map((d) => d.content ?? '').join(''), parsed.content);
    const bad = await post({ reasoning_format: 'sometimes' });
    assert.equal(bad.status, 400);
    assert.equal(bad.body.error.param, 'reasoning_format');
  });

  test('logit_bias bans and forces tokens', async () => {
    const ask = async (bias: Record<string, number>) =>
      (await client.completions.create({ model: 'default', prompt: 'The capital of France is', max_tokens: 1, temperature: 0, logit_bias: bias })).choices[0].text;
    const token = async (text: string) => (await engine.tokenize({ model: 'default', text })).tokens;
    const plain = await ask({});
    const [top] = await token(plain);
    assert.deepEqual(await token(plain), [top], `one token: ${JSON.stringify(plain)}`);
    assert.notEqual(await ask({ [top]: -100 }), plain);
    const [forced] = await token(' London');
    assert.equal(await ask({ [forced]: 100 }), ' London');
  });

  test('bad constraints and tools get a 400 naming the field, and the server keeps serving', async () => {
    const cases: Array<[object, string]> = [
      [{ response_format: { type: 'json_schema', json_schema: { name: 'x', schema: { type: 'object', properties: { a: { type: 'strng' } } } } } }, 'response_format'],
      [{ response_format: { type: 'json_schema', json_schema: { name: 'x', schema: { type: 'string', minLength: 9, maxLength: 2 } } } }, 'response_format'],
      [{ response_format: { type: 'json_schema', json_schema: { name: 'x', schema: { $ref: '#/$defs/missing' } } } }, 'response_format'],
      [{ response_format: { type: 'json_schema', json_schema: { name: 'x', schema: 'not a schema' } } }, 'response_format'],
      [{ structured_outputs: { regex: '[' } }, 'regex'],
      [{ structured_outputs: { grammar: 'start: undefined_rule' } }, 'grammar'],
      [{ tools: [{ type: 'function', function: { name: 'has space' } }] }, 'tools'],
      [{ tools: [{ type: 'function', function: { name: 'f', parameters: 'x' } }] }, 'tools'],
      [{ tools: [{ type: 'function', function: { name: 'f', parameters: { type: 'object', properties: { a: { type: 'nope' } } } } }], tool_choice: 'required' }, 'tools'],
      [{ tools: [{ type: 'function', function: { name: 'f', parameters: { type: 'object', properties: { a: { type: 'nope' } } } } }] }, 'tools'],
      [{ tools: [weatherTool], tool_choice: { type: 'function', function: { name: 'unknown_tool' } } }, 'tool_choice'],
      [{ tools: [weatherTool], tool_choice: 'required', response_format: { type: 'json_object' } }, 'tool_choice'],
      [{ logit_bias: { '99999999': 5 } }, 'logit_bias'],
    ];
    for (const [extra, param] of cases) {
      const r = await fetch(`${server.url}/v1/chat/completions`, {
        method: 'POST', headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ model: 'default', messages: [{ role: 'user', content: 'hi' }], max_tokens: 4, ...extra }),
      });
      const body = await r.json();
      assert.equal(r.status, 400, `${JSON.stringify(extra)}: ${JSON.stringify(body)}`);
      assert.equal(body.error.code, 'InvalidParams');
      assert.equal(body.error.param, param, `${JSON.stringify(extra)}: ${body.error.message}`);
    }
    const ok = await client.chat.completions.create({ model: 'default', messages: [{ role: 'user', content: 'hi' }], max_tokens: 4 });
    assert.ok(ok.choices[0].message.content!.length > 0);
  });

  test('the Vercel AI SDK: generateText with a required tool, and streamText', async () => {
    const { generateText, streamText, tool, jsonSchema } = await import('ai');
    const { createOpenAICompatible } = await import('@ai-sdk/openai-compatible');
    const provider = createOpenAICompatible({ name: 'mlx-serving', baseURL: `${server.url}/v1` });
    const model = provider.chatModel('default');
    const seen: unknown[] = [];
    const r = await generateText({
      model,
      prompt: 'What is the weather in Paris?',
      tools: {
        get_weather: tool({
          description: weatherTool.function.description,
          inputSchema: jsonSchema<{ city: string; unit: string }>(weatherTool.function.parameters as never),
          execute: async (input) => {
            seen.push(input);
            return { temperature: 18 };
          },
        }),
      },
      toolChoice: 'required',
      maxOutputTokens: 80,
      temperature: 0,
    });
    assert.ok(r.toolCalls.length >= 1, JSON.stringify(r.steps.map((s) => s.finishReason)));
    assert.equal(r.toolCalls[0].toolName, 'get_weather');
    assert.equal(seen.length, r.toolCalls.length);
    assert.equal(typeof (seen[0] as { city: unknown }).city, 'string');
    const s = streamText({ model, prompt: 'Say hello.', maxOutputTokens: 16, temperature: 0 });
    let text = '';
    for await (const part of s.textStream) text += part;
    assert.ok(text.length > 0);
    // Streamed tool calls: the SDK assembles our deltas into a call it runs.
    const calls: unknown[] = [];
    const st = streamText({
      model,
      prompt: 'What is the weather in Oslo?',
      tools: { get_weather: tool({ inputSchema: jsonSchema<{ city: string; unit: string }>(weatherTool.function.parameters as never), execute: async (input) => (calls.push(input), { temperature: 3 }) }) },
      toolChoice: 'required',
      maxOutputTokens: 80,
      temperature: 0,
    });
    const streamedCalls = await st.toolCalls;
    assert.equal(streamedCalls.length, calls.length);
    assert.ok(streamedCalls.length >= 1 && streamedCalls[0].toolName === 'get_weather');
    assert.equal(await st.finishReason, 'tool-calls');
  });

  test('LangChain: bindTools and invoke', async () => {
    const { ChatOpenAI } = await import('@langchain/openai');
    const llm = new ChatOpenAI({ model: 'default', apiKey: 'unused', configuration: { baseURL: `${server.url}/v1` }, maxTokens: 80, temperature: 0, maxRetries: 0 });
    const withTools = llm.bindTools([weatherTool], { tool_choice: 'required' });
    const msg = await withTools.invoke('What is the weather in Paris?');
    assert.ok(msg.tool_calls && msg.tool_calls.length >= 1);
    assert.equal(msg.tool_calls[0].name, 'get_weather');
    assert.equal(typeof msg.tool_calls[0].args.city, 'string');
  });

  test('the TypeScript API: responseFormat and toolCall chunks', async () => {
    const out = await engine.generate({
      model: 'default', messages: [{ role: 'user', content: 'A color as JSON.' }], maxTokens: 60,
      responseFormat: { type: 'json_schema', schema: { type: 'object', properties: { color: { enum: ['red', 'green', 'blue'] } }, required: ['color'], additionalProperties: false } },
    });
    assert.ok(['red', 'green', 'blue'].includes(JSON.parse(out).color));
    const chunks = [];
    for await (const c of engine.createGenerator({
      model: 'default', messages: [{ role: 'user', content: 'Weather in Rome?' }], maxTokens: 80,
      tools: [weatherTool], toolChoice: 'required', parallelToolCalls: false,
    })) chunks.push(c);
    const call = chunks.find((c) => c.type === 'toolCall');
    const meta = chunks.at(-1);
    assert.ok(call && call.type === 'toolCall' && call.name === 'get_weather');
    assert.ok(meta?.type === 'metadata' && meta.stats.finishReason === 'tool_calls');
    assert.deepEqual(meta.toolCalls?.map((c) => c.id), [call.id]);
    await assert.rejects(engine.generate({ model: 'default', prompt: 'x', regex: '(' }), { code: 'InvalidParams' });
    await assert.rejects(engine.generate({ model: 'default', prompt: 'x', tools: [weatherTool], toolChoice: 'sometimes' as never }), { code: 'InvalidParams' });
  });
});
