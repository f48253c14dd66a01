/** Errors of the public API: one class, a stable `code` each. */

export const ERROR_CODES = [
  'InvalidParams',
  'ModelLoadError',
  'ModelNotLoaded',
  'GenerationError',
  'GrammarError',
  'TokenizerError',
  'Timeout',
  'Cancelled',
  'Overloaded',
  'InternalError',
] as const;
export type ErrorCode = (typeof ERROR_CODES)[number];

export class EngineClientError extends Error {
  readonly code: ErrorCode;
  constructor(code: ErrorCode, message: string) {
    super(message);
    this.name = 'EngineClientError';
    this.code = code;
  }
}

/**
 * Errors from the addon carry the engine's stable code in `error.code`;
 * napi's own argument conversion errors carry napi's (`InvalidArg`,
 * `NumberExpected`, `StringExpected`, ...), which are the caller's input
 * problem. Anything else is ours.
 */
export function fromNative(err: unknown): EngineClientError {
  if (err instanceof EngineClientError) return err;
  const message = err instanceof Error ? err.message : String(err);
  const code = err instanceof Error ? (err as { code?: unknown }).code : undefined;
  if (typeof code === 'string' && (ERROR_CODES as readonly string[]).includes(code)) {
    return new EngineClientError(code as ErrorCode, message);
  }
  if (typeof code === 'string' && (code === 'InvalidArg' || code.endsWith('Expected'))) {
    return new EngineClientError('InvalidParams', message);
  }
  return new EngineClientError('InternalError', message);
}

export async function call<T>(f: () => Promise<T> | T): Promise<T> {
  try {
    return await f();
  } catch (e) {
    throw fromNative(e);
  }
}

export function callSync<T>(f: () => T): T {
  try {
    return f();
  } catch (e) {
    throw fromNative(e);
  }
}
