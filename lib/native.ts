/**
 * Native shapes to the public API's: model handles, control events, stream
 * chunks. Names only; the values were checked on the Rust side.
 */
import type { NativeChunk, NativeControlEvent, NativeModelInfo } from '../index.js';

import type { ErrorCode } from './errors';
import type { ControlEvent, DraftPairModel, GenerationStats, GeneratorChunk, ModelHandle } from './types';

export function toHandle(m: NativeModelInfo): ModelHandle {
  return {
    id: m.id,
    path: m.path,
    architecture: m.architecture,
    contextLength: m.contextLength,
    vocabSize: m.vocabSize,
    weightBytes: m.weightBytes,
    decodeWeightBytes: m.decodeWeightBytes,
    kvBytesPerPosition: m.kvBytesPerPosition,
    quantization: m.fileType,
    backend: m.backend as ModelHandle['backend'],
    toolCallFormat: m.toolCallFormat as ModelHandle['toolCallFormat'],
    state: 'ready',
    warmupMs: m.warmupMs,
    ...(m.draftModel ? { draftModel: m.draftModel } : {}),
  };
}

export function pairModel(m: NativeModelInfo): DraftPairModel {
  return { id: m.id, architecture: m.architecture, vocabSize: m.vocabSize, contextLength: m.contextLength, weightBytes: m.weightBytes };
}

export function toControlEvent(e: NativeControlEvent): ControlEvent {
  return {
    source: e.source as ControlEvent['source'],
    atMs: e.atMs,
    kind: e.kind,
    reason: e.reason,
    policy: e.policy ?? undefined,
    severity: (e.severity ?? undefined) as ControlEvent['severity'],
    action: e.action ?? undefined,
    metric: e.metric ?? undefined,
    value: e.value ?? undefined,
    threshold: e.threshold ?? undefined,
    dryRun: e.dryRun ?? undefined,
    percent: e.percent ?? undefined,
    automatic: e.automatic ?? undefined,
  };
}

export function fromChunk(c: NativeChunk): GeneratorChunk {
  switch (c.kind) {
    case 'token':
      return { type: 'token', token: c.text ?? '', tokenId: c.tokenId ?? 0, logprob: c.logprob, ...(c.reasoning ? { reasoning: c.reasoning } : {}) };
    case 'toolCall': {
      const t = c.toolCall!;
      return { type: 'toolCall', index: t.index, id: t.id, name: t.name, argumentsDelta: t.arguments };
    }
    case 'done': {
      const s = c.stats!;
      return {
        type: 'metadata',
        stats: {
          promptTokens: s.promptTokens,
          tokensGenerated: s.tokensGenerated,
          timeToFirstToken: s.timeToFirstToken,
          tokensPerSecond: s.tokensPerSecond,
          totalTime: s.totalTime,
          finishReason: s.finishReason as GenerationStats['finishReason'],
          features: s.features,
        },
      };
    }
    default:
      return { type: 'error', error: { code: (c.errorCode ?? 'InternalError') as ErrorCode, message: c.errorMessage ?? '' } };
  }
}
