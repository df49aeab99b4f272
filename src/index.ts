/**
 * The `ublk` package: a ublk server and the API for writing block devices in TypeScript.
 *
 * Stable (semantic versioning, see the README's "Stability"):
 * - async targets: {@link defineAsyncTarget}, {@link AsyncHandlers}, {@link AsyncQueueInfo},
 *   {@link errorResult}, {@link parseLongOptions}, {@link parseSize};
 * - ring-native targets: {@link defineTarget}, {@link TargetDefinition}, {@link QueueHandler},
 *   {@link QueueContext}, {@link QueueInfo}, {@link IoRequest}, {@link DeviceSpec}, {@link TargetError};
 * - {@link UblkServer}`.start/stop` with the options documented as stable in {@link ServerOptions};
 * - `ublk/testing` (withDevice) and the CLI's `--json` output.
 * The io_uring layer is importable on its own as `ublk/uring` (not yet declared stable).
 */
import { parseSize as parseSizeOption } from './targets/options.js';

export * as uring from './uring/index.js';
export { UblkServer, type ServerOptions } from './ublk/server.js';
export type { AsyncTarget } from './ublk/async-main-thread.js';
export {
  defineAsyncTarget, errorResult, parseLongOptions,
  type AsyncHandlers, type AsyncQueueInfo, type AsyncTargetDefinition, type AnyTargetDefinition,
} from './ublk/async-target.js';
export {
  defineTarget, TargetError,
  type TargetDefinition, type QueueHandler, type QueueContext, type QueueInfo, type IoRequest, type DeviceSpec,
} from './ublk/target.js';
export { UblkControl, UblkError } from './ublk/control.js';

/**
 * `4096`, `64K`, `512M`, `1G`, `2T` (binary units) or a number, as bytes: the sizes a target's
 * options take. Throws an error naming `option` for anything else.
 */
export function parseSize(value: string | number, option = 'size'): number {
  return typeof value === 'number' ? value : parseSizeOption(value, option);
}
