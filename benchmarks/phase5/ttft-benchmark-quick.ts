/**
 * The TTFT benchmark with quick defaults (100 samples, 10 warmup); takes the
 * same flags as ttft-benchmark.ts.
 *
 *   npx tsx benchmarks/phase5/ttft-benchmark-quick.ts
 */
import { main } from './ttft-benchmark';

main({ samples: 100, warmup: 10 }, 'ttft-benchmark-quick').catch((e) => {
  console.error(e);
  process.exit(1);
});
