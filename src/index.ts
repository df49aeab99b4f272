/** The `ublk` package. The io_uring layer is also importable on its own as `ublk/uring`. */
export * as uring from './uring/index.js';
export { UblkServer, type ServerOptions } from './ublk/server.js';
export type { AsyncTarget } from './ublk/async-main-thread.js';
export { defineTarget, TargetError, type TargetDefinition, type QueueHandler, type QueueContext, type IoRequest, type DeviceSpec } from './ublk/target.js';
export { UblkControl, UblkError } from './ublk/control.js';
