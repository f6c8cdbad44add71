'use strict';
// ioredis with its defaults (the INFO ready check included) against HOST PORT: INFO server, SET/GET,
// a pipeline.
// Prints one JSON line: {ready, redisVersion, get, pipeline, errors}; exits 0 when all went through.
const Redis = require('ioredis');

const [host, port] = [process.argv[2], Number(process.argv[3])];
const result = { ready: false, errors: [] };
let finished = false;

function finish(code) {
  if (finished) return;
  finished = true;
  process.stdout.write(JSON.stringify(result) + '\n');
  process.exit(code);
}

setTimeout(() => { result.errors.push('timed out after 15 s'); finish(1); }, 15000).unref();

// No reconnection: a failed ready check ends the client (and the script) instead of retrying forever.
const redis = new Redis({ host, port, connectTimeout: 5000, retryStrategy: () => null });
redis.on('error', (err) => result.errors.push(String(err.message)));
redis.on('end', () => finish(1));
redis.once('ready', async () => {
  result.ready = true;
  try {
    // The ready check keeps nothing of its INFO: ask again for the version.
    const server = await redis.info('server');
    const match = /^redis_version:(.*)$/m.exec(server);
    result.redisVersion = match && match[1].trim();
    await redis.set('ioredis:greeting', 'hello from ioredis');
    result.get = await redis.get('ioredis:greeting');
    const pipeline = redis.pipeline();
    for (let i = 0; i < 50; i++) pipeline.set(`ioredis:${i}`, String(i)).get(`ioredis:${i}`);
    const replies = await pipeline.exec();
    result.pipeline = replies.filter((_, index) => index % 2 === 1).map(([err, value]) => (err ? String(err) : value));
    await redis.quit();
    finish(0);
  } catch (err) {
    result.errors.push(String(err.message));
    finish(1);
  }
});
