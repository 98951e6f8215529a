// The official OpenAI Node SDK against `headroom serve`: chat, completion, streaming (with usage), model
// list, and an error. Usage: node openai_sdk.cjs BASE_URL MODEL  (NODE_PATH: where `openai` is installed)
const OpenAI = require('openai');
const assert = require('node:assert/strict');

const [baseURL, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: 'unused', maxRetries: 0 });
const passkey = 'The pass key is 4821930. Remember it. 4821930 is the pass key.\nWhat is the pass key? The pass key is';

async function main() {
  const models = await client.models.list();
  assert.equal(models.data[0].id, model);

  const chat = await client.chat.completions.create({
    model, messages: [{ role: 'user', content: 'Hello' }], max_tokens: 5, temperature: 0 });
  assert.equal(chat.object, 'chat.completion');
  assert.equal(chat.choices[0].message.role, 'assistant');
  assert.equal(typeof chat.choices[0].message.content, 'string');
  assert.equal(chat.usage.completion_tokens, 5);

  const comp = await client.completions.create({ model, prompt: passkey, max_tokens: 10, temperature: 0 });
  assert.ok(comp.choices[0].text.startsWith(' 4821930'), comp.choices[0].text);
  assert.equal(comp.choices[0].finish_reason, 'length');

  // Streaming: the same text as the non-streaming call, the finish reason, and usage in the last chunk.
  const stream = await client.completions.create({
    model, prompt: passkey, max_tokens: 10, temperature: 0, stream: true, stream_options: { include_usage: true } });
  let text = '', finish = null, usage = null;
  for await (const chunk of stream) {
    if (chunk.choices.length) {
      text += chunk.choices[0].text;
      if (chunk.choices[0].finish_reason) finish = chunk.choices[0].finish_reason;
    }
    if (chunk.usage) usage = chunk.usage;
  }
  assert.equal(text, comp.choices[0].text);
  assert.equal(finish, 'length');
  assert.equal(usage.completion_tokens, 10);

  const cs = await client.chat.completions.create({
    model, messages: [{ role: 'user', content: 'Hello' }], max_tokens: 5, temperature: 0, stream: true });
  let ctext = '', role = null;
  for await (const chunk of cs) {
    const d = chunk.choices[0].delta;
    if (d.role) role = d.role;
    ctext += d.content ?? '';
  }
  assert.equal(role, 'assistant');
  assert.equal(ctext, chat.choices[0].message.content);

  await assert.rejects(client.completions.create({ model: 'no-such-model', prompt: 'a' }),
                       (e) => e instanceof OpenAI.APIError && e.status === 404);
  await assert.rejects(client.completions.create({ model, prompt: 'a', max_tokens: 0 }),
                       (e) => e instanceof OpenAI.APIError && e.status === 400);
  console.log('ok');
}

main().catch((e) => { console.error(e); process.exit(1); });
