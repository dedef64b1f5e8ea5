/**
 * A FIFO of received bytes, kept as the chunks they arrived in: appending never copies, and
 * `take` copies each byte out exactly once, however the stream was split.
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
