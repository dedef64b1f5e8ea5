/**
 * Migration with a real frontend: a Linux 6.1 domU writes its disk in 1 MiB direct writes
 * (Linux's blkfront at 256 indirect segments) through `blkif xen-backend` offering indirect;
 * mid-I/O, `xl save` takes the domain down, the backend is replaced by one offering no indirect,
 * and `xl restore` brings the domain back: Linux's `blkfront_resume`/`blkif_recover` must issue
 * what was in flight again, re-split to 11 segments. The data verifies from both sides, the first
 * backend saw indirect requests, the second none. A control guest is saved and restored onto the
 * same backend.
 *
 * Not part of a plain `npm test`: the boot takes ~220 s under TCG, past the 5 minutes all
 * real-Xen tests share; run it with BLKIF_REALXEN_MIGRATION=1. And the re-split case fails on
 * Debian's 6.1 kernel: its blkfront oopses in __blk_rq_map_sg after the restore (docs/real-xen.md).
 */
import { before, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { makeImage, sha256 } from './guest-io.js';
import { bootXen, CHECKOUT, DOM0_PRELUDE, results, rigImages, workDir, writeDomuRamdisk, writeScript } from './rig.js';

const ROOT = CHECKOUT;
const PASSES = 12;

/** The guest: 8 MiB of random data written over and over at the disk's start, then read back. */
const GUEST = `set -u
insmod /modules/xen-blkfront.ko max_indirect_segments=256 || echo "RESULT error insmod"
i=0; while [ ! -b /dev/xvda ]; do i=$((i+1)); if [ $i -gt 600 ]; then echo "RESULT error no-xvda"; exit 1; fi; sleep 0.1; done
dd if=/dev/urandom of=/tmp/data bs=1M count=8 2>/dev/null
echo "RESULT data $(sha256sum < /tmp/data | cut -d' ' -f1)"
n=0
while [ $n -lt ${PASSES} ]; do
  dd if=/tmp/data of=/dev/xvda bs=1M oflag=direct conv=notrunc 2>/dev/null || echo "RESULT error write-pass-$n"
  n=$((n+1))
  echo "RESULT pass $n"
done
echo "RESULT read-back $(dd if=/dev/xvda bs=1M count=8 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
echo "RESULT done"
`;

const SKIP = process.env.BLKIF_REALXEN_MIGRATION === '1' ? false
  : 'about 220 s of real Xen, past the suite\'s 5-minute budget: BLKIF_REALXEN_MIGRATION=1 runs it (docs/real-xen.md has its outcome)';

let work = '';
let bootError: Error | undefined;
/** Each image's bytes past the guest's data, as written here: unchanged by the guest. */
const rest = new Map<string, string>();

before(async () => {
  if (SKIP !== false) return;
  const img = rigImages();
  work = workDir('migration');
  writeDomuRamdisk(join(work, 'guest.cpio'), GUEST);
  for (const g of ['same', 'resplit']) {
    makeImage(join(work, `${g}.img`));
    rest.set(g, sha256(readFileSync(join(work, `${g}.img`)).subarray(8 << 20)));
    writeScript(join(work, `${g}.cfg`), `type = "pv"
name = "${g}"
kernel = "${img.inputs.vmlinuz}"
ramdisk = "/tmp/work/guest.cpio"
extra = "console=hvc0 loglevel=4"
memory = 128
vcpus = 1
on_poweroff = "destroy"
on_crash = "destroy"
disk = [ "format=raw, vdev=xvda, access=rw, script=${ROOT}/xen/scripts/blkif-vbd, target=/tmp/work/${g}.img" ]
`);
  }
  writeScript(join(work, 'dom0.sh'), `${DOM0_PRELUDE}
start_backend() {
  log=$1; shift
  node ${ROOT}/dist/src/cli/blkif.cjs xen-backend "$@" > /tmp/work/$log.out 2> /tmp/work/$log.log &
  bpid=$!
  wait_for "blkif xen-backend ready" 120 grep -q ready /tmp/work/$log.out || { cat /tmp/work/$log.log; kill $bpid; return 1; }
  echo "RIG: backend $log ready $(date +%s)"
}
# A guest's end: it powered off, or its kernel oopsed (then it is destroyed).
ended() { ! xl list $1 || grep -q -e 'general protection fault' -e 'BUG:' -e 'Oops' /tmp/work/console/guest-$1.log; }
run_until_saved() {
  xl create /tmp/work/$1.cfg > /tmp/work/$1.xl.log 2>&1 || { cat /tmp/work/$1.xl.log; rig_diag; return 1; }
  wait_for "guest $1's third pass" 120 grep -q "RESULT pass 3" /tmp/work/console/guest-$1.log || { rig_diag; return 1; }
  xl save $1 /tmp/$1.save > /tmp/work/$1.save.log 2>&1 || { echo "RIG: xl save $1 failed"; cat /tmp/work/$1.save.log; rig_diag; return 1; }
  echo "RIG: $1 saved $(date +%s)"
}
restore_and_finish() {
  xl restore /tmp/$1.save > /tmp/work/$1.restore.log 2>&1 || { echo "RIG: xl restore $1 failed"; cat /tmp/work/$1.restore.log; rig_diag; return 1; }
  echo "RIG: $1 restored $(date +%s)"
  wait_for "guest $1's end" 150 ended $1 || rig_diag
  xl destroy $1 2>/dev/null
  echo "RIG: $1 ended $(date +%s)"
}
start_backend indirect --max-indirect-segments 256 || exit 96
# Control: saved and restored onto the same backend.
run_until_saved same && restore_and_finish same
# Re-split: restored onto a backend without indirect.
run_until_saved resplit || exit 97
wait_for "the first backend letting go" 30 sh -c "[ \\$(grep -c 'let go' /tmp/work/indirect.log) -ge 3 ]" || rig_diag
kill -TERM $bpid; wait $bpid
start_backend plain --max-indirect-segments 0 || exit 96
restore_and_finish resplit
wait_for "the second backend letting go" 30 grep -q 'let go' /tmp/work/plain.log || rig_diag
kill -TERM $bpid; wait $bpid
`);
  try {
    const run = await bootXen(work, 420_000);
    process.stderr.write(`real Xen rig: migration done ${run.seconds.toFixed(1)} s after QEMU started\n`);
  } catch (e) {
    bootError = e as Error;
  }
}, { timeout: 450_000 });

const read = (f: string) => { try { return readFileSync(join(work, f), 'latin1'); } catch { return ''; } };

/** Counters of each VBD a backend's log shows serving `g`'s image, in order. */
function countersFor(log: string, g: string): Record<string, number>[] {
  const text = read(log);
  const dirs = [...text.matchAll(new RegExp(`^blkif: (\\S+): serving /tmp/work/${g}\\.img`, 'gm'))].map((m) => m[1]!);
  return dirs.map((d) => {
    const m = new RegExp(`^blkif: ${d.replace(/[/.]/g, '\\$&')}: counters (\\{.*\\})`, 'm').exec(text);
    assert.ok(m !== null, `${log}: no counters for ${d}; see ${work}`);
    return JSON.parse(m[1]!) as Record<string, number>;
  });
}

/** The guest wrote, read back and finished; its data is in its image, nothing past it changed. */
function checkGuest(g: string): void {
  if (bootError !== undefined) throw bootError;
  const log = read(`console/guest-${g}.log`);
  const report = results(log);
  const where = `see ${work} (dom0.log, indirect.log, plain.log, console/)`;
  const oops = /^.*(general protection fault|BUG:|Oops).*$/m.exec(log);
  assert.equal(oops, null, `guest ${g}'s kernel: ${oops?.[0]}; ${where}`);
  assert.deepEqual(report.filter(([k]) => k === 'error'), [], `guest ${g} errors; ${where}`);
  assert.ok(report.some(([k]) => k === 'done'), `guest ${g} finished; ${where}`);
  const data = report.find(([k]) => k === 'data')![1][0];
  assert.equal(report.find(([k]) => k === 'read-back')![1][0], data, 'the guest read its data back');
  const image = readFileSync(join(work, `${g}.img`));
  assert.equal(sha256(image.subarray(0, 8 << 20)), data, "the guest's data is in the image");
  assert.equal(sha256(image.subarray(8 << 20)), rest.get(g), 'nothing written past it');
}

test('real Xen: a Linux domU saved mid-I/O and restored onto the same backend (indirect 256): verified', { skip: SKIP }, () => {
  checkGuest('same');
  const c = countersFor('indirect.log', 'same');
  assert.equal(c.length, 2, 'served before the save and after the restore');
  for (const x of c) assert.ok(x.indirect_req > 0, `indirect both times: ${JSON.stringify(c)}`);
});

test('real Xen: a Linux domU saved mid-I/O from a backend with indirect and restored onto one without: re-split, verified', { skip: SKIP }, () => {
  checkGuest('resplit');
  const [a] = countersFor('indirect.log', 'resplit');
  const [b] = countersFor('plain.log', 'resplit');
  assert.ok(a!.indirect_req > 0 && a!.indirect_segments / a!.indirect_req > 11, `the first backend served indirect requests: ${JSON.stringify(a)}`);
  assert.equal(b!.indirect_req, 0, `the second backend saw none: ${JSON.stringify(b)}`);
  assert.ok(b!.wr_req > 0 && b!.segments / (b!.rd_req + b!.wr_req) <= 11, `the second backend served the rest in plain requests: ${JSON.stringify(b)}`);
});

test('the work directory goes when every case passed', { skip: SKIP }, () => {
  checkGuest('same');
  checkGuest('resplit');
  rmSync(work, { recursive: true, force: true });
});
