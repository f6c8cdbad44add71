'use strict';
// BullMQ against HOST PORT with PREFIX (a hash tag, as BullMQ asks on a cluster): a Queue adds COUNT
// jobs, a Worker squares them, QueueEvents reports each `completed`. Prints one JSON line:
// {processed, completed, jobIds, counts, workers, errors}; exits 0 when every job completed in time.
const { Queue, QueueEvents, Worker } = require('bullmq');

const [host, port, prefix, count] = [process.argv[2], Number(process.argv[3]), process.argv[4], Number(process.argv[5])];
const name = 'compat';
const connection = { host, port, connectTimeout: 5000, maxRetriesPerRequest: null };
const result = { processed: [], completed: {}, jobIds: [], errors: [] };
const closers = [];
let finished = false;

async function finish(code) {
  if (finished) return;
  finished = true;
  // Closing waits for the server; a proxy that never answers must not keep the script alive.
  await Promise.race([Promise.allSettled(closers.map((closer) => closer.close())),
                      new Promise((resolve) => setTimeout(resolve, 3000))]);
  process.stdout.write(JSON.stringify(result) + '\n');
  process.exit(code);
}

setTimeout(() => { result.errors.push('timed out after 20 s'); finish(1); }, 20000).unref();

async function main() {
  const queueEvents = new QueueEvents(name, { connection, prefix, lastEventId: '0-0' });
  closers.push(queueEvents);
  queueEvents.on('error', (err) => result.errors.push(`queueEvents: ${err.message}`));
  const allCompleted = new Promise((resolve) => {
    queueEvents.on('completed', ({ jobId, returnvalue }) => {
      result.completed[jobId] = returnvalue;
      if (Object.keys(result.completed).length >= count) resolve();
    });
  });
  await queueEvents.waitUntilReady();

  const worker = new Worker(name, async (job) => {
    result.processed.push(job.data.n);
    return job.data.n * job.data.n;
  }, { connection, prefix, concurrency: 1 });
  closers.unshift(worker);
  worker.on('error', (err) => result.errors.push(`worker: ${err.message}`));
  worker.on('failed', (job, err) => result.errors.push(`job ${job && job.id} failed: ${err.message}`));
  await worker.waitUntilReady();

  const queue = new Queue(name, { connection, prefix });
  closers.push(queue);
  queue.on('error', (err) => result.errors.push(`queue: ${err.message}`));
  for (let n = 0; n < count; n++) {
    const job = await queue.add('square', { n });
    result.jobIds.push(job.id);
  }
  await allCompleted;
  result.counts = await queue.getJobCounts('completed', 'failed', 'waiting', 'active', 'delayed');
  result.workers = (await queue.getWorkers()).length;
  await finish(0);
}

main().catch((err) => { result.errors.push(String(err && err.stack || err)); finish(1); });
