/**
 * The main job on the default model: a short streaming chat that prints
 * tokens as they arrive, then TTFT and decode speed.
 *
 *   npm start                       # default model, default question
 *   npx tsx examples/chat.ts "Why is the sky blue?" [model.gguf]
 */
import { createEngine } from '../lib/index';

async function main(): Promise<void> {
  const question = process.argv[2] ?? 'Explain in three sentences why the sky is blue.';
  const model = process.argv[3] ?? 'default';
  const engine = await createEngine();
  const handle = await engine.loadModel({ model });
  const info = await engine.getRuntimeInfo();
  console.log(`model ${handle.id} (${handle.architecture}, ${handle.quantization}, ${(handle.weightBytes / 2 ** 20).toFixed(0)} MiB) on ${info.backend}/${info.isa} x${info.threads}\n`);
  console.log(`> ${question}\n`);
  const controller = new AbortController();
  process.once('SIGINT', () => controller.abort());
  for await (const chunk of engine.createGenerator(
    { model: handle.id, messages: [{ role: 'user', content: question }], maxTokens: 200 },
    { signal: controller.signal },
  )) {
    if (chunk.type === 'token') process.stdout.write(chunk.token);
    else if (chunk.type === 'metadata') {
      const s = chunk.stats;
      console.log(
        `\n\n${s.promptTokens} prompt tokens, ${s.tokensGenerated} generated (${s.finishReason}); ` +
          `TTFT ${s.timeToFirstToken.toFixed(1)} ms, ${s.tokensPerSecond.toFixed(1)} tok/s`,
      );
    } else {
      console.error(`\n[${chunk.error.code}] ${chunk.error.message}`);
      process.exitCode = 1;
    }
  }
  await engine.shutdown();
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
