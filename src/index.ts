/** The `ublk` package. The io_uring layer is also importable on its own as `ublk/uring`. */
export * as uring from './uring/index.js';
