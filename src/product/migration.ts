/**
 * The chaos side of an export: moving its disks to a fresh driver domain with random features
 * while clients keep working (`blkif serve --migrate-every`, SIGUSR2), and saying what changed.
 */
import type { BlkbackOptions } from '../blkback/index.js';
import type { DeviceInfo } from '../blkfront/index.js';

/** Backend features a migration may pick (`randomBackendFeatures`). */
export function randomBackendFeatures(rand: () => number = Math.random): Partial<BlkbackOptions> {
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rand() * xs.length)]!;
  const grantCopy = rand() < 0.2;
  return {
    maxIndirectSegments: pick([0, 32, 256, 4096]),
    maxRingPageOrder: pick([0, 1, 2, 4]),
    maxQueues: pick([1, 2, 4]),
    persistent: !grantCopy && rand() < 0.5,
    grantCopy,
    queueThreads: rand() < 0.5,
  };
}

export function describeChange(a: DeviceInfo, b: DeviceInfo): string {
  const parts: string[] = [];
  const seg = (i: DeviceInfo) => (i.indirect ? String(i.maxSegments) : 'off');
  if (seg(a) !== seg(b)) parts.push(`indirect ${seg(a)} -> ${seg(b)}`);
  if (a.ringPageOrder !== b.ringPageOrder) parts.push(`ring order ${a.ringPageOrder} -> ${b.ringPageOrder}`);
  if (a.queues !== b.queues) parts.push(`queues ${a.queues} -> ${b.queues}`);
  if (a.persistent !== b.persistent) parts.push(`persistent grants ${a.persistent ? 'on' : 'off'} -> ${b.persistent ? 'on' : 'off'}`);
  if (a.flush !== b.flush) parts.push(`flush ${a.flush ? 'on' : 'off'} -> ${b.flush ? 'on' : 'off'}`);
  return parts.length > 0 ? parts.join(', ') : 'same features';
}
