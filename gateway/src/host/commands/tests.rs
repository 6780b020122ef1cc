//! Tests of the `commands` grant.
