/**
 * Names a domain's threads as `ps -L`, `top -H` and /proc/PID/task/TID/comm show them, so that a
 * thread's CPU time can be told apart from the others' (every thread of Node is "node" otherwise).
 */
import { writeFileSync } from 'node:fs';

/** Linux keeps 15 bytes of a thread's name plus the NUL (TASK_COMM_LEN, include/linux/sched.h). */
export const TASK_COMM_LEN = 16;

/** The domain's name for its own thread; `name/N` (the name cut to fit) for vCPU N's thread. */
export function threadComm(domain: string, vcpu: number): string {
  const suffix = vcpu === 0 ? '' : `/${vcpu}`;
  return domain.slice(0, TASK_COMM_LEN - 1 - suffix.length) + suffix;
}

/** Renames the calling thread; elsewhere than Linux (no /proc/thread-self) threads keep their name. */
export function nameThread(name: string): void {
  try {
    writeFileSync('/proc/thread-self/comm', name.slice(0, TASK_COMM_LEN - 1));
  } catch {
    // not Linux: the names only serve ps and top
  }
}
