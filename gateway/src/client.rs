//! Connections to stores that more than one part of the gateway talks to.
//!
//! Owns the connection settings and the connect functions: the etcd source
//! watches through them, the `kv` capability writes through them and the
//! cluster coordinates through them, so none of those borrows another's
//! client. It must not watch, write, retry or read configuration files;
//! callers decide what a connection is for and hand in settings already
//! validated.

pub mod etcd;
