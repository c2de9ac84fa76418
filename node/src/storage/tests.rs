//! Tests of DiskStorage.
