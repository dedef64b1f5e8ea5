export const VERSION = "0.1.0";
export * as abi from "./abi/index.js";
export * as ring from "./ring/index.js";
