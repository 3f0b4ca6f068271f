// The page's shared state and a tiny event bus. Modules read `state`, change it through `set`,
// and talk to each other through `emit`/`on` instead of importing each other in circles.

export const state = {
  /** `/api/info` as last fetched (null until the first answer). */
  info: null,
  /** A POST /api/jobs is in flight. */
  submitting: false,
  /** Until when (ms since epoch) the queue said it is full. */
  retryUntil: 0,
  /** Whether the server answered the last request / stream. */
  online: true,
  /** The model the next job asks for (the picker's value; null = whatever is loaded). */
  model: null,
};

const listeners = new Map();

/** Subscribes `fn` to `event`; returns the unsubscribe function. */
export function on(event, fn) {
  if (!listeners.has(event)) listeners.set(event, new Set());
  listeners.get(event).add(fn);
  return () => listeners.get(event).delete(fn);
}

export function emit(event, data) {
  for (const fn of [...(listeners.get(event) || [])]) {
    try {
      fn(data);
    } catch (e) {
      console.error(`handler of ${event} failed:`, e);
    }
  }
}

/** Merges `patch` into the state and tells `state` subscribers what changed. */
export function set(patch) {
  const changed = {};
  for (const [k, v] of Object.entries(patch)) {
    if (state[k] !== v) {
      state[k] = v;
      changed[k] = v;
    }
  }
  if (Object.keys(changed).length) emit('state', changed);
}
