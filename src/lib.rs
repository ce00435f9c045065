//! changecast streams a database's changes to the right users, live.
//!
//! It reads one change feed from the database, decides for every change who may see it from
//! declarative rules, and delivers JSON events over WebSocket and Server-Sent Events to
//! authenticated clients, who resume after a disconnect without losing anything.
//!
//! # Layout
//!
//! The modules follow the data: `source → router → stream → gateway → hub → transport`,
//! with `auth` beside the transports and `server` wiring them together. In one process the
//! stream is in-process; in a cluster it is a NATS JetStream stream every node reads.
//!
//! - [`config`]: the TOML file, parsed strictly; errors name the config path.
//! - [`plan`]: a config compiled and validated as a whole, before anything starts.
//! - [`suggest`]: "did you mean" for misspelt keys, collections and fields.
//! - [`source`]: change feeds behind one trait; [`source::sqlite`] is the embedded default.
//! - [`change`]: the one normalised change type every source produces.
//! - [`route`]: compiled `[[route]]`s that turn a change into deliveries (who gets what).
//! - [`router`]: the routing loop: source batches → routed events → the stream.
//! - [`cluster`]: several nodes over NATS JetStream: the stream, the router lease.
//! - [`gateway`]: the stream → this node's history and connections.
//! - [`hub`]: per-user fan-out, bounded queues, history and resume; events encoded once.
//! - [`transport`]: `/v1/ws`, `/v1/sse` and the operational endpoints.
//! - [`auth`]: JWT verification and user resolution.
//! - [`event`]: the JSON events and close codes of the public contract.
//! - [`server`]: starts the tasks and stops them in order.
//! - [`demo`]: the Mercury demo: schema, seed data, simulator and activity page.
//! - [`init`]: `changecast init`, a commented starter config read from the database.
//! - [`explain`]: why a user did or did not get a change, traced by the router's own code.

pub mod auth;
pub mod change;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod event;
pub mod explain;
pub mod gateway;
pub mod hub;
pub mod init;
pub mod path;
pub mod plan;
pub mod route;
pub mod router;
pub mod server;
pub mod source;
pub mod suggest;
pub mod transport;
