//! changecast streams a database's changes to the right users, live.
//!
//! It reads one change feed from the database, decides for every change who may see it from
//! declarative rules, and delivers JSON events over WebSocket and Server-Sent Events to
//! authenticated clients, who resume after a disconnect without losing anything.
//!
//! # Layout
//!
//! The modules follow the data: `source → change → route → hub → transport`, with `auth`
//! beside the transports and `server` wiring them together.
//!
//! - [`config`]: the TOML file, parsed strictly; errors name the config path.
//! - [`plan`]: a config compiled and validated as a whole, before anything starts.
//! - [`source`]: change feeds behind one trait; [`source::sqlite`] is the embedded default.
//! - [`change`]: the one normalised change type every source produces.
//! - [`route`]: compiled `[[route]]`s that turn a change into deliveries (who gets what).
//! - [`hub`]: per-user fan-out, bounded queues, history and resume; events encoded once.
//! - [`transport`]: `/v1/ws`, `/v1/sse` and the operational endpoints.
//! - [`auth`]: JWT verification and user resolution.
//! - [`event`]: the JSON events and close codes of the public contract.
//! - [`server`]: starts the tasks and stops them in order.
//! - [`demo`]: the Mercury demo: schema, seed data, simulator and activity page.

pub mod auth;
pub mod change;
pub mod config;
pub mod demo;
pub mod event;
pub mod hub;
pub mod path;
pub mod plan;
pub mod route;
pub mod server;
pub mod source;
pub mod transport;
