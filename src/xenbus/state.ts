/**
 * `enum xenbus_state` of io/xenbus.h and the moves each side of a split driver makes, as blkif.h's
 * "startup" sequence and the xenbus shutdown convention describe them.
 */
export const XenbusStateUnknown = 0;
export const XenbusStateInitialising = 1;
/** Backend only: waiting for the frontend's transport parameters, its own features published. */
export const XenbusStateInitWait = 2;
/** Frontend: transport parameters published. */
export const XenbusStateInitialised = 3;
export const XenbusStateConnected = 4;
/** Being closed due to an error or an unplug event. */
export const XenbusStateClosing = 5;
export const XenbusStateClosed = 6;
export const XenbusStateReconfiguring = 7;
export const XenbusStateReconfigured = 8;

export type XenbusState = 0 | 1 | 2 | 3 | 4 | 5 | 6 | 7 | 8;

export const XENBUS_STATE_NAMES: readonly string[] = [
  'Unknown', 'Initialising', 'InitWait', 'Initialised', 'Connected', 'Closing', 'Closed', 'Reconfiguring', 'Reconfigured',
];

export function xenbusStateName(s: number): string {
  return XENBUS_STATE_NAMES[s] ?? `invalid(${s})`;
}

/** Reads a `state` node's value; `undefined` for anything that is not one of the nine states. */
export function parseXenbusState(v: string | undefined): XenbusState | undefined {
  if (v === undefined || !/^[0-8]$/.test(v.trim())) return undefined;
  return Number(v.trim()) as XenbusState;
}

export type XenbusSide = 'frontend' | 'backend';

/**
 * The states each side may move to from each state (blkif.h startup; either side may start
 * closing at any time; a closed device may be set up again for a reconnect). blkif does not use
 * Reconfiguring/Reconfigured.
 */
const MOVES: Record<XenbusSide, Readonly<Record<number, readonly XenbusState[]>>> = {
  backend: {
    [XenbusStateUnknown]: [XenbusStateInitialising],
    [XenbusStateInitialising]: [XenbusStateInitWait, XenbusStateInitialised, XenbusStateConnected, XenbusStateClosing, XenbusStateClosed],
    [XenbusStateInitWait]: [XenbusStateConnected, XenbusStateClosing, XenbusStateClosed],
    [XenbusStateInitialised]: [XenbusStateConnected, XenbusStateClosing, XenbusStateClosed],
    [XenbusStateConnected]: [XenbusStateConnected, XenbusStateClosing, XenbusStateClosed],
    [XenbusStateClosing]: [XenbusStateClosed],
    [XenbusStateClosed]: [XenbusStateInitialising, XenbusStateInitWait],
  },
  frontend: {
    [XenbusStateUnknown]: [XenbusStateInitialising],
    [XenbusStateInitialising]: [XenbusStateInitialised, XenbusStateConnected, XenbusStateClosing, XenbusStateClosed],
    [XenbusStateInitialised]: [XenbusStateConnected, XenbusStateClosing, XenbusStateClosed],
    [XenbusStateConnected]: [XenbusStateClosing, XenbusStateClosed],
    [XenbusStateClosing]: [XenbusStateClosed],
    [XenbusStateClosed]: [XenbusStateInitialising],
  },
};

/** Whether `side` may switch from `from` to `to` (staying in a state is always allowed: a rewrite). */
export function xenbusMayMove(side: XenbusSide, from: XenbusState, to: XenbusState): boolean {
  return from === to || (MOVES[side][from]?.includes(to) ?? false);
}
