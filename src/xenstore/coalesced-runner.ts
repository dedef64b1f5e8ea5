/**
 * Runs a transport's `step` on each event, never re-entrantly: an event that arrives while a step
 * runs (a kick from the peer, or a send from our own callback) folds into one more pass.
 */
export class CoalescedRunner {
  private again = false;
  /** True while a step runs. */
  busy = false;

  constructor(
    private readonly step: () => void,
    private readonly stopped: () => boolean,
  ) {}

  run(): void {
    if (this.stopped()) return;
    if (this.busy) {
      this.again = true;
      return;
    }
    this.busy = true;
    try {
      do {
        this.again = false;
        this.step();
      } while (this.again && !this.stopped());
    } finally {
      this.busy = false;
    }
  }
}
