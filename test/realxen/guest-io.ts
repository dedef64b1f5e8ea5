/**
 * What a Linux guest does to its disk on the real-Xen rig, and how the test checks it from this
 * side: the guest reports every checksum it computed (`RESULT ...` lines on its console), the
 * test recomputes them from the image file the backend served. Both directions are checked: the
 * guest reads what this side wrote (the image's checksum) and this side reads what the guest wrote.
 */
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';

/** The image a guest gets: random bytes, so a misplaced sector cannot go unseen. */
export const IMAGE_BYTES = 8 << 20;

export function makeImage(path: string, bytes = IMAGE_BYTES): string {
  const data = randomBytes(bytes);
  writeFileSync(path, data);
  return sha256(data);
}

export function sha256(data: Uint8Array): string {
  return createHash('sha256').update(data).digest('hex');
}

/**
 * The guest's scenario (busybox sh): load blkfront with `blkfrontArgs`, wait for xvda, read it
 * whole, write 2 MiB at 2 MiB in 1 MiB direct writes (then fsync: a flush), 32 random 4 KiB
 * direct writes in the last 4 MiB, then read the 2 MiB back past the page cache; optionally
 * discard the first MiB and read it back.
 */
export function guestIoScript(blkfrontArgs = '', o: { discard?: boolean; detach?: boolean; readOnlyXvdb?: boolean } = {}): string {
  return `set -u
insmod /modules/xen-blkfront.ko ${blkfrontArgs} || echo "RESULT error insmod"
i=0; while [ ! -b /dev/xvda ]; do i=$((i+1)); if [ $i -gt 600 ]; then echo "RESULT error no-xvda"; exit 1; fi; sleep 0.1; done
echo "RESULT size $(blockdev --getsize64 /dev/xvda)"
for p in max_indirect_segments max_ring_page_order max_queues feature_persistent; do
  [ -r /sys/module/xen_blkfront/parameters/$p ] && echo "RESULT param $p $(cat /sys/module/xen_blkfront/parameters/$p)"
done
echo "RESULT read-all $(dd if=/dev/xvda bs=1M iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
dd if=/dev/urandom of=/tmp/seq bs=1M count=2 2>/dev/null
dd if=/tmp/seq of=/dev/xvda bs=1M seek=2 oflag=direct conv=notrunc,fsync 2>/dev/null || echo "RESULT error seq-write"
echo "RESULT seq-write 2097152 $(sha256sum < /tmp/seq | cut -d' ' -f1)"
n=0
while [ $n -lt 32 ]; do
  off=$(( 1024 + RANDOM % 1024 ))
  dd if=/dev/urandom of=/tmp/b bs=4096 count=1 2>/dev/null
  dd if=/tmp/b of=/dev/xvda bs=4096 seek=$off oflag=direct conv=notrunc 2>/dev/null || echo "RESULT error rand-write"
  echo "RESULT rand-write $((off*4096)) $(sha256sum < /tmp/b | cut -d' ' -f1)"
  n=$((n+1))
done
sync
echo "RESULT seq-read 2097152 $(dd if=/dev/xvda bs=1M skip=2 count=2 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
${o.discard === true ? `blkdiscard -o 0 -l 1048576 /dev/xvda || echo "RESULT error discard"
echo "RESULT discard-read $(dd if=/dev/xvda bs=1M count=1 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
` : ''}${o.readOnlyXvdb === true ? guestReadOnlyPart('xvdb') : ''}echo "RESULT done"
${o.detach === true ? `# dom0 detaches the disk now (xl block-detach): wait for it to go.
i=0; while [ -b /dev/xvda ]; do i=$((i+1)); if [ $i -gt 600 ]; then echo "RESULT error still-attached"; exit 1; fi; sleep 0.1; done
echo "RESULT detached"
` : ''}`;
}

/**
 * Checks a guest's report against the image: no error, the whole-disk read matched what this
 * side wrote, the sequential and random writes are in the file, the read-back matched.
 */
export function checkGuestIo(report: readonly [string, string[]][], imagePath: string, imageSha: string): void {
  const errors = report.filter(([k]) => k === 'error');
  assert.deepEqual(errors, [], 'the guest reported errors');
  assert.ok(report.some(([k]) => k === 'done'), 'the guest finished its scenario');
  const one = (key: string) => {
    const r = report.find(([k]) => k === key);
    assert.ok(r !== undefined, `the guest reported ${key}`);
    return r[1];
  };
  assert.equal(Number(one('size')[0]), IMAGE_BYTES, 'the guest sees the image size');
  assert.equal(one('read-all')[0], imageSha, 'the guest read the image as written here');
  const image = readFileSync(imagePath);
  const [seqOff, seqSha] = one('seq-write');
  assert.equal(sha256(image.subarray(Number(seqOff), Number(seqOff) + (2 << 20))), seqSha, "the guest's 1 MiB writes are in the image");
  assert.equal(one('seq-read')[1], seqSha, 'the guest read its 1 MiB writes back');
  const last = new Map<number, string>();
  for (const [k, v] of report) if (k === 'rand-write') last.set(Number(v[0]), v[1]!);
  assert.ok(last.size > 0, 'random writes reported');
  for (const [off, sha] of last) assert.equal(sha256(image.subarray(off, off + 4096)), sha, `the guest's 4 KiB write at ${off} is in the image`);
  const discardRead = report.find(([k]) => k === 'discard-read');
  if (discardRead !== undefined) {
    const zeroes = sha256(Buffer.alloc(1 << 20));
    assert.equal(discardRead[1][0], zeroes, 'the guest reads its discarded MiB as zeroes');
    assert.equal(sha256(image.subarray(0, 1 << 20)), zeroes, 'the discarded MiB is zeroes in the image');
  }
}

/**
 * The part of a guest's scenario for a read-only VBD `dev` (blkfront already loaded): read it,
 * try to write and discard anyway (its block layer's read-only flag turned off first, so what
 * Linux would send reaches the backend), read again. Keys start with `ro-`.
 */
export function guestReadOnlyPart(dev: string): string {
  return `i=0; while [ ! -b /dev/${dev} ]; do i=$((i+1)); if [ $i -gt 600 ]; then echo "RESULT error no-${dev}"; exit 1; fi; sleep 0.1; done
echo "RESULT ro-size $(blockdev --getsize64 /dev/${dev})"
echo "RESULT ro-flag $(cat /sys/block/${dev}/ro)"
echo "RESULT ro-read-all $(dd if=/dev/${dev} bs=1M iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
blockdev --setrw /dev/${dev}
dd if=/dev/urandom of=/tmp/b bs=4096 count=1 2>/dev/null
if dd if=/tmp/b of=/dev/${dev} bs=4096 seek=16 oflag=direct conv=notrunc 2>/dev/null; then echo "RESULT ro-write accepted"; else echo "RESULT ro-write refused"; fi
if blkdiscard -o 0 -l 65536 /dev/${dev} 2>/dev/null; then echo "RESULT ro-discard accepted"; else echo "RESULT ro-discard refused"; fi
sync
echo "RESULT ro-read-all-after $(dd if=/dev/${dev} bs=1M iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
`;
}
