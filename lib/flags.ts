/**
 * Feature flags at the package root: the decisions an engine with the same
 * flags file makes, for services that never create an engine.
 */
import * as path from 'node:path';

import { callSync } from './errors';
import type { FeatureDecision } from './types';

// eslint-disable-next-line @typescript-eslint/no-require-imports
const native: typeof import('../index.js') = require('../index.js');

export function defaultFeatureFlagsPath(): string {
  return path.join(__dirname, '..', 'config', 'feature-flags.yaml');
}

/** The flags file used when none is named: `FEATURE_FLAGS_PATH`, else the package's own. */
export function featureFlagsFile(): string {
  return process.env.FEATURE_FLAGS_PATH || defaultFeatureFlagsPath();
}

export function toDecision(d: { enabled: boolean; reason: string; bucket?: number | null }): FeatureDecision {
  return { enabled: d.enabled, reason: d.reason as FeatureDecision['reason'], bucket: d.bucket ?? undefined };
}

/**
 * Why a Phase 5 feature (`phase5`, `ttft_pipeline`, `ttft_pipeline.kv_prefetch`, ...) is on or
 * off for a request id, under `featureFlagsFile()` with the `PHASE5_*` environment overrides:
 * the decision an engine with that file makes, for services that never create one. The file is
 * re-read when it changes; a bad edit is reported once as a process warning and the flags in
 * force stay.
 */
export function evaluateFeature(name: string, requestId: string): FeatureDecision {
  const file = featureFlagsFile();
  const d = callSync(() => native.evaluateFeatureInFile(file, name, requestId));
  if (d.reloadError) {
    process.emitWarning(`${d.reloadError} (the flags in force stay)`, { code: 'MLX_SERVING_FLAGS' });
  }
  return toDecision(d);
}

/** Whether a Phase 5 feature is on for a request id (see `evaluateFeature`). */
export function isFeatureEnabled(name: string, requestId: string): boolean {
  return evaluateFeature(name, requestId).enabled;
}
