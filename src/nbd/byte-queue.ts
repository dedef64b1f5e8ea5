/**
 * A FIFO of received bytes, kept as the chunks they arrived in: appending never copies, `take`
 * copies each byte out exactly once, however the stream was split, and `takeView` copies only
 * what straddles two chunks.
 */
export class ByteQueue {
  private chunks: Uint8Array[] = [];
  /** Bytes of chunks[0] already consumed. */
  private head = 0;
  private total = 0;

  /** Bytes waiting. */
  get length(): number {
    return this.total;
  }

  push(chunk: Uint8Array): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.total += chunk.length;
  }

  /** Removes and returns the next `n` bytes (a fresh copy); `n` must not exceed `length`. */
  take(n: number): Uint8Array {
    if (n > this.total) throw new RangeError(`take(${n}) with ${this.total} bytes queued`);
    const out = new Uint8Array(n);
    let filled = 0;
    while (filled < n) {
      const chunk = this.chunks[0]!;
      const count = Math.min(chunk.length - this.head, n - filled);
      out.set(chunk.subarray(this.head, this.head + count), filled);
      filled += count;
      this.head += count;
      if (this.head === chunk.length) {
        this.chunks.shift();
        this.head = 0;
      }
    }
    this.total -= n;
    return out;
  }

  /**
   * Removes and returns the next `n` bytes: a view into the chunk that holds them all (no copy,
   * no allocation: a 4 KiB NBD write's payload is most often inside one socket read), else a
   * fresh copy. The view keeps its whole chunk alive; the pushed chunks must not be written to.
   */
  takeView(n: number): Uint8Array {
    const chunk = this.chunks[0];
    if (chunk === undefined || chunk.length - this.head < n) return this.take(n);
    const out = chunk.subarray(this.head, this.head + n);
    this.head += n;
    this.total -= n;
    if (this.head === chunk.length) {
      this.chunks.shift();
      this.head = 0;
    }
    return out;
  }

  /** A copy of the next `n` bytes, left in the queue; `n` must not exceed `length`. */
  peek(n: number): Uint8Array {
    if (n > this.total) throw new RangeError(`peek(${n}) with ${this.total} bytes queued`);
    const out = new Uint8Array(n);
    let filled = 0;
    for (let i = 0; filled < n; i++) {
      const chunk = this.chunks[i]!;
      const from = i === 0 ? this.head : 0;
      const count = Math.min(chunk.length - from, n - filled);
      out.set(chunk.subarray(from, from + count), filled);
      filled += count;
    }
    return out;
  }

  /** Drops everything queued. */
  clear(): void {
    this.chunks = [];
    this.head = 0;
    this.total = 0;
  }
}
