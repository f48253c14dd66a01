/** What the llama.cpp parity tests share: llama.cpp's own greedy choices and how sure it was. */

/**
 * llama.cpp's greedy tokens after `prefix` (evaluated as given, no BOS added),
 * each with its top-2 margin in nats; `context` is a node-llama-cpp context.
 */
export async function llamaCppSteps(context: any, prefix: number[], n: number): Promise<{ token: number; margin: number }[]> {
  const seq = context.getSequence();
  const steps: { token: number; margin: number }[] = [];
  for await (const out of seq.evaluateWithMetadata(prefix, { probabilities: true }, { temperature: 0 })) {
    const [p1, p2] = [...(out.probabilities as Map<number, number>).values()].sort((a, b) => b - a);
    steps.push({ token: out.token, margin: Math.log(p1) - Math.log(p2 ?? 1e-30) });
    if (steps.length >= n) break;
  }
  seq.dispose();
  return steps;
}
