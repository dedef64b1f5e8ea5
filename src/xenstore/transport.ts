// What XenstoreClient needs from a transport: a duplex byte stream.
export interface XenstoreTransport {
  send(bytes: Uint8Array): void;
  /** Registers the receiver of incoming bytes (one per transport). */
  onData(cb: (chunk: Uint8Array) => void): void;
  /** Registers the handler for loss of the connection. */
  onClose(cb: (reason: Error) => void): void;
  close(): void;
}
