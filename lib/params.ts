/**
 * What only JavaScript can check (types, key names napi would ignore) and
 * the conversion of generation params to the native shape. Every rule about
 * the values is the engine's (`crates/engine/src/request.rs`).
 */
import type { NativeGenerateParams } from '../index.js';
import { EngineClientError, type ErrorCode } from './errors';
import type { ChatMessage, GeneratorParams } from './types';

/**
 * A whole number in `[min, max]`, or undefined. napi would otherwise wrap or
 * truncate it on the way to Rust (-1 as 4294967295, 1.5 as 1).
 */
export function whole(name: string, v: unknown, min: number, max: number): number | undefined {
  if (v === undefined) return undefined;
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) {
    throw new EngineClientError('InvalidParams', `${name} must be an integer from ${min} to ${max}, got ${typeof v === 'number' ? v : typeof v}`);
  }
  return v;
}

/** Token ids as napi passes them (u32); the engine checks them against the vocabulary. */
export function tokenIds(name: string, v: unknown): number[] | undefined {
  if (v === undefined) return undefined;
  if (!Array.isArray(v)) throw new EngineClientError('InvalidParams', `${name} must be an array of token ids`);
  return v.map((t, i) => whole(`${name}[${i}]`, t, 0, 2 ** 32 - 1)!);
}

/** How an aborted signal ends a stream: `AbortSignal.timeout()` is a timeout. */
export function abortError(signal: AbortSignal): { code: ErrorCode; message: string } {
  const reason = signal.reason as { name?: unknown } | undefined;
  return reason?.name === 'TimeoutError'
    ? { code: 'Timeout', message: 'request timed out (its AbortSignal)' }
    : { code: 'Cancelled', message: 'request cancelled' };
}

const PARAM_KEYS = new Set([
  'model', 'prompt', 'messages', 'maxTokens', 'minTokens', 'temperature', 'topP', 'topK', 'minP', 'repetitionPenalty',
  'presencePenalty', 'frequencyPenalty', 'seed', 'stopSequences', 'stopTokenIds', 'ignoreEos',
  'responseFormat', 'regex', 'grammar', 'tools', 'toolChoice', 'parallelToolCalls', 'logitBias', 'reasoningFormat',
]);
const OPTION_KEYS = new Set(['signal', 'timeoutMs', 'priority', 'cacheSalt', 'requestId', 'onToken']);

/**
 * Refuses keys that would be ignored (`max_tokens`, a `timeoutMs` among the
 * params): from JavaScript nothing else catches the typo, and the request
 * would run without the limit its caller meant.
 */
export function refuseUnknownKeys(what: 'params' | 'options', o: object): void {
  const [known, other] = what === 'params' ? [PARAM_KEYS, OPTION_KEYS] : [OPTION_KEYS, PARAM_KEYS];
  for (const key of Object.keys(o)) {
    if (known.has(key)) continue;
    const camel = key.replace(/_([a-z])/g, (_, c: string) => c.toUpperCase());
    const hint = other.has(key)
      ? ` (it belongs in the ${what === 'params' ? 'options' : 'params'} argument)`
      : key === 'stop' ? " (did you mean 'stopSequences'?)"
      : camel !== key && known.has(camel) ? ` (did you mean '${camel}'?)` : '';
    throw new EngineClientError('InvalidParams', `unknown ${what === 'params' ? 'parameter' : 'option'} '${key}'${hint}`);
  }
}

export function toNativeParams(p: GeneratorParams): NativeGenerateParams {
  if (p === null || typeof p !== 'object') {
    throw new EngineClientError('InvalidParams', 'params must be an object');
  }
  refuseUnknownKeys('params', p);
  if (typeof p.model !== 'string') {
    throw new EngineClientError('InvalidParams', 'model must be a string');
  }
  const out: NativeGenerateParams = {
    model: p.model,
    maxTokens: p.maxTokens,
    minTokens: p.minTokens,
    temperature: p.temperature,
    topP: p.topP,
    topK: p.topK,
    minP: p.minP,
    repetitionPenalty: p.repetitionPenalty,
    presencePenalty: p.presencePenalty,
    frequencyPenalty: p.frequencyPenalty,
    seed: p.seed,
    stopSequences: p.stopSequences,
    stopTokenIds: p.stopTokenIds,
    ignoreEos: p.ignoreEos,
    responseFormat: p.responseFormat,
    regex: p.regex,
    grammar: p.grammar,
    tools: p.tools,
    toolChoice: p.toolChoice,
    parallelToolCalls: p.parallelToolCalls,
    logitBias: p.logitBias,
    reasoningFormat: p.reasoningFormat,
  };
  if (typeof p.prompt === 'string') out.prompt = p.prompt;
  else if (p.prompt !== undefined) {
    if (!p.prompt || !Array.isArray(p.prompt.tokens)) {
      throw new EngineClientError('InvalidParams', 'prompt must be a string or {tokens: number[]}');
    }
    out.promptTokens = p.prompt.tokens;
  }
  if (p.messages !== undefined) {
    const ok = (m: ChatMessage) => typeof m?.role === 'string' && (typeof m.content === 'string' || (m.content == null && Array.isArray(m.toolCalls)));
    if (!Array.isArray(p.messages) || !p.messages.every(ok)) {
      throw new EngineClientError('InvalidParams', 'messages must be an array of {role: string, content: string}');
    }
    out.messages = p.messages.map((m) => ({
      role: m.role,
      content: m.content ?? '',
      toolCalls: m.toolCalls,
      toolCallId: m.toolCallId,
      name: m.name,
    }));
  }
  return out;
}
