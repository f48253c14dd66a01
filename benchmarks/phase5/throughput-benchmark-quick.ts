/**
 * The throughput benchmark with quick defaults (60 s per phase); takes the
 * same flags as throughput-benchmark.ts.
 *
 *   npx tsx benchmarks/phase5/throughput-benchmark-quick.ts
 */
import { main } from './throughput-benchmark';

main({ rate: 2, durationS: 60 }, 'throughput-benchmark-quick').catch((e) => {
  console.error(e);
  process.exit(1);
});
