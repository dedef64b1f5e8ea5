/**
 * Every test file's time limit. `npm test` preloads this module into each test file's process
 * (`node --test --import`); worker threads (our emulated domains) inherit the flag and ignore it.
 * A file still running after BLKIF_TEST_FILE_TIMEOUT seconds (default 300) — a hang, whatever
 * holds it — says so in one line and exits 1, which also ends the children it started
 * (test/support/children.ts). The timer is unref'd: it never keeps a finished file alive.
 */
import { isMainThread } from 'node:worker_threads';

if (isMainThread) {
  const file0 = process.argv[1] ?? '';
  // A real-Xen file boots Xen and Linux under QEMU's TCG (test/realxen/rig.ts): minutes, and more
  // on a busy machine; its own boot limits (bootXen) end a hang before this does.
  const raw = process.env.BLKIF_TEST_FILE_TIMEOUT ?? (file0.includes('/realxen/') ? '600' : '300');
  const seconds = Number(raw);
  if (!(seconds > 0)) throw new Error(`BLKIF_TEST_FILE_TIMEOUT=${raw}: a number of seconds, please`);
  const file = process.argv[1] ?? 'test file';
  setTimeout(() => {
    process.stderr.write(`${file}: still running after ${seconds} s (BLKIF_TEST_FILE_TIMEOUT): ended\n`);
    process.exit(1);
  }, seconds * 1000).unref();
}
